import random

import numpy as np
import pytest
import torch

from textimg.utils import (atomic_write, get_device, load_checkpoint, save_checkpoint, save_json,
                           seed_everything, sha256_file)


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


def test_save_json_and_sha256(tmp_path):
    path = save_json({"b": 1, "a": [1, 2]}, tmp_path / "c.json")
    assert path.read_text().startswith("{\n")
    import hashlib
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
