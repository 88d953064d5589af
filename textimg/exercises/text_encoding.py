"""Exercises of notebook 01_text_encoding.ipynb (the mechanism: :mod:`textimg.checks`)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..checks import call, close, exercise, number, tensor

__all__ = ["check_masked_mean", "check_cosine_similarity", "check_token_count", "check_nearest_caption",
           "check_masked_max", "TOKEN_TEXT", "NEAREST_QUERY", "NEAREST_CANDIDATES"]


@functools.lru_cache(maxsize=1)
def text_encoder():
    """The default MiniLM encoder (cached): what 01.1 and 01.4 are scored with."""
    from ..text import TextEncoder

    return TextEncoder("minilm")


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
    from ..text import masked_mean

    tokens, mask = _pool_inputs()
    got = tensor(got, (4, 5))
    if close(got, tokens.mean(1)):
        return False, "that is the plain mean: padding positions must not count."
    ok = close(got, masked_mean(tokens, mask))
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
    if close(got, a @ b.T):
        return False, "those are plain dot products: divide by the vectors' lengths."
    ok = close(got, F.normalize(a, dim=1) @ F.normalize(b, dim=1).T)
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
    expected = len(text_encoder().tokenizer(TOKEN_TEXT)["input_ids"])
    return int(number(answer)) == expected, f"{expected} tokens."


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
    pooled = text_encoder().encode([NEAREST_QUERY, *NEAREST_CANDIDATES]).pooled
    expected = int(F.cosine_similarity(pooled[:1], pooled[1:]).argmax())
    return int(number(answer)) == expected, f"{NEAREST_CANDIDATES[expected]!r}."


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
    if close(got, tokens.max(1).values):
        return False, "that maximum includes padding positions."
    ok = close(got, tokens.masked_fill(~mask[..., None], float("-inf")).max(1).values)
    return ok, "padding never wins." if ok else "the values differ from the masked maximum."
