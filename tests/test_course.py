"""The course runner (textimg-course) and the notebooks' shared conventions."""

import json
import os
import re
from pathlib import Path

import nbformat
import pytest

import textimg
from textimg.course import course_notebooks, find_notebooks_dir, main, relink, save_figures

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _tiny_notebook(path: Path, source: str = "print('hi')", markdown: str = "# T") -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(markdown), nbformat.v4.new_code_cell(source)]
    nbformat.write(nb, path)


def test_notebooks_are_found_in_course_order(tmp_path):
    for name in ["01_b.ipynb", "00_a.ipynb", "scratch.ipynb"]:
        _tiny_notebook(tmp_path / name)
    assert [p.name for p in course_notebooks(tmp_path)] == ["00_a.ipynb", "01_b.ipynb"]
    assert [p.name for p in course_notebooks(tmp_path, ["1"])] == ["01_b.ipynb"]
    with pytest.raises(ValueError, match="no notebook numbered 07"):
        course_notebooks(tmp_path, ["07"])


def test_find_notebooks_dir_from_a_subfolder():
    assert find_notebooks_dir(ROOT / "tests") == ROOT / "notebooks"


def test_bad_arguments_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "turbo"])
    assert exc.value.code == 2
    assert "invalid choice: 'turbo'" in capsys.readouterr().err
    assert main(["--only", "99"]) == 2
    assert "no notebook numbered 99" in capsys.readouterr().err


def test_runner_executes_a_notebook_and_saves_its_figures(tmp_path, monkeypatch):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    code = ("import os, matplotlib.pyplot as plt\n"
            "plt.plot([1, 2]); plt.show()\n"
            "print(os.environ['TEXTIMG_PRESET'])")
    _tiny_notebook(folder / "00_demo.ipynb", code)
    monkeypatch.chdir(tmp_path)
    assert main(["--preset", "quick", "--out", str(tmp_path / "out")]) == 0
    nb = nbformat.read(tmp_path / "out" / "00_demo.ipynb", as_version=4)
    texts = [o.get("text", "") for o in nb.cells[1].outputs]
    assert "quick\n" in texts
    assert len(list((tmp_path / "out" / "figures").glob("00_demo_cell01_*.png"))) == 1
    assert save_figures(nb, tmp_path / "again", "x") == 1


def test_a_failed_notebook_is_reported_and_the_run_goes_on_then_resumes(tmp_path, monkeypatch, capsys):
    """Go on after a failure, summary table, RUN.json; running again re-runs only what is not done."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _tiny_notebook(folder / "00_first.ipynb", "print('first')")
    _tiny_notebook(folder / "01_broken.ipynb", "1 / 0", markdown="## 3. Dividing")
    _tiny_notebook(folder / "02_last.ipynb", "print('last')")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["--preset", "quick", "--out", str(out), "--threads", "1"]) == 1
    printed = capsys.readouterr().out
    assert "01_broken  FAILED" in printed and "in '3. Dividing'" in printed and "ZeroDivisionError" in printed
    assert "Traceback" not in printed  # the full error goes to a file, not the screen
    assert "ZeroDivisionError" in (out / "logs" / "01_broken.error.txt").read_text()
    assert (out / "02_last.ipynb").exists() and not (out / "01_broken.ipynb").exists()
    table = printed[printed.index("notebook "):]
    assert re.search(r"00_first\.ipynb\s+ok", table) and re.search(r"01_broken\.ipynb\s+failed", table)
    record = json.loads((out / "RUN.json").read_text())
    assert record["preset"] == "quick" and {k: v["status"] for k, v in record["notebooks"].items()} == \
        {"00_first": "ok", "01_broken": "failed", "02_last": "ok"}
    assert record["notebooks"]["00_first"]["threads"] == 1
    assert all(v["commit"] == record["commit"] and v["date"] == record["date"] for v in record["notebooks"].values())

    # the learner fixes the notebook and runs the command again: only it runs
    _tiny_notebook(folder / "01_broken.ipynb", "print('fixed')", markdown="## 3. Dividing")
    assert main(["--preset", "quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 of 3 notebook(s) to run" in printed and "01_broken  ok" in printed
    assert re.search(r"00_first\.ipynb\s+done", printed)
    # a text-only edit is not a reason to run again; --restart runs everything
    _tiny_notebook(folder / "02_last.ipynb", "print('last')", markdown="# Reworded")
    assert main(["--preset", "quick", "--out", str(out)]) == 0
    assert "0 of 3 notebook(s) to run" in capsys.readouterr().out
    assert main(["--preset", "quick", "--out", str(out), "--restart"]) == 0
    assert "3 of 3 notebook(s) to run" in capsys.readouterr().out


def test_threads_are_the_cores_other_programs_leave_free():
    from textimg.course import busy_cores, choose_threads

    assert choose_threads(cores=2, busy=0.1) == 2
    assert choose_threads(cores=2, busy=1.0) == 1  # one other program: one thread (BENCHMARKS.md)
    assert choose_threads(cores=2, busy=2.0) == 1  # never zero
    assert choose_threads(cores=16, busy=3.4) == 13
    assert 0.0 <= busy_cores(0.05) <= (os.cpu_count() or 1) + 0.01


def test_no_cell_time_limit_unless_asked(monkeypatch, tmp_path):
    import textimg.course as course

    seen = {}
    monkeypatch.setattr(course, "execute_notebook", lambda path, preset, **kw: seen.update(kw) or 1 / 0)
    course.main(["--preset", "quick", "--only", "00", "--out", str(tmp_path), "--threads", "1"])
    assert seen["timeout"] is None
    course.main(["--preset", "quick", "--only", "00", "--out", str(tmp_path), "--timeout", "60"])
    assert seen["timeout"] == 60


def test_relink_rewrites_badges_and_install_lines(tmp_path):
    badge = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/old/fork/blob/main/notebooks/00_a.ipynb)"
    _tiny_notebook(tmp_path / "00_a.ipynb", 'REPO = "https://github.com/old/fork"', badge)
    assert relink(tmp_path, "https://github.com/me/textimg") == [tmp_path / "00_a.ipynb"]
    text = (tmp_path / "00_a.ipynb").read_text()
    assert "github/me/textimg/blob/main/notebooks/00_a.ipynb" in text
    assert 'REPO = \\"https://github.com/me/textimg\\"' in text and "old/fork" not in text
    assert relink(tmp_path, "https://github.com/me/textimg") == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_follow_the_conventions(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    head = "".join(cells[0]["source"])
    slug = textimg.REPO_URL.removeprefix("https://github.com/")
    assert f"colab.research.google.com/github/{slug}/blob/main/notebooks/{path.name}" in head, \
        "the Colab badge must point at textimg.REPO_URL (run textimg-course --relink)"
    assert re.search(r"quick.*cpu.*gpu", head, re.S), "the header states the time per preset"
    setup = "".join(cells[1]["source"])
    assert "google.colab" in setup and f'REPO = "{textimg.REPO_URL}"' in setup
    installs = re.findall(r"pip\", \"install[^\n]*", setup)
    assert installs and not any("torch" in line.replace("textimg", "") for line in installs), \
        "the Colab install line must never reinstall torch"
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell is tagged 'parameters'"
    code = [c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert all(c.get("execution_count") for c in code), "committed with the outputs of a real run"
    counts = [c["execution_count"] for c in code]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), "one top-to-bottom run"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"
              and "raises-exception" not in c.get("metadata", {}).get("tags", [])]
    assert not errors
    text = "".join("".join(c["source"]) for c in cells)
    assert "textimg.checks" in text or "from textimg import checks" in text, "exercises check themselves"
    assert path.stat().st_size < 3 * 1024 * 1024


def test_tidy_outputs_keeps_the_last_progress_frame_and_drops_absolute_paths(tmp_path):
    import nbformat

    from textimg.course import tidy_outputs

    root = tmp_path / "repo"
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="GAN:   0%|  | 0/8\r"),
                    nbformat.v4.new_output("stream", name="stderr", text="GAN: 100%|##| 8/8\n"),
                    nbformat.v4.new_output("stream", name="stdout", text=f"saved to {root}/runs/models/x\n"),
                    nbformat.v4.new_output("execute_result", data={"text/plain": f"PosixPath('{root}/a')"},
                                           execution_count=1)]
    nb.cells.append(cell)
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    tidy_outputs(nb, root)
    assert "widgets" not in nb.metadata
    texts = [o.get("text") or o["data"]["text/plain"] for o in cell.outputs]
    assert texts == ["GAN: 100%|##| 8/8\n", "saved to runs/models/x\n", "PosixPath('a')"]
