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

The refiner built on it (32x32 -> 64x64) is :mod:`textimg.refiner`.

Reading order: VQOutput, VectorQuantizer, ResBlock, Encoder, Decoder, VQVAEConfig, VQVAE,
VQTrainConfig, train_vqvae.
"""

from __future__ import annotations

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
from textimg.training import BatchOrder, TrainingCheckpoint, fetch, make_accelerator, unwrap
from textimg.utils import ModelMixin, progress_bar

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


# -----------------------------------------------------------------------------------------------
# The models


class VQVAE(ModelMixin, nn.Module):
    """Image (B, 3, S, S) in [-1, 1] -> (x_rec (B, 3, S, S), VQOutput). See the module docstring.

    x_rec is unbounded, as in the paper (clamp it to show it): a tanh output saturated at the dark
    background in our runs and stopped learning. ``cond_dim`` and ``zero_out`` go to the Decoder
    (the Refiner uses them).
    """

    config_class = VQVAEConfig

    def __init__(self, cfg: VQVAEConfig, cond_dim: int | None = None, zero_out: bool = False):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(3, cfg.channels, cfg.levels, cfg.num_res_blocks, cfg.code_dim)
        self.quantizer = VectorQuantizer(cfg.num_codes, cfg.code_dim, cfg.beta, cfg.ema, cfg.decay,
                                         restart_dead=cfg.restart_dead, dead_threshold=cfg.dead_threshold)
        self.decoder = Decoder(cfg.code_dim, cfg.channels, cfg.levels, cfg.num_res_blocks, 3, cond_dim, zero_out)

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

    def training_inputs(self, x_real: Tensor, captions: list[str] | None, text_encoder=None,
                        rng: torch.Generator | None = None, text_dropout: float = 0.0) -> tuple:
        """What :func:`train_vqvae` feeds the model for real images (B, 3, S, S): the images themselves."""
        return (x_real,)


# -----------------------------------------------------------------------------------------------
# Training


@dataclass
class VQTrainConfig(PresetConfig):
    batch_size: int = 32  # images per step, over all processes
    lr: float = 2e-3  # peak learning rate: linear warm-up over min(100, steps / 10) steps, cosine decay to lr / 10
    recon_loss: str = "mse"  # "mse" (what PSNR measures; BENCHMARKS.md says why not L1 here) or "l1"
    text_dropout: float = 0.1  # fraction of captions replaced by the null caption (a text-conditioned refiner)
    seed: int = 0  # seeds the batch order, dead-code restarts and text dropout (the global RNG is not touched)

    SIZES = {"quick": dict(batch_size=8)}

    def __post_init__(self):
        if self.recon_loss not in ("l1", "mse"):
            raise ValueError(f"recon_loss must be 'l1' or 'mse', got {self.recon_loss!r}")


def train_vqvae(model: VQVAE, data, cfg: VQTrainConfig | None = None, steps: int = 1000,
                device: str | torch.device | None = None, text_encoder=None, progress: bool = True,
                log_every: int = 10, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 200) -> dict:
    """Trains a VQVAE (input = target = x_real), or a Refiner (input = x_real area-downsampled, see
    :meth:`~textimg.refiner.Refiner.training_inputs`), on reconstruction + VQ loss with Adam.

    Args:
        model: a VQVAE or a Refiner (trained in place).
        data: a dataset of items {"image": (3, S, S) in [-1, 1], "caption": str}, e.g.
            ``ShapesDataset(n)`` (64x64), or a tensor (N, 3, S, S) of images (no captions).
        cfg: a VQTrainConfig (default ``VQTrainConfig()``). steps: Adam steps.
        device: where to train; None keeps the model's device.
        text_encoder: a TextEncoder, needed by a text-conditioned Refiner (captions are encoded once, cached).
        progress: show a progress bar. log_every: record the losses every this many steps (and the last).
        checkpoint_dir: where ``vqvae_training.pt`` goes (None: none), every ``checkpoint_every``
            steps and at the end; training resumes from it exactly if it exists (same config and steps).

    Returns:
        {"step", "loss", "recon", "vq_loss", "commit_loss", "codebook_loss", "perplexity", "usage":
        lists, one entry per logged step (perplexity and usage of that step's batch), "seconds": float}.
    """
    cfg = cfg or VQTrainConfig()
    if getattr(model.cfg, "text_cond", False) and text_encoder is None:
        raise ValueError("this Refiner is text-conditioned (cfg.text_cond): pass text_encoder=TextEncoder(...)")
    accelerator = make_accelerator(device or next(model.parameters()).device, amp=False)
    rng = torch.Generator().manual_seed(cfg.seed)  # CPU: the same run on every device
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)  # an EMA codebook is a buffer, not in here
    net, opt = accelerator.prepare(model, opt)
    warmup = min(100, steps // 10)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to lr / 10
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    pixel_loss = F.l1_loss if cfg.recon_loss == "l1" else F.mse_loss
    keys = ("loss", "recon", "vq_loss", "commit_loss", "codebook_loss", "perplexity", "usage")
    history = {"step": [], **{k: [] for k in keys}}
    batches = BatchOrder(len(data), cfg.batch_size, rng=rng, rank=accelerator.process_index,
                         world=accelerator.num_processes)
    checkpoint = TrainingCheckpoint(checkpoint_dir, "vqvae_training", {
        "model_class": type(model).__name__, "config": model.cfg.to_dict(), "train_config": cfg.to_dict(),
        "steps": steps, "num_items": len(data)}, accelerator)
    first, seconds = 0, 0.0
    state = checkpoint.load(rng)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        schedule.load_state_dict(state["schedule"])
        batches.load_state_dict(state["data"])
        history, first, seconds = state["history"], state["step"], state["seconds"]

    start = time.perf_counter()
    net.train()
    bar = progress_bar(range(first, steps), desc=type(model).__name__, unit="step", initial=first, total=steps,
               disable=not progress or not accelerator.is_main_process)
    for step in bar:
        x_real, captions, _ = fetch(data, batches.next())  # (B, 3, S, S)
        x_real = x_real.to(accelerator.device)
        x_rec, vq = net(*model.training_inputs(x_real, captions, text_encoder, rng, cfg.text_dropout), rng=rng)
        recon = pixel_loss(x_rec, x_real)
        loss = recon + vq.loss
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        schedule.step()

        if step % log_every == 0 or step == steps - 1:
            history["step"].append(step)
            for key, value in zip(keys, (loss, recon, vq.loss, vq.commit_loss, vq.codebook_loss,
                                         vq.perplexity, vq.usage)):
                history[key].append(value.item())
            bar.set_postfix(recon=f"{recon.item():.4f}", perplexity=f"{vq.perplexity.item():.0f}")
        if (step + 1) % checkpoint_every == 0 or step == steps - 1:
            checkpoint.save({"step": step + 1, "seconds": seconds + time.perf_counter() - start,
                             "model": model.state_dict(), "opt": opt.state_dict(), "schedule": schedule.state_dict(),
                             "data": batches.state_dict(), "history": history}, rng)
    unwrap(accelerator, net)
    history["seconds"] = seconds + time.perf_counter() - start
    return history
