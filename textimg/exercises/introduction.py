"""Exercises of notebook 00_introduction.ipynb (the mechanism: :mod:`textimg.checks`)."""

from __future__ import annotations

import torch

from ..checks import call, exercise, number

__all__ = ["check_num_compositions", "check_caption_for", "check_bottom_row_count", "check_caption_writer",
           "BOTTOM_ROW"]


@exercise("00.1", 2, "label sets of train captions", "value",
          hints=("Count the words per attribute, multiply, and mind the pairs the train split never shows.",
                 "shapes × colours − len(ShapesDataset.HELDOUT) pairs, times sizes, times positions."))
def check_num_compositions(answer: int):
    """How many distinct (shape, color, size, position) label sets can a *train* caption describe?"""
    return answer


@check_num_compositions.scorer
def _(answer):
    from ..data import HELDOUT, NUM_CLASSES

    shapes, colors, sizes, positions = NUM_CLASSES
    expected = (shapes * colors - len(HELDOUT)) * sizes * positions
    return int(number(answer)) == expected, f"{expected} label sets."


@exercise("00.2", 2, "a caption in the grammar", "value",
          hints=("Read section 6: a template, with one word or phrase per attribute.",
                 "SYNONYMS lists the other words for each attribute; parse_caption(your_caption) must work."))
def check_caption_for(caption: str):
    """A caption, in the dataset's grammar, for a *large cyan cross in the bottom right*, with at least one
    synonym (a word other than those four)."""
    return caption


@check_caption_for.scorer
def _(caption):
    from ..data import ATTRIBUTES, parse_caption

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
    from ..data import ATTRIBUTES, ShapesDataset

    labels = ShapesDataset(1000, split="train", seed=0).labels_tensor()  # (N, 4)
    large = labels[:, 2] == ATTRIBUTES["size"].index("large")
    bottom = torch.isin(labels[:, 3], torch.tensor([ATTRIBUTES["position"].index(p) for p in BOTTOM_ROW]))
    expected = int((large & bottom).sum())
    return int(number(answer)) == expected, f"{expected} of 1,000 items."


def _label_sets(n: int = 40) -> list[dict[str, int]]:
    from ..data import ATTRIBUTES, NUM_CLASSES

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
    from ..data import parse_caption

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
