"""Stage 4's critics (notebook 04_adversarial_training): the discriminators and DiffAugment.

A discriminator D reads an image (and here its caption) and outputs a *logit* l; D(x) = sigmoid(l)
is its belief that x is a real image that matches the caption. Each piece is from a paper:

- *Matching-aware D* (GAN-CLS, Reed et al. 2016, "Generative Adversarial Text to Image
  Synthesis"): D scores an image *with* a caption, and :meth:`Discriminator.forward` also scores
  the same real images against mismatched captions, which the loss counts as fake (see
  ``textimg.gan``): D must check that image and text agree, not only that the image looks real.
- *Projection conditioning* (Miyato & Koyama 2018, "cGANs with Projection Discriminator"):
  logit = psi(phi(x)) + <W c, phi(x)>, with phi(x) the image features and c the pooled caption vector.
- *An attribute head* (AC-GAN, Odena et al. 2017), optional: D also names each image's shape,
  colour, size and position, and G is trained so that D names on its fakes what the caption asks.
- *Spectral normalisation* (Miyato et al. 2018): every weight divided by its largest singular
  value, so each layer is 1-Lipschitz and D cannot become arbitrarily sharp.
- *PatchGAN* (Isola et al. 2017; VQGAN, Esser et al. 2021): one logit per overlapping patch, for
  the 64x64 refiner's texture.
- *DiffAugment* (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"):
  the same random translation and colour changes for real and fake images before D, differentiable,
  so G's gradient passes through them; D cannot memorise a small dataset.

Reading order: the configs, DOutput, Discriminator, PatchDiscriminator, DiffAugment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from textimg.config import PresetConfig
from textimg.text import TextEncoding
from textimg.utils import count_parameters

# -----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DiscriminatorConfig(PresetConfig):
    text_dim: int = 384  # size of the pooled caption vector (384 MiniLM, 32 tiny-bert)
    channels: int = 32  # base width: the six convs have ch, ch, 2ch, 2ch, 4ch, 4ch channels (SNGAN's CNN)
    feature_dim: int = 128  # size of phi(x), the features the caption is projected onto
    spectral_norm: bool = True  # spectral normalisation of every layer (the projection's W too)
    image_size: int = 32  # input side (the generator's output; the only size supported)
    num_classes: tuple = ()  # AC-GAN head: classes per attribute, e.g. (6, 8, 2, 9); () for none
    minibatch_std: bool = False  # append the batch's feature spread at 4x4 (ProGAN): D can see too little variety

    SIZES = {
        "quick": dict(channels=8, feature_dim=32),  # ~56k parameters (45k with tiny-bert's 32-d text)
        "cpu": dict(channels=32, feature_dim=128),  # ~0.75M
        "gpu": dict(channels=64, feature_dim=256),  # ~2.9M
    }

    def __post_init__(self):
        if self.image_size != 32:
            raise ValueError(f"image_size must be 32 (three stride-2 convs to 4x4), got {self.image_size}")
        self.num_classes = tuple(int(n) for n in self.num_classes)  # a JSON list becomes a tuple again
        if any(n < 2 for n in self.num_classes):
            raise ValueError(f"num_classes needs at least 2 classes per attribute, got {self.num_classes}")


@dataclass
class PatchDiscriminatorConfig(PresetConfig):
    channels: int = 64  # width of the first conv, doubled per stride-2 conv (at most 8x)
    num_layers: int = 3  # stride-2 convs: 64x64 -> 8x8, then two 4x4 stride-1 convs -> 6x6 logits
    spectral_norm: bool = False  # spectral normalisation of every conv

    SIZES = {
        "quick": dict(channels=8, num_layers=2),  # 64x64 -> (B, 1, 14, 14) logits; ~11k parameters
        "cpu": dict(channels=32, num_layers=3),  # 64x64 -> (B, 1, 6, 6), receptive field 70 pixels; ~0.7M
        "gpu": dict(channels=64, num_layers=3),  # ~2.8M
    }

    def __post_init__(self):
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")


# -----------------------------------------------------------------------------------------------
# The discriminators


class DOutput(NamedTuple):
    logits: Tensor  # (B,), or (B, 1, h, w) per patch: "real, and matches its caption"
    wrong_logits: Tensor | None  # (B,): the same images scored against mismatched captions (GAN-CLS)
    attributes: tuple[Tensor, ...] | None  # the AC-GAN head's logits, one (B, num_classes[a]) per attribute a


def _sn(layer: nn.Module, on: bool) -> nn.Module:
    """The layer with spectral normalisation of its weight if ``on`` (a parametrization: the state
    dict holds the raw weight and the power iteration's vectors u, v)."""
    return _spectral_norm(layer) if on else layer


def minibatch_std(h: Tensor, group: int = 4) -> Tensor:
    """ProGAN's minibatch standard deviation (Karras et al. 2018): features (B, C, H, W) -> (B, C + 1, H, W).
    Within each group of ``group`` images, the std of every feature over the group, averaged to one
    number, becomes an extra channel of those images: a batch of near-copies gets a telltale 0."""
    b, c, height, width = h.shape
    g = next(k for k in range(min(group, b), 0, -1) if b % k == 0)  # the largest group size that divides B
    if g == 1:
        return torch.cat([h, h.new_zeros(b, 1, height, width)], dim=1)
    std = h.view(g, b // g, c, height, width).float().var(dim=0, unbiased=False).add(1e-8).sqrt()  # (B/g, C, H, W)
    spread = std.mean(dim=(1, 2, 3)).to(h.dtype).repeat(g)  # (B,): image i gets its group's number
    return torch.cat([h, spread.view(b, 1, 1, 1).expand(b, 1, height, width)], dim=1)


def _pooled(text: TextEncoding | Tensor) -> Tensor:
    """The pooled caption vector (B, text_dim) of a TextEncoding, or the tensor itself."""
    return text.pooled if isinstance(text, TextEncoding) else text


class Discriminator(nn.Module):
    """Matching-aware projection discriminator for 32x32 images:
    (x (B, 3, 32, 32), captions[, mismatched captions]) -> DOutput.

    phi: six convs (3x3, then 4x4 stride 2, three times: 32 -> 16 -> 8 -> 4), LeakyReLU(0.2), then
    a linear layer on the *flattened* 4x4 map (not global pooling: "top left" must survive). No
    normalisation layers: each image's logit depends on that image only (unless ``minibatch_std``,
    which adds one channel that is its group's spread).
    """

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        ch, sn = cfg.channels, cfg.spectral_norm
        shapes = [(3, ch, 3, 1), (ch, ch, 4, 2), (ch, 2 * ch, 3, 1), (2 * ch, 2 * ch, 4, 2),
                  (2 * ch, 4 * ch, 3, 1), (4 * ch, 4 * ch, 4, 2)]  # (in, out, kernel, stride)
        self.convs = nn.ModuleList(_sn(nn.Conv2d(i, o, k, s, padding=1), sn) for i, o, k, s in shapes)
        self.fc = _sn(nn.Linear((4 * ch + cfg.minibatch_std) * 4 * 4, cfg.feature_dim), sn)
        self.psi = _sn(nn.Linear(cfg.feature_dim, 1), sn)
        self.embed = _sn(nn.Linear(cfg.text_dim, cfg.feature_dim, bias=False), sn)  # W
        self.classifier = _sn(nn.Linear(cfg.feature_dim, sum(cfg.num_classes)), sn) if cfg.num_classes else None

    def num_parameters(self) -> int:
        return count_parameters(self)

    def features(self, x: Tensor) -> Tensor:
        """phi(x): images (B, 3, 32, 32) -> features (B, feature_dim)."""
        h = x
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)  # 32x32 ... 4x4
        if self.cfg.minibatch_std:
            h = minibatch_std(h)  # (B, 4ch + 1, 4, 4)
        return F.leaky_relu(self.fc(h.flatten(1)), 0.2)  # (B, feature_dim)

    def project(self, h: Tensor, text: TextEncoding | Tensor) -> Tensor:
        """Logits (B,) = psi(h) + <W c, h> for features h (B, feature_dim) and captions c (a TextEncoding
        or pooled vectors (B, text_dim)). W has no bias, so a zero caption vector leaves psi(h) alone."""
        c = _pooled(text).to(device=h.device, dtype=h.dtype)  # (B, text_dim)
        return self.psi(h).squeeze(1) + (self.embed(c) * h).sum(dim=1)  # (B,)

    def forward(self, x: Tensor, text: TextEncoding | Tensor,
                wrong_text: TextEncoding | Tensor | None = None) -> DOutput:
        """Scores images with their captions and, given ``wrong_text`` (B mismatched captions), the same
        images against those: phi(x) is computed once and projected onto both."""
        h = self.features(x)  # (B, feature_dim)
        wrong = self.project(h, wrong_text) if wrong_text is not None else None  # real image, wrong caption
        attributes = None  # one (B, n_a) logit tensor per attribute a
        if self.classifier is not None:
            attributes = self.classifier(h).split(list(self.cfg.num_classes), dim=1)
        return DOutput(self.project(h, text), wrong, attributes)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, as in VQGAN): images (B, 3, 64, 64) -> DOutput with logits (B, 1, h, w).

    ``num_layers`` 4x4 stride-2 convs (widths channels, 2x, 4x, at most 8x), a 4x4 stride-1 conv and
    a 4x4 stride-1 conv to one channel; LeakyReLU(0.2). Each logit sees a patch (70x70 pixels for
    three layers) and judges whether its texture looks real. Captions are ignored. No normalisation
    layers (VQGAN's BatchNorm would make a patch's logit depend on the rest of the batch).
    """

    def __init__(self, cfg: PatchDiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        sn, n = cfg.spectral_norm, cfg.num_layers
        width = [cfg.channels * min(2 ** i, 8) for i in range(n + 1)]
        layers = [_sn(nn.Conv2d(3, width[0], 4, 2, padding=1), sn)]
        layers += [_sn(nn.Conv2d(width[i - 1], width[i], 4, 2, padding=1), sn) for i in range(1, n)]
        layers += [_sn(nn.Conv2d(width[n - 1], width[n], 4, 1, padding=1), sn)]
        self.convs = nn.ModuleList(layers)
        self.out = _sn(nn.Conv2d(width[n], 1, 4, 1, padding=1), sn)

    def num_parameters(self) -> int:
        return count_parameters(self)

    def forward(self, x: Tensor, text=None, wrong_text=None) -> DOutput:
        h = x  # (B, 3, 64, 64)
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)  # the side halves, num_layers times, then shrinks by 1
        return DOutput(self.out(h), None, None)  # logits (B, 1, h, w): 6x6 for 64x64 inputs and three layers


# -----------------------------------------------------------------------------------------------
# DiffAugment (Zhao et al. 2020): the same random transformations for real and fake images

AUGMENTATIONS = ("color", "translation")


def parse_policy(policy: str) -> set[str]:
    """The augmentations named in a policy such as "color,translation"; raises on an unknown one."""
    kinds = {p.strip() for p in policy.split(",") if p.strip()}
    unknown = sorted(kinds - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown} in policy {policy!r}; choose from {AUGMENTATIONS}")
    return kinds


def _max_shift(side: int) -> int:
    return int(side * 0.125 + 0.5)  # DiffAugment's translation ratio 1/8: 4 pixels at 32, 8 at 64


def augment_params(x: Tensor, policy: str = "color,translation",
                   rng: torch.Generator | None = None) -> dict[str, Tensor]:
    """Draws per-image augmentation parameters for a batch like ``x`` (B, C, H, W), as DiffAugment does.

    "color": brightness + U[-0.5, 0.5), saturation x U[0, 2), contrast x U[0.5, 1.5) (each (B, 1, 1, 1));
    "translation": integer shifts (B, 2) (rows, columns) in [-H/8, H/8], [-W/8, W/8].
    Drawn from ``rng`` (None: the global RNG) on its device, in that order.
    """
    kinds, B, (H, W) = parse_policy(policy), x.shape[0], x.shape[-2:]
    device = rng.device if rng is not None else torch.device("cpu")
    params = {}
    if "color" in kinds:
        params["brightness"] = torch.rand(B, 1, 1, 1, generator=rng, device=device) - 0.5
        params["saturation"] = torch.rand(B, 1, 1, 1, generator=rng, device=device) * 2
        params["contrast"] = torch.rand(B, 1, 1, 1, generator=rng, device=device) + 0.5
    if "translation" in kinds:
        sh, sw = _max_shift(H), _max_shift(W)
        params["shift"] = torch.stack([torch.randint(-sh, sh + 1, (B,), generator=rng, device=device),
                                       torch.randint(-sw, sw + 1, (B,), generator=rng, device=device)], dim=1)
    return params


def apply_augment(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """Applies parameters from :func:`augment_params` to images (B, C, H, W) in [-1, 1]; differentiable.

    The same ``params`` for the real and the fake batch give image i of both the same transformation.
    Translation replicates the border (our backgrounds are flat and dark; zero padding would draw grey bars).
    """
    if "brightness" in params:
        x = x + params["brightness"].to(x)
    if "saturation" in params:
        mean = x.mean(dim=1, keepdim=True)  # (B, 1, H, W): the grey level
        x = (x - mean) * params["saturation"].to(x) + mean
    if "contrast" in params:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        x = (x - mean) * params["contrast"].to(x) + mean
    if "shift" in params:
        x = _translate(x, params["shift"].to(x.device))
    return x


def _translate(x: Tensor, shift: Tensor) -> Tensor:
    """Moves image i by shift[i] = (rows, columns) pixels (down, right), border replicated."""
    B, C, H, W = x.shape
    ph, pw = _max_shift(H), _max_shift(W)
    if shift[:, 0].abs().max() > ph or shift[:, 1].abs().max() > pw:
        raise ValueError(f"shifts {shift.tolist()} exceed the padding ({ph}, {pw}) of {H}x{W} images")
    padded = F.pad(x, (pw, pw, ph, ph), mode="replicate")  # (B, C, H + 2ph, W + 2pw)
    rows = torch.arange(H, device=x.device)[None, :] + ph - shift[:, :1]  # (B, H): output row r reads r - dy
    cols = torch.arange(W, device=x.device)[None, :] + pw - shift[:, 1:]  # (B, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C): advanced indices first
    return out.permute(0, 3, 1, 2)  # (B, C, H, W)


def diff_augment(x: Tensor, policy: str = "color,translation", rng: torch.Generator | None = None) -> Tensor:
    """DiffAugment of one batch: :func:`apply_augment` with fresh :func:`augment_params`."""
    return apply_augment(x, augment_params(x, policy, rng)) if policy else x
