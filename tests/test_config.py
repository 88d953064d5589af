import pytest
import torch

from textimg.config import PRESETS, get_preset


def test_explicit_preset_wins(monkeypatch):
    monkeypatch.setenv("TEXTIMG_PRESET", "cpu")
    assert get_preset("quick") == "quick"
    assert get_preset(" GPU ") == "gpu"


def test_preset_from_environment(monkeypatch):
    for name in PRESETS:
        monkeypatch.setenv("TEXTIMG_PRESET", name)
        assert get_preset() == name


def test_default_preset_follows_hardware(monkeypatch):
    monkeypatch.delenv("TEXTIMG_PRESET", raising=False)
    assert get_preset() == ("gpu" if torch.cuda.is_available() else "cpu")


def test_unknown_preset_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="unknown preset 'fast': choose one of quick, cpu, gpu"):
        get_preset("fast")
    monkeypatch.setenv("TEXTIMG_PRESET", "turbo")
    with pytest.raises(ValueError, match=r"\$TEXTIMG_PRESET='turbo'"):
        get_preset()


def test_cache_dir(monkeypatch, tmp_path):
    from pathlib import Path

    from textimg.config import cache_dir

    monkeypatch.setenv("TEXTIMG_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("TEXTIMG_CACHE")
    assert cache_dir() == Path(__file__).resolve().parent.parent / "data" / "cache"  # a clone


def test_models_dir(monkeypatch, tmp_path):
    from pathlib import Path

    from textimg.config import models_dir

    monkeypatch.setenv("TEXTIMG_MODELS", str(tmp_path))
    assert models_dir() == tmp_path
    monkeypatch.delenv("TEXTIMG_MODELS")
    monkeypatch.setenv("TEXTIMG_PRESET", "cpu")
    assert models_dir() == Path(__file__).resolve().parent.parent / "runs" / "models"
    monkeypatch.setenv("TEXTIMG_PRESET", "quick")  # quick runs never replace a learner's cpu/gpu models
    assert models_dir() == Path(__file__).resolve().parent.parent / "runs" / "models" / "quick"
    assert models_dir("cpu") == Path(__file__).resolve().parent.parent / "runs" / "models"  # textimg train --preset
    monkeypatch.setenv("TEXTIMG_PRESET", "cpu")
    assert models_dir("quick") == Path(__file__).resolve().parent.parent / "runs" / "models" / "quick"
