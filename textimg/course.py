"""Runs the course: executes every notebook in order, headless, in one preset.

    textimg-course                     # the preset from $TEXTIMG_PRESET, else gpu/cpu by hardware
    textimg-course --preset quick      # seconds per notebook
    textimg-course --only 00 01        # a subset, by number prefix
    textimg-course --inplace           # refresh the committed notebooks' outputs (maintainers)

Executed notebooks go to ``runs/<preset>/`` with every picture they drew saved as a PNG under
``runs/<preset>/figures/``; open them with ``jupyter lab runs/<preset>``. The committed notebooks
in ``notebooks/`` are left as they are unless ``--inplace`` is given.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
import time
from pathlib import Path

from . import REPO_URL
from .config import PRESETS, get_preset


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


def execute_notebook(path: Path, preset: str, timeout: int = 1800):
    """Executes one notebook top to bottom in a fresh kernel (cwd = its folder). Returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_before = dict(os.environ)
    os.environ["TEXTIMG_PRESET"] = preset
    os.environ["TEXTIMG_PLAIN_PROGRESS"] = "1"  # progress bars as text: a saved widget would stay frozen at 0 %
    # the kernel spec runs "python" from PATH: make sure it is this environment's
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    # figures must reach the notebook even if the caller's shell (or pytest) chose another backend
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
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
            cell.source = re.sub(r"REPO = \"[^\"]*\"", f'REPO = "{repo_url}"', cell.source)
        if nbformat.writes(nb) != before:
            nbformat.write(nb, path)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="textimg-course", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="sizes every notebook (default: $TEXTIMG_PRESET, else gpu if CUDA, else cpu)")
    parser.add_argument("--only", nargs="+", metavar="NN", help="run only these notebook numbers, e.g. 00 01")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<preset>)")
    parser.add_argument("--inplace", action="store_true", help="write outputs into notebooks/ itself")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--relink", action="store_true", help="only rewrite Colab badges to textimg.REPO_URL")
    args = parser.parse_args(argv)

    try:
        folder = find_notebooks_dir()
        if args.relink:
            changed = relink(folder)
            print(f"relinked {len(changed)} notebook(s) to {REPO_URL}")
            return 0
        preset = get_preset(args.preset)
        paths = course_notebooks(folder, args.only)
    except (FileNotFoundError, ValueError) as err:
        print(f"textimg-course: error: {err}", file=sys.stderr)
        return 2

    import nbformat

    out = folder if args.inplace else (args.out or folder.parent / "runs" / preset)
    out.mkdir(parents=True, exist_ok=True)
    print(f"running {len(paths)} notebook(s) in the '{preset}' preset -> {out}")
    total = time.perf_counter()
    for path in paths:
        start = time.perf_counter()
        print(f"  {path.name} ...", end="", flush=True)
        try:
            nb = execute_notebook(path, preset, timeout=args.timeout)
        except Exception as err:  # nbclient's CellExecutionError carries the cell and traceback
            print(" FAILED")
            print(f"textimg-course: {path.name} failed:\n{err}", file=sys.stderr)
            return 1
        nbformat.write(nb, out / path.name)
        n_fig = 0 if args.inplace else save_figures(nb, out / "figures", path.stem)
        print(f" {time.perf_counter() - start:.1f} s" + (f", {n_fig} figures" if n_fig else ""))
    print(f"done in {time.perf_counter() - total:.1f} s.")
    if not args.inplace:
        print(f"Open the executed notebooks with:  jupyter lab {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
