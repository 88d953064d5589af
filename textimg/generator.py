"""Stage 2: a text-conditioned generator with attention (notebook 02_generation).

Noise z and a caption's :class:`~textimg.text.TextEncoding` become a 32x32 RGB image in [-1, 1]:

    pooled text ──► conditioning augmentation ──► c ─┐   (c also sets every norm's gamma, beta)
    z ────────────────────────────────────────────────┴─► linear ─► 4x4 ─► up 8x8 ─► up 16x16
        ─► word cross-attention (to the token vectors) ─► self-attention ─► up 32x32 ─► RGB, tanh

The ideas come from three papers:

- StackGAN (Zhang et al. 2017, "StackGAN: Text to Photo-realistic Image Synthesis with Stacked
  Generative Adversarial Networks"): *conditioning augmentation* samples the text code
  c ~ N(mu(t), sigma(t)^2) and adds KL(N(mu, sigma^2) || N(0, I)) to the loss, so nearby captions
  give overlapping codes and the generator sees a smooth text space.
- AttnGAN (Xu et al. 2018, "AttnGAN: Fine-Grained Text to Image Generation with Attentional
  Generative Adversarial Networks"): each image region attends to the *words* of the caption, so
  "red" can colour the object while "top left" places it. Padding tokens are masked out.
- SAGAN (Zhang et al. 2019, "Self-Attention Generative Adversarial Networks"): self-attention
  lets every position see every other one, with a learnable gate gamma that starts at 0, so the
  block starts as the identity and the network decides how much attention to use.

The source document's generator fed BERT's whole token sequence through a linear layer and took
no noise, so it made one image per token and the same image for a caption every time. Here the
sentence vector (pooled) and the word vectors (tokens) have separate jobs, and z makes a caption
name a distribution of images.

The norms are GroupNorm, computed per sample, so an image never depends on the other images of its
batch (BatchNorm's batch statistics would make it depend on them, in training mode).

Reading order: GeneratorConfig, the blocks (ConditioningAugmentation, ConditionalNorm2d, UpBlock,
SelfAttention2d, WordCrossAttention), Generator, sample, then the regression baseline
(regression_loss, RegressionConfig, train_regression).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from textimg.config import PresetConfig
from textimg.text import TextEncoding
from textimg.training import BatchOrder, make_accelerator, unwrap
from textimg.utils import ModelMixin, evaluating, progress_bar

# -----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class GeneratorConfig(PresetConfig):
    z_dim: int = 32  # size of the noise vector z
    text_dim: int = 384  # size of the text encoder's vectors (384 MiniLM, 768 BERT-base, 32 tiny-bert)
    channels: int = 32  # base width: 4x4 and 8x8 maps have 4x this, 16x16 2x, 32x32 1x
    cond_aug: bool = True  # StackGAN conditioning augmentation: sample c ~ N(mu, sigma^2), add a KL term
    cond_dim: int = 64  # size of the text code c that joins z and conditions the norms
    self_attention: bool = True  # SAGAN self-attention at 16x16
    cross_attention: bool = True  # AttnGAN-style attention from image regions to words at 16x16
    attn_dim: int = 64  # query/key size of the word cross-attention
    text_norm: bool = True  # norms take gamma, beta from c (else a plain learned GroupNorm affine)
    transposed: bool = False  # upsample with 4x4 stride-2 transposed convs instead of upsample + conv
    image_size: int = 32  # output side; 4x4 doubled three times (the only size supported)

    SIZES = {  # not a field (no annotation): the model sizes of each preset
        "quick": dict(z_dim=16, channels=8, cond_dim=16, attn_dim=16),  # ~30k params, seconds on CPU
        "cpu": dict(z_dim=32, channels=32, cond_dim=64, attn_dim=64),  # ~1M params, minutes on 2 cores
        "gpu": dict(z_dim=64, channels=64, cond_dim=128, attn_dim=128),  # ~4M params
    }

    def __post_init__(self):
        if self.image_size != 32:
            raise ValueError(f"image_size must be 32 (4x4 upsampled three times), got {self.image_size}")


# -----------------------------------------------------------------------------------------------
# Building blocks (plain numbers in, no config)


def _groups(channels: int) -> int:
    """Number of GroupNorm groups: 8 where the channels allow it."""
    return math.gcd(channels, 8)


class ConditioningAugmentation(nn.Module):
    """StackGAN's conditioning augmentation: text vector -> (c, kl).

    In training mode c = mu + sigma * eps with eps ~ N(0, I); in eval mode c = mu (the generator's
    noise z still varies the images). kl is KL(N(mu, sigma^2) || N(0, I)), averaged over batch and
    dimensions as in StackGAN's code.
    """

    def __init__(self, text_dim: int, cond_dim: int):
        super().__init__()
        self.proj = nn.Linear(text_dim, 2 * cond_dim)

    def forward(self, text_vec: Tensor, rng: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        mu, logvar = self.proj(text_vec).chunk(2, dim=-1)  # (B, cond_dim) each
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()  # scalar
        if not self.training:
            return mu, kl
        device = rng.device if rng is not None else mu.device
        eps = torch.randn(mu.shape, generator=rng, device=device).to(mu.device)  # (B, cond_dim)
        return mu + eps * (0.5 * logvar).exp(), kl


class ConditionalNorm2d(nn.Module):
    """GroupNorm whose scale and shift come from the text code c (FiLM / conditional BatchNorm,
    per sample). ``cond_dim=None`` gives a plain GroupNorm with a learned affine."""

    def __init__(self, channels: int, cond_dim: int | None):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, affine=cond_dim is None)
        self.film = nn.Linear(cond_dim, 2 * channels) if cond_dim is not None else None
        if self.film is not None:  # start as the identity: gamma = 1, beta = 0
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        x = self.norm(x)  # (B, C, H, W)
        if self.film is None:
            return x
        gamma, beta = self.film(c)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        return x * (1 + gamma) + beta


class UpBlock(nn.Module):
    """Doubles the resolution: nearest upsample + 3x3 conv (or a 4x4 stride-2 transposed conv,
    which tends to leave checkerboard artifacts, Odena et al. 2016), norm, ReLU, 3x3 conv, norm, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int | None, transposed: bool = False):
        super().__init__()
        if transposed:
            self.up = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                    nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))
        self.norm1 = ConditionalNorm2d(out_ch, cond_dim)
        self.conv = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1)
        self.norm2 = ConditionalNorm2d(out_ch, cond_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        x = F.relu(self.norm1(self.up(x), c))  # (B, out_ch, 2H, 2W)
        return F.relu(self.norm2(self.conv(x), c))  # (B, out_ch, 2H, 2W)


class SelfAttention2d(nn.Module):
    """SAGAN self-attention: y = x + gamma * softmax(Q K^T) V over the H*W positions.

    gamma starts at 0, so at initialisation the block is the identity (and its query, key and
    value weights get no gradient until gamma has moved).
    """

    def __init__(self, channels: int):
        super().__init__()
        qk = max(channels // 8, 1)
        self.query = nn.Conv2d(channels, qk, kernel_size=1)
        self.key = nn.Conv2d(channels, qk, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        B, C, H, W = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, HW, C/8)
        k = self.key(x).flatten(2)  # (B, C/8, HW)
        v = self.value(x).flatten(2)  # (B, C, HW)
        attn = torch.softmax(q @ k, dim=-1)  # (B, HW, HW): row i = where position i looks
        out = (v @ attn.transpose(1, 2)).view(B, C, H, W)  # (B, C, H, W)
        y = x + self.gamma * out
        return (y, attn) if return_attention else y


class WordCrossAttention(nn.Module):
    """Image regions attend to the caption's words (AttnGAN): y = x + gamma * softmax(Q K^T / sqrt(d)) V,
    queries from the image features, keys and values from the token vectors. Padding tokens get
    -inf scores, so they receive zero weight and cannot change the image."""

    def __init__(self, channels: int, text_dim: int, attn_dim: int):
        super().__init__()
        self.query = nn.Conv2d(channels, attn_dim, kernel_size=1)
        self.key = nn.Linear(text_dim, attn_dim)
        self.value = nn.Linear(text_dim, channels)
        self.gamma = nn.Parameter(torch.zeros(1))  # starts as the identity, like SelfAttention2d

    def forward(self, x: Tensor, tokens: Tensor, mask: Tensor,
                return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        B, C, H, W = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, HW, d)
        k = self.key(tokens)  # (B, T, d)
        v = self.value(tokens)  # (B, T, C)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, HW, T)
        mask = mask | ~mask.any(dim=1, keepdim=True)  # (B, T); a caption with no real token attends to all
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        attn = torch.softmax(scores, dim=-1)  # (B, HW, T): row i = which words region i looks at
        out = (attn @ v).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        y = x + self.gamma * out
        return (y, attn) if return_attention else y


# -----------------------------------------------------------------------------------------------
# The generator


class GeneratorOutput(NamedTuple):
    image: Tensor  # (B, 3, 32, 32) in [-1, 1]
    kl: Tensor  # scalar: conditioning augmentation's KL term (0 without it)
    attention: dict[str, Tensor]  # "cross": (B, 256, T), "self": (B, 256, 256) at 16x16, when asked


class Generator(ModelMixin, nn.Module):
    """Noise z (B, z_dim) + a TextEncoding -> image (B, 3, 32, 32) in [-1, 1]. See the module docstring.

    Saved and loaded with ``save_pretrained(directory)`` / ``Generator.from_pretrained(directory)``.
    """

    config_class = GeneratorConfig

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        if cfg.cond_aug:
            self.ca = ConditioningAugmentation(cfg.text_dim, cfg.cond_dim)
        else:  # a plain projection of the sentence vector
            self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, cfg.cond_dim), nn.LeakyReLU(0.2))
        norm_cond = cfg.cond_dim if cfg.text_norm else None
        self.fc = nn.Linear(cfg.z_dim + cfg.cond_dim, 4 * ch * 4 * 4)
        self.norm0 = ConditionalNorm2d(4 * ch, norm_cond)
        self.up8 = UpBlock(4 * ch, 4 * ch, norm_cond, cfg.transposed)
        self.up16 = UpBlock(4 * ch, 2 * ch, norm_cond, cfg.transposed)
        self.cross_attn = WordCrossAttention(2 * ch, cfg.text_dim, cfg.attn_dim) if cfg.cross_attention else None
        self.self_attn = SelfAttention2d(2 * ch) if cfg.self_attention else None
        self.up32 = UpBlock(2 * ch, ch, norm_cond, cfg.transposed)
        self.to_rgb = nn.Conv2d(ch, 3, kernel_size=3, padding=1)

    def text_code(self, pooled: Tensor, rng: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The sentence vector (B, text_dim) -> text code c (B, cond_dim) and the KL term (scalar)."""
        if self.cfg.cond_aug:
            return self.ca(pooled, rng)
        return self.text_proj(pooled), pooled.new_zeros(())

    def forward_with_aux(self, z: Tensor, text: TextEncoding, rng: torch.Generator | None = None,
                         return_attention: bool = False) -> GeneratorOutput:
        """Like :meth:`forward`, also returning the KL term and (if asked) the attention maps.

        Args:
            z: noise (B, z_dim).
            text: TextEncoding with tokens (B, T, text_dim), mask (B, T), pooled (B, text_dim).
            rng: torch.Generator for conditioning augmentation's noise (training mode only); None
                uses the global RNG.
            return_attention: also return the attention maps (else ``attention`` is an empty dict).
        """
        if z.shape[0] != text.pooled.shape[0]:
            raise ValueError(f"z has batch size {z.shape[0]} but the text has {text.pooled.shape[0]}")
        tokens, mask = text.tokens.to(z.device), text.mask.to(z.device)
        c, kl = self.text_code(text.pooled.to(z.device), rng)  # (B, cond_dim), scalar
        attention = {}
        x = self.fc(torch.cat([z, c], dim=1)).view(z.shape[0], -1, 4, 4)  # (B, 4ch, 4, 4)
        x = F.relu(self.norm0(x, c))
        x = self.up8(x, c)  # (B, 4ch, 8, 8)
        x = self.up16(x, c)  # (B, 2ch, 16, 16)
        if self.cross_attn is not None:
            x, attention["cross"] = self.cross_attn(x, tokens, mask, return_attention=True)  # attn (B, 256, T)
        if self.self_attn is not None:
            x, attention["self"] = self.self_attn(x, return_attention=True)  # attn (B, 256, 256)
        x = self.up32(x, c)  # (B, ch, 32, 32)
        image = torch.tanh(self.to_rgb(x))  # (B, 3, 32, 32) in [-1, 1]
        return GeneratorOutput(image, kl, attention if return_attention else {})

    def forward(self, z: Tensor, text: TextEncoding, rng: torch.Generator | None = None,
                return_aux: bool = False) -> Tensor | GeneratorOutput:
        """The image (B, 3, 32, 32) in [-1, 1] for noise z (B, z_dim) and a TextEncoding; with
        ``return_aux`` the whole :class:`GeneratorOutput` (training needs its KL term)."""
        out = self.forward_with_aux(z, text, rng)
        return out if return_aux else out.image


@torch.no_grad()
def sample(generator: Generator, text_encoder, captions: list[str], seed: int = 0) -> Tensor:
    """One image per caption, in eval mode, with z drawn from ``torch.Generator().manual_seed(seed)``.

    z is drawn on the CPU and the global RNG is not touched, so a seed gives the same images on
    every device; in eval mode conditioning augmentation uses its mean, so z is the only noise.
    Returns float (B, 3, 32, 32) in [-1, 1], on the generator's device.
    """
    device = next(generator.parameters()).device
    z = torch.randn(len(captions), generator.cfg.z_dim, generator=torch.Generator().manual_seed(seed))
    with evaluating(generator):
        return generator(z.to(device), text_encoder.encode(list(captions)).to(device))


# -----------------------------------------------------------------------------------------------
# The simple way first: regression on (caption, image) pairs


def regression_loss(x_fake: Tensor, x_real: Tensor) -> Tensor:
    """Mean squared pixel error. Its minimiser, for a caption that stands for many images, is their
    per-pixel *mean*: the blurry average notebook 02 shows. The loss rewards one answer, so z is ignored."""
    return F.mse_loss(x_fake, x_real)


@dataclass
class RegressionConfig(PresetConfig):
    batch_size: int = 64  # (caption, image) pairs per step
    lr: float = 2e-3  # Adam's learning rate (betas 0.5, 0.999)
    kl_weight: float = 1e-3  # conditioning augmentation's KL: the pixel loss is small (~0.03), so at 1.0 the
    #                          KL would win, collapse the text code to N(0, I), and the caption would be ignored
    seed: int = 0  # seeds the batch order, z and the augmentation noise (the global RNG is not touched)


def train_regression(generator: Generator, text_encoder, dataset, cfg: RegressionConfig | None = None,
                     steps: int = 500, device: str | torch.device | None = None, progress: bool = True,
                     log_every: int = 10) -> dict[str, list]:
    """Trains the generator with :func:`regression_loss` (+ ``cfg.kl_weight`` * KL) on (caption, image) pairs.

    Args:
        generator: a Generator (trained in place).
        text_encoder: a TextEncoder; its cache makes each distinct caption cost one encoding.
        dataset: items {"image": (3, 32, 32) in [-1, 1], "caption": str}, e.g. ``ShapesDataset(n, image_size=32)``.
        cfg: a RegressionConfig (default ``RegressionConfig()``). steps: Adam steps.
        device: where to train; None keeps the generator's device.
        progress: show a progress bar. log_every: record the losses every this many steps (and the last).

    Returns:
        {"step": [...], "loss": [...], "pixel": [...], "kl": [...], "seconds": float}.
    """
    cfg = cfg or RegressionConfig()
    accelerator = make_accelerator(device or next(generator.parameters()).device, amp=False)
    rng = torch.Generator().manual_seed(cfg.seed)  # CPU: the same run on every device
    G, opt = accelerator.prepare(generator, torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=(0.5, 0.999)))
    G.train()
    batches = BatchOrder(len(dataset), cfg.batch_size, rng=rng)
    history = {"step": [], "loss": [], "pixel": [], "kl": []}
    start = time.perf_counter()
    bar = progress_bar(range(steps), desc="regression", unit="step", disable=not progress)
    for step in bar:
        items = [dataset[int(i)] for i in batches.next()]  # B dicts
        x_real = torch.stack([it["image"] for it in items]).to(accelerator.device)  # (B, 3, 32, 32)
        text = text_encoder.encode([it["caption"] for it in items]).to(accelerator.device)  # TextEncoding, B captions
        z = torch.randn(len(items), generator.cfg.z_dim, generator=rng).to(accelerator.device)  # (B, z_dim)

        x_fake, kl, _ = G(z, text, rng=rng, return_aux=True)
        pixel = regression_loss(x_fake, x_real)
        loss = pixel + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()

        if step % log_every == 0 or step == steps - 1:
            for key, value in (("step", step), ("loss", loss.item()), ("pixel", pixel.item()), ("kl", kl.item())):
                history[key].append(value)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    unwrap(accelerator, G)
    history["seconds"] = time.perf_counter() - start
    return history
