"""The course's graded exercises, notebook by notebook (the mechanism is in :mod:`textimg.checks`).

Each exercise is a ``respond`` function (runs the learner's answer on fixed inputs, in the
learner's process, with the package's reference out of reach) and a ``score`` function (computes
the reference itself and compares; the grader runs it in its own process). Inputs come from fixed
``torch.Generator`` seeds, so both halves see the same numbers. Ids and points appear in the
notebooks' exercise cells; ``tests/test_exercises.py`` keeps the two in step.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .checks import call, exercise, tensor


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-4)


def _number(value, name: str = "your answer") -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} should be a number, got {type(value).__name__}")
    return float(value)


def _scalar(value) -> torch.Tensor:
    """A loss response: one finite number."""
    t = tensor(value, name="your loss")
    if t.numel() != 1:
        raise ValueError(f"your loss should be one number (a scalar), got shape {tuple(t.shape)}")
    return t.reshape(())


@functools.lru_cache(maxsize=1)
def _text_encoder():
    from .text import TextEncoder

    return TextEncoder("minilm")


@functools.lru_cache(maxsize=1)
def _committed():
    """The committed pipeline and judge (cached): what exercise 05.4 is scored with, everywhere."""
    from .metrics import load_judge
    from .pipeline import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(), load_judge()


# ==== 00_introduction ===========================================================================

@exercise("00.1", 2, "label sets of train captions", "value",
          hints=("Count the words per attribute, multiply, and mind the pairs the train split never shows.",
                 "shapes × colours − len(ShapesDataset.HELDOUT) pairs, times sizes, times positions."))
def check_num_compositions(answer: int):
    """How many distinct (shape, color, size, position) label sets can a *train* caption describe?"""
    return answer


@check_num_compositions.scorer
def _(answer):
    from .data import HELDOUT, NUM_CLASSES

    shapes, colors, sizes, positions = NUM_CLASSES
    expected = (shapes * colors - len(HELDOUT)) * sizes * positions
    return int(_number(answer)) == expected, f"{expected} label sets."


@exercise("00.2", 2, "a caption in the grammar", "value",
          hints=("Read section 6: a template, with one word or phrase per attribute.",
                 "SYNONYMS lists the other words for each attribute; parse_caption(your_caption) must work."))
def check_caption_for(caption: str):
    """A caption, in the dataset's grammar, for a *large cyan cross in the bottom right*, with at least one
    synonym (a word other than those four)."""
    return caption


@check_caption_for.scorer
def _(caption):
    from .data import ATTRIBUTES, parse_caption

    if not isinstance(caption, str):
        return False, f"a caption is a string, got {type(caption).__name__}."
    want = {"shape": "cross", "color": "cyan", "size": "large", "position": "bottom right"}
    try:
        got = parse_caption(caption)
    except (ValueError, TypeError) as err:
        return False, f"parse_caption cannot read it: {err}"
    wrong = [a for a in want if got.get(a) != ATTRIBUTES[a].index(want[a])]
    if wrong:
        return False, f"it parses, but these attributes differ: {', '.join(wrong)}."
    canonical = all(w in caption.lower() for w in ("large", "cyan", "cross", "bottom right"))
    return not canonical, ("it says the four canonical words: use a synonym for at least one." if canonical
                           else f"{caption!r} parses to {want}.")


BOTTOM_ROW = ("bottom left", "bottom", "bottom right")


@exercise("00.3", 2, "counting in the labels", "value",
          hints=("labels_tensor() gives one row per item, (shape, color, size, position) as indices, and draws "
                 "no image.",
                 "Turn the words into indices with ShapesDataset.ATTRIBUTES; combine two boolean masks with &."))
def check_bottom_row_count(answer: int):
    """How many of ``ShapesDataset(1000, split="train", seed=0)``'s items show a large shape in the bottom
    row (bottom left, bottom or bottom right)?"""
    return answer


@check_bottom_row_count.scorer
def _(answer):
    from .data import ATTRIBUTES, ShapesDataset

    labels = ShapesDataset(1000, split="train", seed=0).labels_tensor()  # (N, 4)
    large = labels[:, 2] == ATTRIBUTES["size"].index("large")
    bottom = torch.isin(labels[:, 3], torch.tensor([ATTRIBUTES["position"].index(p) for p in BOTTOM_ROW]))
    expected = int((large & bottom).sum())
    return int(_number(answer)) == expected, f"{expected} of 1,000 items."


def _label_sets(n: int = 40) -> list[dict[str, int]]:
    from .data import ATTRIBUTES, NUM_CLASSES

    g = torch.Generator().manual_seed(0)
    draws = torch.stack([torch.randint(k, (n,), generator=g) for k in NUM_CLASSES], dim=1)  # (n, 4)
    return [dict(zip(ATTRIBUTES, map(int, row))) for row in draws]


@exercise("00.4", 3, "write captions for label sets", "function", reference=("textimg.data.make_caption",),
          hints=("Look up each index in ShapesDataset.ATTRIBUTES[attribute], then fill one sentence pattern.",
                 "e.g. f\"a {size} {color} {shape} in the {position}\"; check it with parse_caption."))
def check_caption_writer(fn):
    """``fn(labels: dict attribute -> index) -> str``, a caption in the grammar that means those labels."""
    return [call(fn, dict(labels)) for labels in _label_sets()]


@check_caption_writer.scorer
def _(captions):
    from .data import parse_caption

    labels = _label_sets()
    if not isinstance(captions, list) or len(captions) != len(labels):
        return False, "return one caption (a str) per label set."
    for want, caption in zip(labels, captions):
        try:
            got = parse_caption(caption)
        except (ValueError, TypeError) as err:
            return False, f"for {want} you wrote {caption!r}, which parse_caption cannot read: {err}"
        if got != want:
            return False, f"for {want} you wrote {caption!r}, which means {got}."
    return True, f"all {len(labels)} captions parse back to their labels."


# ==== 01_text_encoding ==========================================================================

def _pool_inputs():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 7, 5, generator=g)  # (B, T, D)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 1 + [0] * 6, [1] * 5 + [0] * 2]).bool()  # (B, T)
    return tokens, mask


@exercise("01.2", 3, "masked mean pooling", "build", reference=("textimg.text.masked_mean",),
          hints=("Turn the mask into 0/1 weights of shape (B, T, 1), so it broadcasts over D.",
                 "Sum tokens * weights over the token axis, divide by the number of real tokens per caption."))
def check_masked_mean(fn):
    """``fn(tokens (B, T, D), mask (B, T) bool) -> (B, D)``: the mean over real tokens only."""
    return call(fn, *_pool_inputs())


@check_masked_mean.scorer
def _(got):
    from .text import masked_mean

    tokens, mask = _pool_inputs()
    got = tensor(got, (4, 5))
    if _close(got, tokens.mean(1)):
        return False, "that is the plain mean: padding positions must not count."
    ok = _close(got, masked_mean(tokens, mask))
    return ok, "padding positions are ignored." if ok else "the values differ from the masked mean."


def _cosine_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 6, generator=g), torch.randn(4, 6, generator=g) * 5


@exercise("01.3", 3, "caption similarity (cosine)", "build", reference=("textimg.text.cosine_matrix",),
          hints=("Cosine similarity is the dot product of the two vectors divided by both lengths.",
                 "Normalise the rows of a and of b to length 1, then one matrix product a @ b.T gives (N, M)."))
def check_cosine_similarity(fn):
    """``fn(a (N, D), b (M, D)) -> (N, M)``: the cosine similarity of every row of a with every row of b."""
    return call(fn, *_cosine_inputs())


@check_cosine_similarity.scorer
def _(got):
    a, b = _cosine_inputs()
    got = tensor(got, (3, 4))
    if _close(got, a @ b.T):
        return False, "those are plain dot products: divide by the vectors' lengths."
    ok = _close(got, F.normalize(a, dim=1) @ F.normalize(b, dim=1).T)
    return ok, "one similarity per pair of rows, in [-1, 1]." if ok else "the values differ from cosine similarity."


TOKEN_TEXT = "a huge turquoise plus sign in the lower right corner"


@exercise("01.1", 1, "predict the token count", "predict",
          hints=("Every word of this caption is in the vocabulary: count the words.",
                 "Words, plus [CLS] at the start and [SEP] at the end."))
def check_token_count(answer: int):
    """How many tokens, [CLS] and [SEP] included, does the tokenizer make of TOKEN_TEXT?"""
    return answer


@check_token_count.scorer
def _(answer):
    expected = len(_text_encoder().tokenizer(TOKEN_TEXT)["input_ids"])
    return int(_number(answer)) == expected, f"{expected} tokens."


NEAREST_QUERY = "a little violet star at the top"
NEAREST_CANDIDATES = ["a small purple star in the top middle", "a small violet square at the top",
                      "a large purple star at the bottom", "a tiny yellow star in the top middle"]


@exercise("01.4", 2, "the nearest caption", "value",
          hints=("Encode the query and the candidates with text_encoder.encode and compare pooled vectors.",
                 "Your cosine similarity from 01.3 on the pooled vectors; the answer is the argmax's index."))
def check_nearest_caption(answer: int):
    """The index of the candidate whose pooled vector is most cosine-similar to the query's."""
    return answer


@check_nearest_caption.scorer
def _(answer):
    pooled = _text_encoder().encode([NEAREST_QUERY, *NEAREST_CANDIDATES]).pooled
    expected = int(F.cosine_similarity(pooled[:1], pooled[1:]).argmax())
    return int(_number(answer)) == expected, f"{NEAREST_CANDIDATES[expected]!r}."


@exercise("01.5", 2, "masked max pooling", "function",
          hints=("The maximum must never be taken at a padding position, even if its values are large.",
                 "Set padded positions to -inf with masked_fill, then take .max(dim=1).values."))
def check_masked_max(fn):
    """``fn(tokens (B, T, D), mask (B, T) bool) -> (B, D)``: each feature's maximum over real tokens only."""
    tokens, mask = _pool_inputs()
    return call(fn, tokens + 3 * (~mask)[..., None], mask)  # padding holds the largest values


@check_masked_max.scorer
def _(got):
    tokens, mask = _pool_inputs()
    tokens = tokens + 3 * (~mask)[..., None]
    got = tensor(got, (4, 5))
    if _close(got, tokens.max(1).values):
        return False, "that maximum includes padding positions."
    ok = _close(got, tokens.masked_fill(~mask[..., None], float("-inf")).max(1).values)
    return ok, "padding never wins." if ok else "the values differ from the masked maximum."


# ==== 02_generation =============================================================================

@exercise("02.1", 1, "predict the upsampled size", "predict",
          hints=("out = (in - 1) * stride - 2 * padding + kernel_size.",
                 "(16 - 1) * 2 - 2 * 1 + 4."))
def check_upsampled_size(answer: int):
    """The output side of ConvTranspose2d(kernel_size=4, stride=2, padding=1) on a 16x16 map."""
    return answer


@check_upsampled_size.scorer
def _(answer):
    expected = torch.nn.ConvTranspose2d(1, 1, kernel_size=4, stride=2, padding=1)(torch.zeros(1, 1, 16, 16)).shape[-1]
    return int(_number(answer)) == expected, f"{expected}x{expected}."


def _attention_inputs():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 5, 4, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 6, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    return q, k, v, mask


@exercise("02.3", 4, "word cross-attention with a padding mask", "build",
          reference=("textimg.generator.WordCrossAttention.forward",
                     "torch.nn.functional.scaled_dot_product_attention"),
          hints=("scores = q @ k^T / sqrt(d) has shape (B, N, T): one score per (region, word).",
                 "masked_fill the padded words' scores with -inf (mask[:, None, :]), softmax over T, then @ v."))
def check_masked_attention(fn):
    """``fn(q (B, N, d), k (B, T, d), v (B, T, C), mask (B, T) bool) -> (B, N, C)``: scaled dot-product
    attention in which padding tokens (mask False) get zero weight."""
    return call(fn, *_attention_inputs())


@check_masked_attention.scorer
def _(got):
    q, k, v, mask = _attention_inputs()
    got = tensor(got, (2, 5, 6))
    if _close(got, torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v):
        return False, "padding tokens still get weight: set their scores to -inf before the softmax."
    scores = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~mask[:, None, :], float("-inf"))
    ok = _close(got, torch.softmax(scores, dim=-1) @ v)  # WordCrossAttention's core, without its projections
    return ok, "padding gets zero weight." if ok else "the values differ from masked attention."


def _film_inputs():
    from .generator import ConditionalNorm2d

    with torch.random.fork_rng():
        torch.manual_seed(3)
        layer = ConditionalNorm2d(8, 5)
        torch.nn.init.normal_(layer.film.weight, std=0.5)
        torch.nn.init.normal_(layer.film.bias, std=0.5)
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 5, generator=g), layer


@exercise("02.2", 3, "text-conditioned normalisation (FiLM)", "build",
          reference=("textimg.generator.ConditionalNorm2d.forward",),
          hints=("norm(x) first; film(c) gives 2C numbers per sample: a scale part and a shift part.",
                 "gamma, beta = film(c)[:, :, None, None].chunk(2, dim=1); return norm(x) * (1 + gamma) + beta."))
def check_conditional_norm(fn):
    """``fn(x (B, C, H, W), c (B, cond_dim), norm: nn.GroupNorm, film: nn.Linear) -> (B, C, H, W)``."""
    x, c, layer = _film_inputs()
    return call(fn, x, c, layer.norm, layer.film)


@check_conditional_norm.scorer
def _(got):
    x, c, layer = _film_inputs()
    got = tensor(got, tuple(x.shape))
    with torch.no_grad():
        expected = layer(x, c)
        gamma, beta = layer.film(c)[:, :, None, None].chunk(2, dim=1)
        if _close(got, layer.norm(x) * gamma + beta):
            return False, "the scale is (1 + gamma), so a zero-initialised film layer starts as the identity."
    ok = _close(got, expected)
    return ok, "each caption scales and shifts every channel." if ok else "the values differ from FiLM."


MSE_CAPTION = "a small red square in the top left"


@functools.lru_cache(maxsize=1)
def _mse_images() -> torch.Tensor:
    from .data import parse_caption, sample_images

    return sample_images(parse_caption(MSE_CAPTION), n=64, seed=0, image_size=32)


@exercise("02.4", 2, "the image a pixel loss prefers", "value",
          hints=("Write the total squared error to all images as a function of one image x.",
                 "Its derivative is zero at the per-pixel average of the images."))
def check_mse_minimiser(answer):
    """The one image (3, 32, 32) with the smallest mean squared error to all 64 images of
    sample_images(parse_caption(MSE_CAPTION), n=64, seed=0, image_size=32)."""
    return answer


@check_mse_minimiser.scorer
def _(answer):
    images = _mse_images()
    ok = _close(tensor(answer, images.shape[1:]), images.mean(0))
    return ok, "the per-pixel mean: the blurry average a pixel loss learns." if ok else "not the minimiser."


@exercise("02.5", 2, "parameters of SelfAttention2d(64)", "value",
          hints=("Three 1x1 convs: query and key map 64 channels to 64 // 8, value maps 64 to 64.",
                 "A 1x1 conv from a to b channels has a*b weights and b biases; add the gate gamma (1)."))
def check_self_attention_params(answer: int):
    """The number of parameters of ``textimg.generator.SelfAttention2d(64)``, worked out by hand."""
    return answer


@check_self_attention_params.scorer
def _(answer):
    from .generator import SelfAttention2d

    expected = sum(p.numel() for p in SelfAttention2d(64).parameters())
    return int(_number(answer)) == expected, f"{expected:,} parameters."


# ==== 03_vqvae_refinement =======================================================================

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
    from .vqvae import VectorQuantizer

    z_e, codebook, w = _vq_inputs()
    vq = VectorQuantizer(16, 4, beta=0.25).eval()
    vq.reset_codebook(codebook)
    z_e.requires_grad_(True)
    out = vq(z_e.T.reshape(1, 4, 200, 1))  # the package wants (B, D, H, W)
    z_q = out.z_q.reshape(4, 200).T
    ((w * z_q).sum() + out.loss).backward()
    if not torch.equal(tensor(got["indices"], (200,)).long(), out.indices.flatten()):
        return False, "the indices are not the nearest codes (smallest squared distance)."
    if not _close(tensor(got["z_q"], (200, 4), "z_q"), z_q):
        return False, "z_q's values should be the chosen codes."
    if not _close(_scalar(got["loss"]), out.loss):
        return False, f"the loss is {float(got['loss']):.4f}, expected {out.loss.item():.4f}: both terms, beta on one."
    if got["grad_z_e"] is None or not _close(tensor(got["grad_z_e"], (200, 4)), z_e.grad):
        return False, ("z_e's gradient is wrong: z_q must pass the downstream gradient straight through, and the "
                       "commitment term must pull z_e toward its (detached) code.")
    if got["grad_codebook"] is None or not _close(tensor(got["grad_codebook"], (16, 4)), vq.codebook.grad):
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
    from .vqvae import VectorQuantizer

    cluster_size, embed_sum, z, indices, decay, eps = _ema_inputs()
    vq = VectorQuantizer(6, 3, ema=True, decay=decay, eps=eps).train()
    vq.cluster_size.copy_(cluster_size)
    vq.embed_sum.copy_(embed_sum)
    vq._update(z, indices, torch.bincount(indices, minlength=6).float(), None)
    if len(got) != 3:
        return False, "return three tensors: cluster_size, embed_sum, codebook."
    for name, mine, ref, shape in zip(("cluster_size", "embed_sum", "codebook"), got,
                                      (vq.cluster_size, vq.embed_sum, vq.codebook), ((6,), (6, 3), (6, 3))):
        if not _close(tensor(mine, shape, name), ref, atol=1e-5):
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
    got = [_number(x) for x in got]
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
    return int(_number(answer)) == expected, f"{expected:,} bits, against 64*64*3*8 = 98,304 for the pixels."


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


# ==== 04_adversarial_training ===================================================================

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
    from .gan import d_loss_bce

    for (real, fake, wrong), mine in zip(_loss_cases(), got, strict=True):
        mine, expected = _scalar(mine), d_loss_bce(real, fake, wrong)
        if not torch.isfinite(mine):
            return False, f"for logits {real.tolist()[:4]} your loss is {mine.item()}: work from logits (softplus)."
        if abs(mine.item() - (F.softplus(-real).mean() + F.softplus(fake).mean() + F.softplus(wrong).mean())) < 1e-4:
            return False, "the wrong-caption and fake terms should share one weight: 0.5 each."
        if abs(mine.item() - expected.item()) > 1e-4 * max(1.0, abs(expected.item())):
            return False, f"expected {expected.item():.4f}, got {mine.item():.4f}."
    return True, "stable for large logits, with the wrong caption counted as fake."


def _gan_parts():
    """A tiny G (no conditioning augmentation: no randomness inside) and D, and one batch."""
    from .discriminator import Discriminator, DiscriminatorConfig
    from .generator import Generator, GeneratorConfig
    from .text import TextEncoding

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
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-2, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-2, betas=(0.5, 0.999))
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
    from .gan import d_step, g_step

    G, D, opt_d, opt_g, batch = _gan_parts()
    for i, b in enumerate(batch):
        with torch.no_grad():
            x_fake = G(b["z"], b["text"])
        d_step(D, opt_d, b["x_real"], x_fake, b["text"], b["wrong_text"])
        if got[f"g_grad_after_d_{i}"]:
            return False, "the D step sent gradients into G: detach x_fake before D sees it."
        if not all(_close(tensor(got[f"D_{i}"][k]), v, 1e-5) for k, v in _params(D).items()):
            return False, f"after d_step #{i + 1}, D's weights differ from the package's d_step."
        if not all(torch.equal(tensor(got[f"D_after_g_{i}"][k]), tensor(got[f"D_{i}"][k])) for k in _params(D)):
            return False, f"g_step #{i + 1} changed D: only G's optimizer may step."
        g_step(G, D, opt_g, b["z"], b["text"])
        if not all(_close(tensor(got[f"G_{i}"][k]), v, 1e-5) for k, v in _params(G).items()):
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
    from .gan import d_loss_hinge

    for (real, fake, wrong), mine in zip(_loss_cases(), got, strict=True):
        expected = d_loss_hinge(real, fake, wrong).item()
        mine = _scalar(mine).item()
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
    return abs(_number(answer) - 0.75) < 1e-3, "D*(x) = 0.3 / (0.3 + 0.1) = 0.75."


# ==== 05_pipeline ===============================================================================

def _feature_sets():
    g = torch.Generator().manual_seed(9)
    return [(torch.randn(400, 3, generator=g), torch.randn(300, 3, generator=g) * 2 + 1),
            (torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g), torch.randn(500, 8, generator=g))]


@exercise("05.1", 4, "the Fréchet distance", "build", reference=("textimg.metrics.frechet_distance",),
          hints=("Means with .mean(0), covariances with torch.cov(x.T) (unbiased, as the formula's S).",
                 "Tr((S_a S_b)^(1/2)) = the sum of the square roots of the eigenvalues of S_a S_b "
                 "(torch.linalg.eigvals; take .real and clamp tiny negatives to 0)."))
def check_frechet_distance(fn):
    """``fn(a (N, F), b (M, F)) -> float``: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    sets = _feature_sets()
    return [float(call(fn, a.clone(), b.clone())) for a, b in sets] + [float(call(fn, sets[0][0], sets[0][0]))]


@check_frechet_distance.scorer
def _(got):
    from .metrics import frechet_distance

    sets = _feature_sets()
    got = [_number(x) for x in got]
    if len(got) != 3:
        return False, "one distance per pair of feature sets."
    for (a, b), mine in zip(sets, got):
        expected = frechet_distance(a, b)
        if abs(mine - expected) > 1e-3 * max(1.0, abs(expected)):
            mean_term = (a.mean(0) - b.mean(0)).square().sum().item()
            hint = "the mean term alone? Add the covariance term." if abs(mine - mean_term) < 1e-6 else ""
            return False, f"expected {expected:.4f}, got {mine:.4f}. {hint}".strip()
    if abs(got[2]) > 1e-4:
        return False, f"a set against itself should be at distance 0, got {got[2]:.2e}."
    return True, "FID's formula, here on any features you choose."


@exercise("05.2", 2, "the interpolation path", "function",
          hints=("Point i is (1 - w_i) a + w_i b.", "w = torch.linspace(0, 1, steps), as a column (steps, 1)."))
def check_lerp_path(fn):
    """``fn(a (D,), b (D,), steps) -> (steps, D)``: evenly spaced points from a (first) to b (last)."""
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(5, generator=g), torch.randn(5, generator=g)
    return [call(fn, a.clone(), b.clone(), steps) for steps in (2, 5, 9)]


@check_lerp_path.scorer
def _(got):
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(5, generator=g), torch.randn(5, generator=g)
    for steps, mine in zip((2, 5, 9), got, strict=True):
        w = torch.linspace(0, 1, steps).unsqueeze(1)
        if not _close(tensor(mine, (steps, 5)), (1 - w) * a + w * b, 1e-5):
            return False, f"for steps={steps} the points are not evenly spaced from a to b."
    return True, "pipe.interpolate walks this path in the text embedding, with one fixed z."


def _diversity_features():
    g = torch.Generator().manual_seed(11)
    return torch.randn(16, 6, generator=g)


@exercise("05.3", 2, "a diversity score", "function", reference=("textimg.metrics.diversity",),
          hints=("torch.cdist(f, f) gives all pairwise distances, with zeros on the diagonal.",
                 "Average over the N (N - 1) ordered pairs i != j: sum / (N * (N - 1))."))
def check_diversity(fn):
    """``fn(features (N, F)) -> float``: the mean L2 distance between the features of two different images."""
    return float(call(fn, _diversity_features()))


@check_diversity.scorer
def _(got):
    f = _diversity_features().double()
    dist = torch.cdist(f, f)
    expected = (dist.sum() / (16 * 15)).item()
    mine = _number(got)
    if abs(mine - dist.mean().item()) < 1e-5:
        return False, "that mean includes the zero distance of each image to itself."
    return abs(mine - expected) < 1e-4, f"{expected:.4f}: notebook 04's diversity, on judge features."


@exercise("05.4", 3, "a prompt beyond the grammar", "value",
          hints=("Keep the four attributes clear; change the sentence: new words, new order.",
                 "Shape is the hardest attribute to keep: try a common shape word in a new sentence."))
def check_paraphrase(answer):
    """``(prompt, labels)``: a prompt *outside* the caption grammar (parse_caption rejects it) that the
    committed pipeline draws right: the judge reads ``labels`` (attribute -> word) in at least 6 of 8 images."""
    prompt, labels = answer
    return [prompt, dict(labels)]


@check_paraphrase.scorer
def _(answer):
    from .data import ATTRIBUTES, parse_caption

    prompt, labels = answer
    if not isinstance(prompt, str) or not isinstance(labels, dict):
        return False, "answer with (prompt, labels): a string and a dict attribute -> word."
    if set(labels) != set(ATTRIBUTES) or any(labels[a] not in ATTRIBUTES[a] for a in ATTRIBUTES):
        return False, ("labels must give one word per attribute, e.g. {'shape': 'star', 'color': 'red', "
                       "'size': 'large', 'position': 'center'}.")
    try:
        parse_caption(prompt)
        return False, f"{prompt!r} is inside the caption grammar (parse_caption reads it): reword it."
    except ValueError:
        pass
    pipe, judge = _committed()
    images = pipe.generate([prompt] * 8, seed=0) * 2 - 1
    want = torch.tensor([ATTRIBUTES[a].index(labels[a]) for a in ATTRIBUTES])
    right = int((judge.predict(images) == want).all(dim=1).sum())
    return right >= 6, f"the judge reads all four attributes in {right} of 8 images (6 needed)."
