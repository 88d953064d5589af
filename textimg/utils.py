"""Shared helpers: seeding, the device, and checkpoint files that are never half-written."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seeds Python's, NumPy's and torch's global RNGs (CPU and every CUDA device).

    Returns a fresh ``torch.Generator`` seeded with ``seed``, for code that prefers an explicit
    generator to the global one.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``device`` if given, else $TEXTIMG_DEVICE, else CUDA if available, else CPU.

    Library code never calls this: it takes the device from its inputs. Notebooks and the
    command line call it once and move models and data there.
    """
    choice = device if device is not None else os.environ.get("TEXTIMG_DEVICE") or None
    if choice is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(choice)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(dev)!r} was asked for, but CUDA is not available on this machine")
    return dev


def sha256_file(path: str | Path) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Calls ``write(tmp_path)`` and then renames the temporary file over ``path``.

    The temporary file lives in the same directory, so the rename is atomic: a reader sees either
    the old file or the complete new one, never half of one. If ``write`` raises, the old file is
    left untouched and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp makes it private (0600); a saved file is an ordinary one
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Saves a training state (models, optimisers, RNG states, step ...) atomically with torch.save."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Loads a state saved by :func:`save_checkpoint`, safely (``weights_only=True``: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"checkpoint {path} could not be read ({type(err).__name__}: {err}); "
                         "it may be corrupted or not a textimg checkpoint") from err


def save_json(obj, path: str | Path) -> Path:
    """Writes ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# -----------------------------------------------------------------------------------------------
# Pretrained modules: safetensors weights + a JSON config, checked against a SHA-256 manifest

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class ChecksumError(ValueError):
    """A file's SHA-256 differs from the one its manifest records (the file changed or is corrupted)."""


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters (trainable or not) of a module."""
    return sum(p.numel() for p in module.parameters())


def save_pretrained_module(module: torch.nn.Module, config: dict, directory: str | Path,
                           manifest: str | Path | None = None, record_hash: bool = False) -> Path:
    """Writes ``directory/model.safetensors`` (the state dict) and ``directory/config.json``, each atomically,
    and records both files' SHA-256 in ``manifest`` if one is given (:func:`update_manifest`).

    With ``record_hash`` the weights' SHA-256 also goes into config.json (``weights_sha256``), so
    the folder checks itself without a manifest (:func:`load_pretrained_state` verifies it).
    Safetensors holds tensors only, so loading it never runs code (unlike a pickle).

    Returns:
        the directory.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    # contiguous copies that share no memory: safetensors refuses tied or strided views
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    weights = atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    save_json({**config, "weights_sha256": sha256_file(weights)} if record_hash else config, directory / CONFIG_NAME)
    if manifest is not None:
        update_manifest(manifest, [directory / WEIGHTS_NAME, directory / CONFIG_NAME])
    return directory


def read_manifest(manifest: str | Path) -> dict[str, str]:
    """The manifest's {path relative to the manifest's folder: sha256}; raises naming the file."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"no checkpoint manifest at {manifest}")
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"manifest {manifest} is not valid JSON ({err})") from err
    if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
        raise ValueError(f"manifest {manifest} must map file paths to SHA-256 hex strings")
    return entries


def update_manifest(manifest: str | Path, files: list[str | Path]) -> dict[str, str]:
    """Records the SHA-256 of each file in the manifest (JSON), keyed by its path relative to the
    manifest's folder; other entries are kept. Written atomically. Returns the new entries."""
    manifest = Path(manifest)
    entries = read_manifest(manifest) if manifest.is_file() else {}
    for file in files:
        file = Path(file)
        if not file.is_file():
            raise FileNotFoundError(f"cannot record {file} in the manifest: no such file")
        key = file.resolve().relative_to(manifest.resolve().parent).as_posix()
        entries[key] = sha256_file(file)
    save_json(entries, manifest)
    return entries


def verify_file(path: str | Path, manifest: str | Path) -> None:
    """Checks a file's SHA-256 against the manifest.

    Raises:
        FileNotFoundError: the file (or the manifest) is missing.
        ChecksumError: the file is not in the manifest, or its hash differs.
    """
    path, manifest = Path(path), Path(manifest)
    entries = read_manifest(manifest)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    key = path.resolve().relative_to(manifest.resolve().parent).as_posix()
    if key not in entries:
        raise ChecksumError(f"{path} is not recorded in {manifest}; run update_manifest after saving it")
    actual = sha256_file(path)
    if actual != entries[key]:
        raise ChecksumError(f"{path} does not match its SHA-256 in {manifest} (expected {entries[key][:12]}..., "
                            f"got {actual[:12]}...): the file was changed or is corrupted")


def load_pretrained_state(directory: str | Path, manifest: str | Path | None = None) -> tuple[dict, dict]:
    """Reads what :func:`save_pretrained_module` wrote, safely (safetensors: no pickled code runs).

    Args:
        directory: holds model.safetensors and config.json.
        manifest: a MANIFEST.json to check both files' SHA-256 against first; None skips the check.

    Returns:
        (state_dict of CPU tensors, config dict).

    Raises:
        FileNotFoundError: a file is missing; ChecksumError: a hash differs from the manifest's, or
        from the ``weights_sha256`` that config.json records; ValueError: a file cannot be read.
        Every message names the file.
    """
    directory = Path(directory)
    weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    for path in (weights, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {path} is missing")
        if manifest is not None:
            verify_file(path, manifest)
    config = read_json(config_path)
    expected = config.get("weights_sha256") if isinstance(config, dict) else None
    if expected and sha256_file(weights) != expected:
        raise ChecksumError(f"{weights} does not match the SHA-256 recorded in {config_path}: "
                            "the file was changed or is corrupted")
    return read_safetensors(weights), config


def read_json(path: str | Path):
    """Parses a JSON file; a file that is not JSON raises ValueError naming it ("it may be corrupted")."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it may be corrupted") from err


def read_safetensors(path: str | Path) -> dict:
    """Loads a safetensors file to CPU tensors (no pickled code runs); a truncated or foreign file
    raises ValueError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path} could not be read as safetensors ({type(err).__name__}: {err}); "
                         "it may be corrupted") from err
