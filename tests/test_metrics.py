"""Tests for textimg.metrics: caption accuracy on hand-made cases, the judge (training it, make_judge's
saved facts, the committed one), the judge-FID, diversity and sharpness."""

import datetime
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import textimg
import textimg.config
import textimg.metrics
from textimg.config import JUDGE_DIR, MANIFEST
from textimg.data import ATTRIBUTES, ShapesDataset, make_caption
from textimg.metrics import (
    Judge,
    JudgeConfig,
    caption_accuracy,
    confusions,
    diversity,
    judge_features,
    labels_of,
    load_judge,
    make_judge,
    sharpness,
    train_judge,
)
from textimg.training import describe_machine
from textimg.utils import ChecksumError, read_config, sha256_file

from helpers import images


class FakeJudge(torch.nn.Module):
    """Answers with chosen labels: image i (marked by its first pixel) gets ``answers[i]``."""

    def __init__(self, answers: torch.Tensor):
        super().__init__()
        self.answers = answers  # (N, 4)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        i = x[:, 0, 0, 0].round().long()  # (B,)
        return {a: torch.nn.functional.one_hot(self.answers[i, k], len(v)).float() * 5
                for k, (a, v) in enumerate(ATTRIBUTES.items())}


def marked_images(n):
    x = torch.zeros(n, 3, 32, 32)
    x[:, 0, 0, 0] = torch.arange(n).float()
    return x


TRUTH = torch.tensor([[0, 0, 0, 0], [1, 2, 1, 4], [2, 3, 0, 8], [5, 7, 1, 1]])  # (shape, color, size, position)


def test_caption_accuracy_by_hand():
    answers = TRUTH.clone()
    answers[1, 0] = 3  # image 1: wrong shape
    answers[2, 1], answers[2, 2] = 0, 1  # image 2: wrong colour and size
    answers[3, 3] = 0  # image 3: wrong position
    scores = caption_accuracy(FakeJudge(answers), marked_images(4), TRUTH, batch_size=3)  # 2 batches
    assert scores == {"shape": 0.75, "color": 0.75, "size": 0.75, "position": 0.75, "all": 0.25}
    assert caption_accuracy(FakeJudge(TRUTH), marked_images(4), TRUTH)["all"] == 1.0



def test_confusions_count_misreadings_by_hand():
    truth = torch.cat([TRUTH, TRUTH])  # 8 images: shapes circle, square, triangle, cross, twice
    truth[5, 2] = 0  # the second square is small
    answers = truth.clone()
    answers[[1, 5], 0] = 0  # both squares (a large and a small one) read as circles
    answers[3, 0] = 4  # the first cross (large) read as a star
    answers[2, 1] = 5  # a colour error is not a shape error
    judge, images = FakeJudge(answers), marked_images(8)
    assert confusions(judge, images, truth, batch_size=3) == [("square", "circle", 2), ("cross", "star", 1)]
    assert confusions(judge, images, truth, given="size") == [
        ("large cross", "star", 1), ("large square", "circle", 1), ("small square", "circle", 1)]
    assert confusions(judge, images, truth, "color") == [("green", "blue", 1)]
    assert confusions(FakeJudge(truth), images, truth) == []
    with pytest.raises(ValueError, match="unknown attribute 'hue'"):
        confusions(judge, images, truth, "hue")
    with pytest.raises(ValueError, match="8 images but 4"):
        confusions(judge, images, TRUTH)

def test_captions_and_label_dicts_are_parsed():
    dicts = [dict(zip(ATTRIBUTES, row.tolist())) for row in TRUTH]
    captions = [make_caption(d, template=i % 7) for i, d in enumerate(dicts)]
    assert torch.equal(labels_of(captions), TRUTH) and torch.equal(labels_of(dicts), TRUTH)
    answers = TRUTH.clone()
    answers[0, 3] = 2
    assert caption_accuracy(FakeJudge(answers), marked_images(4), captions)["position"] == 0.75
    with pytest.raises(ValueError, match="4 images but 3"):
        caption_accuracy(FakeJudge(TRUTH), marked_images(4), captions[:3])
    with pytest.raises(ValueError, match="shape"):
        labels_of(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown word"):
        labels_of(["a small red blob in the top left"])


def test_judge_shapes_at_64_and_32_and_mode_restored():
    judge = Judge(JudgeConfig()).train()
    for side in (64, 32):
        logits = judge(torch.zeros(2, 3, side, side))
        assert {a: t.shape for a, t in logits.items()} == {a: (2, len(v)) for a, v in ATTRIBUTES.items()}
        assert judge.features(torch.zeros(2, 3, side, side)).shape == (2, 128)
    caption_accuracy(judge, torch.zeros(2, 3, 32, 32), TRUTH[:2])
    assert judge.training  # caption_accuracy ran it in eval mode and put it back


def test_judge_config_presets():
    assert JudgeConfig.preset("cpu") == JudgeConfig()  # the committed judge's config is the default
    assert JudgeConfig.from_dict(read_config(JUDGE_DIR)["config"]) == JudgeConfig.preset("cpu")
    quick = JudgeConfig.preset("quick")
    assert (quick.num_train, quick.steps, quick.seed) == (512, 20, 0) and quick.channels == JudgeConfig().channels
    assert JudgeConfig.from_dict(json.loads(json.dumps(quick.to_dict()))) == quick  # channels: a list, a tuple again
    with pytest.raises(ValueError, match="unknown preset"):
        JudgeConfig.preset("default")


def test_train_judge_quick_runs():
    state = torch.get_rng_state()
    judge, history = train_judge(JudgeConfig.preset("quick"), progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # seeded by cfg.seed: the global RNG is not touched
    assert isinstance(judge, Judge) and not judge.training and history["step"] == [0, 10, 19]
    assert set(history) == {"step", "loss", "val_all_64", "val_all_32", "seconds"} and history["seconds"] > 0
    assert len(history["loss"]) == len(history["val_all_64"]) == len(history["val_all_32"]) == 3
    assert history["loss"][-1] < history["loss"][0]


def test_make_judge_writes_facts_by_code_and_loads(tmp_path, monkeypatch):
    """make_judge (what ``textimg train-judge`` runs) saves the judge with the facts of its run and its
    accuracy on both splits at both sizes; load_judge reads the folder back. The evaluation is made
    smaller here (make_judge asks for 2,000 images per split and size, which takes ~20 s)."""
    real_evaluate, asked = textimg.metrics.evaluate_judge, []

    def smaller(judge, num_samples=2000, split="test", image_size=64, seed=0):
        asked.append((num_samples, split, image_size))
        return real_evaluate(judge, 64, split, image_size, seed)

    monkeypatch.setattr(textimg.metrics, "evaluate_judge", smaller)
    manifest = MANIFEST.read_bytes()
    cfg = JudgeConfig.preset("quick")
    day = datetime.date.today().isoformat()
    judge = make_judge(tmp_path / "judge", cfg, command="textimg train-judge --preset quick", progress=False)
    assert sorted((2000, split, size) for split in ("test", "heldout") for size in (64, 32)) == sorted(asked)
    assert sorted(p.name for p in (tmp_path / "judge").iterdir()) == ["config.json", "model.safetensors"]
    assert MANIFEST.read_bytes() == manifest  # a folder outside checkpoints/ is not recorded in the manifest

    config = read_config(tmp_path / "judge")
    assert config["class"] == "Judge" and JudgeConfig.from_dict(config["config"]) == cfg
    assert config["weights_sha256"] == sha256_file(tmp_path / "judge" / "model.safetensors")
    facts = config["training"]
    assert facts["command"] == "textimg train-judge --preset quick"
    assert facts["textimg"] == textimg.__version__ and facts["torch"] == torch.__version__
    assert facts["machine"] == describe_machine() and facts["device"] == "cpu"
    assert facts["date"] in (day, datetime.date.today().isoformat())
    assert facts["steps"] == cfg.steps and facts["parameters"] == judge.num_parameters() and facts["seconds"] > 0
    assert facts["history"]["step"] == [0, 10, 19]
    test = facts["test"]
    assert set(test) == {"note", "test_64", "test_32", "heldout_64", "heldout_32"} and "2000" in test["note"]
    for key in ("test_64", "test_32", "heldout_64", "heldout_32"):
        split, size = key.split("_")
        measured = real_evaluate(judge, 64, split, int(size))  # what was recorded is what the judge scores
        assert test[key] == {a: float(f"{v:.4g}") for a, v in measured.items()}, key
        assert set(test[key]) == {*ATTRIBUTES, "all"}

    loaded = load_judge(tmp_path / "judge")
    assert isinstance(loaded, Judge) and not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(v, judge.state_dict()[k]) for k, v in loaded.state_dict().items())
    x = images(3, size=64)
    assert all(torch.equal(a, b) for a, b in zip(loaded(x).values(), judge.eval()(x).values()))


# --- the committed judge ------------------------------------------------------------------------

def test_committed_judge_matches_its_manifest_and_loads_safely():
    recorded = json.loads(MANIFEST.read_text())
    for name in ("model.safetensors", "config.json"):
        assert recorded[f"judge/{name}"] == sha256_file(JUDGE_DIR / name)
    weights = (JUDGE_DIR / "model.safetensors").read_bytes()
    header = int.from_bytes(weights[:8], "little")
    json.loads(weights[8:8 + header])  # a safetensors file: a JSON header and raw tensors, no pickle
    assert (JUDGE_DIR / "model.safetensors").stat().st_size < 2_500_000
    config = read_config(JUDGE_DIR)
    assert config["class"] == "Judge" and config["weights_sha256"] == recorded["judge/model.safetensors"]
    judge = load_judge()
    assert isinstance(judge, Judge) and not judge.training and not any(p.requires_grad for p in judge.parameters())
    assert config["parameters"] == judge.num_parameters()
    direct = Judge.from_pretrained(JUDGE_DIR)
    assert not direct.training and all(torch.equal(v, judge.state_dict()[k]) for k, v in direct.state_dict().items())


def test_committed_judge_scores_real_test_images():
    ds = ShapesDataset(256, split="test", seed=1)
    images = torch.stack([ds[i]["image"] for i in range(256)])  # (256, 3, 64, 64)
    scores = caption_accuracy(load_judge(), images, ds.captions())  # parsed back from the captions
    assert scores["all"] >= 0.99, scores
    small = F.avg_pool2d(images, 2)  # 32x32, as the generator makes them
    assert caption_accuracy(Judge.from_pretrained(JUDGE_DIR), small, ds.labels_tensor())["all"] >= 0.99


def test_a_tampered_judge_is_refused(tmp_path):
    shutil.copytree(JUDGE_DIR, tmp_path / "judge")
    shutil.copy(MANIFEST, tmp_path / "MANIFEST.json")
    Judge.from_pretrained(tmp_path / "judge", tmp_path / "MANIFEST.json")  # the copy is fine
    load_judge(tmp_path / "judge")  # also without a manifest
    weights = tmp_path / "judge" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"judge/model\.safetensors does not match its SHA-256 in .*MANIFEST"):
        Judge.from_pretrained(tmp_path / "judge", tmp_path / "MANIFEST.json")
    with pytest.raises(ChecksumError, match=r"safetensors does not match the SHA-256 recorded in .*config\.json"):
        load_judge(tmp_path / "judge")  # the hash inside config.json catches it too


def test_a_folder_inside_checkpoints_is_checked_against_the_manifest(tmp_path, monkeypatch):
    """load_judge checks a committed folder against MANIFEST.json by default: there even a changed fact in
    config.json is refused, while a learner's own folder is checked by the weights' hash alone."""
    shutil.copytree(JUDGE_DIR, tmp_path / "checkpoints" / "judge")
    shutil.copy(MANIFEST, tmp_path / "checkpoints" / "MANIFEST.json")
    config = tmp_path / "checkpoints" / "judge" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "note": "edited"}))
    load_judge(tmp_path / "checkpoints" / "judge")  # outside the committed folder: the weights still match
    monkeypatch.setattr(textimg.config, "CHECKPOINTS", tmp_path / "checkpoints")
    monkeypatch.setattr(textimg.config, "MANIFEST", tmp_path / "checkpoints" / "MANIFEST.json")
    with pytest.raises(ChecksumError, match=r"judge/config\.json does not match its SHA-256"):
        load_judge(tmp_path / "checkpoints" / "judge")


# -----------------------------------------------------------------------------------------------
# The Fréchet distance in the judge's feature space (notebook 05)


@pytest.fixture(scope="module")
def judge():
    return load_judge()


class _MeanColourJudge(torch.nn.Module):
    """A stand-in judge whose 'features' are each image's mean colour: 3-d, easy to reason about."""

    class cfg:
        feature_dim = 3

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # judge_features reads the device from a parameter

    def features(self, x):
        return x.mean(dim=(2, 3))  # (N, 3)


def test_frechet_distance_by_hand():
    from textimg.metrics import frechet_distance

    # 1-D: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2; a = [-1, 1]: mean 0, var 2; b = [1, 3, 5]: mean 3, var 4
    a, b = torch.tensor([[-1.0], [1.0]]), torch.tensor([[1.0], [3.0], [5.0]])
    assert frechet_distance(a, b) == pytest.approx(9 + (2 ** 0.5 - 2) ** 2, rel=1e-9)
    assert frechet_distance(b, b) == pytest.approx(0.0, abs=1e-9)


def test_judge_fid_matches_the_formula_and_is_zero_for_identical_sets():
    from textimg.metrics import frechet_distance, judge_fid

    g = torch.Generator().manual_seed(0)
    a = torch.rand(200, 3, 8, 8, generator=g) * 2 - 1
    b = (torch.rand(300, 3, 8, 8, generator=g) * 2 - 1) * 0.5 + 0.2
    judge = _MeanColourJudge()
    feats = lambda x: x.mean(dim=(2, 3))  # noqa: E731
    assert judge_fid(judge, a, a) == pytest.approx(0.0, abs=1e-6)
    assert judge_fid(judge, b, a) == pytest.approx(frechet_distance(feats(b), feats(a)), rel=1e-4)
    assert judge_fid(judge, b, a) > 0.01


def test_judge_fid_floor_is_small_and_a_constant_generator_is_far(judge):
    from textimg.metrics import judge_fid, judge_fid_floor

    floor = judge_fid_floor(judge, num_samples=300)
    real = torch.stack([ShapesDataset(300, split="test", seed=5)[i]["image"] for i in range(300)])
    constant = real[:1].expand(300, -1, -1, -1)  # one image, repeated: no variety at all
    assert 0 < floor < judge_fid(judge, constant, real) / 10


def test_judge_fid_rejects_bad_input():
    from textimg.metrics import judge_fid

    judge = _MeanColourJudge()
    with pytest.raises(ValueError, match="at least 2 images"):
        judge_fid(judge, torch.zeros(1, 3, 8, 8), torch.zeros(5, 3, 8, 8))
    with pytest.raises(ValueError, match=r"reference must be a float tensor \(N, 3, H, W\)"):
        judge_fid(judge, torch.zeros(5, 3, 8, 8), torch.zeros(5, 8, 8))


def test_a_constant_generator_has_zero_diversity(judge):
    from textimg.metrics import diversity

    image = torch.stack([ShapesDataset(1, split="test")[0]["image"]])
    assert diversity(judge, image.expand(8, -1, -1, -1)) == pytest.approx(0.0, abs=1e-6)


def test_inception_fid_is_optional_and_says_how_to_get_it():
    from textimg.metrics import inception_fid

    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install torch-fidelity"):
            inception_fid(torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8))
    else:
        pytest.skip("torch-fidelity is installed here; the offline error path cannot be exercised")


# -----------------------------------------------------------------------------------------------
# Diversity and sharpness (notebook 04)


def test_diversity_is_zero_for_copies_and_positive_otherwise():
    torch.manual_seed(0)
    judge = Judge(JudgeConfig.preset("quick")).train()
    one = images(1, seed=0).expand(5, -1, -1, -1)
    assert judge_features(judge, one).shape == (5, 128) and judge.training  # mode restored
    assert diversity(judge, one) == pytest.approx(0.0, abs=1e-5)  # a collapsed generator
    different = images(5, seed=1)
    assert diversity(judge, different) > 1e-3
    f = judge_features(judge, different[:2])
    assert diversity(judge, different[:2]) == pytest.approx((f[0] - f[1]).norm().item(), rel=1e-5)
    f3 = judge_features(judge, different[:3]).double()
    pairs = [(f3[i] - f3[j]).norm().item() for i in range(3) for j in range(3) if i != j]
    assert diversity(judge, different[:3]) == pytest.approx(sum(pairs) / 6, rel=1e-6)  # the mean over pairs i != j
    with pytest.raises(ValueError, match="at least 2"):
        diversity(judge, different[:1])


def test_sharpness_prefers_a_sharp_edge_to_its_blur():
    sharp = -torch.ones(1, 3, 32, 32)
    sharp[..., 16:] = 1.0  # a vertical edge
    kernel = torch.ones(3, 1, 5, 5) / 25
    blurred = F.conv2d(F.pad(sharp, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
    assert sharpness(sharp) > 5 * sharpness(blurred) > 0
    assert sharpness(-torch.ones(2, 3, 16, 16)) == 0.0  # a flat image


def test_sharpness_by_hand():
    """One white pixel on black, in [0, 1]: the Laplacian's valid response over 4x4 is -4 at the pixel and
    1 at its 4 neighbours (when inside), 0 elsewhere; sharpness is that response's variance."""
    x = -torch.ones(1, 3, 6, 6)
    x[..., 2, 2] = 1.0
    response = torch.zeros(4, 4, dtype=torch.float64)  # valid positions 1..4 of the 6x6 image
    response[1, 1] = -4.0
    for r, c in ((0, 1), (2, 1), (1, 0), (1, 2)):
        response[r, c] = 1.0
    assert sharpness(x) == pytest.approx(response.var().item(), rel=1e-9)
