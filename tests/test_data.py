"""Tests for textimg.data: the shapes dataset, its caption grammar, and the other sources."""

import csv
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from textimg.data import (
    ATTRIBUTES,
    CAPTION_TEMPLATES,
    GRAMMARS,
    HELDOUT,
    HELDOUT_STRUCTURES,
    PALETTE,
    RICH_STRUCTURES,
    SYNONYMS,
    CaptionedClassDataset,
    HFImageCaptionDataset,
    ImageCaptionFolder,
    ShapesDataset,
    class_caption,
    make_caption,
    mnist_captions,
    parse_caption,
)

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
DATA_README = SAMPLES.parent / "README.md"
NAMES = list(ATTRIBUTES)


def word(attr, labels):
    return ATTRIBUTES[attr][labels[attr]]


@pytest.fixture(scope="module")
def train64():
    return ShapesDataset(300, split="train", seed=0)


# ----------------------------------------------------------------------------- grammar


def test_attribute_words_and_heldout_are_consistent():
    assert list(ATTRIBUTES) == ["shape", "color", "size", "position"]
    assert ShapesDataset.ATTRIBUTES is ATTRIBUTES and ShapesDataset.HELDOUT == HELDOUT
    assert len(ATTRIBUTES["shape"]) >= 5 and len(ATTRIBUTES["color"]) >= 7
    assert len(ATTRIBUTES["position"]) == 9
    assert set(PALETTE) == set(ATTRIBUTES["color"])
    for attr, forms in SYNONYMS.items():
        assert list(forms) == ATTRIBUTES[attr]
        assert all(words[0] == canonical for canonical, words in forms.items())
    every_form = [f for forms in SYNONYMS.values() for words in forms.values() for f in words]
    assert len(every_form) == len(set(every_form)), "a surface form names two values"
    for color, shape in HELDOUT:
        assert color in ATTRIBUTES["color"] and shape in ATTRIBUTES["shape"]
    assert len(set(HELDOUT)) == len(HELDOUT)


def test_parse_caption_round_trips_every_template_and_synonym():
    forms = {a: [(f, ATTRIBUTES[a].index(w)) for w, fs in SYNONYMS[a].items() for f in fs] for a in NAMES}
    count = 0
    for template in CAPTION_TEMPLATES:
        for combo in itertools.product(*(forms[a] for a in NAMES)):
            text = template.format(**{a: f for a, (f, _) in zip(NAMES, combo)})
            assert parse_caption(text) == {a: v for a, (_, v) in zip(NAMES, combo)}, text
            count += 1
    assert count > 50_000


def test_parse_caption_tolerates_case_spaces_and_punctuation():
    expected = {"shape": 0, "color": 0, "size": 0, "position": 0}
    assert parse_caption("  A Small RED circle in   the Top-Left. ") == expected
    assert parse_caption("small red circle, upper left!") == expected


@pytest.mark.parametrize("text, message", [
    ("a cat on a mat", "no shape, color, size or position word found"),
    ("a small red cat in the top left", "no shape word found"),
    ("a small red circle", "no position word found"),
    ("a small large red circle in the top left", "more than one size word ('small', 'large')"),
    ("a small red blue circle in the top left", "more than one color word"),
    ("a small red circle in the top left next to a tree", "unknown words 'next', 'to', 'tree'"),
    ("", "no shape"),
])
def test_parse_caption_rejects_text_outside_the_grammar(text, message):
    with pytest.raises(ValueError) as err:
        parse_caption(text)
    assert message in str(err.value) and repr(text) in str(err.value)


def test_parse_caption_type_error():
    with pytest.raises(TypeError):
        parse_caption(42)


def test_make_caption_canonical_random_and_errors():
    labels = {"shape": 4, "color": 5, "size": 1, "position": 4}
    assert make_caption(labels) == "a large blue star in the center"
    assert make_caption({"shape": "star", "color": "blue", "size": "large", "position": "center"},
                        template=3) == "large blue star, center"
    rng = np.random.default_rng(0)
    captions = {make_caption(labels, rng=rng) for _ in range(200)}
    assert len(captions) > 20 and all(parse_caption(c) == labels for c in captions)
    with pytest.raises(KeyError, match="position"):
        make_caption({"shape": 0, "color": 0, "size": 0})
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        make_caption({"shape": 0, "color": "pink", "size": 0, "position": 0})
    with pytest.raises(ValueError, match="unknown size -1"):
        make_caption({"shape": 0, "color": 0, "size": -1, "position": 0})


def test_the_rich_grammar_and_its_held_out_structures():
    assert RICH_STRUCTURES[:len(CAPTION_TEMPLATES)] == CAPTION_TEMPLATES and len(RICH_STRUCTURES) >= 20
    assert not set(RICH_STRUCTURES) & set(HELDOUT_STRUCTURES)
    slots = {"{shape}", "{color}", "{size}", "{position}"}
    for structure in RICH_STRUCTURES + HELDOUT_STRUCTURES:
        assert all(structure.count(s) == 1 for s in slots), structure
    # held out are the *structures*, not the words: every word of one appears in a training structure
    trained = {w for t in RICH_STRUCTURES for w in t.replace(",", " ").replace(";", " ").replace(":", " ").split()}
    for structure in HELDOUT_STRUCTURES:
        new = {w for w in structure.replace(",", " ").replace(";", " ").replace(":", " ").split()} - trained
        assert not new, f"{structure!r} uses words no training structure has: {new}"
    # the position comes first in some training structures, and the attributes in other orders
    assert any(t.startswith("{position}") for t in RICH_STRUCTURES)
    assert any(t.index("{color}") < t.index("{size}") for t in RICH_STRUCTURES)


@pytest.mark.parametrize("grammar", ["rich", "heldout"])
def test_parse_caption_reads_every_caption_of_the_other_grammars(grammar):
    rng = np.random.default_rng(0)
    seen_structures, written = set(), set()
    for _ in range(3000):
        labels = {a: int(rng.integers(len(v))) for a, v in ATTRIBUTES.items()}
        caption = make_caption(labels, rng=rng, grammar=grammar)
        assert parse_caption(caption) == labels, caption
        written |= {caption[0].isupper(), caption.endswith("."), "-" in caption}
    for k, structure in enumerate(GRAMMARS[grammar]):
        labels = {"shape": 0, "color": 1, "size": 0, "position": 0}  # orange: "an orange", never "a orange"
        caption = make_caption(labels, template=k, grammar=grammar)
        assert parse_caption(caption) == labels and " a orange" not in f" {caption}", caption
        seen_structures.add(structure)
    assert written == {True, False} and len(seen_structures) == len(GRAMMARS[grammar])


def test_grammars_change_the_words_never_the_pixels_or_labels():
    plain, rich = ShapesDataset(40, split="test"), ShapesDataset(40, split="test", grammar="rich")
    held = ShapesDataset(40, split="test", grammar="heldout")
    assert torch.equal(plain[3]["image"], rich[3]["image"]) and torch.equal(plain[3]["image"], held[3]["image"])
    assert torch.equal(plain.labels_tensor(), held.labels_tensor())
    assert plain.captions() != rich.captions() != held.captions()
    assert [parse_caption(c) for c in held.captions()] == [parse_caption(c) for c in plain.captions()]
    assert "grammar='rich'" in repr(rich) and "grammar" not in repr(plain)
    with pytest.raises(ValueError, match="unknown grammar 'fancy'"):
        ShapesDataset(4, grammar="fancy")
    with pytest.raises(ValueError, match="unknown grammar"):
        make_caption({"shape": 0, "color": 0, "size": 0, "position": 0}, grammar="fancy")
    with pytest.raises(ValueError, match="index into the 6 structures of grammar 'heldout'"):
        make_caption({"shape": 0, "color": 0, "size": 0, "position": 0}, template=6, grammar="heldout")


def test_dataset_card_lists_the_grammar():
    card = DATA_README.read_text(encoding="utf-8")
    for text in [*RICH_STRUCTURES, *HELDOUT_STRUCTURES, *(f"{c} {s}" for c, s in HELDOUT)]:
        assert text in card, f"data/README.md does not mention {text!r}"
    for forms in SYNONYMS.values():
        for words in forms.values():
            assert all(w in card for w in words)


# ----------------------------------------------------------------------------- ShapesDataset


def test_item_format_and_sizes(train64):
    for size in (64, 32, 16, 8):
        ds = train64 if size == 64 else ShapesDataset(5, seed=0, image_size=size)
        item = ds[0]
        assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert isinstance(item["caption"], str) and list(item["labels"]) == NAMES
    labels = train64.labels_tensor()
    assert labels.shape == (300, 4) and labels.dtype == torch.long
    assert labels[7].tolist() == list(train64[7]["labels"].values())
    assert train64.captions()[7] == train64[7]["caption"] and len(train64) == 300


def test_determinism_across_instances_cache_and_seeds():
    a, b = ShapesDataset(20, seed=3), ShapesDataset(20, seed=3, cache=False)
    b_items = [b[i] for i in reversed(range(20))][::-1]  # order of access does not matter
    for i in range(20):
        assert torch.equal(a[i]["image"], b_items[i]["image"])
        assert a[i]["caption"] == b_items[i]["caption"] and a[i]["labels"] == b_items[i]["labels"]
    assert torch.equal(a[5]["image"], a[5]["image"])  # cached read == first read
    c = ShapesDataset(20, seed=4)
    assert sum(torch.equal(a[i]["image"], c[i]["image"]) for i in range(20)) == 0
    val = ShapesDataset(20, split="val", seed=3)
    assert sum(a[i]["caption"] == val[i]["caption"] for i in range(20)) < 3


def test_area_downsampling_is_avg_pool_of_the_native_render(train64):
    for size in (32, 16, 8):
        small = ShapesDataset(10, seed=0, image_size=size)
        for i in range(10):
            expected = F.avg_pool2d(train64[i]["image"][None], 64 // size)[0]
            torch.testing.assert_close(small[i]["image"], expected, atol=1e-6, rtol=0)


def test_captions_agree_with_labels_in_every_split():
    for split in ShapesDataset.SPLITS:
        ds = ShapesDataset(300, split=split, seed=1)
        for i in range(len(ds)):
            spec = ds.spec(i)
            assert parse_caption(spec.caption) == spec.labels


def test_heldout_combinations():
    held = set(HELDOUT)
    for split in ("train", "val", "test"):
        combos = {(word("color", s.labels), word("shape", s.labels))
                  for s in map(ShapesDataset(2000, split=split).spec, range(2000))}
        assert not combos & held
        if split == "train":
            assert {c for c, _ in combos} == set(ATTRIBUTES["color"])
            assert {s for _, s in combos} == set(ATTRIBUTES["shape"])
            assert len(combos) == len(ATTRIBUTES["color"]) * len(ATTRIBUTES["shape"]) - len(held)
    heldout = ShapesDataset(500, split="heldout")
    assert {(word("color", heldout.spec(i).labels), word("shape", heldout.spec(i).labels))
            for i in range(500)} == held
    everything = ShapesDataset(2000, holdout=False)
    assert held <= {(word("color", s.labels), word("shape", s.labels))
                    for s in map(everything.spec, range(2000))}


def test_picture_matches_caption(train64):
    palette = torch.tensor([PALETTE[c] for c in ATTRIBUTES["color"]], dtype=torch.float32)
    pixels = {0: [], 1: []}
    for i in range(len(train64)):
        item = train64[i]
        rgb = (item["image"] + 1) * 127.5  # (3, 64, 64) in [0, 255]
        background = rgb[:, 0, 0]
        border = torch.cat([rgb[:, 0], rgb[:, -1], rgb[:, :, 0], rgb[:, :, -1]], dim=1)
        assert (border - background[:, None]).abs().max() == 0, "the object touches the border"
        diff = (rgb - background[:, None, None]).abs().amax(0)  # (64, 64)
        core = diff > 0.75 * diff.max()
        mean = rgb[:, core].mean(1)
        assert (palette - mean).norm(dim=1).argmin() == item["labels"]["color"], item["caption"]
        ys, xs = torch.nonzero(diff > 0.5 * diff.max(), as_tuple=True)
        row, col = divmod(item["labels"]["position"], 3)
        for centre, band in ((xs.float().mean() + 0.5, col), (ys.float().mean() + 0.5, row)):
            observed = 0 if centre < 32 - 6 else 2 if centre > 32 + 6 else 1
            assert observed == band, (item["caption"], float(centre))
        pixels[item["labels"]["size"]].append((diff > 0.5 * diff.max()).sum().item())
    assert max(pixels[0]) < min(pixels[1])  # every large object has more pixels than every small one


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        ShapesDataset(0)
    with pytest.raises(ValueError, match="unknown split 'training'"):
        ShapesDataset(5, split="training")
    with pytest.raises(ValueError, match="holdout=True"):
        ShapesDataset(5, split="heldout", holdout=False)
    with pytest.raises(ValueError, match=r"\(64, 32, 16, 8\)"):
        ShapesDataset(5, image_size=48)
    with pytest.raises(ValueError, match="seed"):
        ShapesDataset(5, seed=-1)
    ds = ShapesDataset(5)
    for index in (5, -1):
        with pytest.raises(IndexError):
            ds[index]
    assert ds[np.int64(2)]["caption"] == ds[2]["caption"]


def test_render_all_fills_the_cache():
    ds = ShapesDataset(10, seed=2, image_size=16).render_all()
    assert ds._rendered.all()
    assert torch.equal(ds[3]["image"], ShapesDataset(10, seed=2, image_size=16, cache=False)[3]["image"])


# ----------------------------------------------------------------------------- other sources


def test_sample_folder_loads_in_both_formats():
    rendered = ShapesDataset(4, split="train", seed=0)
    for name in ("captions.csv", "captions.jsonl"):
        folder = ImageCaptionFolder(SAMPLES, captions_file=name)
        assert len(folder) == 4
        for i in range(4):
            item = folder[i]
            assert torch.equal(item["image"], rendered[i]["image"])  # PNG is lossless
            assert item["caption"] == rendered[i]["caption"] and item["labels"] == rendered[i]["labels"]
    assert ImageCaptionFolder(SAMPLES).captions_file.name == "captions.csv"
    assert sum(p.stat().st_size for p in SAMPLES.iterdir()) < 50_000


def write_images(root, names, size=(40, 30)):
    for k, name in enumerate(names):
        Image.new("RGB", size, (40 * k, 100, 200)).save(root / name)


def test_folder_from_csv_and_jsonl(tmp_path):
    write_images(tmp_path, ["a.png", "b.jpg"])
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file", "caption"], ["a.png", "a big red disc at the top"],
                                 ["b.jpg", "a photo of my cat"]])
    folder = ImageCaptionFolder(tmp_path, image_size=16)
    first, second = folder[0], folder[1]
    assert first["image"].shape == (3, 16, 16) and -1 <= first["image"].min() <= first["image"].max() <= 1
    assert first["labels"] == {"shape": 0, "color": 0, "size": 1, "position": 1}
    assert second["caption"] == "a photo of my cat" and second["labels"] == {}
    (tmp_path / "more.jsonl").write_text(json.dumps({"file": "b.jpg", "caption": "x"}) + "\n\n")
    assert ImageCaptionFolder(tmp_path, tmp_path / "more.jsonl")[0]["caption"] == "x"


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions.csv"):
        ImageCaptionFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ImageCaptionFolder(tmp_path, "nope.csv")
    write_images(tmp_path, ["a.png"])
    (tmp_path / "missing.csv").write_text("file,caption\na.png,hello\nghost.png,boo\n")
    with pytest.raises(FileNotFoundError, match=r"line 3: image file 'ghost.png' not found"):
        ImageCaptionFolder(tmp_path, "missing.csv")
    (tmp_path / "empty.jsonl").write_text('{"file": "a.png", "caption": "  "}\n')
    with pytest.raises(ValueError, match=r"line 1: empty caption for 'a.png'"):
        ImageCaptionFolder(tmp_path, "empty.jsonl")
    (tmp_path / "header.csv").write_text("path,text\na.png,hello\n")
    with pytest.raises(ValueError, match="'file' and 'caption'"):
        ImageCaptionFolder(tmp_path, "header.csv")


def test_hf_adapter():
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("L", (32, 24), 128)]
    hf = datasets.Dataset.from_dict({"img": images, "text": ["a tiny red square in the middle", "grey"]})
    ds = HFImageCaptionDataset(hf, image_column="img", caption_column="text", image_size=8)
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert first["image"].shape == (3, 8, 8) and first["labels"]["shape"] == 1
    torch.testing.assert_close(first["image"][0], torch.ones(8, 8))
    assert second["labels"] == {} and second["image"].shape == (3, 8, 8)
    with pytest.raises(KeyError, match=r"'image'.*available columns: \['img', 'text'\]"):
        HFImageCaptionDataset(hf)
    with pytest.raises(TypeError, match="pass one split"):
        HFImageCaptionDataset(datasets.DatasetDict({"train": hf}), "img", "text")


def test_hf_adapter_says_how_to_install_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        HFImageCaptionDataset(object())


def test_captioned_class_dataset_and_mnist_error(tmp_path):
    assert class_caption(7) == "a handwritten digit seven"
    assert class_caption(7, fashion=True) == "a photo of a sneaker"
    assert class_caption(9, fashion=True, template=1) == "a picture of an ankle boot"
    fake = [(Image.new("L", (28, 28), 255), y) for y in (3, 9)]
    ds = CaptionedClassDataset(fake, image_size=32)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["labels"] == {"class": 3}
    assert "three" in item["caption"] and ds[0]["caption"] == item["caption"]
    with pytest.raises(FileNotFoundError, match="download=True"):
        mnist_captions(root=tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="FashionMNIST"):
        mnist_captions(root=tmp_path, fashion=True)


def test_sample_images_render_the_asked_composition():
    from textimg.data import parse_caption, sample_images

    labels = {"shape": "star", "color": "red", "size": "large", "position": "bottom right"}  # held out
    x = sample_images(labels, n=4, seed=3)
    assert x.shape == (4, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, sample_images(labels, n=4, seed=3))
    assert not torch.equal(x[0], x[1])  # jitter differs between the images
    fg = (x + 1).sum(1) > 0.6  # (4, 64, 64) object pixels
    ys, xs = torch.nonzero(fg[0], as_tuple=True)
    assert ys.float().mean() > 38 and xs.float().mean() > 38  # bottom right
    red = x[:, 0][fg].mean() > x[:, 1][fg].mean() + 0.5  # red channel dominates the object
    assert red
    small = sample_images({**labels, "size": "small"}, n=4, seed=3)
    assert ((small + 1).sum(1) > 0.6).sum() < fg.sum()
    assert torch.allclose(sample_images(labels, n=2, seed=3, image_size=32),
                          torch.nn.functional.avg_pool2d(x[:2], 2), atol=1e-6)
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        sample_images({**labels, "color": "pink"})
    assert parse_caption("a big red star in the lower right") == {
        k: ShapesDataset.ATTRIBUTES[k].index(v) for k, v in labels.items()}
