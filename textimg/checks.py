"""Self-checking exercises: each ``check_*`` function tells the learner whether an answer is right.

Every check prints one line, "✅ ..." or "❌ ..." with a hint, and returns True or False, so a
notebook cell (or an autograder) can both show and use the result. Checks never reveal the answer
in their hint; they say what to look at.
"""

from __future__ import annotations

from typing import Callable

import torch


def _report(ok: bool, good: str, hint: str) -> bool:
    print(("✅ " + good) if ok else ("❌ Not yet. " + hint))
    return ok


def _empty_body():
    ...


def _unanswered(answer) -> bool:
    """True (and says so) while the learner's answer is still the placeholder None or ``...``, or a
    function whose body is still only ``...`` (or ``pass``)."""
    if answer is None or answer is Ellipsis:
        print("❌ No answer yet: replace the None (or ...) with your answer and run the cell again.")
        return True
    code = getattr(answer, "__code__", None)
    if code is not None and code.co_code == _empty_body.__code__.co_code and not code.co_consts[1:]:
        print("❌ No answer yet: your function's body is still `...`; write it and run the cell again.")
        return True
    return False


def compare(name: str, mine: torch.Tensor, reference: torch.Tensor, atol: float = 1e-5) -> bool:
    """Compares a result a notebook derived by hand with the package's (micrograd's ``cmp``)."""
    mine, reference = torch.as_tensor(mine).detach().cpu(), torch.as_tensor(reference).detach().cpu()
    if mine.shape != reference.shape:
        return _report(False, "", f"{name}: shapes differ, {tuple(mine.shape)} vs {tuple(reference.shape)}.")
    diff = (mine.float() - reference.float()).abs().max().item() if mine.numel() else 0.0
    return _report(diff <= atol, f"{name}: matches the package (max difference {diff:.1e}).",
                   f"{name}: differs from the package by up to {diff:.1e}.")


# ---- 00_introduction -------------------------------------------------------------------------

def check_num_compositions(answer: int) -> bool:
    """Exercise: how many distinct (shape, color, size, position) label sets can a *train* caption describe?"""
    from .data import ShapesDataset

    if _unanswered(answer):
        return False
    a = ShapesDataset.ATTRIBUTES
    seen_pairs = len(a["shape"]) * len(a["color"]) - len(ShapesDataset.HELDOUT)
    expected = seen_pairs * len(a["size"]) * len(a["position"])
    return _report(answer == expected, f"Right: {expected} label sets.",
                   "Multiply the number of words per attribute, but remember that some (color, shape) "
                   "pairs never appear in train: ShapesDataset.HELDOUT.")


def check_caption_for(caption: str, shape: str, color: str, size: str, position: str) -> bool:
    """Exercise: write a caption, in the dataset's grammar, for the given attribute words."""
    from .data import ShapesDataset, parse_caption

    if _unanswered(caption):
        return False
    words = {"shape": shape, "color": color, "size": size, "position": position}
    expected = {k: ShapesDataset.ATTRIBUTES[k].index(v) for k, v in words.items()}
    try:
        got = parse_caption(caption)
    except (ValueError, TypeError) as err:
        return _report(False, "", f"parse_caption cannot read it: {err}")
    wrong = [k for k in expected if got.get(k) != expected[k]]
    return _report(not wrong, f"Right: {caption!r} parses to {words}.",
                   f"It parses, but these attributes differ: {', '.join(wrong)}.")


def check_heldout_pairs(answer) -> bool:
    """Exercise: which (color, shape) pairs never appear in the train split? (a set of tuples)"""
    from .data import ShapesDataset

    if _unanswered(answer):
        return False
    expected = {tuple(p) for p in ShapesDataset.HELDOUT}
    got = {tuple(p) for p in answer}
    return _report(got == expected, f"Right: {len(expected)} held-out pairs.",
                   f"You listed {len(got)} pairs, {len(got & expected)} of them right. "
                   "Count the pairs in a large train split, or read the dataset card.")


# ---- 01_text_encoding ------------------------------------------------------------------------

def check_masked_mean(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Exercise: write masked mean pooling ``fn(tokens (B, T, D), mask (B, T) bool) -> (B, D)``."""
    from .text import masked_mean

    if _unanswered(fn):
        return False
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 7, 5, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 1 + [0] * 6, [1] * 5 + [0] * 2]).bool()
    try:
        got = fn(tokens, mask)
    except Exception as err:  # the learner's code may fail in any way: say how
        return _report(False, "", f"your function raised {type(err).__name__}: {err}")
    if not isinstance(got, torch.Tensor) or got.shape != (4, 5):
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return _report(False, "", f"expected a tensor of shape (4, 5), got {shape}.")
    if torch.allclose(got, tokens.mean(1), atol=1e-5):
        return _report(False, "", "that is the plain mean: padding positions must not count.")
    ok = torch.allclose(got, masked_mean(tokens, mask), atol=1e-5)
    return _report(ok, "Right: padding positions are ignored.",
                   "Sum only the positions where mask is True, then divide by how many there are.")


def check_cosine_similarity(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Exercise: write ``fn(a (N, D), b (M, D)) -> (N, M)`` cosine similarities."""
    if _unanswered(fn):
        return False
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 6, generator=g), torch.randn(4, 6, generator=g) * 5
    expected = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    try:
        got = fn(a, b)
    except Exception as err:
        return _report(False, "", f"your function raised {type(err).__name__}: {err}")
    if not isinstance(got, torch.Tensor) or got.shape != (3, 4):
        return _report(False, "", "expected an (N, M) tensor: one similarity per pair of rows.")
    ok = torch.allclose(got, expected, atol=1e-5)
    return _report(ok, "Right.", "Divide each dot product by the two vectors' lengths (norms).")


def check_token_count(text: str, answer: int, tokenizer) -> bool:
    """Exercise: how many tokens, [CLS] and [SEP] included, does the tokenizer make of ``text``?"""
    if _unanswered(answer):
        return False
    expected = len(tokenizer(text)["input_ids"])
    return _report(answer == expected, f"Right: {expected} tokens.",
                   "Count the WordPiece tokens from tokenizer.tokenize(text), then add the special tokens.")


def check_nearest_caption(query: str, candidates: list[str], answer: int, text_encoder) -> bool:
    """Exercise: the index of the candidate caption whose pooled vector is most cosine-similar to ``query``'s."""
    if _unanswered(answer):
        return False
    pooled = text_encoder.encode([query, *candidates]).pooled
    sims = torch.nn.functional.cosine_similarity(pooled[:1], pooled[1:])
    expected = int(sims.argmax())
    return _report(answer == expected, f"Right: {candidates[expected]!r}.",
                   "Encode the query and the candidates, compare pooled vectors with cosine similarity, "
                   "take the argmax.")


# ---- 02_generation ---------------------------------------------------------------------------

def check_upsampled_size(answer: int) -> bool:
    """Exercise: the output side of ConvTranspose2d(kernel_size=4, stride=2, padding=1) on a 16x16 map."""
    if _unanswered(answer):
        return False
    conv = torch.nn.ConvTranspose2d(1, 1, kernel_size=4, stride=2, padding=1)
    expected = conv(torch.zeros(1, 1, 16, 16)).shape[-1]
    return _report(answer == expected, f"Right: {expected}x{expected}.",
                   "Use out = (in - 1) * stride - 2 * padding + kernel_size.")


def check_masked_attention(fn: Callable) -> bool:
    """Exercise: ``fn(q (B, N, d), k (B, T, d), v (B, T, C), mask (B, T) bool) -> (B, N, C)``,
    scaled dot-product attention in which padding tokens (mask False) get zero weight."""
    if _unanswered(fn):
        return False
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 5, 4, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 6, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    scores = (q @ k.transpose(1, 2) / 2.0).masked_fill(~mask[:, None, :], float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v
    try:
        got = fn(q, k, v, mask)
    except Exception as err:
        return _report(False, "", f"your function raised {type(err).__name__}: {err}")
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return _report(False, "", f"expected a tensor of shape {tuple(expected.shape)}.")
    unmasked = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v
    if torch.allclose(got, unmasked, atol=1e-5):
        return _report(False, "", "padding tokens still get weight: set their scores to -inf before the softmax.")
    return _report(torch.allclose(got, expected, atol=1e-5), "Right: padding gets zero weight.",
                   "softmax(q k^T / sqrt(d)) v over the token axis, with masked scores set to -inf.")


def check_mse_minimiser(answer: torch.Tensor, images: torch.Tensor) -> bool:
    """Exercise: the one image (3, H, W) with the smallest mean squared error to all of ``images`` (N, 3, H, W)."""
    if _unanswered(answer):
        return False
    answer = torch.as_tensor(answer).float()
    if answer.shape != images.shape[1:]:
        return _report(False, "", f"expected one image of shape {tuple(images.shape[1:])}.")
    ok = torch.allclose(answer, images.mean(0), atol=1e-4)
    return _report(ok, "Right: the per-pixel mean, the blurry average a pixel loss learns.",
                   "Set the derivative of sum_i (x - x_i)^2 with respect to x to zero.")


def check_self_attention_params(answer: int, channels: int = 64) -> bool:
    """Exercise: the number of parameters of ``textimg.generator.SelfAttention2d(channels)``."""
    from .generator import SelfAttention2d

    if _unanswered(answer):
        return False
    expected = sum(p.numel() for p in SelfAttention2d(channels).parameters())
    return _report(answer == expected, f"Right: {expected:,} parameters.",
                   "Count the weights and biases of the three 1x1 convs (query and key have channels // 8 "
                   "outputs, value has channels), plus the gate gamma.")


# ---- 03_vqvae_refinement ---------------------------------------------------------------------

def check_nearest_code(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Exercise: ``fn(z (N, D), codebook (K, D)) -> indices (N,)`` of the nearest code (squared L2)."""
    if _unanswered(fn):
        return False
    g = torch.Generator().manual_seed(3)
    z, codebook = torch.randn(50, 4, generator=g), torch.randn(10, 4, generator=g) * 2
    expected = torch.cdist(z, codebook).argmin(dim=1)
    try:
        got = fn(z, codebook)
    except Exception as err:
        return _report(False, "", f"your function raised {type(err).__name__}: {err}")
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return _report(False, "", "expected a tensor of shape (N,): one code index per vector.")
    if torch.equal(got.long(), (z @ codebook.T).argmax(dim=1)) and not torch.equal(got.long(), expected):
        return _report(False, "", "that is the largest dot product, not the smallest distance: "
                       "||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, and ||e||^2 differs between codes.")
    return _report(torch.equal(got.long(), expected), "Right: the nearest code for every vector.",
                   "For each vector, compute the squared distance to every code and take the argmin.")


def check_perplexity(fn: Callable[[torch.Tensor, int], float]) -> bool:
    """Exercise: ``fn(indices (any shape), K) -> float``, exp(entropy) of the code histogram."""
    from .metrics import codebook_perplexity

    if _unanswered(fn):
        return False
    cases = [(torch.zeros(100, dtype=torch.long), 8), (torch.arange(8).repeat(5), 8),
             (torch.tensor([0, 0, 0, 1, 2, 2]), 4)]
    try:
        got = [float(fn(idx, k)) for idx, k in cases]
    except Exception as err:
        return _report(False, "", f"your function raised {type(err).__name__}: {err}")
    expected = [codebook_perplexity(idx, k) for idx, k in cases]
    ok = all(abs(a - b) < 1e-4 for a, b in zip(got, expected))
    return _report(ok, "Right: 1 for one code, K for uniform use, in between otherwise.",
                   f"got {[round(x, 3) for x in got]} for (one code, uniform over 8, a skewed case); "
                   "use p = counts / total and exp(-sum p log p), skipping p = 0.")


def check_latent_bits(answer: int, num_codes: int = 256, latent_side: int = 16) -> bool:
    """Exercise: how many bits does one image's grid of code indices take (latent_side^2 codes of K)?"""
    import math

    if _unanswered(answer):
        return False
    expected = latent_side * latent_side * math.ceil(math.log2(num_codes))
    return _report(answer == expected, f"Right: {expected:,} bits, against 64*64*3*8 = 98,304 for the pixels.",
                   "Each position of the latent grid stores one index among K codes: log2(K) bits.")


# ---- 04_adversarial_training -----------------------------------------------------------------

def _loss_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return [torch.zeros(4), torch.tensor([30.0, -30.0, 2.0, -2.0]), torch.randn(64, generator=g) * 5]


def check_d_loss(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Exercise: the source document's L_D = -E[log D(x)] - E[log(1 - D(G(z)))], from logits
    ``fn(real_logits (B,), fake_logits (B,)) -> scalar``, finite for any logits."""
    from .gan import d_loss_bce

    if _unanswered(fn):
        return False
    for real in _loss_cases():
        fake = -real.flip(0) + 1.0
        try:
            got = torch.as_tensor(fn(real, fake)).float()
        except Exception as err:
            return _report(False, "", f"your function raised {type(err).__name__}: {err}")
        expected = d_loss_bce(real, fake)
        if got.numel() != 1 or not torch.isfinite(got).all():
            return _report(False, "", f"for logits {real.tolist()[:4]} your loss is {got.tolist()}: one finite number "
                           "expected. Work from logits (softplus, or BCE-with-logits), not sigmoid then log.")
        if abs(got.item() - expected.item()) > 1e-4 * max(1.0, abs(expected.item())):
            return _report(False, "", "with D(x) = sigmoid(logit): -log sigmoid(l) = softplus(-l) and "
                           "-log(1 - sigmoid(l)) = softplus(l). Average each over the batch, then add.")
    return _report(True, "Right, and stable for large logits.", "")


def check_g_loss_nonsaturating(fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Exercise: the non-saturating L_G = -E[log D(G(z))] from logits, ``fn(fake_logits (B,)) -> scalar``."""
    from .gan import g_loss_nonsaturating, g_loss_saturating

    if _unanswered(fn):
        return False
    for fake in _loss_cases():
        try:
            got = torch.as_tensor(fn(fake)).float()
        except Exception as err:
            return _report(False, "", f"your function raised {type(err).__name__}: {err}")
        if got.numel() != 1 or not torch.isfinite(got).all():
            return _report(False, "", "one finite number expected, for any logits: work from logits.")
        saturating, nonsaturating = g_loss_saturating(fake).item(), g_loss_nonsaturating(fake).item()
        if abs(got.item() - saturating) < 1e-6 < abs(got.item() - nonsaturating):
            return _report(False, "", "that is the saturating E[log(1 - D(G(z)))]: G should *maximise* log D(G(z)).")
        if abs(got.item() - g_loss_nonsaturating(fake).item()) > 1e-4 * max(1.0, abs(got.item())):
            return _report(False, "", "-log sigmoid(l) = softplus(-l), averaged over the batch.")
    return _report(True, "Right: large while D rejects the fakes, so G's gradient does not vanish.", "")


def check_mismatch(fn: Callable[[list], list]) -> bool:
    """Exercise: ``fn(captions: list[str]) -> list[str]``, for each caption another caption of the
    batch that differs from it (GAN-CLS's "real image, wrong text")."""
    if _unanswered(fn):
        return False
    import random

    rnd = random.Random(0)
    words = ["a red circle", "a blue square", "a green star", "a red circle", "a red circle"]
    for trial in range(50):
        batch = [rnd.choice(words) for _ in range(rnd.randint(2, 8))]
        if len(set(batch)) < 2:
            continue
        try:
            got = list(fn(list(batch)))
        except Exception as err:
            return _report(False, "", f"your function raised {type(err).__name__}: {err}")
        if len(got) != len(batch) or any(w not in batch for w in got):
            return _report(False, "", "return one caption per input, each taken from the batch.")
        if any(w == c for w, c in zip(got, batch)):
            return _report(False, "", f"for the batch {batch} you returned {got}: a mismatch must never equal "
                           "the true caption, and a batch can repeat a caption (a shuffle is not enough).")
    return _report(True, "Right: never the true caption, even with repeats in the batch.", "")


def check_optimal_d(answer: float, p_data: float = 0.3, p_g: float = 0.1) -> bool:
    """Exercise: the optimal discriminator's D*(x) where p_data(x) and p_g(x) are given."""
    if _unanswered(answer):
        return False
    expected = p_data / (p_data + p_g)
    return _report(abs(float(answer) - expected) < 1e-3, f"Right: D*(x) = {expected:.2f}.",
                   "Maximise p_data log D + p_g log(1 - D) over D pointwise: set the derivative to zero.")


# ---- 05_pipeline -------------------------------------------------------------------------------

def _frechet_reference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), float64, symmetric roots."""
    def sqrt_psd(m):
        vals, vecs = torch.linalg.eigh(m)
        return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T

    a, b = a.double(), b.double()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    root = sqrt_psd(sa)
    return ((a.mean(0) - b.mean(0)).square().sum() + (sa + sb - 2 * sqrt_psd(root @ sb @ root)).trace()).item()


def check_frechet_distance(fn: Callable[[torch.Tensor, torch.Tensor], float]) -> bool:
    """Exercise: the Fréchet distance between two feature sets, ``fn(a (N, F), b (M, F)) -> float``:
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), S the (unbiased) covariances."""
    if _unanswered(fn):
        return False
    g = torch.Generator().manual_seed(5)
    cases = [(torch.randn(400, 3, generator=g), torch.randn(300, 3, generator=g) * 2 + 1),
             (torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g), torch.randn(500, 8, generator=g))]
    for a, b in cases:
        try:
            got = float(fn(a.clone(), b.clone()))
        except Exception as err:
            return _report(False, "", f"your function raised {type(err).__name__}: {err}")
        expected = _frechet_reference(a, b)
        if abs(got - expected) > 1e-3 * max(1.0, abs(expected)):
            mean_term = (a.mean(0) - b.mean(0)).square().sum().item()
            hint = ("the mean term alone? Add the covariance term." if abs(got - mean_term) < 1e-6
                    else "use torch.cov(x.T) for the covariances and a matrix square root of S_a S_b (its trace is "
                         "the sum of the square roots of its eigenvalues, torch.linalg.eigvals).")
            return _report(False, "", f"expected {expected:.4f}, got {got:.4f}: {hint}")
    try:
        same = float(fn(cases[0][0], cases[0][0]))
    except Exception as err:
        return _report(False, "", f"your function raised {type(err).__name__}: {err}")
    if abs(same) > 1e-4:
        return _report(False, "", f"a set against itself should be at distance 0, got {same:.2e}.")
    return _report(True, "Right: that is FID's formula, here on any features you choose.", "")


def check_lerp_path(fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]) -> bool:
    """Exercise: ``fn(a (D,), b (D,), steps) -> (steps, D)``, the straight path from a to b in
    ``steps`` evenly spaced points, a first and b last."""
    if _unanswered(fn):
        return False
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(5, generator=g), torch.randn(5, generator=g)
    for steps in (2, 5, 9):
        try:
            got = torch.as_tensor(fn(a.clone(), b.clone(), steps)).float()
        except Exception as err:
            return _report(False, "", f"your function raised {type(err).__name__}: {err}")
        w = torch.linspace(0, 1, steps).unsqueeze(1)
        expected = (1 - w) * a + w * b
        if got.shape != expected.shape:
            return _report(False, "", f"for steps={steps} expected shape {tuple(expected.shape)}, "
                                      f"got {tuple(got.shape)}.")
        if not torch.allclose(got, expected, atol=1e-5):
            return _report(False, "", "point i is (1 - w_i) a + w_i b with w_i = i / (steps - 1): "
                                      "the first is a, the last b.")
    return _report(True, "Right: pipe.interpolate walks this path in the text embedding, with one fixed z.", "")


def check_paraphrase(prompt: str, labels: dict, pipe, judge, seeds: int = 8, needed: int = 6) -> bool:
    """Exercise: a prompt *outside* the caption grammar (``parse_caption`` rejects it) that the
    pipeline still draws right: the judge must read ``labels`` (attribute -> word) in at least
    ``needed`` of ``seeds`` images."""
    from .data import ATTRIBUTES, parse_caption

    if _unanswered(prompt) or _unanswered(labels):
        return False
    if set(labels) != set(ATTRIBUTES) or any(labels[a] not in ATTRIBUTES[a] for a in ATTRIBUTES):
        return _report(False, "", "labels must give one word per attribute, e.g. {'shape': 'star', 'color': 'red', "
                       "'size': 'large', 'position': 'center'}; words from ShapesDataset.ATTRIBUTES.")
    try:
        parse_caption(prompt)
        return _report(False, "", f"{prompt!r} is inside the caption grammar (parse_caption reads it): reword it, "
                       "with new words or a new sentence structure.")
    except ValueError:
        pass
    images = pipe.generate([prompt] * seeds, seed=0) * 2 - 1
    want = torch.tensor([ATTRIBUTES[a].index(labels[a]) for a in ATTRIBUTES])
    right = int((judge.predict(images) == want).all(dim=1).sum())
    return _report(right >= needed, f"Right: the judge reads {labels} in {right} of {seeds} images of a prompt the "
                   "templates never used.", f"the judge reads all four attributes in {right} of {seeds} images "
                   f"(need {needed}). Shape is the hardest; try another wording, or another shape.")
