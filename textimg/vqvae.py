"""Stage 3: a VQ-VAE with a discrete codebook, and a refiner from 32x32 to 64x64 (notebook 03_vqvae_refinement).

A VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning") squeezes an image
through a finite vocabulary: the encoder's vectors z_e are each replaced by the nearest of K
learned codebook vectors, and the decoder only ever sees those codes:

    x (B, 3, 64, 64) ─► encoder ─► z_e (B, D, 16, 16) ─► nearest code ─► z_q, indices (B, 16, 16) ─► decoder ─► x_rec

"Nearest" has no gradient, so the *straight-through estimator* copies the decoder's gradient from
z_q to z_e unchanged: z_q = z_e + sg[e - z_e]. Two loss terms then train what the lookup cannot:
the *codebook loss* ||sg[z_e] - e||^2 pulls the chosen codes toward the encoder's outputs, and the
*commitment loss* beta ||z_e - sg[e]||^2 (beta = 0.25) keeps the encoder near its codes.

Codebooks collapse: a few codes win every lookup, the rest never move again. Two fixes:

- an EMA codebook (the VQ-VAE paper's appendix; Razavi et al. 2019, "Generating Diverse
  High-Fidelity Images with VQ-VAE-2"): each code becomes an exponential moving average of the
  vectors assigned to it, with Laplace smoothing of the counts, and no codebook loss;
- dead-code restart (Dhariwal et al. 2020, "Jukebox"; Zeghidour et al. 2021, "SoundStream"): a code
  whose moving-average usage falls below a threshold jumps to a random encoder output of the batch.

The refiner is a VQ-VAE whose input is a 32x32 image upsampled (bicubic) to 64x64, whose latents
are 32x32 (one code per input pixel, saying how it splits into 2x2 output pixels), whose decoder may
also read the caption (FiLM from the pooled text vector), and whose output is a *residual*:

    x_low (B, 3, 32, 32) ─► bicubic ─► x_up (B, 3, 64, 64) ─► encoder ─► z_e (B, D, 32, 32) ─► quantiser
        ─► z_q ─► decoder (+ text) ─► detail (B, 3, 64, 64);   x_rec = clamp(x_up + detail, -1, 1)

Its last conv starts at zero, so an untrained refiner is exactly bicubic upsampling, and training
only has to learn the missing detail. Notebook 04 adds an adversarial loss, as VQGAN does (Esser
et al. 2021, "Taming Transformers for High-Resolution Image Synthesis").

Reading order: VQOutput, VectorQuantizer, ResBlock, Encoder, Decoder, the configs, VQVAE, Refiner,
training (train_vqvae, train_refiner, refine, evaluate_refiner), then the committed checkpoint.
"""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from textimg.config import PresetConfig
from textimg.metrics import CHECKPOINTS, MANIFEST, codebook_perplexity, codebook_usage, psnr, ssim
from textimg.text import TextEncoding
from textimg.utils import (count_parameters, load_checkpoint, load_pretrained_state, save_checkpoint,
                           save_pretrained_module)

REFINER_DIR = CHECKPOINTS / "refiner"
VQVAE_CHECKPOINT_NAME = "vqvae_training.pt"  # the training-state file train_vqvae keeps in checkpoint_dir
VQVAE_CHECKPOINT_FORMAT = "textimg.vqvae_training/1"

# -----------------------------------------------------------------------------------------------
# The vector quantiser


class VQOutput(NamedTuple):
    z_q: Tensor  # (B, D, H, W) quantised latents, straight-through: forward = codes, backward = identity
    indices: Tensor  # long (B, H, W): which code each position chose
    loss: Tensor  # scalar: the VQ loss to add to the reconstruction loss (codebook + commitment; EMA: commitment)
    codebook_loss: Tensor  # scalar ||sg[z_e] - e||^2: moves only the codebook (reported, unused, with EMA)
    commit_loss: Tensor  # scalar beta * ||z_e - sg[e]||^2: moves only the encoder
    perplexity: Tensor  # scalar exp(entropy of this batch's code histogram): 1 (one code) .. K (uniform)
    usage: Tensor  # scalar: fraction of the K codes used at least once in this batch


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation of z_e (B, D, H, W) with K codes of size D; returns a VQOutput.

    Args:
        num_codes: K, the codebook size.
        dim: D, the size of each code (the encoder's output channels).
        beta: weight of the commitment loss (0.25 in the paper).
        ema: update the codebook by exponential moving averages (a buffer, no codebook loss)
            instead of by gradient descent on the codebook loss (a parameter).
        decay: the moving averages' decay (0.99), for the EMA codebook and the usage counts.
        eps: Laplace smoothing of the EMA counts, so no code divides by zero.
        restart_dead: move dead codes to random encoder outputs of the batch (training mode only).
        dead_threshold: a code is dead when the moving average of the number of vectors assigned to
            it per batch falls below this *and* it was not used in the current batch.

    The moving averages and restarts happen in training mode only, under no_grad. Restarts draw
    from the ``rng`` passed to forward, or from the global RNG on the inputs' device when None.
    The codebook starts uniform in [-1/K, 1/K] (as in the paper's code): near the origin, far from
    the encoder's outputs, which is what lets a plain codebook collapse.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, ema: bool = False, decay: float = 0.99,
                 eps: float = 1e-5, restart_dead: bool = False, dead_threshold: float = 1.0):
        super().__init__()
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.ema, self.decay, self.eps = ema, decay, eps
        self.restart_dead, self.dead_threshold = restart_dead, dead_threshold
        init = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)  # (K, D)
        if ema:
            self.register_buffer("codebook", init)  # (K, D) = embed_sum / smoothed cluster_size
            self.register_buffer("embed_sum", init.clone())  # (K, D) EMA of the sum of assigned vectors
        else:
            self.codebook = nn.Parameter(init)  # (K, D), trained by the codebook loss
        # EMA of the number of vectors assigned per batch; starts at 1, as if each code had been
        # assigned its own initial value once (so EMA codes start where they are, not at 0/0)
        self.register_buffer("cluster_size", torch.ones(num_codes))  # (K,)

    @torch.no_grad()
    def reset_codebook(self, vectors: Tensor) -> None:
        """Sets the codebook to ``vectors`` (K, D) and the usage counts to 1 (hand-made codebooks, bad inits)."""
        self.codebook.copy_(vectors)
        self.cluster_size.fill_(1.0)
        if self.ema:
            self.embed_sum.copy_(vectors)

    def embed(self, indices: Tensor) -> Tensor:
        """Code vectors for indices (B, H, W) -> (B, D, H, W)."""
        return self.codebook[indices].permute(0, 3, 1, 2)

    def forward(self, z_e: Tensor, rng: torch.Generator | None = None) -> VQOutput:
        B, D, H, W = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, D)  # (N, D), N = B*H*W vectors
        with torch.autocast(device_type=z_e.device.type, enabled=False):  # distances in float32
            flat32, codebook = flat.float(), self.codebook.float()
            # ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2, for every (vector, code) pair at once
            dist = flat32.pow(2).sum(1, keepdim=True) - 2 * flat32 @ codebook.t() + codebook.pow(2).sum(1)  # (N, K)
            indices = dist.argmin(dim=1)  # (N,)
            q = self.codebook[indices].float()  # (N, D): differentiable w.r.t. the codebook only
            codebook_loss = F.mse_loss(q, flat32.detach())  # ||sg[z_e] - e||^2
            commit_loss = self.beta * F.mse_loss(flat32, q.detach())  # beta ||z_e - sg[e]||^2
        loss = commit_loss if self.ema else codebook_loss + commit_loss
        counts = torch.bincount(indices, minlength=self.num_codes).float()  # (K,) this batch's histogram
        if self.training:
            self._update(flat32.detach(), indices, counts, rng)  # after the lookup: q used the old codebook
        z_q = flat + (q.to(flat.dtype) - flat).detach()  # (N, D) straight-through: d z_q / d z_e = I
        z_q = z_q.view(B, H, W, D).permute(0, 3, 1, 2)  # (B, D, H, W)
        p = counts / counts.sum()  # (K,) the batch's code distribution (same as metrics.codebook_perplexity)
        perplexity = torch.exp(torch.special.entr(p).sum())  # exp(-sum p log p)
        usage = (counts > 0).float().mean()
        return VQOutput(z_q, indices.view(B, H, W), loss, codebook_loss, commit_loss, perplexity, usage)

    @torch.no_grad()
    def _update(self, flat: Tensor, indices: Tensor, counts: Tensor, rng: torch.Generator | None) -> None:
        """Training-mode bookkeeping: usage EMA, the EMA codebook, dead-code restarts. flat: (N, D) float32."""
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)  # (K,)
        if self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)  # (K, D) sum of assigned vectors
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n  # Laplace smoothing
            self.codebook.copy_(self.embed_sum / smoothed[:, None])  # each code = mean of its vectors (EMA)
        if self.restart_dead:
            dead = (self.cluster_size < self.dead_threshold) & (counts == 0)  # (K,) never touches a used code
            n_dead = int(dead.sum())
            if n_dead:
                device = rng.device if rng is not None else flat.device
                if n_dead <= flat.shape[0]:  # distinct vectors of the batch
                    pick = torch.randperm(flat.shape[0], generator=rng, device=device)[:n_dead]
                else:
                    pick = torch.randint(flat.shape[0], (n_dead,), generator=rng, device=device)
                new = flat[pick.to(flat.device)].to(self.codebook.dtype)  # (n_dead, D)
                self.codebook[dead] = new
                self.cluster_size[dead] = self.dead_threshold  # a fresh start, not restarted again at once
                if self.ema:
                    self.embed_sum[dead] = new * self.dead_threshold

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, ema={self.ema}, "
                f"restart_dead={self.restart_dead}")


# -----------------------------------------------------------------------------------------------
# Encoder and decoder (plain numbers in, no config)


class ResBlock(nn.Module):
    """The VQ-VAE paper's residual block: x + conv1x1(ReLU(conv3x3(ReLU(x)))).

    With ``cond_dim`` the hidden features are scaled and shifted by a conditioning vector c
    (FiLM, Perez et al. 2018): h * (1 + gamma(c)) + beta(c), starting as the identity.

    No normalisation layers, as in the paper: on these images (a small shape on a flat background)
    GroupNorm's per-image statistics rescale every feature by how big the shape is, and in our runs
    a normalised refiner never learned to leave bicubic.
    """

    def __init__(self, channels: int, cond_dim: int | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=1)
        self.film = nn.Linear(cond_dim, 2 * channels) if cond_dim is not None else None
        if self.film is not None:  # gamma = beta = 0 at the start
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        h = self.conv1(F.relu(x))  # (B, C, H, W)
        if self.film is not None and c is not None:
            gamma, beta = self.film(c)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
            h = h * (1 + gamma) + beta
        return x + self.conv2(F.relu(h))  # (B, C, H, W)


def _widths(channels: int, levels: int) -> list[int]:
    """Channel widths at each resolution, from the image's (index 0) to the latents' (index ``levels``):
    ``channels`` at the latents, halved per doubling of resolution, at least 16."""
    return [max(channels >> (levels - i), 16) for i in range(levels + 1)]  # e.g. [16, 32, 64]


class Encoder(nn.Module):
    """Image (B, in_ch, S, S) -> z_e (B, code_dim, S / 2^levels, S / 2^levels).

    ``levels`` stride-2 4x4 convs (each halves the side), a 3x3 conv, ``num_res_blocks`` ResBlocks
    at the latent resolution, then ReLU and a 1x1 conv down to ``code_dim`` (the paper's encoder).
    """

    def __init__(self, in_ch: int, channels: int, levels: int, num_res_blocks: int, code_dim: int):
        super().__init__()
        w = [in_ch] + _widths(channels, levels)[1:]  # (in_ch, ..., channels)
        self.down = nn.ModuleList(nn.Conv2d(w[i], w[i + 1], kernel_size=4, stride=2, padding=1) for i in range(levels))
        self.conv = nn.Conv2d(w[-1], channels, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(channels) for _ in range(num_res_blocks))
        self.out = nn.Conv2d(channels, code_dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = x  # (B, in_ch, S, S)
        for down in self.down:
            h = F.relu(down(h))  # the side halves each time
        h = self.conv(h)  # (B, channels, S/2^levels, S/2^levels)
        for block in self.blocks:
            h = block(h)
        return self.out(F.relu(h))  # (B, code_dim, h, w)


class Decoder(nn.Module):
    """z_q (B, code_dim, h, w) [+ condition c (B, cond_dim)] -> (B, out_ch, h * 2^levels, w * 2^levels), unbounded.

    A 3x3 conv up to ``channels``, ``num_res_blocks`` ResBlocks (FiLM-conditioned on c when
    ``cond_dim`` is given), then ``levels`` sub-pixel convolutions (a 3x3 conv to 4x the channels,
    then PixelShuffle, Shi et al. 2016), each doubling the side; the last one outputs the image.
    ``zero_out`` starts the last conv at zero (the refiner's residual starts as "add nothing").
    """

    def __init__(self, code_dim: int, channels: int, levels: int, num_res_blocks: int, out_ch: int = 3,
                 cond_dim: int | None = None, zero_out: bool = False):
        super().__init__()
        w = [out_ch] + _widths(channels, levels)[1:]  # (out_ch, ..., channels)
        self.conv = nn.Conv2d(code_dim, channels, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(channels, cond_dim) for _ in range(num_res_blocks))
        self.up = nn.ModuleList(nn.Conv2d(w[i + 1], 4 * w[i], kernel_size=3, padding=1)
                                for i in reversed(range(levels)))  # latents -> image
        if zero_out:
            nn.init.zeros_(self.up[-1].weight)
            nn.init.zeros_(self.up[-1].bias)

    def forward(self, z_q: Tensor, c: Tensor | None = None) -> Tensor:
        h = self.conv(z_q)  # (B, channels, h, w)
        for block in self.blocks:
            h = block(h, c)
        for up in self.up:
            h = F.pixel_shuffle(up(F.relu(h)), 2)  # (B, 4C', H, W) -> (B, C', 2H, 2W)
        return h  # (B, out_ch, S, S)


# -----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class VQVAEConfig(PresetConfig):
    image_size: int = 64  # side of the images the model reconstructs
    channels: int = 64  # width at the latent resolution; halved per doubling toward the image (at least 16)
    levels: int = 2  # stride-2 steps between image and latents: 64x64 -> 16x16 latents
    num_res_blocks: int = 2  # ResBlocks at the latent resolution, in the encoder and in the decoder
    num_codes: int = 256  # K, the codebook size
    code_dim: int = 32  # D, the size of a code (small D: codes are cheaper to use, cf. ViT-VQGAN)
    beta: float = 0.25  # commitment loss weight
    ema: bool = True  # EMA codebook updates instead of a codebook loss
    decay: float = 0.99  # EMA decay (codebook and usage counts)
    restart_dead: bool = True  # restart dead codes at random encoder outputs
    dead_threshold: float = 1.0  # dead: usage EMA (vectors per batch) below this and unused in the batch

    SIZES = {  # not a field (no annotation): the model sizes of each preset
        "quick": dict(channels=32, num_res_blocks=1, num_codes=64, code_dim=16),
        "cpu": dict(channels=64, num_res_blocks=2, num_codes=256, code_dim=32),
        "gpu": dict(channels=128, num_res_blocks=2, num_codes=512, code_dim=32),
    }

    def __post_init__(self):
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1 (the decoder upsamples at least once), got {self.levels}")
        if self.image_size % 2 ** self.levels:
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^levels = {2 ** self.levels}")


@dataclass
class RefinerConfig(VQVAEConfig):
    # 64x64 -> 32x32 latents: one code per input pixel, saying how it splits into 2x2 output pixels.
    # 16x16 latents (levels=2) learned far slower: in our runs (600 steps, before the warm-up was
    # added) they had not left bicubic while 32x32 latents were 4.5 dB above it.
    levels: int = 1
    low_size: int = 32  # side of the input images (the generator's 32x32)
    upsample: str = "bicubic"  # how the input reaches image_size: the encoder's input and the residual's base
    text_cond: bool = True  # FiLM the decoder's ResBlocks with the pooled caption vector
    text_dim: int = 384  # size of the text encoder's vectors (384 MiniLM, 32 tiny-bert)
    cond_dim: int = 64  # size of the text code c that scales and shifts the decoder's features

    SIZES = {name: {**sizes, "cond_dim": {"quick": 16, "cpu": 64, "gpu": 128}[name]}
             for name, sizes in VQVAEConfig.SIZES.items()}

    def __post_init__(self):
        super().__post_init__()
        if self.image_size % self.low_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of low_size {self.low_size}")
        if self.upsample not in ("nearest", "bilinear", "bicubic"):
            raise ValueError(f"upsample must be nearest, bilinear or bicubic, got {self.upsample!r}")


# -----------------------------------------------------------------------------------------------
# The models


class VQVAE(nn.Module):
    """Image (B, 3, S, S) in [-1, 1] -> (x_rec (B, 3, S, S), VQOutput). See the module docstring.

    x_rec is unbounded, as in the paper (clamp it to show it): a tanh output saturated at the dark
    background in our runs and stopped learning. ``cond_dim`` and ``zero_out`` go to the Decoder
    (the Refiner uses them).
    """

    def __init__(self, cfg: VQVAEConfig, cond_dim: int | None = None, zero_out: bool = False):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(3, cfg.channels, cfg.levels, cfg.num_res_blocks, cfg.code_dim)
        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.code_dim, cfg.beta, cfg.ema, cfg.decay,
                                         restart_dead=cfg.restart_dead, dead_threshold=cfg.dead_threshold)
        self.decoder = Decoder(cfg.code_dim, cfg.channels, cfg.levels, cfg.num_res_blocks, 3, cond_dim, zero_out)

    def num_parameters(self) -> int:
        return count_parameters(self)

    def encode(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) -> z_e (B, D, S / 2^levels, S / 2^levels)."""
        return self.encoder(x)

    def quantize(self, z_e: Tensor, rng: torch.Generator | None = None) -> VQOutput:
        return self.quantizer(z_e, rng)

    def decode(self, z_q: Tensor, c: Tensor | None = None) -> Tensor:
        """z_q (B, D, h, w) [+ condition c (B, cond_dim)] -> (B, 3, S, S), unbounded."""
        return self.decoder(z_q, c)

    def forward(self, x: Tensor, rng: torch.Generator | None = None) -> tuple[Tensor, VQOutput]:
        vq = self.quantize(self.encode(x), rng)
        return self.decode(vq.z_q), vq  # (B, 3, S, S), unbounded


class Refiner(VQVAE):
    """Low-res image (B, 3, 32, 32) in [-1, 1] [+ TextEncoding] -> (x_rec (B, 3, 64, 64) in [-1, 1], VQOutput).

    x_up = upsample(x_low) (bicubic, clamped) is both the encoder's input and the base of the output:
    x_rec = clamp(x_up + decoder(z_q, c), -1, 1). The decoder's last conv starts at zero, so an
    untrained refiner *is* bicubic upsampling. With ``text_cond`` the decoder's ResBlocks take a
    scale and shift from the pooled caption vector; ``text=None`` means the null caption (a zero
    vector, which training shows the model now and then), and text is ignored without ``text_cond``.
    """

    def __init__(self, cfg: RefinerConfig):
        super().__init__(cfg, cond_dim=cfg.cond_dim if cfg.text_cond else None, zero_out=True)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, cfg.cond_dim), nn.SiLU()) if cfg.text_cond else None

    def upsample(self, x_low: Tensor) -> Tensor:
        """(B, 3, low, low) -> (B, 3, S, S), clamped to [-1, 1] (bicubic overshoots at edges)."""
        corners = {} if self.cfg.upsample == "nearest" else {"align_corners": False}
        size = (self.cfg.image_size, self.cfg.image_size)
        return F.interpolate(x_low, size=size, mode=self.cfg.upsample, **corners).clamp(-1, 1)

    def text_code(self, text: TextEncoding | None, batch_size: int, device: torch.device) -> Tensor | None:
        """The decoder's condition c (B, cond_dim) from the pooled caption vector; None without text_cond."""
        if self.text_proj is None:
            return None
        if text is None:
            pooled = torch.zeros(batch_size, self.cfg.text_dim, device=device)  # the null caption
        else:
            pooled = text.pooled.to(device)  # (B, text_dim)
            if pooled.shape != (batch_size, self.cfg.text_dim):
                raise ValueError(f"text.pooled has shape {tuple(pooled.shape)}, "
                                 f"expected ({batch_size}, {self.cfg.text_dim})")
        return self.text_proj(pooled)  # (B, cond_dim)

    def forward(self, x_low: Tensor, text: TextEncoding | None = None,
                rng: torch.Generator | None = None) -> tuple[Tensor, VQOutput]:
        if x_low.shape[-1] != self.cfg.low_size or x_low.shape[-2] != self.cfg.low_size:
            raise ValueError(f"expected ({self.cfg.low_size}, {self.cfg.low_size}) inputs, got {tuple(x_low.shape)}")
        x_up = self.upsample(x_low)  # (B, 3, S, S)
        vq = self.quantize(self.encode(x_up), rng)  # z_q (B, D, 32, 32), indices (B, 32, 32)
        c = self.text_code(text, x_low.shape[0], x_low.device)  # (B, cond_dim) or None
        return (x_up + self.decode(vq.z_q, c)).clamp(-1, 1), vq  # (B, 3, S, S)


# -----------------------------------------------------------------------------------------------
# Training


def refiner_inputs(refiner: "Refiner", x_real: Tensor, captions: list[str] | None, encoder=None,
                   rng: torch.Generator | None = None, text_dropout: float = 0.0) -> tuple[Tensor, TextEncoding | None]:
    """A refiner's training inputs for real images (B, 3, 64, 64): the area-downsampled images
    (B, 3, 32, 32) and, for a text-conditioned refiner, the captions' encoding with a fraction
    ``text_dropout`` of them replaced by the null caption (pooled vector zeroed, drawn from ``rng``),
    so the refiner also learns to work without text. None for the text otherwise."""
    x_low = F.avg_pool2d(x_real, refiner.cfg.image_size // refiner.cfg.low_size)  # (B, 3, 32, 32)
    if not refiner.cfg.text_cond:
        return x_low, None
    text = encoder.encode(captions).to(x_real.device)
    keep = (torch.rand(len(captions), generator=rng) >= text_dropout).float().to(x_real.device)  # (B,)
    return x_low, TextEncoding(text.tokens, text.mask, text.pooled * keep[:, None])


def _batch(data, idx: Tensor) -> tuple[Tensor, list[str] | None]:
    """Images (B, 3, S, S) and captions (None for a tensor) of the items ``idx`` of a dataset or a tensor."""
    if isinstance(data, Tensor):
        return data[idx], None
    items = [data[int(i)] for i in idx]
    captions = [it["caption"] for it in items] if "caption" in items[0] else None
    return torch.stack([it["image"] for it in items]), captions


def train_vqvae(model: VQVAE, data, steps: int = 1000, batch_size: int = 32, lr: float = 2e-3,
                device: str | torch.device | None = None, seed: int = 0, progress: bool = True,
                log_every: int = 10, encoder=None, recon_loss: str = "mse", text_dropout: float = 0.1,
                checkpoint_dir: str | Path | None = None, checkpoint_every: int = 200) -> dict:
    """Trains a VQVAE (input = target = x_real) or a Refiner (input = x_real area-downsampled to
    ``cfg.low_size``, as ShapesDataset makes its 32x32 images) with reconstruction + VQ loss, Adam.

    Why the squared error (``recon_loss="mse"``): it is what PSNR measures, and it trains. L1 is the
    usual choice for super-resolution (sharper, Lim et al. 2017) and VQGAN's pixel loss, but here
    the refiner's residual starts at exactly zero and ~89 % of the pixels need no correction at all:
    L1 pulls every one of them back to zero with the same force as an edge pixel away from it, its
    minimiser is "correct nothing", and in our runs (600 steps, no warm-up) the L1 refiner had not
    left bicubic while the MSE one was 4.5 dB above it. ``"l1"`` is there to try this.

    Args:
        model: a VQVAE or a Refiner (moved to ``device`` here).
        data: a dataset of items {"image": (3, S, S) in [-1, 1], "caption": str}, e.g.
            ``ShapesDataset(n)`` (64x64), or a tensor (N, 3, S, S) of images (no captions).
        steps, batch_size, lr: Adam steps, images per step, peak learning rate (linear warm-up over
            min(100, steps / 10) steps, which keeps the early ReLUs alive, then cosine decay to lr / 10).
        device: where to train; None keeps the model's device.
        seed: seeds the batch order, the dead-code restarts and the text dropout (one CPU
            torch.Generator; the global RNG is not touched), so a run repeats exactly.
        progress: show a tqdm bar.
        log_every: record the losses every this many steps (and at the last step).
        encoder: a TextEncoder, needed by a text-conditioned Refiner (captions are encoded once, cached).
        recon_loss: "mse" or "l1".
        text_dropout: fraction of captions replaced by the null caption (zeros), so ``text=None`` works.
        checkpoint_dir: where ``vqvae_training.pt`` goes (None: no checkpoints): written atomically
            every ``checkpoint_every`` steps and at the end. If it exists, training resumes from it
            exactly (model, optimiser, schedule, the loop's RNG, the data order, the history); it
            must come from a run with the same config and arguments. Loaded with ``weights_only=True``.

    Returns:
        {"step", "loss", "recon", "vq_loss", "commit_loss", "codebook_loss", "perplexity", "usage":
        lists, one entry per logged step (perplexity and usage of that step's batch), "seconds": float}.
    """
    if recon_loss not in ("l1", "mse"):
        raise ValueError(f"recon_loss must be 'l1' or 'mse', got {recon_loss!r}")
    is_refiner = isinstance(model, Refiner)
    with_text = is_refiner and model.cfg.text_cond
    if with_text and encoder is None:
        raise ValueError("this Refiner is text-conditioned (cfg.text_cond): pass encoder=TextEncoder(...)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    rng = torch.Generator().manual_seed(seed)  # CPU: the same run on every device
    opt = torch.optim.Adam(model.parameters(), lr=lr)  # an EMA codebook is a buffer, not in here
    warmup = min(100, steps // 10)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to lr / 10
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    pixel_loss = F.l1_loss if recon_loss == "l1" else F.mse_loss
    keys = ("loss", "recon", "vq_loss", "commit_loss", "codebook_loss", "perplexity", "usage")
    history = {"step": [], **{k: [] for k in keys}}
    batch_size = min(batch_size, len(data))
    order, pos, first, seconds = torch.randperm(len(data), generator=rng), 0, 0, 0.0
    path = Path(checkpoint_dir) / VQVAE_CHECKPOINT_NAME if checkpoint_dir is not None else None
    run = {"format": VQVAE_CHECKPOINT_FORMAT, "model": type(model).__name__, "config": model.cfg.to_dict(),
           "args": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "recon_loss": recon_loss,
                    "text_dropout": text_dropout, "num_items": len(data)}}
    if path is not None and path.is_file():
        state = load_checkpoint(path)  # weights_only=True: no pickled code runs
        if {k: state.get(k) for k in run} != run:
            raise ValueError(f"{path} is from another run ({ {k: state.get(k) for k in ('model', 'args')} }); "
                             "resume with the same model config and arguments, or use another checkpoint_dir")
        model.load_state_dict(state["state"])
        opt.load_state_dict(state["opt"])
        schedule.load_state_dict(state["schedule"])
        rng.set_state(state["rng"])
        order, pos, first = state["order"], state["pos"], state["step"]
        history, seconds = state["history"], state["seconds"]

    def save(next_step: int, elapsed: float) -> None:
        save_checkpoint({**run, "step": next_step, "seconds": elapsed, "state": model.state_dict(),
                         "opt": opt.state_dict(), "schedule": schedule.state_dict(), "rng": rng.get_state(),
                         "order": order, "pos": pos, "history": history}, path)

    start = time.perf_counter()
    bar = range(first, steps)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc=type(model).__name__, unit="step", initial=first, total=steps)
    for step in bar:
        if pos + batch_size > len(order):  # a new epoch, a new order
            order, pos = torch.randperm(len(data), generator=rng), 0
        x_real, captions = _batch(data, order[pos:pos + batch_size])  # (B, 3, S, S)
        pos += batch_size
        x_real = x_real.to(device)
        if is_refiner:
            x_low, text = refiner_inputs(model, x_real, captions, encoder, rng, text_dropout)
            x_rec, vq = model(x_low, text, rng=rng)
        else:
            x_rec, vq = model(x_real, rng=rng)
        recon = pixel_loss(x_rec, x_real)
        loss = recon + vq.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()

        if step % log_every == 0 or step == steps - 1:
            history["step"].append(step)
            for key, value in zip(keys, (loss, recon, vq.loss, vq.commit_loss, vq.codebook_loss,
                                         vq.perplexity, vq.usage)):
                history[key].append(value.item())
            if progress:
                bar.set_postfix(recon=f"{recon.item():.4f}", perplexity=f"{vq.perplexity.item():.0f}")
        if path is not None and ((step + 1) % checkpoint_every == 0 or step == steps - 1):
            save(step + 1, seconds + time.perf_counter() - start)
    history["seconds"] = seconds + time.perf_counter() - start
    return history


def train_refiner(refiner: Refiner, data, steps: int = 2000, batch_size: int = 32, lr: float = 2e-3,
                  device: str | torch.device | None = None, seed: int = 0, progress: bool = True,
                  log_every: int = 10, encoder=None, **kwargs) -> dict:
    """Trains a Refiner on (area-downsampled x_real, x_real) pairs made from ``data`` (64x64 images):
    :func:`train_vqvae` with a check that ``refiner`` is one. See there for the arguments."""
    if not isinstance(refiner, Refiner):
        raise TypeError(f"train_refiner trains a Refiner, got {type(refiner).__name__}; use train_vqvae")
    return train_vqvae(refiner, data, steps, batch_size, lr, device, seed, progress, log_every, encoder, **kwargs)


@torch.no_grad()
def refine(refiner: Refiner, x_low: Tensor, text: TextEncoding | None = None, batch_size: int = 256,
           return_indices: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Refines low-res images (B, 3, 32, 32) in [-1, 1] to (B, 3, 64, 64) in [-1, 1], in eval mode.

    Runs in batches of ``batch_size`` on the refiner's device and returns there; ``text`` (B
    captions) is used only by a text-conditioned refiner (None: the null caption). With
    ``return_indices`` also returns the codes (B, 32, 32).
    """
    device = next(refiner.parameters()).device
    was_training = refiner.training
    refiner.eval()
    try:
        out, codes = [], []
        for s in range(0, x_low.shape[0], batch_size):
            t = text[s:s + batch_size].to(device) if text is not None else None
            x_rec, vq = refiner(x_low[s:s + batch_size].to(device), t)
            out.append(x_rec)
            codes.append(vq.indices)
        x_rec, indices = torch.cat(out), torch.cat(codes)
        return (x_rec, indices) if return_indices else x_rec
    finally:
        refiner.train(was_training)


def bicubic(x_low: Tensor, size: int = 64) -> Tensor:
    """The baseline: bicubic upsampling (align_corners=False) to (B, 3, size, size), clamped to [-1, 1]."""
    return F.interpolate(x_low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def evaluate_refiner(refiner: Refiner, num_samples: int = 2000, split: str = "test", seed: int = 0,
                     encoder=None, batch_size: int = 256) -> dict[str, float]:
    """PSNR and SSIM of the refiner and of bicubic upsampling against the real 64x64 images, and the
    codebook's usage and perplexity over all the refiner's codes, on ``num_samples`` images of a split.

    The 32x32 inputs are ShapesDataset's own (the 64x64 render area-averaged). A text-conditioned
    refiner reads the captions through ``encoder`` (None: the null caption).
    """
    from textimg.data import ShapesDataset

    high = ShapesDataset(num_samples, split=split, seed=seed, cache=False)
    x_real = torch.stack([high[i]["image"] for i in range(num_samples)])  # (N, 3, 64, 64)
    x_low = F.avg_pool2d(x_real, refiner.cfg.image_size // refiner.cfg.low_size)  # (N, 3, 32, 32)
    text = encoder.encode(high.captions()) if encoder is not None and refiner.cfg.text_cond else None
    x_rec, indices = refine(refiner, x_low, text, batch_size, return_indices=True)
    x_bic = bicubic(x_low, refiner.cfg.image_size)
    K = refiner.cfg.num_codes
    return {"images": num_samples, "split": split, "psnr_refiner": psnr(x_rec.cpu(), x_real),
            "psnr_bicubic": psnr(x_bic, x_real), "ssim_refiner": ssim(x_rec.cpu(), x_real),
            "ssim_bicubic": ssim(x_bic, x_real), "usage": codebook_usage(indices, K),
            "perplexity": codebook_perplexity(indices, K)}


# -----------------------------------------------------------------------------------------------
# The committed checkpoint


def save_refiner(refiner: Refiner, directory: str | Path = REFINER_DIR, facts: dict | None = None,
                 manifest: str | Path | None = MANIFEST) -> Path:
    """Writes the refiner (model.safetensors + config.json with ``facts``) and records both files'
    SHA-256 in ``manifest`` (None: no manifest)."""
    return save_pretrained_module(refiner, {"model": "Refiner", "config": refiner.cfg.to_dict(), **(facts or {})},
                                  directory, manifest)


def load_refiner(directory: str | Path = REFINER_DIR, manifest: str | Path | None = MANIFEST) -> Refiner:
    """Loads the committed refiner (or one saved by :func:`save_refiner`), checking its files' SHA-256.

    Safe (safetensors: no pickled code runs). Returned on the CPU in eval mode, trainable (notebook
    04 fine-tunes it). A text-conditioned refiner wants the encoder named in its config.json
    ("text_encoder"). Raises FileNotFoundError, ChecksumError or ValueError naming the file.
    """
    state, config = load_pretrained_state(directory, manifest)
    refiner = Refiner(RefinerConfig.from_dict(config["config"]))
    refiner.load_state_dict(state)
    return refiner.eval()


def train_and_save_refiner(directory: str | Path = REFINER_DIR, preset: str = "cpu", steps: int = 2000,
                           num_train: int = 20_000, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                           text_encoder: str | None = "minilm", device: str | torch.device | None = None,
                           progress: bool = True) -> dict:
    """Trains a refiner of ``RefinerConfig.preset(preset)`` on ``num_train`` training images, measures
    it on 2,000 test images, and saves it with the facts. Returns the facts.

    This is how ``checkpoints/refiner`` was made: ``python -m textimg.vqvae``. ``text_encoder=None``
    trains without text conditioning.
    """
    from textimg.data import ShapesDataset
    from textimg.text import TextEncoder

    encoder = TextEncoder(text_encoder) if text_encoder else None
    cfg = RefinerConfig.preset(preset, text_cond=encoder is not None,
                               **({"text_dim": encoder.dim} if encoder is not None else {}))
    with torch.random.fork_rng(devices=[]):  # the weights come from `seed`; the global RNG is untouched
        torch.manual_seed(seed)
        refiner = Refiner(cfg)
    data = ShapesDataset(num_train, split="train", seed=seed)
    if encoder is not None:
        encoder.encode_dataset(data.captions(), progress=progress)
    history = train_refiner(refiner, data, steps, batch_size, lr, device, seed, progress, log_every=100,
                            encoder=encoder)
    refiner.cpu()
    scores = evaluate_refiner(refiner, 2000, "test", seed=0, encoder=encoder)
    four = lambda v: float(f"{v:.4g}")  # noqa: E731 (four significant digits)
    facts = {
        "text_encoder": text_encoder,
        "training": {"function": "textimg.vqvae.train_and_save_refiner", "preset": preset, "seed": seed,
                     "steps": steps, "num_train": num_train, "batch_size": batch_size, "lr": lr,
                     "schedule": f"linear warm-up over {min(100, steps // 10)} steps, cosine decay to lr / 10",
                     "recon_loss": "mse",
                     "text_dropout": 0.1, "seconds": round(history["seconds"], 1), "device": str(device or "cpu"),
                     "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "date": datetime.date.today().isoformat()},
        "history": {k: [four(v) for v in history[k]] if k != "step" else history[k]
                    for k in ("step", "recon", "vq_loss", "perplexity", "usage")},
        "test": {k: four(v) if isinstance(v, float) else v for k, v in scores.items()},
        "parameters": count_parameters(refiner),
    }
    save_refiner(refiner, directory, facts, Path(directory).parent / MANIFEST.name)
    return facts


if __name__ == "__main__":
    import json

    print(json.dumps(train_and_save_refiner(), indent=2))
