"""Tests for the general helpers of textimg.utils: seeding, eval mode, the device, files written atomically,
JSON and training-state files. Saved networks and the manifest (ModelMixin, save_pipeline) are in
test_checkpoints.py."""

import random

import numpy as np
import pytest
import torch

from textimg.utils import (
    atomic_write,
    count_parameters,
    evaluating,
    get_device,
    load_checkpoint,
    progress_bar,
    read_json,
    save_checkpoint,
    save_json,
    seed_everything,
    seeded,
    sha256_file,
)


def test_seed_everything_repeats_every_rng():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first
    seed_everything(124)
    assert draw() != first


def test_seed_everything_returns_a_seeded_generator():
    a = torch.rand(4, generator=seed_everything(7))
    b = torch.rand(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="seed must be an int"):
        seed_everything("7")


def test_seeded_repeats_the_draws_and_restores_the_global_rng():
    with seeded(3):
        a = torch.rand(4)
    with seeded(3):
        b = torch.rand(4)
    assert torch.equal(a, b) and torch.equal(a, torch.rand(4, generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(11)
    state = torch.random.get_rng_state()
    with seeded(3):
        torch.rand(100)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's randomness is left alone
    with pytest.raises(KeyError):
        with seeded(3):
            torch.rand(5)
            raise KeyError("x")
    assert torch.equal(torch.random.get_rng_state(), state)  # also after an exception


def test_evaluating_restores_each_module_s_own_mode():
    a, b = torch.nn.Linear(2, 2).train(), torch.nn.Dropout().eval()
    with evaluating(a, b):
        assert not a.training and not b.training
    assert a.training and not b.training
    with pytest.raises(RuntimeError):
        with evaluating(a):
            raise RuntimeError("boom")
    assert a.training


def test_progress_bar_is_plain_text_when_asked(monkeypatch):
    import io

    from tqdm.auto import tqdm as auto
    from tqdm.std import tqdm as plain

    monkeypatch.setenv("TEXTIMG_PLAIN_PROGRESS", "1")
    bar = progress_bar(range(3), file=io.StringIO())
    assert type(bar) is plain and bar.mininterval == 30.0 and list(bar) == [0, 1, 2]
    monkeypatch.delenv("TEXTIMG_PLAIN_PROGRESS")
    assert type(progress_bar(range(3), file=io.StringIO())) is auto


def test_count_parameters_counts_frozen_ones_too():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    net[0].requires_grad_(False)
    assert count_parameters(net) == 3 * 4 + 4 + 4 + 4  # buffers (running statistics) are not parameters


def test_get_device(monkeypatch):
    monkeypatch.delenv("TEXTIMG_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert get_device().type == expected
    assert get_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("TEXTIMG_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            get_device("cuda")


def test_checkpoint_round_trip(tmp_path):
    state = {"step": 3, "weights": {"w": torch.arange(6.0).view(2, 3)}, "rng": torch.get_rng_state()}
    path = save_checkpoint(state, tmp_path / "ckpt.pt")
    loaded = load_checkpoint(path)
    assert path.stat().st_mode & 0o777 == 0o644
    assert loaded["step"] == 3
    assert torch.equal(loaded["weights"]["w"], state["weights"]["w"])
    assert torch.equal(loaded["rng"], state["rng"])


def test_failed_write_keeps_the_old_checkpoint(tmp_path):
    path = save_checkpoint({"step": 1}, tmp_path / "ckpt.pt")
    good = path.read_bytes()

    def half_write(tmp):
        tmp.write_bytes(good[: len(good) // 2])  # the process "dies" halfway through
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_write)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_corrupted_checkpoint_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt could not be read"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoints_do_not_run_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(path)


def test_save_json_read_json_and_sha256(tmp_path):
    import hashlib

    path = save_json({"b": 1, "a": [1, 2]}, tmp_path / "sub" / "c.json")
    assert path.read_text().startswith('{\n  "a"')  # indented, keys sorted
    assert read_json(path) == {"b": 1, "a": [1, 2]}
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "bad.json").write_text("{half")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON.*corrupted"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"binary\.json is not valid JSON"):
        read_json(tmp_path / "binary.json")
