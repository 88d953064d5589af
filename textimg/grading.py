"""The autograder: ``textimg grade SUBMISSION.ipynb|FOLDER ...``.

Each submission is untrusted code. It runs in the ``quick`` preset, in its own process tree, in a
scratch copy of the course (package, checkpoints, data card), with a wall-clock limit, a memory
limit and a file-size limit. Where the kernel allows unprivileged user namespaces (most Linux
machines, GitHub's runners), it also runs without network, in its own PID namespace (it cannot see
or signal the grader), with the course, the Python environment, $HOME and the other submissions'
folders mounted read-only. Elsewhere (``--isolation process``) the grader instead checks its own
files after each submission, restores any that changed and flags the student.

The submission's checks write one *response* per exercise (see :mod:`textimg.checks`); the grader
reads them back as plain data (``weights_only``) and scores them in its own process, with the
package's reference. Nothing the submission does can change the score functions, and a crash,
an endless loop or a huge output costs that submission the exercises it did not reach.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .classroom import notebook_name

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent  # the course: textimg/, checkpoints/, data/
MAX_RESPONSE_BYTES = 50 * 2**20
MAX_OUTPUT_BYTES = 20 * 2**20  # outputs kept per notebook (only for --keep): the rest is dropped
_score_lock = threading.Lock()


@dataclass
class Limits:
    timeout: float = 600.0  # seconds for the whole notebook
    cell_timeout: float = 300.0  # seconds per cell (a stuck cell is interrupted, the next ones run)
    memory_gb: float = 8.0  # address space of each process (RLIMIT_AS)
    file_mb: float = 256.0  # largest file the submission may write (RLIMIT_FSIZE)
    threads: int = 1  # torch threads


@dataclass
class Result:
    student: str
    notebook: str
    file: str
    status: str = "graded"  # graded | timed out | crashed | not a course notebook | unreadable
    seconds: float = 0.0
    points: dict = field(default_factory=dict)  # exercise id -> points earned
    messages: dict = field(default_factory=dict)  # exercise id -> the score's message
    flags: list = field(default_factory=list)  # e.g. "changed the grader's files (restored)"

    @property
    def total(self) -> int:
        return sum(self.points.values())


# ---- isolation ---------------------------------------------------------------------------------

def namespaces_available() -> bool:
    """Whether ``unshare`` can give an unprivileged process its own user, network, mount and PID namespaces."""
    if not (shutil.which("unshare") and shutil.which("ip") and sys.platform.startswith("linux")):
        return False
    try:
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork",
                                "true"], capture_output=True, timeout=20)
        return probe.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _read_only_paths(scratch_root: Path) -> list[Path]:
    paths = [ROOT, Path(sys.prefix), Path.home(), scratch_root]
    out: list[Path] = []
    for p in sorted({p.resolve() for p in paths if p.exists()}, key=lambda p: len(p.parts)):
        if not any(p == q or q in p.parents for q in out):  # a parent already covers it
            out.append(p)
    return out


def _namespace_wrapper(scratch: Path, scratch_root: Path) -> list[str]:
    """unshare + a shell prologue: loopback up (the kernel talks to its client over it), read-only
    binds, then the submission's own folder writable again."""
    script = ["ip link set lo up"]
    for p in _read_only_paths(scratch_root):
        script.append(f"mount --bind -o ro {shlex.quote(str(p))} {shlex.quote(str(p))}")
    s = shlex.quote(str(scratch))
    script += [f"mount --bind {s} {s}", f"mount -o remount,bind,rw {s}", 'exec "$@"']
    return ["unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--mount-proc",
            "sh", "-ec", "; ".join(script), "sh"]


def _limits(limits: Limits):
    def apply():
        gb = int(limits.memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (gb, gb))
        mb = int(limits.file_mb * 2**20)
        resource.setrlimit(resource.RLIMIT_FSIZE, (mb, mb))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with an error, not a kill
    return apply


def _snapshot(paths: list[Path]) -> dict[Path, bytes]:
    """The grader's own files, in memory (package and checkpoints: a few MB)."""
    files = {}
    for top in paths:
        for p in sorted(top.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                files[p] = p.read_bytes()
    return files


def _restore(snapshot: dict[Path, bytes], paths: list[Path]) -> list[str]:
    """Puts back every file that changed, disappeared or appeared; returns their names."""
    changed = []
    for p, data in snapshot.items():
        try:
            same = p.read_bytes() == data
        except OSError:
            same = False
        if not same:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            changed.append(str(p.relative_to(ROOT)))
    for top in paths:
        for p in top.rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts and p not in snapshot:
                p.unlink()
                changed.append(str(p.relative_to(ROOT)))
    return changed


def _kill_tree(proc: subprocess.Popen, token: str) -> None:
    """Kills the submission's process group, and any process that carries its token (a kernel that
    started its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            if token.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, PermissionError):
            continue


# ---- one submission ----------------------------------------------------------------------------

def _scratch_course(scratch: Path, submission: Path, name: str) -> Path:
    course = scratch / "course"
    shutil.copytree(PACKAGE, course / "textimg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "checkpoints", course / "checkpoints")
    (course / "data").mkdir(parents=True)
    for item in ("README.md", "samples"):
        src = ROOT / "data" / item
        if src.is_dir():
            shutil.copytree(src, course / "data" / item)
        elif src.is_file():
            shutil.copy2(src, course / "data" / item)
    shutil.copy2(ROOT / "pyproject.toml", course / "pyproject.toml")
    (course / "notebooks").mkdir()
    target = course / "notebooks" / f"{name}.ipynb"
    shutil.copy2(submission, target)
    return target


def grade_one(submission: Path, student: str, limits: Limits, isolation: str, scratch_root: Path,
              keep: Path | None = None) -> Result:
    """Runs one submission in its sandbox and scores its responses in this process."""
    import nbformat

    from . import checks

    result = Result(student, "", str(submission))
    try:
        nb = nbformat.read(submission, as_version=4)
    except Exception as err:  # not JSON, not a notebook, not readable
        result.status = f"unreadable ({type(err).__name__})"
        return result
    name = notebook_name(submission, nb)
    stems = {p.stem[:2]: p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    name = stems.get((name or "")[:2]) if name else None
    if not name or not checks.ids(name):
        result.status = "not a course notebook"
        return result
    result.notebook = name
    ids = checks.ids(name)
    result.points = {i: 0 for i in ids}

    scratch = Path(tempfile.mkdtemp(prefix="submission-", dir=scratch_root))
    token = uuid.uuid4().hex
    start = time.perf_counter()
    try:
        target = _scratch_course(scratch, submission, name)
        responses, home = scratch / "responses", scratch / "home"
        responses.mkdir()
        home.mkdir()
        env = {
            "PATH": os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin",
            "HOME": str(home), "PYTHONPATH": str(scratch / "course"), "TEXTIMG_PRESET": "quick",
            checks.GRADING_ENV: str(responses), "TEXTIMG_PLAIN_PROGRESS": "1", "MPLBACKEND": "agg",
            "OMP_NUM_THREADS": str(limits.threads), "MKL_NUM_THREADS": str(limits.threads),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TEXTIMG_GRADE_TOKEN": token,
            "JUPYTER_PLATFORM_DIRS": "1", "MPLCONFIGDIR": str(home / "mpl"), "LANG": "C.UTF-8",
        }
        if isolation == "process":
            env["TEXTIMG_NO_NETWORK"] = "1"
        command = [sys.executable, "-m", "textimg.grading", "--run", str(target), "--cell-timeout",
                   str(limits.cell_timeout)]
        if isolation == "namespace":
            command = _namespace_wrapper(scratch, scratch_root) + command
        snapshot_paths = [PACKAGE, ROOT / "checkpoints"]
        snapshot = _snapshot(snapshot_paths) if isolation == "process" else None
        with open(scratch / "run.log", "wb") as log:
            proc = subprocess.Popen(command, cwd=target.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_limits(limits))
            try:
                code = proc.wait(timeout=limits.timeout)
                if code != 0:
                    result.status = f"crashed (exit code {code})"
            except subprocess.TimeoutExpired:
                result.status = f"timed out after {limits.timeout:.0f} s"
            finally:
                _kill_tree(proc, token)
                proc.wait()
        if snapshot is not None:
            changed = _restore(snapshot, snapshot_paths)
            if changed:
                result.flags.append(f"changed the grader's files (restored): {', '.join(changed[:5])}")
        result.seconds = round(time.perf_counter() - start, 1)
        with _score_lock:
            for i in ids:
                result.points[i], result.messages[i] = _score(i, responses / f"{i}.pt")
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy2(scratch / "run.log", keep / f"{student}_{name}.log")
            if (target.parent / "executed.ipynb").is_file():
                shutil.copy2(target.parent / "executed.ipynb", keep / f"{student}_{name}.ipynb")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _score(exercise_id: str, path: Path) -> tuple[int, str]:
    from . import checks

    ex = checks.EXERCISES[exercise_id]
    if not path.is_file():
        return 0, "not reached: the notebook stopped before this check, or its check was not called"
    if path.stat().st_size > MAX_RESPONSE_BYTES:
        return 0, "the response file is too large"
    try:
        response = checks.read_response(path)
    except Exception as err:  # written by untrusted code: anything but plain data is refused
        return 0, f"the response could not be read safely ({type(err).__name__})"
    right, message = checks.score_response(ex, response)
    return (ex.points if right else 0), message


def run_submission(path: Path, cell_timeout: float) -> int:
    """Inside the sandbox: execute the notebook; every cell runs, errors or not."""
    import nbformat
    from nbclient import NotebookClient

    if os.environ.get("TEXTIMG_NO_NETWORK"):
        _block_network()
    class CappedClient(NotebookClient):
        """Keeps at most MAX_OUTPUT_BYTES of outputs: a flood of prints cannot fill the runner's memory."""
        left = MAX_OUTPUT_BYTES

        def output(self, outs, msg, display_id, cell_index):
            content = msg.get("content", {})
            size = len(str(content.get("text", ""))) + sum(len(str(v)) for v in content.get("data", {}).values())
            CappedClient.left -= size
            if CappedClient.left < 0:
                return None
            return super().output(outs, msg, display_id, cell_index)

    nb = nbformat.read(path, as_version=4)
    client = CappedClient(nb, timeout=int(cell_timeout), kernel_name="python3", allow_errors=True,
                          interrupt_on_timeout=True, resources={"metadata": {"path": str(path.parent)}})
    client.log.setLevel("CRITICAL")
    client.execute()
    try:
        nbformat.write(nb, path.parent / "executed.ipynb")
    except OSError:
        pass
    return 0


def _block_network() -> None:
    """--isolation process: the kernel inherits an environment in which sockets other than the
    loopback refuse to connect (a courtesy, not a wall: namespaces are the wall)."""
    site = Path(os.environ["PYTHONPATH"]) / "sitecustomize.py"
    site.write_text(
        "import socket\n_connect = socket.socket.connect\n"
        "def _local_only(self, address):\n"
        "    host = address[0] if isinstance(address, tuple) else address\n"
        "    if isinstance(host, str) and host not in ('127.0.0.1', 'localhost', '::1') and '/' not in host:\n"
        "        raise OSError('network access is disabled while grading')\n"
        "    return _connect(self, address)\n"
        "socket.socket.connect = _local_only\n", encoding="utf-8")


# ---- a class -----------------------------------------------------------------------------------

def collect(paths: list[Path]) -> list[tuple[str, Path]]:
    """(student, notebook) pairs: a file is its own student (its name); in a folder, each first-level
    subfolder is one student (GitHub Classroom's layout) and a notebook directly inside is one student."""
    found = []
    for p in paths:
        if p.is_file():
            found.append((p.stem, p))
        elif p.is_dir():
            for nb in sorted(p.rglob("*.ipynb")):
                if ".ipynb_checkpoints" in nb.parts:
                    continue
                rel = nb.relative_to(p)
                found.append((rel.parts[0] if len(rel.parts) > 1 else nb.stem, nb))
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return found


def grade(paths: list[Path], limits: Limits | None = None, isolation: str = "auto", jobs: int = 1,
          keep: Path | None = None, progress=print) -> list[Result]:
    """Grades every submission found in ``paths``; ``jobs`` submissions run at once."""

    limits = limits or Limits()
    if isolation == "auto":
        isolation = "namespace" if namespaces_available() else "process"
    if isolation == "process" and jobs > 1:
        jobs = 1  # the file check after each submission needs the submissions one at a time
    submissions = collect(paths)
    progress(f"textimg grade: {len(submissions)} submission(s), isolation: {isolation}, {jobs} at a time, "
             f"limits: {limits.timeout:.0f} s, {limits.memory_gb:g} GB, {limits.threads} thread(s) each")
    scratch_root = Path(tempfile.mkdtemp(prefix="textimg-grade-"))
    try:
        def one(item):
            student, path = item
            r = grade_one(path, student, limits, isolation, scratch_root, keep)
            progress(f"  {student}  {r.notebook or path.name}: {r.total}/{_max(r)}  {r.status}  {r.seconds:.0f} s"
                     + "".join(f"  [{f}]" for f in r.flags))
            return r
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(one, submissions))
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)


def _max(r: Result) -> int:
    from . import checks

    return sum(checks.EXERCISES[i].points for i in r.points)


def table(results: list[Result]) -> str:
    """One row per student: points per notebook and in all."""
    notebooks = sorted({r.notebook for r in results if r.notebook})
    by_student: dict[str, dict[str, Result]] = {}
    for r in results:
        by_student.setdefault(r.student, {})[r.notebook or r.file] = r
    width = max([len(s) for s in by_student] + [7])
    head = f"{'student'.ljust(width)}  " + "  ".join(n[:2].rjust(7) for n in notebooks) + "    total"
    lines = [head]
    for student, rs in sorted(by_student.items()):
        cells = []
        for n in notebooks:
            r = rs.get(n)
            cells.append("-".rjust(7) if r is None else f"{r.total}/{_max(r)}".rjust(7))
        total = sum(r.total for r in rs.values())
        maximum = sum(_max(r) for r in rs.values())
        notes = "; ".join(f"{r.notebook or Path(r.file).name}: {r.status}"
                          for r in rs.values() if r.status != "graded")
        lines.append(f"{student.ljust(width)}  " + "  ".join(cells) + f"  {total:>3}/{maximum:<3}" +
                     (f"  ({notes})" if notes else ""))
    return "\n".join(lines)


def write_reports(results: list[Result], csv_path: Path | None = None, json_path: Path | None = None) -> None:
    """CSV: one row per student, a column per exercise (for a gradebook); JSON: everything."""
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps([asdict(r) | {"total": r.total, "max": _max(r)} for r in results],
                                        indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if csv_path is not None:
        ids = sorted({i for r in results for i in r.points})
        rows: dict[str, dict] = {}
        for r in results:
            row = rows.setdefault(r.student, {"student": r.student})
            row.update(r.points)
            row["status"] = "; ".join(filter(None, [row.get("status", ""),
                                                    "" if r.status == "graded" else f"{r.notebook}: {r.status}"]))
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, ["student", *ids, "total", "status"])
            writer.writeheader()
            for student, row in sorted(rows.items()):
                row["total"] = sum(row.get(i, 0) for i in ids)
                writer.writerow({k: row.get(k, 0 if k in ids else "") for k in writer.fieldnames})


def passed(json_path: Path, exercise_id: str) -> bool:
    """From a grades JSON: did every submission earn all points of one exercise (GitHub Classroom's
    per-test exit code)?"""
    from . import checks

    results = json.loads(Path(json_path).read_text(encoding="utf-8"))
    scores = [r["points"][exercise_id] for r in results if exercise_id in r.get("points", {})]
    return bool(scores) and all(s == checks.EXERCISES[exercise_id].points for s in scores)


if __name__ == "__main__":  # the sandboxed half: python -m textimg.grading --run NOTEBOOK --cell-timeout S
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--cell-timeout", type=float, default=300.0)
    args = parser.parse_args()
    sys.exit(run_submission(args.run, args.cell_timeout))
