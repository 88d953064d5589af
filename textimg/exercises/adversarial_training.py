"""Exercises of notebook 04_adversarial_training.ipynb (the mechanism: :mod:`textimg.checks`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import call, close, exercise, number, scalar, tensor

__all__ = ["check_d_loss_cls", "check_gan_steps", "check_d_loss_hinge", "check_mismatch", "check_optimal_d"]


def _loss_cases():
    g = torch.Generator().manual_seed(7)
    big = torch.tensor([30.0, -30.0, 2.0, -2.0])
    return [(torch.zeros(4), torch.zeros(4), torch.zeros(4)), (big, -big.flip(0) + 1, big * 0.5),
            (torch.randn(64, generator=g) * 5, torch.randn(64, generator=g) * 5, torch.randn(64, generator=g) * 5)]


@exercise("04.2", 3, "GAN-CLS discriminator loss", "build", reference=("textimg.gan.d_loss_bce",),
          hints=("From logits: -log D = softplus(-l) and -log(1 - D) = softplus(l), each averaged over the batch.",
                 "real term + 0.5 * (fake term + wrong-caption term): the two kinds of fake share one weight."))
def check_d_loss_cls(fn):
    """``fn(real_logits (B,), fake_logits (B,), wrong_logits (B,)) -> scalar``: GAN-CLS's L_D, finite for
    any logits."""
    return [call(fn, *case) for case in _loss_cases()]


@check_d_loss_cls.scorer
def _(got):
    from ..gan import d_loss_bce

    for (real, fake, wrong), mine in zip(_loss_cases(), got, strict=True):
        mine, expected = scalar(mine), d_loss_bce(real, fake, wrong)
        if not torch.isfinite(mine):
            return False, f"for logits {real.tolist()[:4]} your loss is {mine.item()}: work from logits (softplus)."
        if abs(mine.item() - (F.softplus(-real).mean() + F.softplus(fake).mean() + F.softplus(wrong).mean())) < 1e-4:
            return False, "the wrong-caption and fake terms should share one weight: 0.5 each."
        if abs(mine.item() - expected.item()) > 1e-4 * max(1.0, abs(expected.item())):
            return False, f"expected {expected.item():.4f}, got {mine.item():.4f}."
    return True, "stable for large logits, with the wrong caption counted as fake."


def _gan_parts():
    """A tiny G (no conditioning augmentation: no randomness inside) and D, and one batch."""
    from ..discriminator import Discriminator, DiscriminatorConfig
    from ..generator import Generator, GeneratorConfig
    from ..text import TextEncoding

    with torch.random.fork_rng():
        torch.manual_seed(8)
        G = Generator(GeneratorConfig(z_dim=4, text_dim=8, channels=4, cond_dim=4, attn_dim=4, cond_aug=False))
        D = Discriminator(DiscriminatorConfig(text_dim=8, channels=4, feature_dim=8, spectral_norm=False))
    g = torch.Generator().manual_seed(8)
    B, T = 4, 3

    def text():
        tokens, pooled = torch.randn(B, T, 8, generator=g), torch.randn(B, 8, generator=g)
        return TextEncoding(tokens, torch.ones(B, T, dtype=torch.bool), pooled)

    batch = [dict(x_real=torch.rand(B, 3, 32, 32, generator=g) * 2 - 1, z=torch.randn(B, 4, generator=g),
                  text=text(), wrong_text=text()) for _ in range(2)]
    # plain SGD: a step is lr x gradient, so the rounding that differs between thread counts (the
    # learner's kernel and the grader) stays at rounding size; Adam divides it by sqrt(v) and can
    # turn a near-zero gradient's rounding into a full step of lr
    opt_d = torch.optim.SGD(D.parameters(), lr=0.1)
    opt_g = torch.optim.SGD(G.parameters(), lr=0.1)
    return G, D, opt_d, opt_g, batch


def _params(module) -> dict:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@exercise("04.3", 5, "one d_step and one g_step", "build", reference=("textimg.gan.d_step", "textimg.gan.g_step"),
          hints=("d_step: zero D's gradients; real = D(x_real, text, wrong_text); fake = D(x_fake.detach(), text); "
                 "loss from real.logits, fake.logits, real.wrong_logits; backward; step.",
                 "g_step: zero G's gradients; x_fake = G(z, text); loss = non-saturating L_G of "
                 "D(x_fake, text).logits; "
                 "backward; step G's optimizer only. Freeze D meanwhile (requires_grad_(False)), then unfreeze."))
def check_gan_steps(steps):
    """``(d_step, g_step)``: ``d_step(D, d_opt, x_real, x_fake, text, wrong_text) -> dict`` and
    ``g_step(G, D, g_opt, z, text) -> dict``, the package's losses (bce, non-saturating), no augmentation."""
    my_d_step, my_g_step = steps
    G, D, opt_d, opt_g, batch = _gan_parts()
    response = {}
    for i, b in enumerate(batch):  # two rounds: forgotten zero_grad calls show in the second
        x_fake = G(b["z"], b["text"])
        before = [None if p.grad is None else p.grad.clone() for p in G.parameters()]
        call(my_d_step, D, opt_d, b["x_real"], x_fake, b["text"], b["wrong_text"])
        response[f"g_grad_after_d_{i}"] = any(  # did the D step change any of G's gradients?
            (p.grad is not None) != (old is not None) or p.grad is not None and not torch.equal(p.grad, old)
            for p, old in zip(G.parameters(), before))
        response[f"D_{i}"] = _params(D)
        call(my_g_step, G, D, opt_g, b["z"], b["text"])
        response[f"D_after_g_{i}"] = _params(D)
        response[f"G_{i}"] = _params(G)
    return response


@check_gan_steps.scorer
def _(got):
    from ..gan import d_step, g_step

    G, D, opt_d, opt_g, batch = _gan_parts()
    for i, b in enumerate(batch):
        with torch.no_grad():
            x_fake = G(b["z"], b["text"])
        d_step(D, opt_d, b["x_real"], x_fake, b["text"], b["wrong_text"])
        if got[f"g_grad_after_d_{i}"]:
            return False, "the D step sent gradients into G: detach x_fake before D sees it."
        if not all(close(tensor(got[f"D_{i}"][k]), v, 1e-5) for k, v in _params(D).items()):
            return False, f"after d_step #{i + 1}, D's weights differ from the package's d_step."
        if not all(torch.equal(tensor(got[f"D_after_g_{i}"][k]), tensor(got[f"D_{i}"][k])) for k in _params(D)):
            return False, f"g_step #{i + 1} changed D: only G's optimizer may step."
        g_step(G, D, opt_g, b["z"], b["text"])
        if not all(close(tensor(got[f"G_{i}"][k]), v, 1e-5) for k, v in _params(G).items()):
            return False, (f"after g_step #{i + 1}, G's weights differ from the package's g_step (zero G's gradients "
                           "first; the loss is -log D(G(z)) = softplus(-logits).mean()).")
    return True, "two rounds of D then G match the package, and each step moves only its own network."


@exercise("04.4", 3, "hinge loss with a wrong caption", "function", reference=("textimg.gan.d_loss_hinge",),
          hints=("The hinge loss asks real logits above +1 and fake logits below -1: relu(1 - l) and relu(1 + l).",
                 "relu(1 - real).mean() + 0.5 * (relu(1 + fake).mean() + relu(1 + wrong).mean())."))
def check_d_loss_hinge(fn):
    """``fn(real_logits, fake_logits, wrong_logits) -> scalar``: the hinge D loss with GAN-CLS's wrong-caption
    term weighted as in 04.2."""
    return [call(fn, *case) for case in _loss_cases()]


@check_d_loss_hinge.scorer
def _(got):
    from ..gan import d_loss_hinge

    for (real, fake, wrong), mine in zip(_loss_cases(), got, strict=True):
        expected = d_loss_hinge(real, fake, wrong).item()
        mine = scalar(mine).item()
        if abs(mine - expected) > 1e-4 * max(1.0, abs(expected)):
            return False, f"for real logits {real.tolist()[:4]}, expected {expected:.4f}, got {mine:.4f}."
    return True, "zero loss once real logits pass +1 and fakes fall below -1."


def _mismatch_batches() -> list[list[str]]:
    import random

    rnd = random.Random(0)
    words = ["a red circle", "a blue square", "a green star", "a red circle", "a red circle"]
    batches = [[rnd.choice(words) for _ in range(rnd.randint(2, 8))] for _ in range(60)]
    return [b for b in batches if len(set(b)) > 1]


@exercise("04.5", 3, "mismatched captions", "function",
          reference=("textimg.gan.mismatched_captions", "textimg.gan.mismatched_indices"),
          hints=("A shuffle can hand a caption back to itself, or to an equal caption elsewhere in the batch.",
                 "For each caption, pick at random among the batch's captions that differ from it."))
def check_mismatch(fn):
    """``fn(captions: list[str]) -> list[str]``: for each caption another caption of the batch that differs."""
    return [list(call(fn, list(batch))) for batch in _mismatch_batches()]


@check_mismatch.scorer
def _(got):
    for batch, mine in zip(_mismatch_batches(), got, strict=True):
        if len(mine) != len(batch) or any(w not in batch for w in mine):
            return False, "return one caption per input, each taken from the batch."
        if any(w == c for w, c in zip(mine, batch)):
            return False, (f"for the batch {batch} you returned {mine}: a mismatch must never equal the true "
                           "caption, and a batch can repeat a caption.")
    return True, "never the true caption, even with repeats in the batch."


@exercise("04.1", 1, "predict the optimal discriminator", "predict",
          hints=("For fixed G, D maximises p_data log D + p_g log(1 - D) at each x.",
                 "Set the derivative to zero: D* = p_data / (p_data + p_g)."))
def check_optimal_d(answer: float):
    """D*(x) at a point where p_data(x) = 0.3 and p_g(x) = 0.1."""
    return answer


@check_optimal_d.scorer
def _(answer):
    return abs(number(answer) - 0.75) < 1e-3, "D*(x) = 0.3 / (0.3 + 0.1) = 0.75."
