"""The preset switch: one name that sizes every notebook, test and training run.

| preset  | who                     | budget                                     |
|---------|-------------------------|--------------------------------------------|
| quick   | CI, tests, autograders  | each notebook <= 60 s on 2 CPU cores       |
| cpu     | a learner's laptop      | each notebook <= 10 min on 2 cores         |
| gpu     | Colab T4 / any CUDA GPU | each notebook <= 10 min on a T4            |

The preset is read from the environment variable ``TEXTIMG_PRESET``; without it, ``gpu`` when
CUDA is available, else ``cpu``. Stage configs are dataclasses with a ``preset(name)``
constructor, so a notebook's parameters cell reads ``cfg = SomeConfig.preset(PRESET)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PRESETS = ("quick", "cpu", "gpu")
ENV_VAR = "TEXTIMG_PRESET"

# The committed checkpoints: the layout `textimg train` writes (see checkpoints/README.md)
CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
MANIFEST = CHECKPOINTS / "MANIFEST.json"  # SHA-256 of every committed file
JUDGE_DIR = CHECKPOINTS / "judge"  # the attribute classifier that scores images (textimg train-judge)
REFINER_DIR = CHECKPOINTS / "refiner"  # stage 3: the refiner trained on reconstruction (notebook 03)
PIPELINE_DIR = CHECKPOINTS / "pipeline"  # the whole pipeline: pipeline.json, generator/, refiner/
DIFFUSION_DIR = CHECKPOINTS / "diffusion"  # the diffusion cascade: pipeline.json, base/, superres/ (notebook 06)
# What benchmarks/*.py recorded (one JSON per benchmark, the machine named inside): notebooks read their tables here
BENCHMARK_RESULTS = CHECKPOINTS.parent / "benchmarks" / "results"


def check_preset(name: str) -> str:
    """Returns ``name`` lower-cased if it is a known preset, else raises a ValueError naming the choices."""
    if not isinstance(name, str) or name.strip().lower() not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return name.strip().lower()


def get_preset(preset: str | None = None) -> str:
    """The preset to use: ``preset`` if given, else $TEXTIMG_PRESET, else gpu/cpu by hardware.

    Raises:
        ValueError: if the name (given or from the environment) is not a known preset.
    """
    if preset is not None:
        return check_preset(preset)
    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        try:
            return check_preset(from_env)
        except ValueError as err:
            raise ValueError(f"${ENV_VAR}={from_env!r}: {err}") from None
    return "gpu" if torch.cuda.is_available() else "cpu"


def _repo_root() -> Path | None:
    """The course repository's root when the package runs from a clone, else None."""
    repo = Path(__file__).resolve().parent.parent
    return repo if (repo / "pyproject.toml").is_file() and (repo / "data").is_dir() else None


def cache_dir() -> Path:
    """Where rendered caches and text-encoding caches go: $TEXTIMG_CACHE, else ``data/cache`` of the
    course repository when the package runs from a clone, else ``~/.cache/textimg``."""
    if os.environ.get("TEXTIMG_CACHE"):
        return Path(os.environ["TEXTIMG_CACHE"]).expanduser()
    repo = _repo_root()
    return repo / "data" / "cache" if repo else Path.home() / ".cache" / "textimg"


def models_dir(preset: str | None = None) -> Path:
    """Where the learner's own trained models go (one folder per stage): $TEXTIMG_MODELS, else
    ``runs/models`` of the course repository (git-ignored), else ``~/.cache/textimg/models``.

    In the ``quick`` preset the default is the ``quick/`` folder inside it: a quick run (the tests,
    CI, an autograder) trains throwaway models and must never replace one a learner trained with
    ``cpu`` or ``gpu``. ``preset`` overrides the preset in force (``textimg train --preset``). A
    notebook that needs an earlier stage's model looks here first, then falls back to the committed
    checkpoint in ``checkpoints/``.
    """
    if os.environ.get("TEXTIMG_MODELS"):
        return Path(os.environ["TEXTIMG_MODELS"]).expanduser()
    repo = _repo_root()
    base = repo / "runs" / "models" if repo else Path.home() / ".cache" / "textimg" / "models"
    return base / "quick" if get_preset(preset) == "quick" else base


class PresetConfig:
    """``preset`` / ``to_dict`` / ``from_dict`` for the package's dataclass configs.

    A subclass is a ``@dataclass`` whose class attribute ``SIZES`` (no annotation, so not a field)
    maps each preset name to its field overrides.
    """

    SIZES: dict = {}

    @classmethod
    def preset(cls, name: str, **overrides):
        """The config of a preset ("quick", "cpu" or "gpu"), with any field overridden by keyword."""
        return cls.from_dict({**cls.SIZES.get(check_preset(name), {}), **overrides})

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Builds a config from a dict (e.g. a checkpoint's config.json); unknown keys are an error."""
        from dataclasses import fields

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)
