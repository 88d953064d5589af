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

import torch

PRESETS = ("quick", "cpu", "gpu")
ENV_VAR = "TEXTIMG_PRESET"


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


def _repo_root() -> "Path | None":
    """The course repository's root when the package runs from a clone, else None."""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    return repo if (repo / "pyproject.toml").is_file() and (repo / "data").is_dir() else None


def cache_dir() -> "Path":
    """Where rendered caches and text-encoding caches go: $TEXTIMG_CACHE, else ``data/cache`` of the
    course repository when the package runs from a clone, else ``~/.cache/textimg``."""
    from pathlib import Path

    if os.environ.get("TEXTIMG_CACHE"):
        return Path(os.environ["TEXTIMG_CACHE"]).expanduser()
    repo = _repo_root()
    return repo / "data" / "cache" if repo else Path.home() / ".cache" / "textimg"


def models_dir() -> "Path":
    """Where the learner's own trained models go (one folder per stage): $TEXTIMG_MODELS, else
    ``runs/models`` of the course repository (git-ignored), else ``~/.cache/textimg/models``.

    A notebook that needs an earlier stage's model looks here first, then falls back to the
    committed checkpoint in ``checkpoints/``.
    """
    from pathlib import Path

    if os.environ.get("TEXTIMG_MODELS"):
        return Path(os.environ["TEXTIMG_MODELS"]).expanduser()
    repo = _repo_root()
    return repo / "runs" / "models" if repo else Path.home() / ".cache" / "textimg" / "models"
