"""Exercises of notebook 02_generation.ipynb (the mechanism: :mod:`textimg.checks`)."""

from __future__ import annotations

import functools
import math

import torch

from ..checks import call, close, exercise, number, tensor

__all__ = ["check_upsampled_size", "check_masked_attention", "check_conditional_norm", "check_mse_minimiser",
           "check_self_attention_params", "MSE_CAPTION"]


@exercise("02.1", 1, "predict the upsampled size", "predict",
          hints=("out = (in - 1) * stride - 2 * padding + kernel_size.",
                 "(16 - 1) * 2 - 2 * 1 + 4."))
def check_upsampled_size(answer: int):
    """The output side of ConvTranspose2d(kernel_size=4, stride=2, padding=1) on a 16x16 map."""
    return answer


@check_upsampled_size.scorer
def _(answer):
    expected = torch.nn.ConvTranspose2d(1, 1, kernel_size=4, stride=2, padding=1)(torch.zeros(1, 1, 16, 16)).shape[-1]
    return int(number(answer)) == expected, f"{expected}x{expected}."


def _attention_inputs():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 5, 4, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 6, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    return q, k, v, mask


@exercise("02.3", 4, "word cross-attention with a padding mask", "build",
          reference=("textimg.generator.WordCrossAttention.forward",
                     "torch.nn.functional.scaled_dot_product_attention"),
          hints=("scores = q @ k^T / sqrt(d) has shape (B, N, T): one score per (region, word).",
                 "masked_fill the padded words' scores with -inf (mask[:, None, :]), softmax over T, then @ v."))
def check_masked_attention(fn):
    """``fn(q (B, N, d), k (B, T, d), v (B, T, C), mask (B, T) bool) -> (B, N, C)``: scaled dot-product
    attention in which padding tokens (mask False) get zero weight."""
    return call(fn, *_attention_inputs())


@check_masked_attention.scorer
def _(got):
    q, k, v, mask = _attention_inputs()
    got = tensor(got, (2, 5, 6))
    if close(got, torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v):
        return False, "padding tokens still get weight: set their scores to -inf before the softmax."
    scores = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~mask[:, None, :], float("-inf"))
    ok = close(got, torch.softmax(scores, dim=-1) @ v)  # WordCrossAttention's core, without its projections
    return ok, "padding gets zero weight." if ok else "the values differ from masked attention."


def _film_inputs():
    from ..generator import ConditionalNorm2d

    with torch.random.fork_rng():
        torch.manual_seed(3)
        layer = ConditionalNorm2d(8, 5)
        torch.nn.init.normal_(layer.film.weight, std=0.5)
        torch.nn.init.normal_(layer.film.bias, std=0.5)
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 5, generator=g), layer


@exercise("02.2", 3, "text-conditioned normalisation (FiLM)", "build",
          reference=("textimg.generator.ConditionalNorm2d.forward",),
          hints=("norm(x) first; film(c) gives 2C numbers per sample: a scale part and a shift part.",
                 "gamma, beta = film(c)[:, :, None, None].chunk(2, dim=1); return norm(x) * (1 + gamma) + beta."))
def check_conditional_norm(fn):
    """``fn(x (B, C, H, W), c (B, cond_dim), norm: nn.GroupNorm, film: nn.Linear) -> (B, C, H, W)``."""
    x, c, layer = _film_inputs()
    return call(fn, x, c, layer.norm, layer.film)


@check_conditional_norm.scorer
def _(got):
    x, c, layer = _film_inputs()
    got = tensor(got, tuple(x.shape))
    with torch.no_grad():
        expected = layer(x, c)
        gamma, beta = layer.film(c)[:, :, None, None].chunk(2, dim=1)
        if close(got, layer.norm(x) * gamma + beta):
            return False, "the scale is (1 + gamma), so a zero-initialised film layer starts as the identity."
    ok = close(got, expected)
    return ok, "each caption scales and shifts every channel." if ok else "the values differ from FiLM."


MSE_CAPTION = "a small red square in the top left"


@functools.lru_cache(maxsize=1)
def _mse_images() -> torch.Tensor:
    from ..data import parse_caption, sample_images

    return sample_images(parse_caption(MSE_CAPTION), n=64, seed=0, image_size=32)


@exercise("02.4", 2, "the image a pixel loss prefers", "value",
          hints=("Write the total squared error to all images as a function of one image x.",
                 "Its derivative is zero at the per-pixel average of the images."))
def check_mse_minimiser(answer):
    """The one image (3, 32, 32) with the smallest mean squared error to all 64 images of
    sample_images(parse_caption(MSE_CAPTION), n=64, seed=0, image_size=32)."""
    return answer


@check_mse_minimiser.scorer
def _(answer):
    images = _mse_images()
    ok = close(tensor(answer, images.shape[1:]), images.mean(0))
    return ok, "the per-pixel mean: the blurry average a pixel loss learns." if ok else "not the minimiser."


@exercise("02.5", 2, "parameters of SelfAttention2d(64)", "value",
          hints=("Three 1x1 convs: query and key map 64 channels to 64 // 8, value maps 64 to 64.",
                 "A 1x1 conv from a to b channels has a*b weights and b biases; add the gate gamma (1)."))
def check_self_attention_params(answer: int):
    """The number of parameters of ``textimg.generator.SelfAttention2d(64)``, worked out by hand."""
    return answer


@check_self_attention_params.scorer
def _(answer):
    from ..generator import SelfAttention2d

    expected = sum(p.numel() for p in SelfAttention2d(64).parameters())
    return int(number(answer)) == expected, f"{expected:,} parameters."
