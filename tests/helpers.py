"""Small stand-ins the tests share: random images and captions, parameter snapshots."""

import torch

from textimg.text import TextEncoding


def images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images (batch, 3, size, size) in [-1, 1]."""
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def random_text(batch: int, dim: int = 32, seed: int = 0) -> TextEncoding:
    """A random TextEncoding of 5 real tokens per caption (dim 32: tiny-bert's size)."""
    g = torch.Generator().manual_seed(seed)
    return TextEncoding(torch.randn(batch, 5, dim, generator=g), torch.ones(batch, 5, dtype=torch.bool),
                        torch.randn(batch, dim, generator=g))


def snapshot(module: torch.nn.Module) -> dict:
    """A copy of a module's state dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    """Whether two snapshots hold the same keys and equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
