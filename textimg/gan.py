"""Stage 4: adversarial training (notebook 04_adversarial_training).

A GAN (Goodfellow et al. 2014, "Generative Adversarial Nets") trains two networks against each
other: a discriminator D (:mod:`textimg.discriminator`) that tells real images from generated
ones, and the generator G that tries to fool it. D outputs a logit l; D(x) = sigmoid(l).

    x_real, caption ──────────────┐
    z, caption ─► G ─► x_fake ────┴─► DiffAugment ─► D(x, caption) ─► logits ─► d_loss / g_loss

The matching-aware mechanism (GAN-CLS, Reed et al. 2016) is one short path, read in this order:
:func:`train_gan` picks for each real image a caption of the batch that *means* something else
(:func:`mismatched_indices`); :func:`d_step` has D score each real image against its own and that
wrong caption (:meth:`~textimg.discriminator.Discriminator.forward`); and L_D counts "real image,
wrong caption" as fake, the third term of :func:`d_loss_bce`.

The training loop keeps the lesson visible: :func:`d_step` on the generated batch *detached*, then
:func:`g_step`, two plain functions that each update one network and return a dict of floats.

Reading order: the losses (the source document's L_D and L_G first), R1, mismatched captions,
d_step and g_step, GANTrainConfig, train_gan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from textimg.config import PresetConfig
from textimg.discriminator import apply_augment, augment_params, diff_augment, parse_policy
from textimg.text import TextEncoding
from textimg.training import BatchOrder, Engine, TrainingCheckpoint, fetch, frozen, make_accelerator, unwrap
from textimg.utils import progress_bar

# -----------------------------------------------------------------------------------------------
# Losses, all from logits l; D(x) = sigmoid(l).
#
# -log sigmoid(l) = softplus(-l) and -log(1 - sigmoid(l)) = softplus(l): the same numbers as
# binary_cross_entropy_with_logits, finite for any logit. Logits are cast to float32 first, so the
# losses are safe under autocast. Each is a mean, so any logit shape works ((B,) or (B, 1, h, w)).


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


def attribute_loss(attributes: tuple[Tensor, ...] | None, labels: Tensor) -> Tensor:
    """AC-GAN's attribute loss (Odena et al. 2017): the mean over attributes of the cross-entropy between
    D's attribute logits (one (B, n_a) tensor per attribute, ``DOutput.attributes``) and ``labels``
    (B, num_attributes), one class index per attribute."""
    if attributes is None:
        raise ValueError("this discriminator has no attribute head: set DiscriminatorConfig.num_classes")
    if labels.shape[1:] != (len(attributes),):
        raise ValueError(f"labels must be (B, {len(attributes)}), got {tuple(labels.shape)}")
    labels = labels.to(attributes[0].device)
    return torch.stack([F.cross_entropy(lg.float(), labels[:, a]) for a, lg in enumerate(attributes)]).mean()


def mode_seeking_loss(x1: Tensor, x2: Tensor, z1: Tensor, z2: Tensor, eps: float = 1e-5) -> Tensor:
    """Mode seeking (MSGAN, Mao et al. 2019): two noises z1, z2 (B, z_dim) for the same captions should
    give images x1, x2 (B, 3, S, S) as far apart as the noises are. The ratio
    r = mean|x1 - x2| / mean|z1 - z2| (per pair, then averaged) is large when G uses its noise;
    the loss 1 / (r + eps) falls as r grows, and is added to g_loss with ``ms_weight``."""
    ratio = (x1.float() - x2.float()).abs().mean(dim=(1, 2, 3)) / (z1.float() - z2.float()).abs().mean(dim=1)
    return 1.0 / (ratio.mean() + eps)


def r1_penalty(real_logits: Tensor, x_real: Tensor, gamma: float,
               scaler: torch.amp.GradScaler | None = None) -> Tensor:
    """R1 = gamma / 2 * E_x ||grad_x D(x)||^2 (Mescheder et al. 2018), on real images, so D is flat
    where the data is.

    Args:
        real_logits: D's logits for ``x_real``, any shape (summed: each image's logit depends on
            that image only, so the gradient of the sum is each image's own gradient).
        x_real: the images D saw, (B, 3, H, W), with ``requires_grad=True``.
        gamma: the weight.
        scaler: an enabled fp16 GradScaler scales the logits before differentiating, and the
            gradient back, so small gradients do not underflow (PyTorch's AMP recipe).

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
# Mismatched captions (GAN-CLS)


def _hashable(key) -> Hashable:
    return tuple(sorted(key.items())) if isinstance(key, dict) else key


def mismatched_indices(keys: Sequence, rng: torch.Generator | None = None) -> Tensor:
    """For each sample i of a batch, the index j of a sample whose key differs from i's, uniformly.

    Args:
        keys: B keys saying what each caption means: the captions themselves, or label dicts
            (then two synonymous captions, "a big red star" and "a large red star", never count
            as a mismatch).
        rng: the torch.Generator to draw from (None: the global RNG).

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
    device = rng.device if rng is not None else torch.device("cpu")
    scores = torch.rand(len(keys), len(keys), generator=rng, device=device).cpu()
    return scores.masked_fill(~candidates, -1.0).argmax(dim=1)  # (B,) a uniform pick among the candidates


def mismatched_captions(captions: Sequence[str], rng: torch.Generator | None = None,
                        keys: Sequence | None = None) -> list[str]:
    """A mismatched caption for each caption of a batch, drawn from the batch (see :func:`mismatched_indices`;
    ``keys`` defaults to the captions)."""
    idx = mismatched_indices(keys if keys is not None else captions, rng)
    return [captions[j] for j in idx.tolist()]


# -----------------------------------------------------------------------------------------------
# One step for one network


def _mean_prob(logits: Tensor | None) -> float:
    """Mean sigmoid(logit), i.e. D's average belief "real"; NaN for None."""
    return torch.sigmoid(logits.detach().float()).mean().item() if logits is not None else float("nan")


def d_step(discriminator, d_opt: torch.optim.Optimizer, x_real: Tensor, x_fake: Tensor,
           text: TextEncoding | Tensor | None = None, wrong_text: TextEncoding | Tensor | None = None,
           labels: Tensor | None = None, cfg: GANTrainConfig | None = None,
           engine: Engine | None = None) -> dict[str, float]:
    """One discriminator update. Real images with their captions should be called real; generated
    images (detached: no gradient reaches G) and real images with mismatched captions, fake.

    Args:
        discriminator: a Discriminator, or a PatchDiscriminator (``text=None``).
        d_opt: D's optimizer.
        x_real, x_fake: (B, 3, S, S) in [-1, 1].
        text: the captions (TextEncoding or pooled (B, text_dim)); wrong_text: mismatched captions
            for the real images, same form (None: no GAN-CLS term).
        labels: (B, num_attributes) class indices of the real images, for D's attribute head.
        cfg: losses, DiffAugment policy, R1 and attribute weights (default: ``GANTrainConfig(augment="")``).
        engine: mixed precision, gradient scaling and the RNG (default ``Engine()``: float32, global RNG).

    Returns:
        {"d_loss", "d_adv", "r1", "d_aux", "d_real": mean D(x), "d_fake": mean D(G(z)), "d_wrong"} floats.
    """
    cfg, engine = cfg or GANTrainConfig(augment=""), engine or Engine()
    if text is None and (wrong_text is not None or labels is not None):
        raise ValueError("wrong_text and labels need text: they only mean something to a caption-conditioned D")
    if cfg.augment:  # the same transformation for real and generated image i
        params = augment_params(x_real, cfg.augment, engine.rng)
        x_real, x_fake = apply_augment(x_real, params), apply_augment(x_fake, params)
    if cfg.r1_gamma > 0:
        x_real = x_real.detach().requires_grad_(True)  # R1 differentiates D's logits with respect to it
    discriminator.train()
    d_opt.zero_grad(set_to_none=True)
    with engine.autocast():
        real = discriminator(x_real, text, wrong_text)  # each real image with its caption, and with a wrong one
        fake = discriminator(x_fake.detach(), text)  # each generated image with the caption it was drawn for
        adv = D_LOSSES[cfg.d_loss](real.logits, fake.logits, real.wrong_logits)  # real, fake, wrong caption
        aux = attribute_loss(real.attributes, labels) if labels is not None else adv.new_zeros(())
    r1 = r1_penalty(real.logits, x_real, cfg.r1_gamma, engine.scaler) if cfg.r1_gamma > 0 else adv.new_zeros(())
    d_loss = adv + r1 + cfg.aux_weight * aux
    engine.update(d_loss, d_opt, "d_loss", guard=adv if engine.scaler is not None else None)  # fp16: R1 may overflow
    return {"d_loss": d_loss.item(), "d_adv": adv.item(), "r1": r1.item(), "d_aux": aux.item(),
            "d_real": _mean_prob(real.logits), "d_fake": _mean_prob(fake.logits),
            "d_wrong": _mean_prob(real.wrong_logits)}


def g_step(generator, discriminator, g_opt: torch.optim.Optimizer, z: Tensor, text: TextEncoding,
           labels: Tensor | None = None, cfg: GANTrainConfig | None = None,
           engine: Engine | None = None) -> dict[str, float]:
    """One generator update: g_loss = L_G(D(augment(G(z, c)), c)) [+ attribute loss] + kl_weight * KL
    (conditioning augmentation's) [+ ms_weight * mode-seeking loss, on a second draw of z for the first
    half of the captions]. D is frozen meanwhile, so only G changes.

    Args:
        generator, discriminator, g_opt: the networks and G's optimizer.
        z: noise (B, z_dim). text: the captions (TextEncoding: tokens for G, pooled for D).
        labels: (B, num_attributes) the attributes the captions ask for: G is also trained so that
            D's attribute head names them; None: no attribute loss.
        cfg, engine: as in :func:`d_step` (the same augmentation D trains with, or fakes look different to D).

    Returns:
        {"g_loss", "g_adv", "g_aux", "kl", "ms", "d_fake_g": mean D(G(z)) as G saw it} floats.
    """
    cfg, engine = cfg or GANTrainConfig(augment=""), engine or Engine()
    D = engine.plain(discriminator)  # D's own gradients are not wanted here: no DDP synchronisation
    generator.train()
    g_opt.zero_grad(set_to_none=True)
    with frozen(D), engine.autocast():
        x_fake, kl, _ = generator(z, text, rng=engine.rng, return_aux=True)  # (B, 3, 32, 32), scalar
        fake = D(diff_augment(x_fake, cfg.augment, engine.rng), text)
        adv = G_LOSSES[cfg.g_loss](fake.logits)
        aux = attribute_loss(fake.attributes, labels) if labels is not None else adv.new_zeros(())
        g_loss = adv + cfg.aux_weight * aux + cfg.kl_weight * kl.float()
        ms = adv.new_zeros(())
        if cfg.ms_weight > 0:  # the same captions again, with other noise (half the batch: half the cost)
            half = max(1, len(z) // 2)
            z2 = torch.randn(half, z.shape[1], generator=engine.rng).to(z.device)
            x2 = generator(z2, text[:half], rng=engine.rng)
            ms = mode_seeking_loss(x_fake[:half], x2, z[:half], z2)
            g_loss = g_loss + cfg.ms_weight * ms
    engine.update(g_loss, g_opt, "g_loss")
    return {"g_loss": g_loss.item(), "g_adv": adv.item(), "g_aux": aux.item(), "kl": kl.item(), "ms": ms.item(),
            "d_fake_g": _mean_prob(fake.logits)}


# -----------------------------------------------------------------------------------------------
# The training loop


@dataclass
class GANTrainConfig(PresetConfig):
    batch_size: int = 32  # real images (and as many fakes) per step, over all processes
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
    ms_weight: float = 0.0  # weight of the mode-seeking loss (MSGAN; 0: off): G must use its noise
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 + GradScaler); CPU: fp32
    seed: int = 0  # seeds the data order and every random draw of the loop (not the weights)

    SIZES = {"quick": dict(batch_size=16), "cpu": dict(batch_size=32), "gpu": dict(batch_size=64)}

    def __post_init__(self):
        if self.d_loss not in D_LOSSES:
            raise ValueError(f"d_loss must be one of {sorted(D_LOSSES)}, got {self.d_loss!r}")
        if self.g_loss not in G_LOSSES:
            raise ValueError(f"g_loss must be one of {sorted(G_LOSSES)}, got {self.g_loss!r}")
        parse_policy(self.augment)  # raises on an unknown augmentation


LOGGED = ("d_loss", "g_loss", "d_real", "d_fake", "d_wrong", "r1", "kl", "d_aux", "g_aux", "ms")


def attribute_labels(meanings: list, num_classes: tuple, device: torch.device) -> Tensor | None:
    """(B, A) class indices from items' label dicts (attributes in dataset order) for an attribute
    head with ``num_classes``; None when D has no such head."""
    if not num_classes:
        return None
    if not all(isinstance(m, dict) and len(m) == len(num_classes) for m in meanings):
        raise ValueError(f"the discriminator classifies {len(num_classes)} attributes, so every item needs "
                         "a 'labels' dict with as many (e.g. ShapesDataset's); set num_classes=() otherwise")
    return torch.tensor([list(m.values()) for m in meanings], dtype=torch.long, device=device)


def train_gan(generator, discriminator, text_encoder, dataset, cfg: GANTrainConfig | None = None, steps: int = 1000,
              checkpoint_dir: str | Path | None = None, checkpoint_every: int = 100, resume: bool = True,
              progress: bool = True, log_every: int = 10, device: str | torch.device | None = None,
              callback: Callable[[int, dict], None] | None = None) -> dict:
    """Trains a text-conditioned GAN: per step :func:`d_step`, then :func:`g_step`.

    Each step draws a batch, encodes its captions (cached), draws a mismatched caption for each
    real image (GAN-CLS, by meaning), z and a fake batch (G under no_grad, since D's step must not
    train G), then updates D and G once each. Runs through Accelerate: under ``accelerate launch``
    or ``torchrun`` each process takes its share of every batch and gradients are averaged.

    Args:
        generator, discriminator: the networks (trained in place).
        text_encoder: a TextEncoder whose ``dim`` matches both networks' ``text_dim``.
        dataset: items {"image": (3, 32, 32) in [-1, 1], "caption": str[, "labels": dict]}, e.g.
            ``ShapesDataset(n, image_size=32)``.
        cfg: a GANTrainConfig (default ``GANTrainConfig()``).
        steps: total number of steps, counting those of a resumed run.
        checkpoint_dir: where ``gan_training.pt`` goes (None: none), every ``checkpoint_every`` steps
            and at the end; never for a step whose loss was not finite.
        resume: continue exactly from that checkpoint if there is one (models, optimisers, scaler,
            every random state, data order, step, history). Its configs must match. Exactness also
            needs the text encoder to return the same vectors for the same captions: fill its cache the
            same way in both runs (e.g. ``text_encoder.encode_dataset(dataset.captions())`` first).
        progress: show a progress bar. log_every: record the losses every this many steps (and the last).
        device: "cpu" or a GPU; None keeps the generator's device.
        callback: called as ``callback(step, stats)`` at each logged step (e.g. to draw a grid).

    Returns:
        {"step", "d_loss", "g_loss", "d_real", "d_fake", "d_wrong", "r1", "kl", "d_aux", "g_aux": lists,
        one entry per logged step; "seconds": float, the training time of all sittings}.

    Raises:
        NonFiniteLossError: a loss was NaN or inf; the last checkpoint is the last good state.
        ValueError: a batch whose captions all mean the same, images that are not 32x32, or a
            checkpoint that cannot be read or comes from another run.
    """
    cfg = cfg or GANTrainConfig()
    accelerator = make_accelerator(device or next(generator.parameters()).device, cfg.amp)
    betas = (cfg.beta1, cfg.beta2)
    G, D, g_opt, d_opt = accelerator.prepare(generator, discriminator,
                                             torch.optim.Adam(generator.parameters(), lr=cfg.lr_g, betas=betas),
                                             torch.optim.Adam(discriminator.parameters(), lr=cfg.lr_d, betas=betas))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    data_seed, noise_seed = (int(s) for s in np.random.SeedSequence(cfg.seed).generate_state(2))
    batches = BatchOrder(len(dataset), cfg.batch_size, data_seed, rank, world)
    engine = Engine(accelerator, torch.Generator().manual_seed(noise_seed + rank))  # z, mismatches, augmentation
    checkpoint = TrainingCheckpoint(checkpoint_dir, "gan_training", {
        "config": cfg.to_dict(), "generator_config": generator.cfg.to_dict(),
        "discriminator_config": discriminator.cfg.to_dict(), "num_items": len(dataset)}, accelerator)
    history: dict = {"step": [], **{k: [] for k in LOGGED}}
    first, seconds = 0, 0.0
    state = checkpoint.load(engine.rng) if resume else None
    if state is not None:
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        g_opt.load_state_dict(state["g_opt"])
        d_opt.load_state_dict(state["d_opt"])
        if engine.scaler is not None and state["scaler"]:
            engine.scaler.load_state_dict(state["scaler"])
        batches.load_state_dict(state["data"])
        history, first, seconds = state["history"], state["step"], state["seconds"]
        for key in LOGGED:  # a checkpoint from before a statistic was logged
            history.setdefault(key, [float("nan")] * len(history["step"]))

    start = time.perf_counter()
    bar = progress_bar(range(first, steps), desc="GAN", unit="step", initial=first, total=steps,
               disable=not progress or not accelerator.is_main_process)
    for step in bar:
        engine.step = step
        x_real, captions, meanings = fetch(dataset, batches.next())
        if x_real.shape[-1] != 32:
            raise ValueError(f"train_gan needs 32x32 images, got {tuple(x_real.shape[1:])}: "
                             "use e.g. ShapesDataset(n, image_size=32)")
        x_real = x_real.to(device)  # (B, 3, 32, 32)
        text = text_encoder.encode(captions).to(device)  # TextEncoding, B captions
        wrong = text.pooled[mismatched_indices(meanings, engine.rng).to(device)] if cfg.mismatch else None
        labels = attribute_labels(meanings, discriminator.cfg.num_classes, device)  # (B, A) or None
        z = torch.randn(len(captions), generator.cfg.z_dim, generator=engine.rng).to(device)  # (B, z_dim)
        with torch.no_grad(), engine.autocast():
            x_fake = G(z, text, rng=engine.rng)  # (B, 3, 32, 32), no graph: D's step cannot train G

        d_stats = d_step(D, d_opt, x_real, x_fake, text, wrong, labels, cfg, engine)
        g_stats = g_step(G, D, g_opt, z, text, labels, cfg, engine)

        stats = {**d_stats, **g_stats}
        if step % log_every == 0 or step == steps - 1:
            history["step"].append(step)
            for key in LOGGED:
                history[key].append(stats[key])
            bar.set_postfix(d=f"{stats['d_loss']:.3f}", g=f"{stats['g_loss']:.3f}")
            if callback is not None and accelerator.is_main_process:
                callback(step, stats)
        if (step + 1) % checkpoint_every == 0 or step == steps - 1:
            checkpoint.save({"step": step + 1, "seconds": seconds + time.perf_counter() - start,
                             "generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
                             "g_opt": g_opt.state_dict(), "d_opt": d_opt.state_dict(),
                             "scaler": engine.scaler.state_dict() if engine.scaler is not None else {},
                             "data": batches.state_dict(), "history": history}, engine.rng)
    unwrap(accelerator, G)  # the plain modules again (no autocast patch left on their forward)
    unwrap(accelerator, D)
    history["seconds"] = seconds + time.perf_counter() - start
    return history
