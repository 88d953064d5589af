"""Pictures: image grids, loss curves and heatmaps, built on torchvision and matplotlib.

Images anywhere in the course are float tensors (B, 3, H, W) in [-1, 1] (the generator's range);
every function here also accepts [0, 1] images with ``value_range=(0, 1)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchvision.utils import make_grid


def to_unit(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Maps images from ``value_range`` to [0, 1] (clamped), on the CPU, detached, float32."""
    lo, hi = value_range
    return ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)


def image_grid(images: torch.Tensor, nrow: int = 8, value_range=(-1.0, 1.0), padding: int = 2) -> np.ndarray:
    """Tiles a batch (B, 3, H, W) into one HxWx3 uint8 array, ``nrow`` images per row."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    grid = make_grid(to_unit(images, value_range), nrow=nrow, padding=padding, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def show_images(images: torch.Tensor, captions: Sequence[str] | None = None, nrow: int = 8,
                value_range=(-1.0, 1.0), title: str | None = None, scale: float = 1.3,
                fontsize: int = 7):
    """Shows a batch of images, each with its caption underneath when ``captions`` is given.

    Returns the matplotlib figure (so a notebook can also save it).
    """
    import matplotlib.pyplot as plt

    n = images.shape[0]
    if captions is not None and len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions")
    if captions is None:
        fig, ax = plt.subplots(figsize=(scale * min(n, nrow), scale * ((n + nrow - 1) // nrow)))
        ax.imshow(image_grid(images, nrow=nrow, value_range=value_range), interpolation="nearest")
        ax.axis("off")
    else:
        rows = (n + nrow - 1) // nrow
        fig, axes = plt.subplots(rows, nrow, figsize=(scale * 1.4 * nrow, scale * 1.9 * rows), squeeze=False)
        unit = to_unit(images, value_range)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k < n:
                ax.imshow(unit[k].permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_title(_wrap(captions[k], 22), fontsize=fontsize)
    if title:
        fig.suptitle(_wrap(title, int(fig.get_figwidth() * 11), max_lines=4))
    fig.tight_layout()
    return fig


def plot_heatmap(matrix, row_labels: Sequence[str], col_labels: Sequence[str] | None = None,
                 title: str | None = None, fmt: str = "{:.2f}", cmap: str = "viridis", annotate: bool = True):
    """A labelled heatmap of a (R, C) matrix, e.g. caption-to-caption cosine similarities."""
    import matplotlib.pyplot as plt

    m = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
    col_labels = row_labels if col_labels is None else col_labels
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * m.shape[1], 1.0 + 0.5 * m.shape[0]))
    im = ax.imshow(m, cmap=cmap)
    ax.set_xticks(range(m.shape[1]), col_labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(m.shape[0]), row_labels, fontsize=8)
    if annotate:
        mid = (m.max() + m.min()) / 2
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=7,
                        color="black" if m[i, j] > mid else "white")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        ax.set_title(_wrap(title, int(fig.get_figwidth() * 10), max_lines=4))
    fig.tight_layout()
    return fig


def plot_curves(curves: dict[str, Sequence[float]], xlabel: str = "step", ylabel: str = "", title: str | None = None,
                logy: bool = False):
    """Plots named curves (e.g. losses) against their index."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, values in curves.items():
        ax.plot(list(values), label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(_wrap(title, 66, max_lines=4))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int, max_lines: int = 3) -> str:
    """``text`` broken into lines of at most ``width`` characters (at spaces; its own line breaks kept),
    at most ``max_lines`` of them."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for w in paragraph.split():
            if line and len(line) + 1 + len(w) > width:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
    return "\n".join(lines[:max_lines])
