"""Exercises of notebook 03_vqvae_refinement.ipynb (the mechanism: :mod:`textimg.checks`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..checks import call, close, exercise, number, scalar, tensor

__all__ = ["check_quantizer", "check_ema_update", "check_perplexity", "check_latent_bits", "check_cosine_code"]


def _vq_inputs():
    g = torch.Generator().manual_seed(4)
    z_e = torch.randn(200, 4, generator=g) * 1.5  # (N, D)
    codebook = torch.randn(16, 4, generator=g)  # (K, D)
    w = torch.randn(200, 4, generator=g)  # a downstream loss: sum(w * z_q)
    return z_e, codebook, w


def _vq_response(z_q, indices, loss, z_e, codebook) -> dict:
    return {"z_q": z_q.detach(), "indices": indices.detach(), "loss": loss.detach().reshape(()),
            "grad_z_e": z_e.grad, "grad_codebook": codebook.grad}


@exercise("03.1", 5, "the vector quantiser: lookup, both losses, straight-through", "build",
          reference=("textimg.vqvae.VectorQuantizer.forward",),
          hints=("Three parts: nearest code per vector; codebook loss mse(e, z_e.detach()) + beta * mse(z_e, "
                 "e.detach()); z_q = z_e + (e - z_e).detach().",
                 "The codebook gets its gradient only from the codebook loss, the encoder from the commitment "
                 "loss and, through the straight-through z_q, from everything downstream."))
def check_quantizer(fn):
    """``fn(z_e (N, D), codebook (K, D), beta) -> (z_q (N, D), indices (N,), loss)``: VQ-VAE's
    quantiser with loss = codebook loss + beta * commitment loss and a straight-through z_q."""
    z_e, codebook, w = _vq_inputs()
    z_e.requires_grad_(True)
    codebook.requires_grad_(True)
    z_q, indices, loss = call(fn, z_e, codebook, 0.25)
    ((w * z_q).sum() + loss).backward()
    return _vq_response(z_q, indices, loss, z_e, codebook)


@check_quantizer.scorer
def _(got):
    from ..vqvae import VectorQuantizer

    z_e, codebook, w = _vq_inputs()
    vq = VectorQuantizer(16, 4, beta=0.25).eval()
    vq.reset_codebook(codebook)
    z_e.requires_grad_(True)
    out = vq(z_e.T.reshape(1, 4, 200, 1))  # the package wants (B, D, H, W)
    z_q = out.z_q.reshape(4, 200).T
    ((w * z_q).sum() + out.loss).backward()
    if not torch.equal(tensor(got["indices"], (200,)).long(), out.indices.flatten()):
        return False, "the indices are not the nearest codes (smallest squared distance)."
    if not close(tensor(got["z_q"], (200, 4), "z_q"), z_q):
        return False, "z_q's values should be the chosen codes."
    if not close(scalar(got["loss"]), out.loss):
        return False, f"the loss is {float(got['loss']):.4f}, expected {out.loss.item():.4f}: both terms, beta on one."
    if got["grad_z_e"] is None or not close(tensor(got["grad_z_e"], (200, 4)), z_e.grad):
        return False, ("z_e's gradient is wrong: z_q must pass the downstream gradient straight through, and the "
                       "commitment term must pull z_e toward its (detached) code.")
    if got["grad_codebook"] is None or not close(tensor(got["grad_codebook"], (16, 4)), vq.codebook.grad):
        return False, "the codebook's gradient should come from the codebook loss alone (detach z_e there)."
    return True, "values, loss and both gradients match the package."


def _ema_inputs():
    g = torch.Generator().manual_seed(5)
    K, D, N = 6, 3, 40
    cluster_size = torch.rand(K, generator=g) * 4 + 0.5
    embed_sum = torch.randn(K, D, generator=g)
    z = torch.randn(N, D, generator=g)
    indices = torch.cat([torch.arange(K - 1), torch.randint(K - 1, (N - K + 1,), generator=g)])  # code K-1 unused
    return cluster_size, embed_sum, z, indices, 0.9, 1e-5


@exercise("03.2", 4, "the EMA codebook update", "build", reference=("textimg.vqvae.VectorQuantizer._update",),
          hints=("Two moving averages: the number of vectors per code (bincount) and the sum of those vectors "
                 "(index_add_); each new = decay * old + (1 - decay) * this batch.",
                 "codebook = embed_sum / smoothed counts, smoothed = (n_k + eps) / (n + K eps) * n with n the total."))
def check_ema_update(fn):
    """``fn(cluster_size (K,), embed_sum (K, D), z (N, D), indices (N,), decay, eps) -> (cluster_size,
    embed_sum, codebook)``, the new values after one batch (VQ-VAE-2's EMA codebook)."""
    cluster_size, embed_sum, z, indices, decay, eps = _ema_inputs()
    out = call(fn, cluster_size.clone(), embed_sum.clone(), z, indices, decay, eps)
    return list(out)


@check_ema_update.scorer
def _(got):
    from ..vqvae import VectorQuantizer

    cluster_size, embed_sum, z, indices, decay, eps = _ema_inputs()
    vq = VectorQuantizer(6, 3, ema=True, decay=decay, eps=eps).train()
    vq.cluster_size.copy_(cluster_size)
    vq.embed_sum.copy_(embed_sum)
    vq._update(z, indices, torch.bincount(indices, minlength=6).float(), None)
    if len(got) != 3:
        return False, "return three tensors: cluster_size, embed_sum, codebook."
    for name, mine, ref, shape in zip(("cluster_size", "embed_sum", "codebook"), got,
                                      (vq.cluster_size, vq.embed_sum, vq.codebook), ((6,), (6, 3), (6, 3))):
        if not close(tensor(mine, shape, name), ref, atol=1e-5):
            return False, f"{name} differs from the package's update."
    return True, "counts, sums and codes move as the package's do (the unused code keeps its place)."


@exercise("03.3", 2, "codebook perplexity", "function", reference=("textimg.metrics.codebook_perplexity",),
          hints=("Make a histogram of the indices with torch.bincount(indices.flatten(), minlength=K).",
                 "p = counts / counts.sum(); perplexity = exp(-sum p log p), skipping p = 0."))
def check_perplexity(fn):
    """``fn(indices (any shape), K) -> float``: exp(entropy) of the code histogram."""
    cases = [(torch.zeros(100, dtype=torch.long), 8), (torch.arange(8).repeat(5), 8),
             (torch.tensor([0, 0, 0, 1, 2, 2]), 4)]
    return [float(call(fn, idx, k)) for idx, k in cases]


@check_perplexity.scorer
def _(got):
    expected = [1.0, 8.0, math.exp(-(0.5 * math.log(0.5) + 1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3)))]
    got = [number(x) for x in got]
    ok = len(got) == 3 and all(abs(a - b) < 1e-4 for a, b in zip(got, expected))
    return ok, ("1 for one code, K for uniform use, in between otherwise." if ok else
                f"got {[round(x, 3) for x in got]} for (one code, uniform over 8, a skewed case).")


@exercise("03.4", 1, "bits in a code grid", "value",
          hints=("Each stride-2 conv halves the side: 64 -> 32 -> 16.",
                 "One index among K = 512 codes takes log2(512) bits; multiply by the grid's positions."))
def check_latent_bits(answer: int):
    """A VQ-VAE with two stride-2 levels on 64x64 images and K = 512 codes: bits per image's code grid?"""
    return answer


@check_latent_bits.scorer
def _(answer):
    expected = (64 // 4) ** 2 * int(math.log2(512))
    return int(number(answer)) == expected, f"{expected:,} bits, against 64*64*3*8 = 98,304 for the pixels."


def _code_inputs():
    g = torch.Generator().manual_seed(6)
    return torch.randn(50, 4, generator=g), torch.randn(10, 4, generator=g) * torch.linspace(0.2, 3, 10)[:, None]


@exercise("03.5", 2, "nearest code by angle", "function",
          hints=("ViT-VQGAN compares directions only: normalise z and the codes to length 1.",
                 "F.normalize both, then the largest dot product (argmax over codes) per vector."))
def check_cosine_code(fn):
    """``fn(z (N, D), codebook (K, D)) -> indices (N,)``: the code with the largest cosine similarity."""
    return call(fn, *_code_inputs())


@check_cosine_code.scorer
def _(got):
    z, codebook = _code_inputs()
    got = tensor(got, (50,)).long()
    if torch.equal(got, torch.cdist(z, codebook).argmin(1)):
        return False, "that is the nearest code by distance; this exercise asks for the smallest angle."
    ok = torch.equal(got, (F.normalize(z, dim=1) @ F.normalize(codebook, dim=1).T).argmax(1))
    return ok, "lengths no longer matter, only directions." if ok else "not the largest cosine similarity."
