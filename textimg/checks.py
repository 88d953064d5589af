"""Self-checking exercises: each ``check_*`` tells the learner whether an answer is right, and the
grader (``textimg grade``) scores the same exercises from outside the learner's process.

An :class:`Exercise` has an id ("01.2"), points, two hints and two halves:

- ``respond(answer)`` runs in the learner's kernel: it calls the learner's function on fixed inputs
  (or takes the learner's value) and returns plain data, the *response*. While it runs, the
  package's own reference for that exercise is out of reach: calling it, by any name, raises.
- ``score(response) -> (right, message)`` computes the reference answer itself and compares. In a
  notebook it runs right after ``respond``, for feedback; under the grader, the response is also
  written to a file, and the grader scores it again in its own process, where the points count.

The exercises themselves are in :mod:`textimg.exercises`, one module per notebook;
``checks.check_masked_mean`` and the other ``check_*`` names are found there.
"""

from __future__ import annotations

import dis
import importlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

GRADING_ENV = "TEXTIMG_GRADING_DIR"  # set by the grader: responses are written there, one file per exercise
_STUB_MESSAGE = "textimg: the package's reference for the exercise being checked is out of reach"
_failures: dict[str, int] = {}  # failed attempts per exercise in this kernel: the hint ladder


@dataclass
class Exercise:
    """One graded exercise. ``kind``: "build" (write a piece of a network or its training),
    "function" (write a small function), "value" (an answer) or "predict" (predict, then run)."""

    id: str
    points: int
    title: str
    kind: str
    respond: Callable[[Any], Any]
    score: Callable[[Any], tuple[bool, str]] | None = None
    hints: tuple[str, str] = ("", "")
    reference: tuple[str, ...] = ()  # dotted names of the package's own answer, out of reach in respond

    @property
    def notebook(self) -> str:
        return self.id.split(".")[0]


EXERCISES: dict[str, Exercise] = {}


class Check:
    """What a notebook calls: ``check(answer) -> bool``. ``@check.scorer`` attaches the score half."""

    def __init__(self, exercise: Exercise):
        self.exercise = exercise
        self.__doc__ = exercise.respond.__doc__

    def scorer(self, fn: Callable[[Any], tuple[bool, str]]) -> Callable:
        self.exercise.score = fn
        return fn

    def __call__(self, answer) -> "Verdict":
        return Verdict(run(self.exercise, answer))

    def __repr__(self) -> str:
        e = self.exercise
        return f"<check {e.id} ({e.points} points): {e.title}>"


class Verdict:
    """A check's result: true or false like a bool, but a notebook cell ending in a check shows only
    the check's own line, not an extra ``True``."""

    def __init__(self, right: bool):
        self.right = bool(right)

    def __bool__(self) -> bool:
        return self.right

    def __eq__(self, other) -> bool:
        return self.right == bool(other)

    def __hash__(self) -> int:
        return hash(self.right)

    def __repr__(self) -> str:
        return repr(self.right)

    def _ipython_display_(self) -> None:  # IPython calls this instead of showing the repr
        pass


def exercise(id: str, points: int, title: str, kind: str, hints: tuple[str, str] = ("", ""),
             reference: tuple[str, ...] = ()) -> Callable[[Callable], Check]:
    """Registers ``respond`` as exercise ``id``; returns the :class:`Check` a notebook calls."""
    def register(respond: Callable) -> Check:
        if id in EXERCISES:
            raise ValueError(f"exercise {id} is defined twice")
        EXERCISES[id] = Exercise(id, points, title, kind, respond, hints=hints, reference=reference)
        return Check(EXERCISES[id])
    return register


# ---- one check, start to finish ----------------------------------------------------------------

def run(ex: Exercise, answer) -> bool:
    """respond (reference out of reach) -> record for the grader -> score -> one line of feedback."""
    if _unanswered(answer):
        response = {"__error__": "unanswered"}
    else:
        response = respond_safely(ex, answer)
    _record(ex.id, response)
    right, message = score_response(ex, response)
    _feedback(ex, right, message)
    return right


def respond_safely(ex: Exercise, answer) -> Any:
    """The learner's half: never raises; failures become {"__error__": ...} responses."""
    try:
        with out_of_reach(ex.reference) as intact:
            response = ex.respond(answer)
            if not intact():
                return {"__error__": "tampered"}
    except NotImplementedError as err:
        if str(err).startswith(_STUB_MESSAGE):
            return {"__error__": "delegated"}
        return {"__error__": f"your code raised NotImplementedError: {err}"[:400]}
    except Exception as err:  # the learner's code may fail in any way: say how
        return {"__error__": f"your code raised {type(err).__name__}: {err}"[:400]}
    try:
        return plain(response)
    except TypeError as err:
        return {"__error__": str(err)}


def score_response(ex: Exercise, response) -> tuple[bool, str]:
    """The judging half, safe on any response (also one read back from an untrusted file)."""
    if isinstance(response, dict) and "__error__" in response:
        error = str(response["__error__"])
        if error == "unanswered":
            return False, "No answer yet: replace the None (or the `...`) with your answer and run the cell again."
        if error == "delegated":
            names = ", ".join(ex.reference)
            return False, (f"your answer calls the package's own reference ({names}), directly or through another "
                           "function: write it yourself.")
        if error == "tampered":
            return False, "your answer changed the package's reference while it was checked."
        return False, error
    try:
        right, message = ex.score(response)
        return bool(right), str(message)
    except Exception as err:  # a response of an unexpected form
        return False, f"your answer has an unexpected form ({type(err).__name__}: {err})"[:400]


def _feedback(ex: Exercise, right: bool, message: str) -> None:
    head = f"{ex.id} {ex.title} ({ex.points if right else 0}/{ex.points} point{'s' * (ex.points != 1)})"
    if right:
        print(f"✅ {head}: {message}")
        return
    print(f"❌ {head}: Not yet. {message}")
    if message.startswith("No answer yet"):
        return
    _failures[ex.id] = _failures.get(ex.id, 0) + 1
    for level in range(min(_failures[ex.id], 2)):
        if ex.hints[level]:
            print(f"   Hint {level + 1}: {ex.hints[level]}")


def _record(exercise_id: str, response) -> None:
    """Under the grader: write the response where the grader reads it (the last attempt counts)."""
    folder = os.environ.get(GRADING_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(response, Path(folder) / f"{exercise_id}.pt")


def read_response(path: str | Path) -> Any:
    """A response written by :func:`_record`, read safely (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- helpers for exercises ---------------------------------------------------------------------

def plain(value) -> Any:
    """A response as plain data torch.save/load(weights_only) can carry: tensors (detached, on CPU),
    numbers, strings, None, and lists/tuples/dicts of them; sets become sorted lists."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if hasattr(value, "__array__") or hasattr(value, "item"):  # numpy arrays and scalars
        return torch.as_tensor(value).clone()
    raise TypeError(f"expected a tensor, a number, a string or a list of them, got {type(value).__name__}")


def call(fn: Callable, *args) -> Any:
    """Calls the learner's function; a None result says which part is missing."""
    out = fn(*args)
    if out is None:
        raise ValueError("your function returned None: write the missing part (did you forget `return`?)")
    return out


def tensor(value, shape: tuple | None = None, name: str = "your result") -> torch.Tensor:
    """A response as a float tensor of the expected shape, or a clear error."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} should be a tensor, got {type(value).__name__}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} should have shape {tuple(shape)}, got {tuple(value.shape)}")
    return value.float()


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> bool:
    """Same shape and values within ``atol`` (and a relative 1e-4)."""
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-4)


def number(value, name: str = "your answer") -> float:
    """A response that should be one number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} should be a number, got {type(value).__name__}")
    return float(value)


def scalar(value) -> torch.Tensor:
    """A loss response: a tensor holding one number."""
    t = tensor(value, name="your loss")
    if t.numel() != 1:
        raise ValueError(f"your loss should be one number (a scalar), got shape {tuple(t.shape)}")
    return t.reshape(())


def _unanswered(answer) -> bool:
    """True while the answer is still the placeholder None or ``...``, or a function whose body is
    only ``...`` or ``pass`` (a docstring allowed)."""
    if answer is None or answer is Ellipsis:
        return True
    if isinstance(answer, tuple) and answer:  # several parts: unanswered while every part is
        return all(_unanswered(part) for part in answer)
    code = getattr(answer, "__code__", None)
    if code is None:
        return False
    ops = [(i.opname, i.argval) for i in dis.get_instructions(code) if i.opname not in ("RESUME", "NOP", "CACHE")]
    return ops in ([("LOAD_CONST", None), ("RETURN_VALUE", None)], [("RETURN_CONST", None)])


# ---- the reference, out of reach ---------------------------------------------------------------

def _stub(*args, **kwargs):
    raise NotImplementedError("textimg: the package's reference for the exercise being checked is out of reach; "
                              "write your own")


def resolve(name: str) -> Callable:
    """The innermost function object behind a dotted name ("textimg.vqvae.VectorQuantizer.forward")."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        while hasattr(obj, "__wrapped__"):  # e.g. @torch.no_grad()
            obj = obj.__wrapped__
        if not hasattr(obj, "__code__"):
            raise TypeError(f"{name} is not a Python function")
        return obj
    raise ImportError(f"cannot import {name}")


@contextmanager
def out_of_reach(names: tuple[str, ...]):
    """Inside, every function named in ``names`` raises when called. A Python function's code object
    is swapped, so every name the caller holds it by is caught; a built-in (e.g. a torch function)
    is replaced on its module, which catches ``module.function`` calls. Yields ``intact()``: False
    if a swap was undone meanwhile."""
    swapped, replaced = [], []
    try:
        for name in names:
            try:
                fn = resolve(name)
            except TypeError:  # not a Python function
                owner, attr = name.rsplit(".", 1)
                owner = importlib.import_module(owner)
                replaced.append((owner, attr, getattr(owner, attr)))
                setattr(owner, attr, _stub)
                continue
            stub = _stub.__code__.replace(co_name=fn.__code__.co_name, co_qualname=fn.__code__.co_qualname)
            swapped.append((fn, fn.__code__, stub))
            fn.__code__ = stub
        yield lambda: (all(fn.__code__ is stub for fn, _, stub in swapped)
                       and all(getattr(owner, attr) is _stub for owner, attr, _ in replaced))
    finally:
        for fn, code, _ in reversed(swapped):
            fn.__code__ = code
        for owner, attr, original in reversed(replaced):
            setattr(owner, attr, original)


# ---- in notebooks ------------------------------------------------------------------------------

def compare(name: str, mine: torch.Tensor, reference: torch.Tensor, atol: float = 1e-5) -> bool:
    """Compares a result a notebook derived by hand with the package's (micrograd's ``cmp``)."""
    mine, reference = torch.as_tensor(mine).detach().cpu(), torch.as_tensor(reference).detach().cpu()
    if mine.shape != reference.shape:
        print(f"❌ {name}: shapes differ, {tuple(mine.shape)} vs {tuple(reference.shape)}.")
        return False
    diff = (mine.float() - reference.float()).abs().max().item() if mine.numel() else 0.0
    print(f"✅ {name}: matches the package (max difference {diff:.1e})." if diff <= atol
          else f"❌ {name}: differs from the package by up to {diff:.1e}.")
    return diff <= atol


def use(right: bool, mine: Callable, ours: Callable, what: str) -> Callable:
    """After a build-it exercise: the learner's function if it passed, else the package's, saying which."""
    print(f"→ The cells below use your {what}." if right else
          f"→ The cells below use the package's {what} until yours passes (then run this cell again).")
    return mine if right else ours


def ids(notebook: str | None = None) -> list[str]:
    """Exercise ids, in course order, optionally of one notebook ("01" or "01_text_encoding")."""
    import textimg.exercises  # noqa: F401  (registers them)

    prefix = None if notebook is None else notebook[:2]
    return sorted(i for i in EXERCISES if prefix is None or i.startswith(prefix + "."))


def __getattr__(name: str):  # checks.check_masked_mean and friends live in textimg.exercises
    if name.startswith("check_"):
        from . import exercises

        return getattr(exercises, name)
    raise AttributeError(f"module 'textimg.checks' has no attribute {name!r}")


__all__ = ["Exercise", "EXERCISES", "compare", "use", "ids", "out_of_reach", "read_response"]
