"""Runs the course: executes every notebook in order, headless, in one preset.

    textimg-course                     # the preset from $TEXTIMG_PRESET, else gpu/cpu by hardware
    textimg-course --preset quick      # seconds per notebook
    textimg-course --only 00 01        # a subset, by number prefix
    textimg-course --restart           # run every notebook again, not only those not yet done
    textimg-course --inplace           # refresh the committed notebooks' outputs (maintainers)

Executed notebooks go to ``runs/<preset>/`` with every picture they drew saved as a PNG under
``runs/<preset>/figures/``; open them with ``jupyter lab runs/<preset>``. The committed notebooks
in ``notebooks/`` are left as they are unless ``--inplace`` is given.

The run is made for a learner's laptop, which is rarely quiet: no cell has a time limit (unless
``--timeout`` sets one), torch gets only the cores that other programs leave free, a notebook that
fails is reported and the next one runs (each falls back to the committed checkpoints), and running
the command again resumes at the first notebook not yet done. ``RUN.json`` beside the executed
notebooks records the run: preset, date, machine, commit, and each notebook's status, time, commit and date
(a later ``--only`` run updates its own notebooks' entries and keeps the others').
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import REPO_URL
from .config import PRESETS, get_preset

RUN_RECORD = "RUN.json"


def find_notebooks_dir(start: Path | None = None) -> Path:
    """The repository's ``notebooks/`` folder: searched from ``start`` (default: cwd) upwards, then beside
    the package."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents, Path(__file__).resolve().parent.parent):
        if (folder / "notebooks").is_dir() and any((folder / "notebooks").glob("[0-9][0-9]_*.ipynb")):
            return folder / "notebooks"
    raise FileNotFoundError("no notebooks/ folder with NN_*.ipynb notebooks found here or above; "
                            "run this from a clone of the course repository")


def course_notebooks(folder: Path, only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in ``folder``, in course order, optionally only those whose number is in ``only``."""
    paths = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {o.zfill(2) for o in only}
        unknown = wanted - {p.name[:2] for p in paths}
        if unknown:
            raise ValueError(f"no notebook numbered {', '.join(sorted(unknown))} in {folder}")
        paths = [p for p in paths if p.name[:2] in wanted]
    return paths


def source_hash(path: Path) -> str:
    """SHA-256 of a notebook's code (not its text or outputs): whether what it computes changed since it ran."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    text = "\x00".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return hashlib.sha256(text.encode()).hexdigest()


def busy_cores(seconds: float = 0.5) -> float:
    """How many cores other programs keep busy now, from two readings of /proc/stat (0 where unreadable)."""
    def read():
        with open("/proc/stat", encoding="utf-8") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # all, idle + iowait
    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return 0.0
    busy = 1 - (idle1 - idle0) / max(total1 - total0, 1)
    return busy * (os.cpu_count() or 1)


def choose_threads(cores: int | None = None, busy: float | None = None) -> int:
    """Torch threads for the next notebook: the cores that other programs leave free, at least one.

    More OpenMP threads than free cores make each parallel region wait for its slowest thread, which
    the other programs keep descheduled: that, not the work, is what turns minutes into hours on a
    busy machine (BENCHMARKS.md measures it). Fewer threads slow down in proportion instead.
    """
    cores = cores or os.cpu_count() or 1
    busy = busy_cores() if busy is None else busy
    return max(1, min(cores, int(cores - busy + 0.5)))


def execute_notebook(path: Path, preset: str, timeout: int | None = None, threads: int | None = None,
                     on_cell_start=None, kernel_log: Path | None = None):
    """Executes one notebook top to bottom in a fresh kernel (cwd = its folder). Returns the executed notebook.

    ``timeout`` is seconds per cell (None: no limit); ``threads`` sets torch's thread count in the kernel
    (OMP_NUM_THREADS); ``on_cell_start(cell, cell_index)`` is called before each cell; the kernel
    process's own output (not the notebook's) goes to ``kernel_log``, so a kernel's teardown never
    prints on the learner's screen.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_before = dict(os.environ)
    os.environ["TEXTIMG_PRESET"] = preset
    os.environ["TEXTIMG_PLAIN_PROGRESS"] = "1"  # progress bars as text: a saved widget would stay frozen at 0 %
    if threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    # the kernel spec runs "python" from PATH: make sure it is this environment's
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    # figures must reach the notebook even if the caller's shell (or pytest) chose another backend
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    log = open(kernel_log, "w", encoding="utf-8") if kernel_log else subprocess.DEVNULL  # noqa: SIM115
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", on_cell_start=on_cell_start,
                                resources={"metadata": {"path": str(path.parent)}})
        client.log.setLevel("CRITICAL")  # nbclient's own teardown warnings; errors still raise
        client.execute(stdout=log, stderr=log)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
        if kernel_log:
            log.close()
    tidy_outputs(nb, path.resolve().parent.parent)
    return nb


def _tidy_text(text: str, prefix: str) -> str:
    lines = (line.rsplit("\r", 1)[-1] for line in text.split("\n"))  # a progress bar's last frame per line
    return "\n".join(lines).replace(prefix, "")


def tidy_outputs(nb, root: Path) -> None:
    """Makes an executed notebook fit to commit, in place: consecutive stream outputs are merged, a
    progress bar's overwritten frames are dropped (each line keeps its last state), saved widget state
    is dropped, and paths under ``root`` (the repository) are printed relative to it, never as the
    build machine's absolute paths."""
    prefix = str(root) + os.sep
    nb.metadata.pop("widgets", None)  # saved widget state: stale once the bars are plain text
    for cell in nb.cells:
        merged = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream" \
                    and merged[-1].get("name") == out.get("name"):
                merged[-1]["text"] += out["text"]
            else:
                merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream":
                out["text"] = _tidy_text(out["text"], prefix)
            elif "text/plain" in out.get("data", {}):
                out["data"]["text/plain"] = _tidy_text(out["data"]["text/plain"], prefix)
        if "outputs" in cell:
            cell["outputs"] = merged


def save_figures(nb, folder: Path, stem: str) -> int:
    """Writes every PNG a notebook displayed to ``folder/<stem>_cellNN_k.png``; returns how many."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for i, cell in enumerate(nb.cells):
        for k, out in enumerate(cell.get("outputs", [])):
            png = out.get("data", {}).get("image/png")
            if png:
                (folder / f"{stem}_cell{i:02d}_{k}.png").write_bytes(base64.b64decode(png))
                count += 1
    return count


REPO_LINE = re.compile(r"REPO = \"[^\"]*\"")


def relink(folder: Path, repo_url: str = REPO_URL) -> list[Path]:
    """Rewrites every notebook's Colab badge and Colab clone line (``REPO = "..."``) to ``repo_url``.

    The repository URL lives in one place, ``textimg.REPO_URL``; after a fork changes it, this
    brings the notebooks in line. Returns the notebooks that changed.
    """
    import nbformat

    slug = repo_url.rstrip("/").removeprefix("https://github.com/")
    changed = []
    for path in course_notebooks(folder):
        nb = nbformat.read(path, as_version=4)
        before = nbformat.writes(nb)
        for cell in nb.cells:
            cell.source = re.sub(r"colab\.research\.google\.com/github/[^/]+/[^/]+/blob/",
                                 f"colab.research.google.com/github/{slug}/blob/", cell.source)
            cell.source = REPO_LINE.sub(f'REPO = "{repo_url}"', cell.source)
        if nbformat.writes(nb) != before:
            nbformat.write(nb, path)
            changed.append(path)
    return changed


class Progress:
    """One line per notebook while it runs: its name, the section it is in, the time so far.

    On a terminal the line is rewritten in place every second; in a log (no terminal) a line is
    printed when a new section starts.
    """

    def __init__(self, name: str, threads: int, stream=None):
        self.name, self.threads = name, threads
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.section, self.start = "setup", time.perf_counter()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)

    def elapsed(self) -> str:
        seconds = int(time.perf_counter() - self.start)
        return f"{seconds // 60}:{seconds % 60:02d}"

    def line(self) -> str:
        return f"  {self.name}  {self.elapsed():>6}  {self.section[:60]}"

    def __enter__(self):
        if self.live:
            self._ticker.start()
        else:
            print(f"  {self.name}  started ({self.threads} torch thread{'s' * (self.threads != 1)})",
                  file=self.stream, flush=True)
        return self

    def _tick(self):
        while not self._stop.wait(1.0):
            print("\r" + self.line().ljust(80), end="", file=self.stream, flush=True)

    def cell_started(self, cell, cell_index):
        heading = re.match(r"#{1,2} (.+)", cell.source) if cell.cell_type == "markdown" else None
        if heading and heading.group(1) != self.section:
            self.section = heading.group(1).strip()
            if not self.live:
                print(self.line(), file=self.stream, flush=True)

    def __exit__(self, *exc):
        self._stop.set()
        if self.live:
            self._ticker.join()
            print("\r" + " " * 80 + "\r", end="", file=self.stream, flush=True)


def _git_commit(root: Path) -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "textimg"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def read_record(out: Path) -> dict:
    """The RUN.json in ``out``, or {} if there is none (or it cannot be read: the run starts afresh)."""
    from .utils import read_json

    try:
        return read_json(out / RUN_RECORD)
    except (OSError, ValueError):
        return {}


def new_record(preset: str, root: Path) -> dict:
    from .training import describe_machine

    return {"preset": preset, "date": time.strftime("%Y-%m-%d"), "machine": describe_machine(),
            "commit": _git_commit(root), "notebooks": {}}


def summary(rows: list[tuple[str, str, float | None]]) -> str:
    width = max(len(name) for name, _, _ in rows)
    lines = [f"  {'notebook'.ljust(width)}  status   time"]
    for name, status, seconds in rows:
        shown = "" if seconds is None else f"{seconds / 60:.1f} min" if seconds >= 100 else f"{seconds:.0f} s"
        lines.append(f"  {name.ljust(width)}  {status.ljust(7)}  {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="textimg-course", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="sizes every notebook (default: $TEXTIMG_PRESET, else gpu if CUDA, else cpu)")
    parser.add_argument("--only", nargs="+", metavar="NN", help="run only these notebook numbers, e.g. 00 01")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<preset>)")
    parser.add_argument("--inplace", action="store_true", help="write outputs into notebooks/ itself")
    parser.add_argument("--restart", action="store_true",
                        help="run every notebook again (default: resume at the first one not yet done)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds allowed per cell (default: no limit)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per notebook (default: the cores other programs leave free)")
    parser.add_argument("--relink", action="store_true", help="only rewrite Colab badges to textimg.REPO_URL")
    parser.add_argument("--student", type=Path, metavar="DIR",
                        help="only write the student notebooks (solutions removed, outputs cleared) into DIR")
    parser.add_argument("--solutions", type=Path, metavar="DIR",
                        help="only write the solution notebooks (solution markers removed) into DIR")
    parser.add_argument("--workflow", type=Path, metavar="FILE",
                        help="only write a GitHub Classroom workflow that grades the notebooks (docs/instructors.md)")
    args = parser.parse_args(argv)

    try:
        folder = find_notebooks_dir()
        if args.relink:
            changed = relink(folder)
            print(f"relinked {len(changed)} notebook(s) to {REPO_URL}")
            return 0
        if args.workflow:
            from .classroom import classroom_workflow

            args.workflow.parent.mkdir(parents=True, exist_ok=True)
            args.workflow.write_text(classroom_workflow(REPO_URL, notebooks=args.only), encoding="utf-8")
            which = "notebooks " + " ".join(args.only) if args.only else "every notebook"
            print(f"wrote {args.workflow}: grades {which}"
                  f" with the checks of {REPO_URL}")
            return 0
        if args.student or args.solutions:
            from .classroom import write_versions

            written = write_versions(course_notebooks(folder, args.only), args.student, args.solutions)
            for target in (args.student, args.solutions):
                if target is not None:
                    n = sum(p.parent == target for p in written)
                    print(f"wrote {n} {'student' if target == args.student else 'solution'} notebook(s) to {target}")
            return 0
        preset = get_preset(args.preset)
        paths = course_notebooks(folder, args.only)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
    except (FileNotFoundError, ValueError) as err:
        print(f"textimg-course: error: {err}", file=sys.stderr)
        return 2

    import nbformat

    from .utils import save_json

    out = folder if args.inplace else (args.out or folder.parent / "runs" / preset)
    out.mkdir(parents=True, exist_ok=True)
    record = read_record(out)
    if args.restart or record.get("preset") != preset:
        record = new_record(preset, folder.parent)

    def done(path: Path) -> bool:
        entry = record["notebooks"].get(path.stem, {})
        return (entry.get("status") == "ok" and entry.get("source") == source_hash(path)
                and (out / path.name).exists())

    todo = paths if args.only else [p for p in paths if not done(p)]
    print(f"textimg-course: {len(todo)} of {len(paths)} notebook(s) to run in the '{preset}' preset -> "
          f"{os.path.relpath(out)}" + ("" if len(todo) == len(paths) else
                                       " (the others are done; --restart runs them again)"))
    rows = [(p.name, "done", record["notebooks"][p.stem]["seconds"]) for p in paths if p not in todo]
    logs = (args.out or folder.parent / "runs" / preset) / "logs"  # kernel logs stay out of notebooks/
    try:
        for path in todo:
            threads = args.threads or choose_threads()
            start = time.perf_counter()
            with Progress(path.stem, threads) as progress:
                try:
                    logs.mkdir(parents=True, exist_ok=True)
                    nb = execute_notebook(path, preset, timeout=args.timeout, threads=threads,
                                          on_cell_start=progress.cell_started,
                                          kernel_log=logs / f"{path.stem}.kernel.log")
                    status, error = "ok", None
                except Exception as err:  # nbclient's CellExecutionError carries the cell and traceback
                    status, error = "failed", err
            seconds = time.perf_counter() - start
            if status == "ok":
                nbformat.write(nb, out / path.name)
                n_fig = 0 if args.inplace else save_figures(nb, out / "figures", path.stem)
                print(f"  {path.stem}  {status}  {seconds:.0f} s, {threads} torch thread"
                      f"{'s' * (threads != 1)}" + (f", {n_fig} figures" if n_fig else ""), flush=True)
            else:
                (logs / f"{path.stem}.error.txt").write_text(str(error), encoding="utf-8")
                last = str(error).strip().splitlines()[-1:] or [type(error).__name__]
                print(f"  {path.stem}  FAILED after {seconds:.0f} s in '{progress.section}': {last[0][:200]}\n"
                      f"    full error: {os.path.relpath(logs / (path.stem + '.error.txt'))}; "
                      "the next notebooks run on (they fall back to the committed checkpoints)", flush=True)
            record["notebooks"][path.stem] = {"status": status, "seconds": round(seconds, 1), "threads": threads,
                                              "source": source_hash(path), "commit": record["commit"],
                                              "date": record["date"]}  # --only runs: each its own
            on_disk = read_record(out)  # another runner (--only) may have recorded other notebooks meanwhile
            if on_disk.get("preset") == preset:
                for name, entry in on_disk["notebooks"].items():
                    if name not in {p.stem for p in todo}:
                        record["notebooks"].setdefault(name, entry)
            save_json(record, out / RUN_RECORD)  # atomic: an interrupted run leaves the last notebook's record
            rows.append((path.name, status, seconds))
    except KeyboardInterrupt:
        print("\ninterrupted: run the command again to resume at the first notebook not yet done")
        return 130
    rows.sort()
    print(summary(rows))
    failed = [name for name, status, _ in rows if status == "failed"]
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)}; fix and run again (only those re-run)")
    if not args.inplace:
        print(f"Open the executed notebooks with:  jupyter lab {os.path.relpath(out)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
