"""Stage 3's refiner (notebook 03_vqvae_refinement): a text-aware VQ-VAE from 32x32 to 64x64, and its
adversarial fine-tuning (notebook 04), VQGAN's recipe (Esser et al. 2021, "Taming Transformers for
High-Resolution Image Synthesis").

The refiner is a :class:`~textimg.vqvae.VQVAE` whose input is a 32x32 image upsampled (bicubic) to
64x64, whose latents are 32x32 (one code per input pixel, saying how it splits into 2x2 output
pixels), whose decoder may also read the caption (FiLM from the pooled text vector), and whose
output is a *residual*:

    x_low (B, 3, 32, 32) ─► bicubic ─► x_up (B, 3, 64, 64) ─► encoder ─► z_e (B, D, 32, 32) ─► quantiser
        ─► z_q ─► decoder (+ text) ─► detail (B, 3, 64, 64);   x_rec = clamp(x_up + detail, -1, 1)

Its last conv starts at zero, so an untrained refiner is exactly bicubic upsampling, and training
only has to learn the missing detail. Fine-tuning adds a PatchGAN's opinion to the pixel loss.

Reading order: RefinerConfig, Refiner, train_refiner, refine, bicubic, evaluate_refiner, then the
adversarial fine-tuning (RefinerGANConfig, adaptive_weight, refiner_step, finetune_refiner).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from textimg.config import PresetConfig
from textimg.discriminator import diff_augment, parse_policy
from textimg.gan import D_LOSSES, G_LOSSES, GANTrainConfig, d_step
from textimg.metrics import codebook_perplexity, codebook_usage, psnr, ssim
from textimg.text import TextEncoding
from textimg.training import BatchOrder, Engine, fetch, frozen, make_accelerator, unwrap
from textimg.utils import evaluating, progress_bar
from textimg.vqvae import VQVAE, VQOutput, VQTrainConfig, VQVAEConfig, train_vqvae

# -----------------------------------------------------------------------------------------------
# The refiner


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


class Refiner(VQVAE):
    """Low-res image (B, 3, 32, 32) in [-1, 1] [+ TextEncoding] -> (x_rec (B, 3, 64, 64) in [-1, 1], VQOutput).

    x_up = upsample(x_low) (bicubic, clamped) is both the encoder's input and the base of the output:
    x_rec = clamp(x_up + decoder(z_q, c), -1, 1). The decoder's last conv starts at zero, so an
    untrained refiner *is* bicubic upsampling. With ``text_cond`` the decoder's ResBlocks take a
    scale and shift from the pooled caption vector; ``text=None`` means the null caption (a zero
    vector, which training shows the model now and then), and text is ignored without ``text_cond``.
    """

    config_class = RefinerConfig

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

    def training_inputs(self, x_real: Tensor, captions: list[str] | None, text_encoder=None,
                        rng: torch.Generator | None = None,
                        text_dropout: float = 0.0) -> tuple[Tensor, TextEncoding | None]:
        """The refiner's inputs for real images (B, 3, 64, 64): the images area-downsampled (B, 3, 32, 32), as
        ShapesDataset makes its 32x32 ones, and the captions' encoding with a fraction ``text_dropout`` replaced
        by the null caption (drawn from ``rng``), so that it also works without text (None without text_cond)."""
        x_low = F.avg_pool2d(x_real, self.cfg.image_size // self.cfg.low_size)  # (B, 3, 32, 32)
        if not self.cfg.text_cond:
            return x_low, None
        text = text_encoder.encode(captions).to(x_real.device)
        keep = (torch.rand(len(captions), generator=rng) >= text_dropout).float().to(x_real.device)  # (B,)
        return x_low, TextEncoding(text.tokens, text.mask, text.pooled * keep[:, None])


def train_refiner(refiner: Refiner, data, cfg: VQTrainConfig | None = None, steps: int = 2000, **kwargs) -> dict:
    """Trains a Refiner on (area-downsampled x_real, x_real) pairs made from ``data`` (64x64 images):
    :func:`~textimg.vqvae.train_vqvae` with a check that ``refiner`` is one. See there for the arguments."""
    if not isinstance(refiner, Refiner):
        raise TypeError(f"train_refiner trains a Refiner, got {type(refiner).__name__}; use train_vqvae")
    return train_vqvae(refiner, data, cfg, steps, **kwargs)


@torch.no_grad()
def refine(refiner: Refiner, x_low: Tensor, text: TextEncoding | None = None, batch_size: int = 256,
           return_indices: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Refines low-res images (B, 3, 32, 32) in [-1, 1] to (B, 3, 64, 64) in [-1, 1], in eval mode.

    Runs in batches of ``batch_size`` on the refiner's device and returns there; ``text`` (B
    captions) is used only by a text-conditioned refiner (None: the null caption). With
    ``return_indices`` also returns the codes (B, 32, 32).
    """
    device = next(refiner.parameters()).device
    out, codes = [], []
    with evaluating(refiner):
        for s in range(0, x_low.shape[0], batch_size):
            t = text[s:s + batch_size].to(device) if text is not None else None
            x_rec, vq = refiner(x_low[s:s + batch_size].to(device), t)
            out.append(x_rec)
            codes.append(vq.indices)
    x_rec, indices = torch.cat(out), torch.cat(codes)
    return (x_rec, indices) if return_indices else x_rec


def bicubic(x_low: Tensor, size: int = 64) -> Tensor:
    """The baseline: bicubic upsampling (align_corners=False) to (B, 3, size, size), clamped to [-1, 1]."""
    return F.interpolate(x_low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def evaluate_refiner(refiner: Refiner, num_samples: int = 2000, split: str = "test", seed: int = 0,
                     text_encoder=None, batch_size: int = 256) -> dict[str, float]:
    """PSNR and SSIM of the refiner and of bicubic upsampling against the real 64x64 images, and the
    codebook's usage and perplexity over all the refiner's codes, on ``num_samples`` images of a split.

    The 32x32 inputs are ShapesDataset's own (the 64x64 render area-averaged). A text-conditioned
    refiner reads the captions through ``text_encoder`` (None: the null caption).
    """
    from textimg.data import ShapesDataset

    high = ShapesDataset(num_samples, split=split, seed=seed, cache=False)
    x_real = torch.stack([high[i]["image"] for i in range(num_samples)])  # (N, 3, 64, 64)
    x_low = F.avg_pool2d(x_real, refiner.cfg.image_size // refiner.cfg.low_size)  # (N, 3, 32, 32)
    text = text_encoder.encode(high.captions()) if text_encoder is not None and refiner.cfg.text_cond else None
    x_rec, indices = refine(refiner, x_low, text, batch_size, return_indices=True)
    x_bic = bicubic(x_low, refiner.cfg.image_size)
    K = refiner.cfg.num_codes
    return {"images": num_samples, "split": split, "psnr_refiner": psnr(x_rec.cpu(), x_real),
            "psnr_bicubic": psnr(x_bic, x_real), "ssim_refiner": ssim(x_rec.cpu(), x_real),
            "ssim_bicubic": ssim(x_bic, x_real), "usage": codebook_usage(indices, K),
            "perplexity": codebook_perplexity(indices, K)}


# -----------------------------------------------------------------------------------------------
# Adversarial fine-tuning (VQGAN's recipe on the refiner)


@dataclass
class RefinerGANConfig(PresetConfig):
    batch_size: int = 16  # real 64x64 images per step, over all processes
    lr: float = 1e-4  # the refiner's Adam learning rate
    lr_d: float = 1e-4  # the patch discriminator's
    beta1: float = 0.5  # Adam's betas (0.5, 0.9), as in VQGAN
    beta2: float = 0.9
    adv_weight: float = 0.1  # weight of the adversarial term (times adaptive_weight if adaptive)
    adaptive: bool = False  # VQGAN's adaptive weight: balance the two gradients at the decoder's last layer
    d_loss: str = "hinge"  # a name in textimg.gan.D_LOSSES
    g_loss: str = "hinge"  # a name in textimg.gan.G_LOSSES
    augment: str = "color,translation"  # DiffAugment policy for D's inputs
    r1_gamma: float = 0.0  # R1 weight (0: off)
    text_dropout: float = 0.1  # fraction of null captions, as in train_vqvae
    amp: bool = True  # mixed precision on CUDA
    seed: int = 0  # seeds the batch order and all draws (the global RNG is untouched)

    def __post_init__(self):
        if self.d_loss not in D_LOSSES or self.g_loss not in G_LOSSES:
            raise ValueError(f"d_loss must be one of {sorted(D_LOSSES)} and g_loss one of {sorted(G_LOSSES)}, "
                             f"got {self.d_loss!r} and {self.g_loss!r}")
        parse_policy(self.augment)


def adaptive_weight(rec_loss: Tensor, adv_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's balance: ||grad_w rec_loss|| / (||grad_w adv_loss|| + 1e-4) at the decoder's last weight w,
    so the adversarial gradient there is as large as the reconstruction's. Detached scalar."""
    (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_adv,) = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, max_weight).detach()


def refiner_step(refiner: Refiner, patch_discriminator: nn.Module, r_opt: torch.optim.Optimizer, x_low: Tensor,
                 x_real: Tensor, text: TextEncoding | None = None, cfg: RefinerGANConfig | None = None,
                 engine: Engine | None = None) -> dict[str, float]:
    """One refiner update, the generator's side: MSE + VQ loss + weight * L_G(patch D(x_rec)). D is frozen.

    Args:
        refiner, patch_discriminator, r_opt: the networks and the refiner's optimizer.
        x_low: (B, 3, 32, 32) inputs; x_real: (B, 3, 64, 64) targets, both in [-1, 1].
        text: captions for a text-conditioned refiner (None: the null caption).
        cfg: losses and weights (default ``RefinerGANConfig(augment="")``). engine: as in :func:`textimg.gan.d_step`.

    Returns:
        {"r_loss", "recon", "vq_loss", "r_adv", "adv_weight", "perplexity", "d_fake_r"} as floats.
    """
    cfg, engine = cfg or RefinerGANConfig(augment=""), engine or Engine()
    D = engine.plain(patch_discriminator)
    refiner.train()
    r_opt.zero_grad(set_to_none=True)
    with frozen(D), engine.autocast():
        x_rec, vq = refiner(x_low, text, rng=engine.rng)  # (B, 3, 64, 64)
        recon = F.mse_loss(x_rec.float(), x_real.float())
        fake_logits = D(diff_augment(x_rec, cfg.augment, engine.rng)).logits  # (B, 1, h, w)
        adv = G_LOSSES[cfg.g_loss](fake_logits)
        last = engine.plain(refiner).decoder.up[-1].weight
        weight = cfg.adv_weight * (adaptive_weight(recon, adv, last) if cfg.adaptive else 1.0)
        r_loss = recon + vq.loss.float() + weight * adv
    engine.update(r_loss, r_opt, "refiner loss")
    return {"r_loss": r_loss.item(), "recon": recon.item(), "vq_loss": vq.loss.item(), "r_adv": adv.item(),
            "adv_weight": float(weight), "perplexity": vq.perplexity.item(),
            "d_fake_r": torch.sigmoid(fake_logits.detach().float()).mean().item()}


def finetune_refiner(refiner: Refiner, patch_discriminator: nn.Module, dataset, text_encoder=None,
                     cfg: RefinerGANConfig | None = None, steps: int = 200, device: str | torch.device | None = None,
                     progress: bool = True, log_every: int = 10) -> dict:
    """Fine-tunes a trained refiner against a PatchGAN, VQGAN-style: per step :func:`textimg.gan.d_step` on
    real 64x64 images against the refiner's current outputs, then :func:`refiner_step`.

    D's fakes come from :func:`refine` (eval mode, no_grad), so only the refiner's own step updates
    its EMA codebook and restarts codes.

    Args:
        refiner: a Refiner (trained in place). patch_discriminator: e.g. ``PatchDiscriminator(...)``.
        dataset: items {"image": (3, 64, 64) in [-1, 1], "caption": str}, e.g. ``ShapesDataset(n)``.
        text_encoder: a TextEncoder, needed by a text-conditioned refiner.
        cfg: a RefinerGANConfig (default ``RefinerGANConfig()``). steps: steps.
        device: where to train; None keeps the refiner's device.
        progress: show a progress bar. log_every: record every this many steps (and the last).

    Returns:
        {"step", "recon", "vq_loss", "r_adv", "adv_weight", "perplexity", "d_loss", "d_real", "d_fake":
        lists; "seconds": float}.
    """
    cfg = cfg or RefinerGANConfig()
    if refiner.cfg.text_cond and text_encoder is None:
        raise ValueError("this Refiner is text-conditioned (cfg.text_cond): pass text_encoder=TextEncoder(...)")
    accelerator = make_accelerator(device or next(refiner.parameters()).device, cfg.amp)
    betas = (cfg.beta1, cfg.beta2)
    r_opt = torch.optim.Adam(refiner.parameters(), lr=cfg.lr, betas=betas)
    d_opt = torch.optim.Adam(patch_discriminator.parameters(), lr=cfg.lr_d, betas=betas)
    R, D, r_opt, d_opt = accelerator.prepare(refiner, patch_discriminator, r_opt, d_opt)
    rank, world = accelerator.process_index, accelerator.num_processes
    data_seed, noise_seed = (int(s) for s in np.random.SeedSequence(cfg.seed).generate_state(2))
    batches = BatchOrder(len(dataset), cfg.batch_size, data_seed, rank, world)
    engine = Engine(accelerator, torch.Generator().manual_seed(noise_seed + rank))
    d_cfg = GANTrainConfig(d_loss=cfg.d_loss, augment=cfg.augment, r1_gamma=cfg.r1_gamma)
    keys = ("recon", "vq_loss", "r_adv", "adv_weight", "perplexity", "d_loss", "d_real", "d_fake")
    history: dict = {"step": [], **{k: [] for k in keys}}
    start = time.perf_counter()
    bar = progress_bar(range(steps), desc="refiner GAN", unit="step",
                       disable=not progress or not accelerator.is_main_process)
    for step in bar:
        engine.step = step
        x_real, captions, _ = fetch(dataset, batches.next())
        x_real = x_real.to(accelerator.device)  # (B, 3, 64, 64)
        x_low, text = refiner.training_inputs(x_real, captions, text_encoder, engine.rng, cfg.text_dropout)
        x_fake = refine(refiner, x_low, text)  # (B, 3, 64, 64), eval mode, no graph
        stats = {**d_step(D, d_opt, x_real, x_fake, cfg=d_cfg, engine=engine),
                 **refiner_step(R, D, r_opt, x_low, x_real, text, cfg, engine)}
        if step % log_every == 0 or step == steps - 1:
            history["step"].append(step)
            for key in keys:
                history[key].append(stats[key])
            bar.set_postfix(recon=f"{stats['recon']:.4f}", d=f"{stats['d_loss']:.3f}")
    unwrap(accelerator, R)
    unwrap(accelerator, D)
    history["seconds"] = time.perf_counter() - start
    return history
