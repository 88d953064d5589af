"""The training scaffold every loop shares, so that each loop's body stays short and visible.

- :func:`make_accelerator`: Hugging Face Accelerate places the models, runs mixed precision (and its
  GradScaler) on CUDA, and synchronises gradients when ``accelerate launch`` / ``torchrun`` starts
  several processes; a loop writes ``accelerator.backward(loss)`` where it would write ``loss.backward()``;
- :class:`BatchOrder`: shuffled batches from a seeded generator, each process taking its share;
- :class:`TrainingCheckpoint`: one resumable-state file per loop, written atomically by the main
  process, read safely (``weights_only=True``), refused when it comes from another run, holding
  every process's random state so that a resumed run continues exactly;
- :func:`run_facts`: what a checkpoint records about how it was made, written by code.

Accelerate can also save checkpoints (``save_state``); we keep our own file because that one is a
folder written file by file (not atomic) and reloads random states with ``weights_only=False``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from textimg.utils import evaluating, load_checkpoint, save_checkpoint

CHECKPOINT_FORMAT = "textimg.training/1"


# -----------------------------------------------------------------------------------------------
# Device, mixed precision and processes: Accelerate


def make_accelerator(device: str | torch.device | None = None, amp: bool = True):
    """An ``accelerate.Accelerator`` for one training loop.

    Args:
        device: "cpu" trains on the CPU (also when CUDA exists); anything else, or None, trains on
            this process's accelerator if there is one (``cuda:<local rank>``), else on the CPU.
        amp: mixed precision on CUDA: bf16 where supported, else fp16 with a GradScaler; never on CPU.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = on_cpu(device)
    precision = "no" if cpu or not amp else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        return Accelerator(cpu=cpu, mixed_precision=precision)
    except ValueError:  # an earlier loop of this process chose another precision or device: Accelerate keeps
        # one per process. Forget it; in a single process also forget the device (several processes keep theirs)
        from accelerate import PartialState

        AcceleratorState._reset_state(reset_partial_state=PartialState().num_processes == 1)
        return Accelerator(cpu=cpu, mixed_precision=precision)


def on_cpu(device: str | torch.device | None) -> bool:
    """Whether a loop asked to run on ``device`` runs on the CPU (the flag Accelerate's ``cpu`` wants)."""
    return device is not None and torch.device(device).type == "cpu" or not torch.cuda.is_available()


def unwrap(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind ``accelerator.prepare(model)`` (no DDP wrapper, no autocast patch)."""
    return accelerator.unwrap_model(model, keep_fp32_wrapper=False)


class Engine:
    """What a training step needs beyond its lesson: the Accelerator (mixed precision, gradient scaling,
    gradient synchronisation), the loop's torch.Generator for random draws, and the step number for
    error messages. ``Engine()`` alone means plain float32 and the global RNG, for a step run by hand.
    """

    def __init__(self, accelerator=None, rng: torch.Generator | None = None):
        self.accelerator, self.rng, self.step = accelerator, rng, 0

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 GradScaler, or None (float32 and bf16 need none)."""
        return getattr(self.accelerator, "scaler", None)

    def autocast(self):
        """Mixed precision for the forward pass where the Accelerator uses it, else nothing."""
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    def plain(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module itself, unwrapped from DDP: to run it without synchronising its gradients."""
        return self.accelerator.unwrap_model(model) if self.accelerator is not None else model

    def update(self, loss: Tensor, opt: torch.optim.Optimizer, name: str, guard: Tensor | None = None) -> None:
        """Checks that ``guard`` (default: the loss) is finite, then backward and one optimizer step."""
        check_finite(self.step, name, loss if guard is None else guard)
        if self.accelerator is not None:
            self.accelerator.backward(loss)  # scales the loss with fp16; DDP all-reduces the gradients
        else:
            loss.backward()
        opt.step()  # an Accelerate optimizer skips a step whose scaled gradients overflowed


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The other network while one network steps: no gradients for its parameters, and eval mode (spectral
    norm's power iteration then leaves its u, v alone), so it ends exactly as it was."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        with evaluating(module):
            yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf; raised before the optimizer step, so the parameters are unchanged."""


def check_finite(step: int, name: str, loss: Tensor) -> None:
    """Raises :class:`NonFiniteLossError` naming the step and the loss if ``loss`` is NaN or inf."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(f"step {step}: {name} is {loss.item()} (not finite); no update was applied. "
                                 "Lower the learning rates, or resume from the last checkpoint")


# -----------------------------------------------------------------------------------------------
# Batches


class BatchOrder:
    """Shuffled batches of dataset indices, epoch after epoch, from a seeded CPU torch.Generator
    (a new permutation when fewer than ``batch_size`` indices are left).

    With several processes every process draws the same global batch and keeps its share
    (``rank``, ``rank + world``, ...), so the images seen per step do not depend on the number of
    processes. :meth:`state_dict` restores the exact sequence of batches that would have followed.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 rng: torch.Generator | None = None):
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        self.batch_size = min(batch_size, num_samples)
        self.rank, self.world = rank, world
        self.rng = rng if rng is not None else torch.Generator().manual_seed(seed)  # rng: share a loop's generator
        self.order = torch.randperm(num_samples, generator=self.rng)  # (N,)
        self.pos = 0

    def next(self) -> Tensor:
        """This process's indices of the next batch, LongTensor (batch_size / world,)."""
        if self.pos + self.batch_size > len(self.order):  # a new epoch, a new order
            self.order, self.pos = torch.randperm(len(self.order), generator=self.rng), 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx[self.rank::self.world]

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state(), "order": self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self.order, self.pos = state["order"].clone(), int(state["pos"])


def fetch(data, idx: Tensor) -> tuple[Tensor, list[str] | None, list | None]:
    """Images (B, 3, S, S), captions and meanings of the items ``idx`` of a dataset (or of a tensor
    of images: no captions). A meaning is an item's label dict if it has one, else its caption: two
    synonymous captions have one meaning."""
    if isinstance(data, Tensor):
        return data[idx], None, None
    items = [data[int(i)] for i in idx]
    if "caption" not in items[0]:
        return torch.stack([it["image"] for it in items]), None, None
    meanings = [it["labels"] if it.get("labels") else it["caption"] for it in items]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items], meanings


# -----------------------------------------------------------------------------------------------
# Resumable training state


def global_rng_state() -> dict:
    """The global RNGs' states (torch CPU, every CUDA device, Python's random, NumPy's) as tensors and
    plain Python values, so a checkpoint holding them loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}


def set_global_rng_state(state: dict) -> None:
    """Restores what :func:`global_rng_state` returned (CUDA only on a machine with as many devices)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """The keys (dotted) whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(prefix + key)
    return out


class TrainingCheckpoint:
    """One loop's resumable state in ``directory/<loop>.pt`` (None: no checkpoints).

    ``run`` holds what must be the same to resume (configs and arguments). :meth:`save` writes
    ``state`` (weights, optimisers, data order, step, history ...) with every process's random
    state (the loop's torch.Generator and the global RNGs); :meth:`load` checks ``run`` and
    restores this process's random state. All processes call both; only the main one writes.
    """

    def __init__(self, directory: str | Path | None, loop: str, run: dict, accelerator=None):
        self.path = Path(directory) / f"{loop}.pt" if directory is not None else None
        self.run = {"format": CHECKPOINT_FORMAT, "loop": loop, **run}
        self.accelerator = accelerator

    def load(self, rng: torch.Generator) -> dict | None:
        """The saved state, or None when there is none; sets ``rng`` and the global RNGs as saved.

        Raises:
            ValueError: the file cannot be read, is not this loop's, or comes from another run (the
            message lists what differs).
        """
        if self.path is None or not self.path.is_file():
            return None
        state = load_checkpoint(self.path)  # weights_only=True: a pickled object is refused, no code runs
        if state.get("format") != CHECKPOINT_FORMAT or state.get("loop") != self.run["loop"]:
            raise ValueError(f"{self.path} is not a {self.run['loop']} checkpoint of this textimg version "
                             f"(format {state.get('format')!r}); delete it or use another checkpoint folder")
        diff = _differences({k: state.get(k) for k in self.run}, self.run)
        if diff:
            raise ValueError(f"cannot resume from {self.path}: this run differs in {diff}; resume with the same "
                             "settings, or start afresh in another checkpoint folder")
        rank, world = self._rank_world()
        if len(state["rng"]) != world:
            raise ValueError(f"{self.path} was written by {len(state['rng'])} process(es); resume it with as many, "
                             f"not {world}")
        rng.set_state(state["rng"][rank]["loop"])
        set_global_rng_state(state["rng"][rank]["global"])
        return state

    def save(self, state: dict, rng: torch.Generator) -> None:
        """Writes ``state`` and every process's random state atomically (the main process writes)."""
        if self.path is None:
            return
        rngs = [{"loop": rng.get_state(), "global": global_rng_state()}]
        if self._rank_world()[1] > 1:
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)  # one entry per process, in rank order
        if self.accelerator is None or self.accelerator.is_main_process:
            save_checkpoint({**self.run, **state, "rng": rngs}, self.path)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def _rank_world(self) -> tuple[int, int]:
        acc = self.accelerator
        return (acc.process_index, acc.num_processes) if acc is not None else (0, 1)


# -----------------------------------------------------------------------------------------------
# Facts: what a saved model records about how it was made


def describe_machine(device: str | torch.device | None = None) -> str:
    """E.g. "AMD EPYC 7B13, 2 cores" or "..., NVIDIA T4": the CPU model, its cores, and the GPU if used."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(torch.device(device))}"
    return text


def rounded(value, digits: int = 4):
    """Floats (also inside dicts and lists) rounded to ``digits`` significant digits, for JSON files."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def run_facts(device: str | torch.device | None = None, **facts) -> dict:
    """The facts a saved model records about the run that made it: ``facts`` (command, preset, steps,
    history, scores ...), rounded, plus what the code can tell: package and torch versions, the
    machine, torch threads and the date. The one place such facts are written."""
    from textimg import __version__

    return {**rounded(facts), "textimg": __version__, "torch": torch.__version__,
            "machine": describe_machine(device), "device": str(device or "cpu"), "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat()}
