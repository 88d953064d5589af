"""Exercises of notebook 05_pipeline.ipynb (the mechanism: :mod:`textimg.checks`)."""

from __future__ import annotations

import functools

import torch

from ..checks import call, close, exercise, number, tensor

__all__ = ["check_frechet_distance", "check_lerp_path", "check_diversity", "check_paraphrase"]


@functools.lru_cache(maxsize=1)
def committed():
    """The committed pipeline and judge (cached): what exercise 05.4 is scored with, everywhere."""
    from ..metrics import load_judge
    from ..pipeline import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(), load_judge()


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
    from ..metrics import frechet_distance

    sets = _feature_sets()
    got = [number(x) for x in got]
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
        if not close(tensor(mine, (steps, 5)), (1 - w) * a + w * b, 1e-5):
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
    mine = number(got)
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
    from ..data import ATTRIBUTES, parse_caption

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
    pipe, judge = committed()
    images = pipe.generate([prompt] * 8, seed=0) * 2 - 1
    want = torch.tensor([ATTRIBUTES[a].index(labels[a]) for a in ATTRIBUTES])
    right = int((judge.predict(images) == want).all(dim=1).sum())
    return right >= 6, f"the judge reads all four attributes in {right} of 8 images (6 needed)."
