"""Stage 4: adversarial training (notebook 04_adversarial_training).

A GAN (Goodfellow et al. 2014, "Generative Adversarial Nets") trains two networks against each
other: a discriminator D that tells real images from generated ones, and the generator G that
tries to fool it. D outputs a *logit* l; D(x) = sigmoid(l) is its belief that x is real.

    x_real, caption ──────────────┐
    z, caption ─► G ─► x_fake ────┴─► DiffAugment ─► D(x, caption) ─► logits ─► d_loss / g_loss

The pieces, each from a paper:

- *Matching-aware D* (GAN-CLS, Reed et al. 2016, "Generative Adversarial Text to Image
  Synthesis"): D also sees the caption, and a *real image with a mismatched caption* counts as
  fake, so D must check that image and text agree, not only that the image looks real.
- *Projection conditioning* (Miyato & Koyama 2018, "cGANs with Projection Discriminator"):
  logit = psi(phi(x)) + <W c, phi(x)>, with phi(x) the image features and c the pooled caption
  vector: the caption enters as an inner product with what D sees.
- *An attribute head* (AC-GAN, Odena et al. 2017, "Conditional Image Synthesis with Auxiliary
  Classifier GANs"), optional (``DiscriminatorConfig.num_classes``): D also classifies each real
  image's attributes (shape, colour, size, position), and G is trained so that D names, on its
  fakes, the attributes the caption asks for. The frozen sentence vector encodes the shape word
  weakly (notebook 01), and in our CPU runs this head is what taught the generator shapes.
- *Spectral normalisation* (Miyato et al. 2018): every weight divided by its largest singular
  value, so D is 1-Lipschitz per layer and cannot become arbitrarily sharp.
- *R1 penalty* (Mescheder et al. 2018, "Which Training Methods for GANs do actually Converge?"):
  gamma / 2 * E ||grad_x D(x)||^2 on real images, so D is flat where the data is.
- *DiffAugment* (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN
  Training"): random translation and colour changes applied to real *and* fake images before D,
  differentiable, so G's gradient passes through them; D cannot memorise a small dataset.
- *Hinge loss* (Lim & Ye 2017; Miyato et al. 2018) as an alternative to the binary cross-entropy.
- *PatchGAN* (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
  Networks"; VQGAN, Esser et al. 2021): a D that gives one logit per overlapping patch, used to
  fine-tune the 64x64 refiner of notebook 03 so its detail looks real, not merely close in L2.

The training loop keeps the lesson visible: :func:`d_step` (on the generated batch *detached*,
so no gradient reaches G) and then :func:`g_step`, two plain functions, each updating one network
and returning a dict of floats. :func:`train_gan` adds checkpoints that are written atomically
and resume *exactly* (models, optimisers, scaler, every RNG, the data order).

Reading order: the configs, the discriminators, the losses, R1, DiffAugment, mismatched
captions, d_step / g_step, train_gan (batches, checkpoints), then the refiner's fine-tuning.
"""

from __future__ import annotations

import contextlib
import datetime
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from textimg.config import PresetConfig
from textimg.generator import Generator
from textimg.metrics import CHECKPOINTS, MANIFEST
from textimg.text import TextEncoding
from textimg.utils import (count_parameters, load_checkpoint, load_pretrained_state, save_checkpoint,
                           save_pretrained_module)
from textimg.vqvae import Refiner, refine, refiner_inputs

CHECKPOINT_NAME = "gan_training.pt"  # the one training-state file train_gan keeps in checkpoint_dir
CHECKPOINT_FORMAT = "textimg.gan_training/1"

# -----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DiscriminatorConfig(PresetConfig):
    text_dim: int = 384  # size of the pooled caption vector (384 MiniLM, 32 tiny-bert)
    channels: int = 32  # base width: the six convs have ch, ch, 2ch, 2ch, 4ch, 4ch channels (SNGAN's CNN)
    feature_dim: int = 128  # size of phi(x), the features the caption is projected onto
    spectral_norm: bool = True  # spectral normalisation of every layer (the projection's W too)
    image_size: int = 32  # input side (the generator's output; the only size supported)
    num_classes: tuple = ()  # AC-GAN head: classes per attribute, e.g. (6, 8, 2, 9) (); () for none

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


@dataclass
class GANTrainConfig(PresetConfig):
    batch_size: int = 32  # real images (and as many fakes) per step
    lr_g: float = 2e-4  # generator's Adam learning rate (DCGAN's 2e-4)
    lr_d: float = 2e-4  # discriminator's Adam learning rate
    beta1: float = 0.5  # Adam's beta1: 0.5, not 0.9, as in DCGAN (less momentum in a moving game)
    beta2: float = 0.999  # Adam's beta2
    d_loss: str = "bce"  # "bce" (the source document's L_D) or "hinge"
    g_loss: str = "nonsaturating"  # "nonsaturating", "saturating" (to see it fail) or "hinge"
    mismatch: bool = True  # GAN-CLS: real image + mismatched caption counts as fake
    r1_gamma: float = 0.0  # weight of the R1 penalty (0: off)
    augment: str = "color,translation"  # DiffAugment policy ("" for none)
    kl_weight: float = 1.0  # conditioning augmentation's KL term in g_loss (StackGAN's lambda = 1)
    aux_weight: float = 1.0  # weight of the AC-GAN attribute loss (used only if D has num_classes)
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 + GradScaler); CPU: fp32
    seed: int = 0  # seeds the data order and every random draw of the loop (not the weights)

    SIZES = {"quick": dict(batch_size=16), "cpu": dict(batch_size=32), "gpu": dict(batch_size=64)}

    def __post_init__(self):
        if self.d_loss not in D_LOSSES:
            raise ValueError(f"d_loss must be one of {sorted(D_LOSSES)}, got {self.d_loss!r}")
        if self.g_loss not in G_LOSSES:
            raise ValueError(f"g_loss must be one of {sorted(G_LOSSES)}, got {self.g_loss!r}")
        _parse_policy(self.augment)  # raises on an unknown augmentation


# -----------------------------------------------------------------------------------------------
# The discriminators


def _sn(layer: nn.Module, on: bool) -> nn.Module:
    """The layer with spectral normalisation of its weight if ``on`` (a parametrization: the state
    dict holds the raw weight and the power iteration's vectors u, v)."""
    return _spectral_norm(layer) if on else layer


def _pooled(text: TextEncoding | Tensor) -> Tensor:
    """The pooled caption vector (B, text_dim) of a TextEncoding, or the tensor itself."""
    return text.pooled if isinstance(text, TextEncoding) else text


class Discriminator(nn.Module):
    """Matching-aware projection discriminator for 32x32 images: (x (B, 3, 32, 32), caption) -> logits (B,).

    phi: six convs (3x3, then 4x4 stride 2, three times: 32 -> 16 -> 8 -> 4), LeakyReLU(0.2), then
    a linear layer on the *flattened* 4x4 map (not global pooling: "top left" must survive),
    giving h = phi(x) (B, feature_dim). The logit is psi(h) + <W c, h>, with c the pooled caption
    vector and W a linear map without bias, so a zero caption vector leaves psi(h) alone.
    No normalisation layers: each image's logit depends on that image only.
    """

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        ch, sn = cfg.channels, cfg.spectral_norm
        shapes = [(3, ch, 3, 1), (ch, ch, 4, 2), (ch, 2 * ch, 3, 1), (2 * ch, 2 * ch, 4, 2),
                  (2 * ch, 4 * ch, 3, 1), (4 * ch, 4 * ch, 4, 2)]  # (in, out, kernel, stride)
        self.convs = nn.ModuleList(_sn(nn.Conv2d(i, o, k, s, padding=1), sn) for i, o, k, s in shapes)
        self.fc = _sn(nn.Linear(4 * ch * 4 * 4, cfg.feature_dim), sn)
        self.psi = _sn(nn.Linear(cfg.feature_dim, 1), sn)
        self.embed = _sn(nn.Linear(cfg.text_dim, cfg.feature_dim, bias=False), sn)  # W
        # AC-GAN (Odena et al. 2017): one more head that names each attribute of the image it sees
        self.classifier = _sn(nn.Linear(cfg.feature_dim, sum(cfg.num_classes)), sn) if cfg.num_classes else None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def features(self, x: Tensor) -> Tensor:
        """phi(x): images (B, 3, 32, 32) -> features (B, feature_dim)."""
        h = x
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)  # 32x32 ... 4x4
        return F.leaky_relu(self.fc(h.flatten(1)), 0.2)  # (B, feature_dim)

    def project(self, h: Tensor, text: TextEncoding | Tensor) -> Tensor:
        """Logits (B,) = psi(h) + <W c, h> for features h (B, feature_dim) and captions c (TextEncoding
        or pooled (B, text_dim)). Computing h once lets one image be scored against two captions."""
        c = _pooled(text).to(device=h.device, dtype=h.dtype)  # (B, text_dim)
        return self.psi(h).squeeze(1) + (self.embed(c) * h).sum(dim=1)  # (B,)

    def forward(self, x: Tensor, text: TextEncoding | Tensor) -> Tensor:
        return self.project(self.features(x), text)  # (B,)

    def classify_loss(self, h: Tensor, labels: Tensor) -> Tensor:
        """AC-GAN's attribute loss: the mean over attributes of the cross-entropy between the
        classifier head's logits on features h (B, feature_dim) and ``labels`` (B, num_attributes),
        one class index per attribute (in ``cfg.num_classes`` order)."""
        if self.classifier is None:
            raise ValueError("this Discriminator has no classifier head: set DiscriminatorConfig.num_classes")
        if labels.shape[1:] != (len(self.cfg.num_classes),):
            raise ValueError(f"labels must be (B, {len(self.cfg.num_classes)}), got {tuple(labels.shape)}")
        logits = self.classifier(h).float().split(list(self.cfg.num_classes), dim=1)  # one (B, n_a) per attribute
        return torch.stack([F.cross_entropy(lg, labels[:, a]) for a, lg in enumerate(logits)]).mean()


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, as in VQGAN): images (B, 3, 64, 64) -> logits (B, 1, h, w), one per patch.

    ``num_layers`` 4x4 stride-2 convs (widths channels, 2x, 4x, at most 8x), a 4x4 stride-1 conv and
    a 4x4 stride-1 conv to one channel; LeakyReLU(0.2). Each logit sees a patch of the image (70x70
    pixels for three layers) and judges whether its texture looks real. No normalisation layers
    (VQGAN's BatchNorm would make a patch's logit depend on the rest of the batch).
    """

    def __init__(self, cfg: PatchDiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        width = [cfg.channels * min(2 ** i, 8) for i in range(cfg.num_layers + 1)]
        layers = [_sn(nn.Conv2d(3, width[0], 4, 2, padding=1), cfg.spectral_norm)]
        layers += [_sn(nn.Conv2d(width[i - 1], width[i], 4, 2, padding=1), cfg.spectral_norm)
                   for i in range(1, cfg.num_layers)]
        layers += [_sn(nn.Conv2d(width[cfg.num_layers - 1], width[cfg.num_layers], 4, 1, padding=1), cfg.spectral_norm)]
        self.convs = nn.ModuleList(layers)
        self.out = _sn(nn.Conv2d(width[cfg.num_layers], 1, 4, 1, padding=1), cfg.spectral_norm)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: Tensor) -> Tensor:
        h = x  # (B, 3, 64, 64)
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)  # the side halves, num_layers times, then shrinks by 1
        return self.out(h)  # (B, 1, h, w): 6x6 for 64x64 inputs and three layers


# -----------------------------------------------------------------------------------------------
# Losses, all from logits l; D(x) = sigmoid(l).
#
# -log sigmoid(l) = softplus(-l) and -log(1 - sigmoid(l)) = softplus(l): the same numbers as
# binary_cross_entropy_with_logits, finite for any logit (log(sigmoid(l)) of a float would give
# -inf once sigmoid(l) rounds to 0). Logits are cast to float32 first, so the losses are safe
# under autocast. Every loss is a mean, so logits of any shape work ((B,) or PatchGAN's (B, 1, h, w)).


def d_loss_bce(real_logits: Tensor, fake_logits: Tensor, wrong_logits: Tensor | None = None) -> Tensor:
    """The source document's L_D = -E[log D(x)] - E[log(1 - D(G(z)))].

    With ``wrong_logits`` (D on real images with mismatched captions) it is GAN-CLS's (Reed et al.
    2016): L_D = -E[log D(x, c)] - 1/2 (E[log(1 - D(x, c_wrong))] + E[log(1 - D(G(z), c))]): the
    two kinds of fake share the weight of one, so real and fake stay balanced.
    """
    real = F.softplus(-real_logits.float()).mean()  # -E[log D(x)]
    fake = F.softplus(fake_logits.float()).mean()  # -E[log(1 - D(G(z)))]
    if wrong_logits is None:
        return real + fake
    wrong = F.softplus(wrong_logits.float()).mean()  # -E[log(1 - D(x, c_wrong))]
    return real + 0.5 * (fake + wrong)


def g_loss_nonsaturating(fake_logits: Tensor) -> Tensor:
    """The non-saturating L_G = -E[log D(G(z))] (Goodfellow et al. 2014): strong gradient while D wins."""
    return F.softplus(-fake_logits.float()).mean()


def g_loss_saturating(fake_logits: Tensor) -> Tensor:
    """The minimax L_G = E[log(1 - D(G(z)))], minimised by G. Kept to show why it is not used:
    its gradient with respect to the logit is -sigmoid(l) = -D(G(z)), which vanishes when D is
    confident that the fakes are fake (D(G(z)) ~ 0): early in training, G learns nothing."""
    return -F.softplus(fake_logits.float()).mean()


def d_loss_hinge(real_logits: Tensor, fake_logits: Tensor, wrong_logits: Tensor | None = None) -> Tensor:
    """Hinge L_D = E[relu(1 - l_real)] + E[relu(1 + l_fake)]; with ``wrong_logits`` the fake term is
    1/2 (E[relu(1 + l_fake)] + E[relu(1 + l_wrong)]), weighted as in :func:`d_loss_bce`."""
    real = F.relu(1 - real_logits.float()).mean()
    fake = F.relu(1 + fake_logits.float()).mean()
    if wrong_logits is None:
        return real + fake
    return real + 0.5 * (fake + F.relu(1 + wrong_logits.float()).mean())


def g_loss_hinge(fake_logits: Tensor) -> Tensor:
    """Hinge L_G = -E[l_fake] (the generator loss that goes with the hinge D loss)."""
    return -fake_logits.float().mean()


D_LOSSES: dict[str, Callable] = {"bce": d_loss_bce, "hinge": d_loss_hinge}
G_LOSSES: dict[str, Callable] = {"nonsaturating": g_loss_nonsaturating, "saturating": g_loss_saturating,
                                 "hinge": g_loss_hinge}


def r1_penalty(real_logits: Tensor, x_real: Tensor, gamma: float,
               scaler: torch.amp.GradScaler | None = None) -> Tensor:
    """R1 = gamma / 2 * E_x ||grad_x D(x)||^2 (Mescheder et al. 2018), on real images (with their captions).

    Args:
        real_logits: D's logits for ``x_real``, any shape (summed: each image's logit depends on
            that image only, so the gradient of the sum is each image's own gradient).
        x_real: the images D saw, (B, 3, H, W), with ``requires_grad=True``.
        gamma: the weight.
        scaler: an enabled fp16 GradScaler scales the logits before differentiating, and the
            gradient back, so small gradients do not underflow (PyTorch's AMP recipe for gradient
            penalties).

    Returns:
        scalar float32, differentiable with respect to D's parameters (create_graph=True).
    """
    out = real_logits.float().sum()
    scaled = scaler is not None and scaler.is_enabled()
    if scaled:
        out = scaler.scale(out)
    (grad,) = torch.autograd.grad(out, x_real, create_graph=True)  # (B, 3, H, W)
    grad = grad.float()
    if scaled:
        grad = grad / scaler.get_scale()
    return 0.5 * gamma * grad.pow(2).flatten(1).sum(dim=1).mean()


# -----------------------------------------------------------------------------------------------
# DiffAugment (Zhao et al. 2020): the same random transformations for real and fake images

_AUGMENTATIONS = ("color", "translation")


def _parse_policy(policy: str) -> set[str]:
    kinds = {p.strip() for p in policy.split(",") if p.strip()}
    unknown = sorted(kinds - set(_AUGMENTATIONS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown} in policy {policy!r}; choose from {_AUGMENTATIONS}")
    return kinds


def _rng_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def augment_params(x: Tensor, policy: str = "color,translation",
                   generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Draws per-image augmentation parameters for a batch like ``x`` (B, C, H, W), as DiffAugment does.

    "color": brightness + U[-0.5, 0.5), saturation x U[0, 2), contrast x U[0.5, 1.5) (each (B, 1, 1, 1));
    "translation": integer shifts (B, 2) (rows, columns) in [-H/8, H/8], [-W/8, W/8].
    Drawn from ``generator`` (None: the global RNG) on its device, in that order.
    """
    kinds, B, (H, W) = _parse_policy(policy), x.shape[0], x.shape[-2:]
    device = _rng_device(generator)
    params = {}
    if "color" in kinds:
        params["brightness"] = torch.rand(B, 1, 1, 1, generator=generator, device=device) - 0.5
        params["saturation"] = torch.rand(B, 1, 1, 1, generator=generator, device=device) * 2
        params["contrast"] = torch.rand(B, 1, 1, 1, generator=generator, device=device) + 0.5
    if "translation" in kinds:
        sh, sw = _max_shift(H), _max_shift(W)
        params["shift"] = torch.stack([torch.randint(-sh, sh + 1, (B,), generator=generator, device=device),
                                       torch.randint(-sw, sw + 1, (B,), generator=generator, device=device)], dim=1)
    return params


def _max_shift(side: int) -> int:
    return int(side * 0.125 + 0.5)  # DiffAugment's translation ratio 1/8: 4 pixels at 32, 8 at 64


def apply_augment(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """Applies parameters from :func:`augment_params` to images (B, C, H, W) in [-1, 1]; differentiable.

    Applying the same ``params`` to the real and the fake batch gives image i of both the same
    transformation. Translation pads by replicating the border (our backgrounds are flat and dark;
    DiffAugment's zero padding would draw grey bars).
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


def diff_augment(x: Tensor, policy: str = "color,translation", generator: torch.Generator | None = None) -> Tensor:
    """DiffAugment of one batch: :func:`apply_augment` with fresh :func:`augment_params`."""
    return apply_augment(x, augment_params(x, policy, generator)) if policy else x


# -----------------------------------------------------------------------------------------------
# Mismatched captions (GAN-CLS)


def _hashable(key) -> Hashable:
    return tuple(sorted(key.items())) if isinstance(key, dict) else key


def mismatched_indices(keys: Sequence, generator: torch.Generator | None = None) -> Tensor:
    """For each sample i of a batch, the index j of a sample whose key differs from i's, uniformly.

    Args:
        keys: B keys saying what each caption means: the captions themselves, or label dicts
            (then two synonymous captions, "a big red star" and "a large red star", never count
            as a mismatch).
        generator: the torch.Generator to draw from (None: the global RNG).

    Returns:
        LongTensor (B,): ``keys[j[i]] != keys[i]`` for every i.

    Raises:
        ValueError: all keys are equal, so no sample has a mismatch in the batch.
    """
    ids: dict = {}
    codes = torch.tensor([ids.setdefault(_hashable(k), len(ids)) for k in keys])  # (B,) one id per meaning
    if len(ids) < 2:
        raise ValueError(f"cannot mismatch captions: all {len(keys)} captions of the batch are the same "
                         f"({next(iter(ids), None)!r}); use batches with at least two different captions")
    candidates = codes[:, None] != codes[None, :]  # (B, B): j may be i's mismatch
    scores = torch.rand(len(keys), len(keys), generator=generator, device=_rng_device(generator)).cpu()
    return scores.masked_fill(~candidates, -1.0).argmax(dim=1)  # (B,) a uniform pick among the candidates


def mismatched_captions(captions: Sequence[str], generator: torch.Generator | None = None,
                        keys: Sequence | None = None) -> list[str]:
    """A mismatched caption for each caption of a batch, drawn from the batch (see :func:`mismatched_indices`;
    ``keys`` defaults to the captions)."""
    idx = mismatched_indices(keys if keys is not None else captions, generator)
    return [captions[j] for j in idx.tolist()]


# -----------------------------------------------------------------------------------------------
# One step for one network


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf; raised before the optimizer step, so the parameters are unchanged."""


def _check_finite(step: int, name: str, loss: Tensor) -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(f"step {step}: {name} is {loss.item()} (not finite); no update was applied. "
                                 "Lower the learning rates, or resume from the last checkpoint")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; None: plain float32."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def _backward_and_step(loss: Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """loss.backward() and opt.step(), through the GradScaler when it is enabled (fp16)."""
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(opt)  # skipped if a gradient overflowed ...
        scaler.update()  # ... and the scale lowered
    else:
        loss.backward()
        opt.step()


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """The other network, while one network steps: no gradients for its parameters, and eval mode
    (spectral norm's power iteration then leaves its u, v alone), so it ends exactly as it was."""
    flags = [p.requires_grad for p in module.parameters()]
    was_training = module.training
    module.requires_grad_(False).eval()
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        module.train(was_training)


def _mean_prob(logits: Tensor | None) -> float:
    """Mean sigmoid(logit), i.e. D's average belief "real"; NaN for None."""
    return torch.sigmoid(logits.detach().float()).mean().item() if logits is not None else float("nan")


def d_step(discriminator: nn.Module, d_opt: torch.optim.Optimizer, x_real: Tensor, x_fake: Tensor,
           text: TextEncoding | Tensor | None = None, wrong_text: TextEncoding | Tensor | None = None, *,
           loss: str = "bce", r1_gamma: float = 0.0, augment: str = "", rng: torch.Generator | None = None,
           scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None,
           step: int = 0, labels: Tensor | None = None, aux_weight: float = 1.0) -> dict[str, float]:
    """One discriminator update: zero_grad, forward, loss, backward, step. Only D changes.

    Args:
        discriminator: a :class:`Discriminator` (called with captions) or, with ``text=None``, any
            D called as D(x) (the :class:`PatchDiscriminator`).
        d_opt: the discriminator's optimizer.
        x_real: real images (B, 3, S, S) in [-1, 1].
        x_fake: generated images (B, 3, S, S); *detached* here, so no gradient reaches G.
        text: the real captions (TextEncoding or pooled (B, text_dim)); None for an unconditional D.
        wrong_text: mismatched captions for the real images (GAN-CLS), same form; None: no such term.
        loss: "bce" or "hinge" (:data:`D_LOSSES`).
        r1_gamma: weight of :func:`r1_penalty` on the (augmented) real images; 0 skips it.
        augment: DiffAugment policy; real and fake image i get the same transformation.
        rng: torch.Generator for the augmentation (None: the global RNG).
        scaler: a GradScaler shared with :func:`g_step` (enabled only with fp16 autocast).
        amp_dtype: autocast dtype (torch.bfloat16 / torch.float16) or None for float32.
        step: the step number, for the error message of a non-finite loss.
        labels: (B, num_attributes) class indices of the real images, for D's AC-GAN head
            (:meth:`Discriminator.classify_loss`); None: no attribute loss.
        aux_weight: weight of that loss.

    Returns:
        {"d_loss": total, "d_adv": the adversarial part, "r1", "d_aux" (0 without labels), "d_real": mean D(x), "d_fake": mean
        D(G(z)), "d_wrong": mean D(x, c_wrong) (NaN without wrong_text)}, as floats.

    Raises:
        NonFiniteLossError: the loss is NaN or inf, before any optimizer update (the parameters are
            unchanged; spectral norm's power-iteration vectors, moved by every training-mode
            forward, are not restored).
    """
    if text is None and (wrong_text is not None or labels is not None):
        raise ValueError("wrong_text and labels need text: they only mean something to a conditional D")
    x_fake = x_fake.detach()
    discriminator.train()
    d_opt.zero_grad(set_to_none=True)
    if augment:
        params = augment_params(x_real, augment, rng)
        x_real, x_fake = apply_augment(x_real, params), apply_augment(x_fake, params)
    if r1_gamma > 0:
        x_real = x_real.detach().requires_grad_(True)  # R1 differentiates D's logits with respect to it
    with _autocast(x_real.device, amp_dtype):
        wrong_logits = None
        if text is None:
            real_logits = discriminator(x_real)
        else:
            h = discriminator.features(x_real)  # (B, F): one pass scores both captions
            real_logits = discriminator.project(h, text)  # (B,)
            if wrong_text is not None:
                wrong_logits = discriminator.project(h, wrong_text)  # (B,) real image, wrong caption
        fake_logits = discriminator(x_fake) if text is None else discriminator(x_fake, text)
        adv = D_LOSSES[loss](real_logits, fake_logits, wrong_logits)
        aux = discriminator.classify_loss(h, labels.to(h.device)) if labels is not None else adv.new_zeros(())
    r1 = r1_penalty(real_logits, x_real, r1_gamma, scaler) if r1_gamma > 0 else adv.new_zeros(())
    total = adv + r1 + aux_weight * aux
    # with fp16 an overflowing (scaled) R1 gradient is the GradScaler's business: it skips that step
    _check_finite(step, "d_loss", adv if scaler is not None and scaler.is_enabled() else total)
    _backward_and_step(total, d_opt, scaler)
    return {"d_loss": total.item(), "d_adv": adv.item(), "r1": r1.item(), "d_aux": aux.item(), "d_real": _mean_prob(real_logits),
            "d_fake": _mean_prob(fake_logits), "d_wrong": _mean_prob(wrong_logits)}


def g_step(generator: Generator, discriminator: Discriminator, g_opt: torch.optim.Optimizer, z: Tensor,
           text: TextEncoding, *, loss: str = "nonsaturating", kl_weight: float = 1.0, augment: str = "",
           rng: torch.Generator | None = None, scaler: torch.amp.GradScaler | None = None,
           amp_dtype: torch.dtype | None = None, step: int = 0, labels: Tensor | None = None,
           aux_weight: float = 1.0) -> dict[str, float]:
    """One generator update: zero_grad, forward through G and D, loss, backward, step. Only G changes.

    g_loss = L_G(D(augment(G(z, c)), c)) + kl_weight * KL, the KL being conditioning
    augmentation's (:meth:`Generator.forward_with_aux`). D is frozen meanwhile (no gradients for
    its parameters, eval mode so spectral norm does not update), so it ends exactly as it was.

    Args:
        generator, discriminator, g_opt: the networks and the generator's optimizer.
        z: noise (B, z_dim). text: the captions (TextEncoding: tokens for G, pooled for D).
        loss: "nonsaturating", "saturating" or "hinge" (:data:`G_LOSSES`).
        kl_weight: weight of the KL term.
        augment: DiffAugment policy (the same one D is trained with, or the fakes look different to D).
        rng: torch.Generator for conditioning augmentation and DiffAugment (None: the global RNG).
        scaler, amp_dtype, step: as in :func:`d_step`.
        labels: (B, num_attributes) class indices the captions ask for: G is also trained to make
            D's AC-GAN head name them; None: no attribute loss.
        aux_weight: weight of that loss.

    Returns:
        {"g_loss": total, "g_adv", "g_aux" (0 without labels), "kl", "d_fake_g": mean D(G(z)) as G
        saw it}, as floats.

    Raises:
        NonFiniteLossError: the loss is NaN or inf (before any update).
    """
    generator.train()
    g_opt.zero_grad(set_to_none=True)
    with _frozen(discriminator), _autocast(z.device, amp_dtype):
        out = generator.forward_with_aux(z, text, rng=rng)  # image (B, 3, 32, 32), kl scalar
        x_fake = diff_augment(out.image, augment, rng) if augment else out.image
        h = discriminator.features(x_fake)  # (B, F)
        fake_logits = discriminator.project(h, text)  # (B,)
        adv = G_LOSSES[loss](fake_logits)
        aux = discriminator.classify_loss(h, labels.to(h.device)) if labels is not None else adv.new_zeros(())
        total = adv + aux_weight * aux + kl_weight * out.kl.float()
    _check_finite(step, "g_loss", total)
    _backward_and_step(total, g_opt, scaler)
    return {"g_loss": total.item(), "g_adv": adv.item(), "g_aux": aux.item(), "kl": out.kl.item(), "d_fake_g": _mean_prob(fake_logits)}


# -----------------------------------------------------------------------------------------------
# Batches and random state that save and restore exactly


class BatchOrder:
    """Shuffled batches of dataset indices, epoch after epoch, from a seeded CPU torch.Generator
    (train_regression's scheme: a new permutation when fewer than ``batch_size`` indices are left).

    :meth:`state_dict` (the generator's state, the current permutation, the position) restores
    the exact sequence of batches that would have followed.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0):
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        self.batch_size = min(batch_size, num_samples)
        self.rng = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(num_samples, generator=self.rng)  # (N,)
        self.pos = 0

    def next(self) -> Tensor:
        """The next batch's indices, LongTensor (batch_size,)."""
        if self.pos + self.batch_size > len(self.order):  # a new epoch, a new order
            self.order, self.pos = torch.randperm(len(self.order), generator=self.rng), 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state(), "order": self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self.order, self.pos = state["order"].clone(), int(state["pos"])


def global_rng_state() -> dict:
    """The global RNGs' states (torch CPU, every CUDA device, Python's random, NumPy's) as tensors and
    plain Python values, so a checkpoint holding them loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}


def set_global_rng_state(state: dict) -> None:
    """Restores what :func:`global_rng_state` returned (CUDA only on a machine with as many devices)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _fetch(dataset, idx: Tensor) -> tuple[Tensor, list[str], list]:
    """Images (B, 3, S, S), captions and meaning keys (the labels if the items have any, else the
    caption) of the items ``idx`` of a dataset."""
    items = [dataset[int(i)] for i in idx]
    keys = [it["labels"] if it.get("labels") else it["caption"] for it in items]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items], keys


def _labels(meanings: list, num_classes: tuple, device: torch.device) -> Tensor | None:
    """(B, A) class indices from items' label dicts (attributes in dataset order) for an AC-GAN
    head with ``num_classes``; None when D has no such head."""
    if not num_classes:
        return None
    if not all(isinstance(m, dict) and len(m) == len(num_classes) for m in meanings):
        raise ValueError(f"the discriminator classifies {len(num_classes)} attributes, so every item needs "
                         "a 'labels' dict with as many (e.g. ShapesDataset's); set num_classes=() otherwise")
    return torch.tensor([list(m.values()) for m in meanings], dtype=torch.long, device=device)


def _amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 on CUDA devices that have it (no scaler needed), else fp16; None (float32) on CPU or without amp."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _check_resumable(state: dict, path: Path, configs: dict[str, dict]) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a train_gan checkpoint (format {state.get('format')!r})")
    for key, current in configs.items():
        if state[key] != current:
            diff = sorted(k for k in set(current) | set(state[key]) if current.get(k) != state[key].get(k))
            raise ValueError(f"cannot resume from {path}: its {key} differs in {diff}; pass resume=False "
                             "or another checkpoint_dir to start afresh")


# -----------------------------------------------------------------------------------------------
# The training loop


def train_gan(generator: Generator, discriminator: Discriminator, encoder, dataset, cfg: GANTrainConfig | None = None,
              steps: int = 1000, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 100,
              resume: bool = True, progress: bool = True, log_every: int = 10,
              device: str | torch.device | None = None,
              callback: Callable[[int, dict], None] | None = None) -> dict:
    """Trains a text-conditioned GAN: per step :func:`d_step`, then :func:`g_step`.

    Each step draws a batch (:class:`BatchOrder`), encodes its captions (cached), draws mismatched
    captions (GAN-CLS, by labels where the items have them), z, and a fake batch (G under
    no_grad, since D's step must not train G), then updates D and G once each.

    Args:
        generator, discriminator: the networks (moved to ``device``; trained in place).
        encoder: a TextEncoder whose ``dim`` matches both networks' ``text_dim``.
        dataset: items {"image": (3, 32, 32) in [-1, 1], "caption": str[, "labels": dict]}, e.g.
            ``ShapesDataset(n, image_size=32)``.
        cfg: a GANTrainConfig (default ``GANTrainConfig()``).
        steps: total number of steps, counting those of a resumed run.
        checkpoint_dir: where ``gan_training.pt`` goes (None: no checkpoints). Written atomically
            (a temporary file renamed over the old one) every ``checkpoint_every`` steps and at the
            end; never for a step whose loss was not finite.
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one: models, both
            optimisers, the GradScaler, every RNG (this loop's generators and the global ones),
            the data order, the step and the history, so the run continues exactly as if it had
            never stopped. Loading is safe (``weights_only=True``). Its configs must match.
            Exactness also needs the encoder to return the same vectors for the same captions: a
            frozen Transformer's output can differ in the last bits with the padding of the batch
            a caption was first encoded in, so fill the cache the same way in both runs (e.g.
            ``encoder.encode_dataset(dataset.captions())`` first, or a cache loaded from disk).
        progress: show a tqdm bar.
        log_every: record the losses every this many steps (and at the last step).
        device: where to train; None keeps the generator's device.
        callback: called as ``callback(step, stats)`` at each logged step (e.g. to draw a grid
            from one fixed z).

    Returns:
        {"step", "d_loss", "g_loss", "d_real", "d_fake", "d_wrong", "r1", "kl", "d_aux", "g_aux": lists, one entry per
        logged step; "seconds": float, the training time of all runs}.

    Raises:
        NonFiniteLossError: a loss was NaN or inf; the last checkpoint is the last good state.
        ValueError: a batch whose captions all mean the same (no mismatch possible), images that
            are not 32x32, or a checkpoint that cannot be read or whose configs differ.
    """
    cfg = cfg or GANTrainConfig()
    device = torch.device(device) if device is not None else next(generator.parameters()).device
    generator.to(device).train()
    discriminator.to(device).train()
    amp_dtype = _amp_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # one, for both steps
    betas = (cfg.beta1, cfg.beta2)
    g_opt = torch.optim.Adam(generator.parameters(), lr=cfg.lr_g, betas=betas)
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr_d, betas=betas)
    data_seed, noise_seed = (int(s) for s in np.random.SeedSequence(cfg.seed).generate_state(2))
    batches = BatchOrder(len(dataset), cfg.batch_size, data_seed)
    rng = torch.Generator().manual_seed(noise_seed)  # CPU: z, conditioning aug., mismatches, DiffAugment
    keys = ("d_loss", "g_loss", "d_real", "d_fake", "d_wrong", "r1", "kl", "d_aux", "g_aux")
    history: dict = {"step": [], **{k: [] for k in keys}}
    configs = {"config": cfg.to_dict(), "generator_config": generator.cfg.to_dict(),
               "discriminator_config": discriminator.cfg.to_dict()}
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    first, seconds = 0, 0.0
    if path is not None and resume and path.is_file():
        state = load_checkpoint(path)  # weights_only=True: a pickled object is refused, no code runs
        _check_resumable(state, path, configs)
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        g_opt.load_state_dict(state["g_opt"])
        d_opt.load_state_dict(state["d_opt"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        batches.load_state_dict(state["data"])
        rng.set_state(state["rng"]["loop"])
        set_global_rng_state(state["rng"]["global"])
        history, first, seconds = state["history"], state["step"], state["seconds"]

    def save(next_step: int, elapsed: float) -> None:
        save_checkpoint({"format": CHECKPOINT_FORMAT, "step": next_step, "seconds": elapsed, **configs,
                         "generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
                         "g_opt": g_opt.state_dict(), "d_opt": d_opt.state_dict(), "scaler": scaler.state_dict(),
                         "data": batches.state_dict(),
                         "rng": {"loop": rng.get_state(), "global": global_rng_state()},
                         "history": history}, path)

    bar = range(first, steps)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc="GAN", unit="step", initial=first, total=steps)
    start = time.perf_counter()
    for step in bar:
        x_real, captions, meanings = _fetch(dataset, batches.next())
        if x_real.shape[-1] != 32:
            raise ValueError(f"train_gan needs 32x32 images, got {tuple(x_real.shape[1:])}: "
                             "use e.g. ShapesDataset(n, image_size=32)")
        x_real = x_real.to(device)  # (B, 3, 32, 32)
        text = encoder.encode(captions).to(device)  # TextEncoding, B captions
        wrong = None
        if cfg.mismatch:
            wrong = text.pooled[mismatched_indices(meanings, rng).to(device)]  # (B, text_dim)
        labels = _labels(meanings, discriminator.cfg.num_classes, device)  # (B, A) or None
        z = torch.randn(len(captions), generator.cfg.z_dim, generator=rng).to(device)  # (B, z_dim)
        with torch.no_grad(), _autocast(device, amp_dtype):
            x_fake = generator(z, text, rng=rng)  # (B, 3, 32, 32), no graph: D's step cannot train G

        d_stats = d_step(discriminator, d_opt, x_real, x_fake, text, wrong, loss=cfg.d_loss,
                         r1_gamma=cfg.r1_gamma, augment=cfg.augment, rng=rng, scaler=scaler,
                         amp_dtype=amp_dtype, step=step, labels=labels, aux_weight=cfg.aux_weight)
        g_stats = g_step(generator, discriminator, g_opt, z, text, loss=cfg.g_loss, kl_weight=cfg.kl_weight,
                         augment=cfg.augment, rng=rng, scaler=scaler, amp_dtype=amp_dtype, step=step,
                         labels=labels, aux_weight=cfg.aux_weight)

        stats = {**d_stats, **g_stats}
        if step % log_every == 0 or step == steps - 1:
            history["step"].append(step)
            for key in keys:
                history[key].append(stats[key])
            if progress:
                bar.set_postfix(d=f"{stats['d_loss']:.3f}", g=f"{stats['g_loss']:.3f}")
            if callback is not None:
                callback(step, stats)
        if path is not None and ((step + 1) % checkpoint_every == 0 or step == steps - 1):
            save(step + 1, seconds + time.perf_counter() - start)
    history["seconds"] = seconds + time.perf_counter() - start
    return history


# -----------------------------------------------------------------------------------------------
# Adversarial fine-tuning of the refiner (VQGAN's recipe on notebook 03's refiner)


def adaptive_weight(rec_loss: Tensor, adv_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's balance: ||grad_w rec_loss|| / (||grad_w adv_loss|| + 1e-4) at the decoder's last weight w,
    so the adversarial gradient there is as large as the reconstruction's. Detached scalar."""
    (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_adv,) = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, max_weight).detach()


def refiner_step(refiner: Refiner, patch_discriminator: nn.Module, r_opt: torch.optim.Optimizer, x_low: Tensor,
                 x_real: Tensor, text: TextEncoding | None = None, *, adv_weight: float = 0.1,
                 adaptive: bool = False, loss: str = "hinge", augment: str = "",
                 rng: torch.Generator | None = None, scaler: torch.amp.GradScaler | None = None,
                 amp_dtype: torch.dtype | None = None, step: int = 0) -> dict[str, float]:
    """One refiner update (the generator's side): MSE + VQ loss + weight * L_G(patch D(x_rec)).

    zero_grad, forward, loss, backward, step; only the refiner changes (the patch D is frozen).

    Args:
        refiner: a Refiner. patch_discriminator: D(x) -> patch logits (frozen here).
        r_opt: the refiner's optimizer.
        x_low: (B, 3, 32, 32) inputs; x_real: (B, 3, 64, 64) targets, both in [-1, 1].
        text: captions for a text-conditioned refiner (None: the null caption).
        adv_weight: weight of the adversarial term (times :func:`adaptive_weight` if ``adaptive``).
        loss: generator loss name (:data:`G_LOSSES`).
        augment, rng, scaler, amp_dtype, step: as in :func:`g_step`.

    Returns:
        {"r_loss", "recon", "vq_loss", "r_adv", "adv_weight", "perplexity", "d_fake_r"} as floats.
    """
    refiner.train()
    r_opt.zero_grad(set_to_none=True)
    with _frozen(patch_discriminator), _autocast(x_low.device, amp_dtype):
        x_rec, vq = refiner(x_low, text, rng=rng)  # (B, 3, 64, 64)
        recon = F.mse_loss(x_rec.float(), x_real.float())
        fake_logits = patch_discriminator(diff_augment(x_rec, augment, rng) if augment else x_rec)  # (B, 1, h, w)
        adv = G_LOSSES[loss](fake_logits)
        weight = adv_weight * (adaptive_weight(recon, adv, refiner.decoder.up[-1].weight) if adaptive else 1.0)
        total = recon + vq.loss.float() + weight * adv
    _check_finite(step, "refiner loss", total)
    _backward_and_step(total, r_opt, scaler)
    return {"r_loss": total.item(), "recon": recon.item(), "vq_loss": vq.loss.item(), "r_adv": adv.item(),
            "adv_weight": float(weight), "perplexity": vq.perplexity.item(), "d_fake_r": _mean_prob(fake_logits)}


def finetune_refiner(refiner: Refiner, patch_discriminator: nn.Module, dataset, encoder=None, steps: int = 200,
                     batch_size: int = 16, lr: float = 1e-4, lr_d: float = 1e-4,
                     betas: tuple[float, float] = (0.5, 0.9),
                     adv_weight: float = 0.1, adaptive: bool = False, d_loss: str = "hinge", g_loss: str = "hinge",
                     augment: str = "color,translation", r1_gamma: float = 0.0, text_dropout: float = 0.1,
                     seed: int = 0, amp: bool = True, device: str | torch.device | None = None,
                     progress: bool = True, log_every: int = 10) -> dict:
    """Fine-tunes a (trained) refiner with a PatchGAN, VQGAN-style: per step :func:`d_step` on real
    64x64 images against the refiner's current outputs, then :func:`refiner_step`.

    The D's fakes come from :func:`textimg.vqvae.refine` (eval mode, no_grad), so only the refiner's
    own step updates its EMA codebook and restarts codes.

    Args:
        refiner: a Refiner (moved to ``device``, trained in place).
        patch_discriminator: e.g. ``PatchDiscriminator(PatchDiscriminatorConfig.preset(...))``.
        dataset: items {"image": (3, 64, 64) in [-1, 1], "caption": str}, e.g. ``ShapesDataset(n)``;
            the inputs are the images area-downsampled to the refiner's ``low_size``.
        encoder: a TextEncoder, needed by a text-conditioned refiner.
        steps, batch_size: steps, images per step.
        lr, lr_d, betas: Adam for the refiner and the discriminator.
        adv_weight, adaptive: weight of the adversarial term (VQGAN's adaptive weight if ``adaptive``).
        d_loss, g_loss: names in :data:`D_LOSSES` / :data:`G_LOSSES`.
        augment: DiffAugment policy for D's inputs. r1_gamma: R1 weight (0: off).
        text_dropout: fraction of captions replaced by the null caption, as in train_vqvae.
        seed: seeds the batch order and all draws (CPU torch.Generators; the global RNG is untouched).
        amp: mixed precision on CUDA. device: None keeps the refiner's device.
        progress, log_every: tqdm bar; record every this many steps (and the last).

    Returns:
        {"step", "recon", "vq_loss", "r_adv", "adv_weight", "perplexity", "d_loss", "d_real", "d_fake":
        lists; "seconds": float}.
    """
    if refiner.cfg.text_cond and encoder is None:
        raise ValueError("this Refiner is text-conditioned (cfg.text_cond): pass encoder=TextEncoder(...)")
    device = torch.device(device) if device is not None else next(refiner.parameters()).device
    refiner.to(device).train()
    patch_discriminator.to(device).train()
    amp_dtype = _amp_dtype(device, amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    r_opt = torch.optim.Adam(refiner.parameters(), lr=lr, betas=betas)
    d_opt = torch.optim.Adam(patch_discriminator.parameters(), lr=lr_d, betas=betas)
    data_seed, noise_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    batches = BatchOrder(len(dataset), batch_size, data_seed)
    rng = torch.Generator().manual_seed(noise_seed)
    keys = ("recon", "vq_loss", "r_adv", "adv_weight", "perplexity", "d_loss", "d_real", "d_fake")
    history: dict = {"step": [], **{k: [] for k in keys}}
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc="refiner GAN", unit="step")
    start = time.perf_counter()
    for step in bar:
        x_real, captions, _ = _fetch(dataset, batches.next())
        x_real = x_real.to(device)  # (B, 3, 64, 64)
        x_low, text = refiner_inputs(refiner, x_real, captions, encoder, rng, text_dropout)  # (B, 3, 32, 32), text
        x_fake = refine(refiner, x_low, text)  # (B, 3, 64, 64), eval mode, no graph
        d_stats = d_step(patch_discriminator, d_opt, x_real, x_fake, loss=d_loss, r1_gamma=r1_gamma,
                         augment=augment, rng=rng, scaler=scaler, amp_dtype=amp_dtype, step=step)
        r_stats = refiner_step(refiner, patch_discriminator, r_opt, x_low, x_real, text, adv_weight=adv_weight,
                               adaptive=adaptive, loss=g_loss, augment=augment, rng=rng, scaler=scaler,
                               amp_dtype=amp_dtype, step=step)
        stats = {**d_stats, **r_stats}
        if step % log_every == 0 or step == steps - 1:
            history["step"].append(step)
            for key in keys:
                history[key].append(stats[key])
            if progress:
                bar.set_postfix(recon=f"{stats['recon']:.4f}", d=f"{stats['d_loss']:.3f}")
    history["seconds"] = time.perf_counter() - start
    return history


# -----------------------------------------------------------------------------------------------
# Measuring a generator, and the committed checkpoints


GENERATOR_DIR = CHECKPOINTS / "generator_gan"  # the adversarially trained generator
REFINER_GAN_DIR = CHECKPOINTS / "refiner_gan"  # notebook 03's refiner after adversarial fine-tuning


def evaluate_generator(generator: Generator, encoder, judge: nn.Module, num_samples: int = 2000,
                       split: str = "test", seed: int = 0, refiner: Refiner | None = None,
                       diversity_captions: int = 16, diversity_samples: int = 16) -> dict:
    """Judge accuracy (per attribute and all), diversity and sharpness of a generator's images for
    the captions of ``num_samples`` items of a ShapesDataset split.

    With a ``refiner`` the images are refined to 64x64 first (the whole pipeline). Diversity is the
    mean of :func:`~textimg.metrics.diversity` over ``diversity_captions`` captions, each drawn
    ``diversity_samples`` times with different z. Noise comes from ``seed``; the global RNG is untouched.

    Returns:
        {"accuracy": {attribute: fraction, "all": fraction}, "diversity": float, "sharpness": float,
        "images": num_samples, "split": split, "size": 32 or 64}.
    """
    from textimg.data import ShapesDataset
    from textimg.generator import sample
    from textimg.metrics import caption_accuracy, diversity, sharpness

    captions = ShapesDataset(num_samples, split=split, seed=seed).captions()

    def draw(caps: list[str], s: int) -> Tensor:  # (N, 3, S, S) on the CPU
        out = []
        for i in range(0, len(caps), 256):
            x = sample(generator, encoder, caps[i:i + 256], seed=s + i)
            if refiner is not None:
                x = refine(refiner, x, encoder.encode(caps[i:i + 256]) if refiner.cfg.text_cond else None)
            out.append(x.cpu())
        return torch.cat(out)

    images = draw(captions, seed)
    divs = [diversity(judge, draw([c] * diversity_samples, seed + 1 + k)) for k, c in
            enumerate(captions[:diversity_captions])]
    return {"accuracy": caption_accuracy(judge, images, captions), "diversity": sum(divs) / len(divs),
            "sharpness": sharpness(images), "images": num_samples, "split": split, "size": images.shape[-1]}


def save_generator(generator: Generator, directory: str | Path = GENERATOR_DIR, facts: dict | None = None,
                   manifest: str | Path | None = MANIFEST) -> Path:
    """Writes a generator (model.safetensors + config.json with ``facts``) and records both files'
    SHA-256 in ``manifest`` (None: no manifest)."""
    return save_pretrained_module(generator, {"model": "Generator", "generator": generator.cfg.to_dict(),
                                              **(facts or {})}, directory, manifest)


def load_generator(directory: str | Path = GENERATOR_DIR, manifest: str | Path | None = MANIFEST) -> Generator:
    """Loads the committed GAN generator (or one saved by :func:`save_generator`, or notebook 02's
    ``runs/models/generator_regression`` with ``manifest=None``), checking SHA-256 against the
    manifest. Safe (safetensors). Returned on the CPU in eval mode. Raises FileNotFoundError,
    ChecksumError or ValueError naming the file."""
    from textimg.generator import GeneratorConfig

    state, config = load_pretrained_state(directory, manifest)
    generator = Generator(GeneratorConfig.from_dict(config["generator"]))
    generator.load_state_dict(state)
    return generator.eval()


def train_and_save_gan(preset: str = "cpu", steps: int = 6000, refiner_steps: int = 600, num_train: int = 20_000,
                       seed: int = 0, device: str | torch.device | None = None, progress: bool = True) -> dict:
    """How ``checkpoints/generator_gan`` and ``checkpoints/refiner_gan`` were made (``python -m textimg.gan``).

    Trains the ``preset`` generator against a matching-aware projection discriminator with an
    AC-GAN head (``GANTrainConfig.preset(preset)``'s losses and augmentation) on ``num_train``
    32x32 training images, then fine-tunes the committed refiner adversarially with a PatchGAN for
    ``refiner_steps``; measures both on 2,000 test captions with the committed judge and saves
    them with the facts. Returns the facts.
    """
    from textimg.data import NUM_CLASSES, ShapesDataset
    from textimg.generator import GeneratorConfig
    from textimg.metrics import load_judge
    from textimg.text import TextEncoder
    from textimg.vqvae import evaluate_refiner, load_refiner, save_refiner

    encoder = TextEncoder("minilm")
    data32 = ShapesDataset(num_train, split="train", seed=seed, image_size=32)
    encoder.encode_dataset(data32.captions(), progress=progress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = Generator(GeneratorConfig.preset(preset, text_dim=encoder.dim))
        discriminator = Discriminator(DiscriminatorConfig.preset(preset, text_dim=encoder.dim, num_classes=NUM_CLASSES))
    cfg = GANTrainConfig.preset(preset, seed=seed)
    history = train_gan(generator, discriminator, encoder, data32, cfg, steps=steps, progress=progress,
                        log_every=100, device=device)
    generator.cpu().eval()
    judge = load_judge()
    refiner = load_refiner()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        patch_d = PatchDiscriminator(PatchDiscriminatorConfig.preset(preset))
    data64 = ShapesDataset(num_train, split="train", seed=seed)
    r_history = finetune_refiner(refiner, patch_d, data64, encoder, steps=refiner_steps, seed=seed, device=device,
                                 progress=progress, log_every=50)
    refiner.cpu().eval()
    four = lambda v: float(f"{v:.4g}")  # noqa: E731 (four significant digits)
    round_all = lambda d: {k: round_all(v) if isinstance(v, dict) else four(v) if isinstance(v, float) else v  # noqa: E731
                           for k, v in d.items()}
    common = {"preset": preset, "seed": seed, "num_train": num_train, "device": str(device or "cpu"),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat()}
    g_facts = {
        "text_encoder": "minilm",
        "training": {"function": "textimg.gan.train_and_save_gan", "steps": steps, **common,
                     "config": cfg.to_dict(), "discriminator": discriminator.cfg.to_dict(),
                     "seconds": round(history["seconds"], 1)},
        "history": {k: [four(v) for v in history[k]] if k != "step" else history[k]
                    for k in ("step", "d_loss", "g_loss", "d_real", "d_fake", "d_aux", "g_aux")},
        "test_32": round_all(evaluate_generator(generator, encoder, judge)),
        "test_64_refined": round_all(evaluate_generator(generator, encoder, judge, refiner=refiner)),
        "parameters": count_parameters(generator),
    }
    save_generator(generator, GENERATOR_DIR, g_facts)
    r_facts = {
        "text_encoder": "minilm",
        "training": {"function": "textimg.gan.train_and_save_gan", "base": "checkpoints/refiner",
                     "steps": refiner_steps, **common, "discriminator": patch_d.cfg.to_dict(),
                     "seconds": round(r_history["seconds"], 1)},
        "test": round_all(evaluate_refiner(refiner, 2000, "test", seed=0, encoder=encoder)),
        "parameters": count_parameters(refiner),
    }
    save_refiner(refiner, REFINER_GAN_DIR, r_facts)
    return {"generator": g_facts, "refiner": r_facts}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Trains and saves the committed GAN generator and refiner.")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--refiner-steps", type=int, default=600)
    args = parser.parse_args()
    print(json.dumps(train_and_save_gan(args.preset, args.steps, args.refiner_steps), indent=2))
