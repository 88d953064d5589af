"""Shared helpers: seeding, the device, eval mode, files that are never half-written, and
:class:`ModelMixin`, the one save/load of every network (the idea of diffusers' ``ModelMixin``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Callable, Iterator

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


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Runs the block with torch's global CPU RNG seeded with ``seed``, then restores the RNG: seeded
    weight initialisation (``with seeded(0): G = Generator(cfg)``) that leaves the caller's randomness alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def evaluating(*modules: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the block; each module's own train/eval flag is restored afterwards."""
    flags = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.train(flag)


def progress_bar(iterable=None, **kwargs):
    """A tqdm progress bar: a widget in a live notebook, plain text in a terminal, and plain text
    (at most one update every 30 s) when $TEXTIMG_PLAIN_PROGRESS is set, as ``textimg-course`` sets
    it: a committed notebook must not keep a widget frozen at its first frame."""
    if os.environ.get("TEXTIMG_PLAIN_PROGRESS"):
        from tqdm.std import tqdm

        kwargs.setdefault("mininterval", 30.0)
    else:
        from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters (trainable or not) of a module."""
    return sum(p.numel() for p in module.parameters())


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


# -----------------------------------------------------------------------------------------------
# Files written atomically


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


def save_json(obj, path: str | Path) -> Path:
    """Writes ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | Path):
    """Parses a JSON file; a file that is not JSON raises ValueError naming it ("it may be corrupted")."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it may be corrupted") from err


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


# -----------------------------------------------------------------------------------------------
# SHA-256 sums: a manifest for the committed checkpoints, and one inside each saved config


class ChecksumError(ValueError):
    """A file's SHA-256 differs from the one recorded for it (the file changed or is corrupted)."""


def sha256_file(path: str | Path) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def manifest_for(directory: str | Path) -> Path | None:
    """The committed MANIFEST.json if ``directory`` lies inside the committed ``checkpoints/`` folder, else None:
    the committed files are checked against it, a learner's own saved models against the hash in their config."""
    from textimg.config import CHECKPOINTS, MANIFEST

    return MANIFEST if Path(directory).resolve().is_relative_to(CHECKPOINTS.resolve()) else None


# -----------------------------------------------------------------------------------------------
# One save/load for every network: a folder with model.safetensors and config.json

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_CLASSES: dict[str, type] = {}  # class name -> class, for every ModelMixin (pipelines load by name)


def read_safetensors(path: str | Path) -> dict:
    """Loads a safetensors file to CPU tensors (no pickled code runs); a truncated or foreign file
    raises ValueError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path} could not be read as safetensors ({type(err).__name__}: {err}); "
                         "it may be corrupted") from err


class ModelMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``num_parameters`` for a network built from one
    dataclass config ``self.cfg`` of type ``config_class``.

    A saved network is a folder: ``model.safetensors`` (tensors only: loading never runs code) and
    ``config.json`` = {"class": name, "config": cfg.to_dict(), "weights_sha256": ..., **facts}.
    """

    config_class: type

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        MODEL_CLASSES[cls.__name__] = cls

    def num_parameters(self) -> int:
        return count_parameters(self)

    def save_pretrained(self, directory: str | Path, facts: dict | None = None,
                        manifest: str | Path | None = None) -> Path:
        """Writes the folder (each file atomically); with ``manifest`` also records both files' SHA-256
        there. ``facts`` (how it was made, what it scored) go into config.json; without them, a network
        saved unchanged since :meth:`from_pretrained` keeps the facts it was loaded with. Returns the folder."""
        from safetensors.torch import save_file

        directory = Path(directory)
        # contiguous copies that share no memory: safetensors refuses tied or strided views
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        weights = atomic_write(directory / WEIGHTS_NAME,
                               lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        digest = sha256_file(weights)
        loaded = getattr(self, "_loaded_facts", None)  # (weights' SHA-256, facts) from from_pretrained
        if facts is None and loaded is not None and loaded[0] == digest:
            facts = loaded[1]
        save_json({"class": type(self).__name__, "config": self.cfg.to_dict(), **(facts or {}),
                   "weights_sha256": digest}, directory / CONFIG_NAME)
        if manifest is not None:
            update_manifest(manifest, [directory / WEIGHTS_NAME, directory / CONFIG_NAME])
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, manifest: str | Path | None = None):
        """Loads a folder written by :meth:`save_pretrained`, on the CPU, in eval mode.

        Both files are checked against ``manifest`` (default: the committed MANIFEST.json for a folder
        inside ``checkpoints/``) and the weights against the SHA-256 in config.json. Called on
        ``ModelMixin`` itself it builds whichever class config.json names.

        Raises:
            FileNotFoundError: a file is missing; ChecksumError: a hash differs; ValueError: a file
            cannot be read, or holds another class. Every message names the file.
        """
        directory = Path(directory)
        weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
        manifest = manifest if manifest is not None else manifest_for(directory)
        for path in (weights, config_path):
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint file {path} is missing")
            if manifest is not None:
                verify_file(path, manifest)
        config = _upgrade(read_json(config_path), cls)
        if not isinstance(config, dict) or "config" not in config or "class" not in config:
            raise ValueError(f"{config_path} is not a textimg model config (no 'class' and 'config' keys)")
        target = MODEL_CLASSES.get(config["class"]) if cls is ModelMixin else cls
        if target is None or target.__name__ != config["class"]:
            raise ValueError(f"{config_path} holds a {config['class']}, not a {cls.__name__}")
        digest = check_weights_hash(weights, config, config_path)
        try:
            model = target(target.config_class.from_dict(config["config"]))
            model.load_state_dict(read_safetensors(weights))
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{weights} and {config_path} do not describe the same {target.__name__} "
                             f"({type(err).__name__}: {str(err)[:300]})") from err
        facts = {k: v for k, v in config.items() if k not in ("class", "config", "weights_sha256")}
        model._loaded_facts = (digest, facts)  # kept by save_pretrained while the weights are unchanged
        return model.eval()


def check_weights_hash(weights: Path, config: dict, config_path: Path) -> str:
    """The weights file's SHA-256, checked against the one ``config`` records (if any); raises
    ChecksumError naming both files when they differ."""
    digest = sha256_file(weights)
    if config.get("weights_sha256") and digest != config["weights_sha256"]:
        raise ChecksumError(f"{weights} does not match the SHA-256 recorded in {config_path}: "
                            "the file was changed or is corrupted")
    return digest


def _upgrade(config, cls: type) -> dict:
    """A config.json of textimg 0.1 (class under "model", the generator's config under "generator") in
    today's form; anything else unchanged. Old folders load without being rewritten."""
    if not isinstance(config, dict) or "class" in config:
        return config
    old = dict(config)
    name = old.pop("model", None) or (cls.__name__ if cls is not ModelMixin else None)
    key = "config" if "config" in old else "generator" if "generator" in old else None
    return {"class": name, "config": old.pop(key), **old} if name and key else config


# -----------------------------------------------------------------------------------------------
# One layout for every pipeline: a folder per component and pipeline.json naming them

PIPELINE_NAME = "pipeline.json"
PIPELINE_FORMAT = "textimg.pipeline/2"


def save_pipeline(directory: str | Path, kind: str, components: dict[str, ModelMixin | None],
                  facts: dict | None = None, manifest: str | Path | None = None) -> Path:
    """Writes each component with its ``save_pretrained`` into ``directory/<name>/`` and then
    ``directory/pipeline.json`` = {"format", "class": kind, "components": {name: class name or None}, **facts}.
    ``kind`` is the pipeline's class name (e.g. "TextToImagePipeline"). Returns the directory."""
    directory = Path(directory)
    for name, model in components.items():
        if model is not None:
            model.save_pretrained(directory / name, manifest=manifest)
    classes = {name: type(model).__name__ if model is not None else None for name, model in components.items()}
    save_json({"format": PIPELINE_FORMAT, "class": kind, "components": classes, **(facts or {})},
              directory / PIPELINE_NAME)
    if manifest is not None:
        update_manifest(manifest, [directory / PIPELINE_NAME])
    return directory


def load_pipeline(directory: str | Path, kind: str) -> tuple[dict, dict[str, ModelMixin | None]]:
    """Reads what :func:`save_pipeline` wrote: (pipeline.json's dict, {name: loaded component or None}),
    each component checked like :meth:`ModelMixin.from_pretrained`. Raises FileNotFoundError,
    ChecksumError or ValueError naming the file."""
    directory = Path(directory)
    path = directory / PIPELINE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {PIPELINE_NAME} in {directory}: not a saved textimg pipeline")
    manifest = manifest_for(directory)
    if manifest is not None:
        verify_file(path, manifest)
    config = read_json(path)
    if not isinstance(config, dict) or config.get("format") != PIPELINE_FORMAT or config.get("class") != kind:
        raise ValueError(f"{path} does not describe a {kind} (format {PIPELINE_FORMAT!r} expected)")
    components = {}
    for name, class_name in config["components"].items():
        model = ModelMixin.from_pretrained(directory / name) if class_name is not None else None
        if model is not None and type(model).__name__ != class_name:
            raise ValueError(f"{path} names a {class_name} for {name!r}, but {directory / name} holds a "
                             f"{type(model).__name__}")
        components[name] = model
    return config, components


def read_config(directory: str | Path) -> dict:
    """The config.json of a saved network (its config and the facts recorded with it)."""
    return read_json(Path(directory) / CONFIG_NAME)
