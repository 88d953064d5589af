"""Tests for textimg.metrics: caption accuracy on hand-made cases, and the committed judge."""

import json
import shutil

import pytest
import torch

from textimg.data import ATTRIBUTES, ShapesDataset, make_caption
from textimg.metrics import (JUDGE_DIR, MANIFEST, Judge, JudgeConfig, caption_accuracy, confusions, labels_of,
                             load_judge, train_judge)
from textimg.utils import ChecksumError, sha256_file


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


def test_train_judge_quick_runs():
    judge, history = train_judge(JudgeConfig.preset("quick"), seed=0, progress=False)
    assert not judge.training and history["step"] == [0, 10, 19]
    assert history["loss"][-1] < history["loss"][0]


# --- the committed judge ------------------------------------------------------------------------

def test_committed_judge_matches_its_manifest_and_loads_safely():
    recorded = json.loads(MANIFEST.read_text())
    for name in ("model.safetensors", "config.json"):
        assert recorded[f"judge/{name}"] == sha256_file(JUDGE_DIR / name)
    weights = (JUDGE_DIR / "model.safetensors").read_bytes()
    header = int.from_bytes(weights[:8], "little")
    json.loads(weights[8:8 + header])  # a safetensors file: a JSON header and raw tensors, no pickle
    assert (JUDGE_DIR / "model.safetensors").stat().st_size < 2_500_000
    judge = load_judge()
    assert not judge.training and not any(p.requires_grad for p in judge.parameters())


def test_committed_judge_scores_real_test_images():
    ds = ShapesDataset(256, split="test", seed=1)
    images = torch.stack([ds[i]["image"] for i in range(256)])  # (256, 3, 64, 64)
    scores = caption_accuracy(load_judge(), images, ds.captions())  # parsed back from the captions
    assert scores["all"] >= 0.99, scores


def test_a_tampered_judge_is_refused(tmp_path):
    shutil.copytree(JUDGE_DIR, tmp_path / "judge")
    shutil.copy(MANIFEST, tmp_path / "MANIFEST.json")
    load_judge(tmp_path / "judge", tmp_path / "MANIFEST.json")  # the copy is fine
    weights = tmp_path / "judge" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"judge/model\.safetensors does not match"):
        load_judge(tmp_path / "judge", tmp_path / "MANIFEST.json")


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


def test_judge_fid_matches_the_formula_and_is_zero_for_identical_sets():
    from textimg.checks import _frechet_reference  # symmetric matrix square roots, not torchmetrics' eigvals
    from textimg.metrics import judge_fid

    g = torch.Generator().manual_seed(0)
    a = torch.rand(200, 3, 8, 8, generator=g) * 2 - 1
    b = (torch.rand(300, 3, 8, 8, generator=g) * 2 - 1) * 0.5 + 0.2
    judge = _MeanColourJudge()
    feats = lambda x: x.mean(dim=(2, 3))  # noqa: E731
    assert judge_fid(judge, a, a) == pytest.approx(0.0, abs=1e-6)
    assert judge_fid(judge, b, a) == pytest.approx(_frechet_reference(feats(b), feats(a)), rel=1e-4)
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
