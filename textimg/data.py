"""Data for the course: the captioned-shapes dataset, its caption grammar, and other image-caption sources.

The default dataset is generated, not downloaded: each sample is one coloured shape on a dark
background, described by four attributes (shape, color, size, position) and a caption written
from them with a small template grammar. Because the grammar can be parsed back
(:func:`parse_caption`), "does the image match the caption?" is measurable, which is what the
metrics notebook needs. A fixed set of (color, shape) combinations is held out of training to test
compositional generalisation (cf. CLEVR, Johnson et al. 2017; dSprites, Matthey et al. 2017).

Every item, whatever the source, is a dict::

    {"image": float tensor (3, H, W) in [-1, 1], "caption": str, "labels": dict attribute -> int}

Reading order: the attribute words and caption grammar, the shape renderer, ShapesDataset, then
the other sources (a folder of images, a Hugging Face dataset, MNIST / Fashion-MNIST).
"""

from __future__ import annotations

import colorsys
import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

# -----------------------------------------------------------------------------------------------
# The attribute words and the caption grammar

ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "diamond", "star", "cross"],
    "color": ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "white"],
    "size": ["small", "large"],
    "position": ["top left", "top", "top right", "left", "center", "right",
                 "bottom left", "bottom", "bottom right"],
}
NUM_CLASSES: tuple[int, ...] = tuple(len(words) for words in ATTRIBUTES.values())  # (6, 8, 2, 9), in ATTRIBUTES order

# RGB of each colour at full brightness: saturated, bright, and far apart (purple leans magenta so
# it never passes for blue), so that a small CNN judge separates them on the dark background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30), "orange": (255, 130, 0), "yellow": (240, 235, 20), "green": (30, 200, 50),
    "cyan": (30, 220, 230), "blue": (40, 80, 255), "purple": (190, 50, 230), "white": (240, 240, 240),
}

# (color, shape) combinations that never appear in train/val/test; each colour and shape still
# appears in training with other partners, so a model *could* compose them.
HELDOUT: tuple[tuple[str, str], ...] = (
    ("red", "star"), ("blue", "triangle"), ("green", "diamond"),
    ("yellow", "circle"), ("purple", "square"), ("cyan", "cross"),
)

# attribute -> canonical word -> surface forms (the first is the canonical word). No surface form
# is shared between two values, so parsing is unambiguous (tests check it).
SYNONYMS: dict[str, dict[str, list[str]]] = {
    "shape": {"circle": ["circle", "disc"], "square": ["square"], "triangle": ["triangle"],
              "diamond": ["diamond", "rhombus"], "star": ["star"], "cross": ["cross", "plus sign"]},
    "color": {c: [c] for c in ATTRIBUTES["color"]} | {"cyan": ["cyan", "turquoise"],
                                                       "purple": ["purple", "violet"]},
    "size": {"small": ["small", "tiny", "little"], "large": ["large", "big", "huge"]},
    "position": {
        "top left": ["top left", "upper left", "top left corner"],
        "top": ["top", "top middle", "top center"],
        "top right": ["top right", "upper right", "top right corner"],
        "left": ["left", "middle left", "center left"],
        "center": ["center", "middle", "centre"],
        "right": ["right", "middle right", "center right"],
        "bottom left": ["bottom left", "lower left", "bottom left corner"],
        "bottom": ["bottom", "bottom middle", "bottom center"],
        "bottom right": ["bottom right", "lower right", "bottom right corner"],
    },
}

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} in the {position}",
    "there is a {size} {color} {shape} in the {position}",
    "a {size} {color} {shape} at the {position}",
    "{size} {color} {shape}, {position}",
    "a picture of a {size} {color} {shape} in the {position}",
    "in the {position} there is a {size} {color} {shape}",
    "a {shape} that is {size} and {color}, in the {position}",
)

# The richer grammar ("rich"): the seven templates and more sentence structures, with the attributes
# in other orders, the position first or last, other verbs and fillers. Training sees these; the
# HELDOUT_STRUCTURES below are never trained on: they arrange the same words in new ways, to measure
# whether a model learned the words or the templates' word order (like HELDOUT for colour-shape pairs).
RICH_STRUCTURES: tuple[str, ...] = CAPTION_TEMPLATES + (
    "{size} {color} {shape} in the {position}",
    "an image of a {size} {color} {shape} at the {position}",
    "a {color} {shape}, {size}, in the {position}",
    "the {position} has a {size} {color} {shape}",
    "please draw a {size} {color} {shape} in the {position}",
    "a {size} {shape} coloured {color}, placed at the {position}",
    "{position}: a {size} {color} {shape}",
    "one {size} {color} {shape} at the {position}",
    "there is a {color} {shape} in the {position}; it is {size}",
    "a {size} {color} {shape} sits in the {position}",
    "the picture shows a {size} {color} {shape} in the {position}",
    "at the {position}, a {size} {color} {shape}",
    "a {color} {size} {shape} in the {position}",
    "draw a {size} {shape} that is {color}, at the {position}",
    "a picture with a {shape}, {color} and {size}, in the {position} of the image",
    "{color} {shape}, {size}, {position}",
)
HELDOUT_STRUCTURES: tuple[str, ...] = (
    "please draw a {size} {color} {shape} in the {position} of the picture",  # notebook 05's first three
    "the image shows one {color} {shape}; it is {size} and sits in the {position}",
    "{position}: {size} {shape}, coloured {color}",
    "in the {position} of the picture sits a {color} {shape} that is {size}",
    "the {shape} at the {position} is {color} and {size}",
    "{color} and {size}: a {shape} placed in the {position}",
)
GRAMMARS: dict[str, tuple[str, ...]] = {"templates": CAPTION_TEMPLATES, "rich": RICH_STRUCTURES,
                                        "heldout": HELDOUT_STRUCTURES}


def _normalise(text: str) -> list[str]:
    """Lower-cases, turns hyphens into spaces, drops punctuation, and splits into words."""
    return re.sub(r"[.,;:!?\"']", " ", text.lower().replace("-", " ")).split()


# every surface form (as a tuple of words) -> (attribute, value index); the words of the templates
# around the slots are the only other words a caption may contain.
_PHRASES = {tuple(form.split()): (attr, ATTRIBUTES[attr].index(word))
            for attr, forms in SYNONYMS.items() for word, words in forms.items() for form in words}
_MAX_PHRASE = max(len(p) for p in _PHRASES)
_FILLER = {w for ts in GRAMMARS.values() for t in ts for w in _normalise(re.sub(r"\{\w+\}", " ", t))} | {"an"}


def check_grammar(grammar: str, training: bool = False) -> str:
    """``grammar`` if it names one of :data:`GRAMMARS` (with ``training``: one a model may be trained
    on, so not "heldout"), else a ValueError naming the choices. The one check of a grammar name."""
    if training and grammar not in ("templates", "rich"):
        raise ValueError(f"grammar must be 'templates' or 'rich' ('heldout' is for testing), got {grammar!r}")
    if grammar not in GRAMMARS:
        raise ValueError(f"unknown grammar {grammar!r}: choose one of {', '.join(GRAMMARS)}")
    return grammar


def _a_or_an(text: str) -> str:
    """'a orange star' -> 'an orange star' (before a vowel), wherever the article stands."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def make_caption(labels: dict[str, int | str], template: int | None = None,
                 rng: np.random.Generator | None = None, grammar: str = "templates") -> str:
    """Writes a caption for the given attributes.

    Args:
        labels: attribute -> value index (or canonical word), for all four attributes.
        template: index into the grammar's sentence structures; None picks one with ``rng`` (the first
            without one).
        rng: NumPy generator that picks the structure and synonyms (and, in the "rich" and "heldout"
            grammars, the writing: a capital, a full stop, "top-left"); None gives canonical words.
        grammar: "templates" (CAPTION_TEMPLATES, what the committed models learned), "rich"
            (RICH_STRUCTURES) or "heldout" (HELDOUT_STRUCTURES, never trained on).

    Returns:
        e.g. "a small red circle in the top left".
    """
    structures = GRAMMARS[check_grammar(grammar)]
    words = {}
    for attr, values in ATTRIBUTES.items():
        if attr not in labels:
            raise KeyError(f"labels lack {attr!r}: need all of {list(ATTRIBUTES)}")
        value = labels[attr]
        if isinstance(value, str) and value not in values or not isinstance(value, str) and \
                not 0 <= int(value) < len(values):
            raise ValueError(f"unknown {attr} {value!r}: choose one of {values} or an index into them")
        word = value if isinstance(value, str) else values[int(value)]
        forms = SYNONYMS[attr][word]
        words[attr] = forms[int(rng.integers(len(forms)))] if rng is not None else forms[0]
    if template is None:
        template = int(rng.integers(len(structures))) if rng is not None else 0
    elif not 0 <= template < len(structures):
        raise ValueError(f"template must be an index into the {len(structures)} structures of grammar "
                         f"{grammar!r}, got {template!r}")
    if grammar == "templates" or rng is None:
        return _a_or_an(structures[template].format(**words))
    hyphen, capital, stop = rng.random(3) < (0.2, 0.3, 0.3)  # how it is written, not what it says
    if hyphen:
        words["position"] = words["position"].replace(" ", "-", 1)
    text = _a_or_an(structures[template].format(**words))
    return (text[0].upper() + text[1:] if capital else text) + ("." if stop else "")


def parse_caption(text: str) -> dict[str, int]:
    """Maps a caption written in the shapes grammar back to its labels.

    Case, extra spaces, hyphens and punctuation are ignored. Each attribute must be named exactly
    once and every other word must come from the templates.

    Returns:
        attribute -> value index, in ATTRIBUTES order.

    Raises:
        TypeError: if ``text`` is not a string.
        ValueError: naming every problem: unknown words, missing or repeated attributes.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    words, found, unknown, i = _normalise(text), {a: [] for a in ATTRIBUTES}, [], 0
    while i < len(words):  # longest match first, so "top left" wins over "top"
        for n in range(min(_MAX_PHRASE, len(words) - i), 0, -1):
            hit = _PHRASES.get(tuple(words[i:i + n]))
            if hit is not None:
                found[hit[0]].append((" ".join(words[i:i + n]), hit[1]))
                i += n
                break
        else:
            if words[i] not in _FILLER:
                unknown.append(words[i])
            i += 1
    problems = []
    missing = [a for a in ATTRIBUTES if not found[a]]
    if missing:
        names = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " or " + missing[-1]
        problems.append(f"no {names} word found")
    problems += [f"more than one {a} word ({', '.join(repr(w) for w, _ in hits)})"
                 for a, hits in found.items() if len(hits) > 1]
    if unknown:
        problems.append(f"unknown word{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}")
    if problems:
        raise ValueError(f"{'; '.join(problems)} in {text!r} (a caption names one shape, colour, "
                         f"size and position, e.g. {make_caption(dict.fromkeys(ATTRIBUTES, 0))!r})")
    return {a: hits[0][1] for a, hits in found.items()}


# -----------------------------------------------------------------------------------------------
# Rendering one shape: exact, anti-aliased, identical on every machine

NATIVE_SIZE = 64  # pixels; smaller images are area-downsampled from this render
IMAGE_SIZES = (64, 32, 16, 8)
SUPERSAMPLE = 4  # 4x4 sub-pixel samples per pixel: coverage is a count out of 16
SIZE_RANGES = {"small": (5.5, 7.5), "large": (11.0, 14.0)}  # radius in pixels; never overlap
MAX_ROTATION = 15.0  # degrees: a square never turns into a diamond
POSITION_JITTER = 0.25  # fraction of a grid cell the centre may move either way
HUE_JITTER = 0.012  # hue shift either way, as a fraction of the colour wheel (about 4 degrees)
VALUE_JITTER = 0.12  # brightness drops by up to this fraction


def _star_kites(outer: float = 1.0, inner: float = 0.45) -> list[list[tuple[float, float]]]:
    """A five-pointed star as five convex kites (centre, inner, tip, inner) that tile it."""
    def at(r, deg):
        return (r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg)))
    return [[(0.0, 0.0), at(inner, a - 36), at(outer, a), at(inner, a + 36)]
            for a in (-90 + 72 * k for k in range(5))]


# Each shape is a union of convex polygons in a unit circle (x right, y down, pointing up).
_UNIT_SHAPES: dict[str, list[list[tuple[float, float]]]] = {
    "square": [[(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)]],
    "triangle": [[(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5), (-0.866, 0.5)]],  # last vertex doubled to 4
    "diamond": [[(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]],  # a tall rhombus, not a square
    "star": _star_kites(),
    "cross": [[(-0.95, -0.3), (0.95, -0.3), (0.95, 0.3), (-0.95, 0.3)],
              [(-0.3, -0.95), (0.3, -0.95), (0.3, 0.95), (-0.3, 0.95)]],
}
_CIRCLE_RADIUS = 0.85  # a full-radius circle would look bigger than the other shapes


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that decides one sample: its labels, caption and the jitter of its picture."""
    labels: dict[str, int]  # attribute -> value index
    caption: str
    cx: float  # centre, in pixels of the 64x64 image (x right, y down)
    cy: float
    radius: float  # the shape fits in a circle of this radius, in pixels
    angle: float  # rotation, degrees
    rgb: tuple[int, int, int]  # object colour after hue/brightness jitter
    background: int  # grey level of the background


def _row_spans(polys: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row y and convex polygon, the x-interval [lo, hi] inside it (lo > hi: empty).

    Args:
        polys: (P, K, 2) vertices of P convex polygons.
        ys: (R,) row coordinates.

    Returns:
        lo, hi: (R, P).
    """
    e = np.roll(polys, -1, axis=1) - polys  # (P, K, 2) edge vectors
    x0, y0, ex, ey = polys[..., 0], polys[..., 1], e[..., 0], e[..., 1]
    orient = np.sign((x0 * np.roll(y0, -1, 1) - np.roll(x0, -1, 1) * y0).sum(1, keepdims=True))
    a, b = -ey * orient, ex * orient  # inside: a*x + b*y + c >= 0 for every edge
    c = -(a * x0 + b * y0)
    g = b * ys[:, None, None] + c  # (R, P, K)
    bound = -g / np.where(a == 0, 1.0, a)
    lo = np.where(a > 0, bound, -np.inf).max(-1)  # (R, P)
    hi = np.where(a < 0, bound, np.inf).min(-1)
    lo[((a == 0) & (g < 0)).any(-1)] = np.inf  # a horizontal edge the row lies outside of
    return lo, hi


def render_shape(spec: ShapeSpec) -> np.ndarray:
    """Draws a spec as a 64x64 RGB image.

    Every number that reaches a pixel is either an integer or a multiple of 1/256 px, so the
    sub-pixel inside-tests, and hence the pixels, are bit-identical on any IEEE machine.

    Returns:
        uint8 array (3, 64, 64).
    """
    n, s = NATIVE_SIZE, SUPERSAMPLE
    bg, fg = np.int32(spec.background), np.array(spec.rgb, np.int32)[:, None, None]
    img = np.full((3, n, n), bg, np.uint8)
    x0, x1 = max(int(spec.cx - spec.radius) - 1, 0), min(int(spec.cx + spec.radius) + 2, n)
    y0, y1 = max(int(spec.cy - spec.radius) - 1, 0), min(int(spec.cy + spec.radius) + 2, n)
    xs = (np.arange(x0 * s, x1 * s) + 0.5) / s  # sub-pixel sample centres, (C,)
    ys = (np.arange(y0 * s, y1 * s) + 0.5) / s  # (R,)
    shape = ATTRIBUTES["shape"][spec.labels["shape"]]
    if shape == "circle":
        d2 = (_CIRCLE_RADIUS * spec.radius) ** 2 - (ys - spec.cy) ** 2
        half = np.sqrt(np.maximum(d2, 0.0))
        lo, hi = np.where(d2 >= 0, spec.cx - half, np.inf)[:, None], (spec.cx + half)[:, None]
    else:
        t = math.radians(spec.angle)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        polys = np.array(_UNIT_SHAPES[shape]) @ rot.T * spec.radius + (spec.cx, spec.cy)
        lo, hi = _row_spans(np.round(polys * 256) / 256, ys)  # (R, P)
    inside = ((xs >= lo[..., None]) & (xs <= hi[..., None])).any(1)  # (R, C)
    count = inside.reshape(len(ys) // s, s, len(xs) // s, s).sum((1, 3), dtype=np.int32)
    img[:, y0:y1, x0:x1] = (bg * (s * s - count) + fg * count + s * s // 2) // (s * s)
    return img


def _draw_spec(rng: np.random.Generator, combos: list[tuple[int, int]],
               size: int | None = None, position: int | None = None, grammar: str = "templates") -> ShapeSpec:
    """Draws one sample's attributes, jitter and caption, in a fixed order, from ``rng``.

    ``size`` / ``position`` fix those attributes; the same numbers are drawn either way. The caption
    is drawn last, so the ``grammar`` changes the words and never the pixels.
    """
    color, shape = combos[int(rng.integers(len(combos)))]
    drawn_size, drawn_position = int(rng.integers(2)), int(rng.integers(9))
    size = drawn_size if size is None else size
    position = drawn_position if position is None else position
    u = rng.random(7)  # all the jitter in one draw, so the caption's draws never move the pixels
    lo, hi = SIZE_RANGES[ATTRIBUTES["size"][size]]
    radius = round((lo + u[0] * (hi - lo)) * 256) / 256
    # The centre lives in a 3x3 grid over the range that keeps the whole shape 1 px inside.
    first, third = radius + 1, (NATIVE_SIZE - 2 * radius - 2) / 3
    row, col = divmod(position, 3)
    cx = round((first + third * (col + 0.5 + POSITION_JITTER * (2 * u[1] - 1))) * 256) / 256
    cy = round((first + third * (row + 0.5 + POSITION_JITTER * (2 * u[2] - 1))) * 256) / 256
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in PALETTE[ATTRIBUTES["color"][color]]))
    rgb = colorsys.hsv_to_rgb((h + HUE_JITTER * (2 * u[4] - 1)) % 1.0, s, v * (1 - VALUE_JITTER * u[5]))
    labels = {"shape": shape, "color": color, "size": size, "position": position}
    return ShapeSpec(labels=labels, caption=make_caption(labels, rng=rng, grammar=grammar), cx=cx, cy=cy,
                     radius=radius, angle=MAX_ROTATION * (2 * u[3] - 1), rgb=tuple(round(255 * c) for c in rgb),
                     background=8 + int(20 * u[6]))


# -----------------------------------------------------------------------------------------------
# The dataset


class ShapesDataset(Dataset):
    """Captioned shapes: one coloured shape on a dark background, rendered on demand.

    Sample ``i`` is a pure function of (seed, split, i): its RNG is seeded with
    ``SeedSequence([seed, split_id, i])``, so two instances agree and no global RNG is touched.
    Smaller images are the 64x64 render area-averaged over k x k blocks (exactly ``avg_pool2d``).

    Args:
        num_samples: number of samples (> 0).
        split: "train", "val", "test" (seen combinations) or "heldout" (only HELDOUT combinations).
        seed: non-negative int; different seeds give different datasets.
        image_size: 64, 32, 16 or 8.
        holdout: if False, every split draws from all (color, shape) combinations.
        cache: keep rendered images in memory, so later epochs only index.
        grammar: how captions are written: "templates" (seven sentence patterns), "rich" (many
            more, see RICH_STRUCTURES) or "heldout" (structures no training caption uses). Only the
            captions differ: sample i has the same labels and pixels in every grammar.
    """

    ATTRIBUTES = ATTRIBUTES
    PALETTE = PALETTE
    HELDOUT = HELDOUT
    SPLITS = ("train", "val", "test", "heldout")
    IMAGE_SIZES = IMAGE_SIZES

    def __init__(self, num_samples: int, split: str = "train", seed: int = 0, image_size: int = 64,
                 holdout: bool = True, cache: bool = True, grammar: str = "templates"):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r}: choose one of {', '.join(self.SPLITS)}")
        if split == "heldout" and not holdout:
            raise ValueError("split 'heldout' needs holdout=True (with holdout=False nothing is held out)")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if image_size not in IMAGE_SIZES:
            raise ValueError(f"image_size must be one of {IMAGE_SIZES} (64 is rendered, smaller sizes "
                             f"are area-downsampled from it), got {image_size!r}")
        check_grammar(grammar)  # raises for an unknown grammar now, not at the first caption
        self.num_samples, self.split, self.seed, self.grammar = num_samples, split, seed, grammar
        self.image_size, self.holdout, self.cache = image_size, holdout, cache
        held = {(ATTRIBUTES["color"].index(c), ATTRIBUTES["shape"].index(s)) for c, s in HELDOUT}
        every = [(c, s) for c in range(len(ATTRIBUTES["color"])) for s in range(len(ATTRIBUTES["shape"]))]
        self.combos = [cs for cs in every if not holdout or ((cs in held) == (split == "heldout"))]
        self._split_id = self.SPLITS.index(split)
        self._specs: list[ShapeSpec | None] = [None] * num_samples
        self._images: np.ndarray | None = None  # (N, 3, H, W) uint8, or uint16 k x k block sums
        self._rendered = np.zeros(num_samples, bool)

    def __len__(self) -> int:
        return self.num_samples

    def spec(self, index: int) -> ShapeSpec:
        """The labels, caption and jitter of sample ``index`` (cheap: no pixels)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        if self._specs[index] is None:
            ss = np.random.SeedSequence([self.seed, self._split_id, int(index)])
            self._specs[index] = _draw_spec(np.random.default_rng(ss), self.combos, grammar=self.grammar)
        return self._specs[index]

    def _pixels(self, index: int) -> np.ndarray:
        """Sample ``index`` as uint8 (3, 64, 64), or uint16 k x k block sums (3, H, W) if smaller."""
        img = render_shape(self.spec(index))
        k = NATIVE_SIZE // self.image_size
        if k > 1:
            img = img.reshape(3, self.image_size, k, self.image_size, k).sum((2, 4), dtype=np.uint16)
        return img

    def render_all(self) -> "ShapesDataset":
        """Renders every sample into the cache now (e.g. before forking DataLoader workers)."""
        for i in range(self.num_samples):
            self._cached(i)
        return self

    def _cached(self, index: int) -> np.ndarray:
        if self._images is None:
            dtype = np.uint8 if self.image_size == NATIVE_SIZE else np.uint16
            self._images = np.empty((self.num_samples, 3, self.image_size, self.image_size), dtype)
        if not self._rendered[index]:
            self._images[index] = self._pixels(index)
            self._rendered[index] = True
        return self._images[index]

    def __getitem__(self, index: int) -> dict:
        """Returns {"image": float32 (3, H, W) in [-1, 1], "caption": str, "labels": dict}."""
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        spec = self.spec(int(index))  # raises IndexError
        pixels = self._cached(int(index)) if self.cache else self._pixels(int(index))
        k2 = (NATIVE_SIZE // self.image_size) ** 2
        image = torch.from_numpy(pixels.astype(np.float32)) / (127.5 * k2) - 1.0  # (3, H, W)
        return {"image": image, "caption": spec.caption, "labels": dict(spec.labels)}

    def labels_tensor(self) -> torch.Tensor:
        """All labels as a LongTensor (N, 4), columns in ATTRIBUTES order (shape, color, size, position)."""
        return torch.tensor([list(self.spec(i).labels.values()) for i in range(self.num_samples)])

    def captions(self) -> list[str]:
        """All captions, in index order, without rendering any image."""
        return [self.spec(i).caption for i in range(self.num_samples)]

    def __repr__(self) -> str:
        return (f"ShapesDataset(num_samples={self.num_samples}, split={self.split!r}, seed={self.seed}, "
                f"image_size={self.image_size}, holdout={self.holdout}"
                + (f", grammar={self.grammar!r})" if self.grammar != "templates" else ")"))


def sample_images(labels: dict[str, int | str], n: int = 8, seed: int = 0, image_size: int = 64) -> torch.Tensor:
    """``n`` renders of one composition, differing only in jitter: the images a caption stands for.

    Args:
        labels: attribute -> value index or canonical word, for all four attributes (any
            (color, shape) pair, held-out ones included).
        n: number of images.
        seed: the jitter of image ``j`` is a pure function of (seed, labels, j).
        image_size: 64, 32, 16 or 8 (area-downsampled, as in ShapesDataset).

    Returns:
        float32 (n, 3, image_size, image_size) in [-1, 1].
    """
    make_caption(labels)  # validates every attribute, with its clear errors
    idx = {a: v if not isinstance(v, str) else ATTRIBUTES[a].index(v) for a, v in labels.items()}
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size!r}")
    key = [idx[a] for a in ATTRIBUTES]
    images = []
    for j in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 99, *key, j]))
        spec = _draw_spec(rng, [(idx["color"], idx["shape"])], idx["size"], idx["position"])
        images.append(torch.from_numpy(render_shape(spec).astype(np.float32)) / 127.5 - 1.0)
    x = torch.stack(images)  # (n, 3, 64, 64)
    k = NATIVE_SIZE // image_size
    return torch.nn.functional.avg_pool2d(x, k) if k > 1 else x


# -----------------------------------------------------------------------------------------------
# Other sources, same item format


def load_image(image, image_size: int = 64) -> torch.Tensor:
    """Converts a PIL image, a path, a file object or an (H, W[, C]) uint8 array to the item format.

    Non-square images are centre-cropped to a square, then resized with an antialiasing bicubic
    filter (skipped when the size already matches, so PNGs of rendered shapes load exactly).

    Returns:
        float32 tensor (3, image_size, image_size) in [-1, 1].
    """
    if isinstance(image, (str, Path)):
        with Image.open(image) as f:
            image = f.convert("RGB")
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    elif isinstance(image, dict) and (image.get("bytes") or image.get("path")):  # undecoded HF image
        import io
        return load_image(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"], image_size)
    elif not isinstance(image, Image.Image):
        image = Image.open(image)  # a file-like object
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != image_size:
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)  # PIL antialiases
    array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy()  # (3, H, W)
    return torch.from_numpy(array) / 127.5 - 1.0


def _try_parse(caption: str) -> dict[str, int]:
    try:
        return parse_caption(caption)
    except ValueError:
        return {}


class ImageCaptionFolder(Dataset):
    """A folder of images with a captions file: CSV with columns ``file,caption`` or JSON lines
    with keys ``file`` and ``caption`` (see data/samples/). ``labels`` are parsed from the caption
    when it is in the shapes grammar, else empty.

    Args:
        root: the folder; image paths in the captions file are relative to it.
        captions_file: path (relative to ``root`` or absolute); None looks for captions.csv, then
            captions.jsonl, in ``root``.
        image_size: side of the square images returned.
    """

    def __init__(self, root: str | Path, captions_file: str | Path | None = None, image_size: int = 64):
        self.root, self.image_size = Path(root), image_size
        if captions_file is None:
            found = [self.root / n for n in ("captions.csv", "captions.jsonl") if (self.root / n).is_file()]
            if not found:
                raise FileNotFoundError(f"no captions file in {self.root}: expected captions.csv "
                                        "(columns file,caption) or captions.jsonl (keys file, caption)")
            captions_file = found[0]
        path = Path(captions_file)
        if not path.is_absolute() and (self.root / path).is_file():
            path = self.root / path  # relative to root first, then to the working directory
        if not path.is_file():
            raise FileNotFoundError(f"captions file {path} does not exist")
        self.captions_file = path
        self.items = [self._check(path, line, row) for line, row in self._read(path)]
        if not self.items:
            raise ValueError(f"captions file {path} has no rows")

    @staticmethod
    def _read(path: Path):
        """Yields (line number, row dict) from a CSV or JSON-lines file."""
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                if not {"file", "caption"} <= set(reader.fieldnames or ()):
                    raise ValueError(f"{path}: the header must name columns 'file' and 'caption', "
                                     f"got {reader.fieldnames}")
                for row in reader:
                    yield reader.line_num, row
            elif path.suffix.lower() in (".jsonl", ".json"):
                for line, text in enumerate(f, 1):
                    if text.strip():
                        try:
                            yield line, json.loads(text)
                        except json.JSONDecodeError as err:
                            raise ValueError(f"{path}, line {line}: not valid JSON ({err})") from None
            else:
                raise ValueError(f"{path}: captions file must end in .csv or .jsonl")

    def _check(self, path: Path, line: int, row: dict) -> tuple[Path, str]:
        name, caption = row.get("file"), row.get("caption")
        if not name:
            raise ValueError(f"{path}, line {line}: no 'file' given")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{path}, line {line}: empty caption for {name!r}")
        if not (self.root / name).is_file():
            raise FileNotFoundError(f"{path}, line {line}: image file {name!r} not found in {self.root}")
        return self.root / name, caption.strip()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        file, caption = self.items[index]
        return {"image": load_image(file, self.image_size), "caption": caption, "labels": _try_parse(caption)}


class HFImageCaptionDataset(Dataset):
    """Adapter over a Hugging Face ``datasets.Dataset`` with an image and a caption column.

    Args:
        hf_dataset: a ``datasets.Dataset`` (one split, e.g. ``load_dataset(...)["train"]``).
        image_column, caption_column: column names.
        image_size: side of the square images returned.
    """

    def __init__(self, hf_dataset, image_column: str = "image", caption_column: str = "caption",
                 image_size: int = 64):
        try:
            import datasets
        except ImportError as err:
            raise ImportError("HFImageCaptionDataset needs the datasets library: "
                              "pip install datasets") from err
        if isinstance(hf_dataset, datasets.DatasetDict):
            split = next(iter(hf_dataset), "train")
            raise TypeError(f"got a DatasetDict; pass one split, e.g. ds[{split!r}]")
        columns = list(hf_dataset.column_names)
        for column in (image_column, caption_column):
            if column not in columns:
                raise KeyError(f"column {column!r} not in the dataset; available columns: {columns}")
        self.dataset, self.image_column, self.caption_column = hf_dataset, image_column, caption_column
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[int(index)]
        caption = str(row[self.caption_column]).strip()
        return {"image": load_image(row[self.image_column], self.image_size), "caption": caption,
                "labels": _try_parse(caption)}


MNIST_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNIST_TEMPLATES = ("a handwritten digit {}", "the digit {}, written by hand", "a handwritten {}")
FASHION_WORDS = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal",
                 "a shirt", "a sneaker", "a bag", "an ankle boot")
FASHION_TEMPLATES = ("a photo of {}", "a picture of {}", "a grayscale photo of {}")


def class_caption(label: int, fashion: bool = False, template: int = 0) -> str:
    """The caption of an MNIST (digit) or Fashion-MNIST (clothing) class, e.g. "a photo of a sneaker"."""
    words, templates = (FASHION_WORDS, FASHION_TEMPLATES) if fashion else (MNIST_WORDS, MNIST_TEMPLATES)
    return templates[template % len(templates)].format(words[label])


class CaptionedClassDataset(Dataset):
    """Wraps a dataset of (PIL image, class index) pairs, adding templated captions.

    The template of item ``i`` is drawn from ``SeedSequence([seed, i])``; ``labels`` is {"class": y}.
    """

    def __init__(self, base, fashion: bool = False, image_size: int = 64, seed: int = 0):
        self.base, self.fashion, self.image_size, self.seed = base, fashion, image_size, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        image, label = self.base[index]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(index)]))
        caption = class_caption(int(label), self.fashion, int(rng.integers(3)))
        return {"image": load_image(image, self.image_size), "caption": caption,
                "labels": {"class": int(label)}}


def mnist_captions(root: str | Path = "data/downloads", train: bool = True, fashion: bool = False,
                   download: bool = False, image_size: int = 64) -> CaptionedClassDataset:
    """MNIST or Fashion-MNIST (through torchvision) with templated captions.

    Args:
        root: where the files are, or are downloaded to (git-ignored by default).
        train: the 60,000-image training set, else the 10,000-image test set.
        fashion: Fashion-MNIST (clothing) instead of MNIST (digits).
        download: fetch the files if missing; needs a network, once.
        image_size: side of the returned images.

    Returns:
        a dataset of {"image": (3, image_size, image_size) in [-1, 1], "caption", "labels": {"class": y}}.
    """
    from torchvision import datasets as tv_datasets
    name = "FashionMNIST" if fashion else "MNIST"
    try:
        base = getattr(tv_datasets, name)(str(root), train=train, download=download)
    except RuntimeError as err:
        if download:
            raise
        raise FileNotFoundError(f"{name} not found under {root}: pass download=True on a machine with a "
                                f"network (it fetches 10-30 MB into {root})") from err
    return CaptionedClassDataset(base, fashion=fashion, image_size=image_size)
