"""The classroom kit: student and solution versions from one source, and a grader that scores
submissions from outside their process and contains hostile ones."""

import hashlib
import json
import os
from pathlib import Path

import nbformat
import pytest

from textimg import checks, grading
from textimg.classroom import make_version, notebook_name, write_versions
from textimg.grading import Limits, grade

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NAMESPACES = grading.namespaces_available()


def _notebook(*sources: str, name: str = "00_introduction") -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["textimg"] = {"notebook": name, "version": "student"}
    return nb


# ---- student and solution versions -------------------------------------------------------------

def test_versions_remove_or_keep_the_marked_solutions():
    nb = _notebook('def f(x):\n    """doc"""\n    # BEGIN SOLUTION\n    y = x + 1\n    return y\n    # END SOLUTION\n'
                   "\n\nanswer = 42  # SOLUTION\nchecks.check_x(answer)")
    nb.cells.append(nbformat.v4.new_markdown_cell("Q?\n<!-- BEGIN SOLUTION -->Model answer.<!-- END SOLUTION -->"))
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="hi\n")]
    nb.cells[0].execution_count = 3
    student = make_version(nb, "00_introduction", student=True)
    assert student.cells[0].source == ('def f(x):\n    """doc"""\n    ...  # your code here\n\n\n'
                                       "answer = ...  # your answer\nchecks.check_x(answer)")
    assert student.cells[0].outputs == [] and student.cells[0].execution_count is None
    assert student.cells[1].source == "Q?\n"
    assert student.metadata["textimg"] == {"notebook": "00_introduction", "version": "student"}
    solution = make_version(nb, "00_introduction", student=False)
    assert "BEGIN" not in solution.cells[0].source and "y = x + 1" in solution.cells[0].source
    assert "answer = 42\n" in solution.cells[0].source and solution.cells[0].outputs  # the committed run's outputs
    assert solution.cells[1].source == "Q?\nModel answer."


@pytest.mark.parametrize("source, problem", [("# BEGIN SOLUTION\nx = 1", "without"),
                                             ("x = 1\n# END SOLUTION", "without"),
                                             ("print(1)  # SOLUTION", "only marks a line")])
def test_a_broken_marker_names_its_cell(source, problem):
    with pytest.raises(ValueError, match=f"01_x, cell 0: .*{problem}"):
        make_version(_notebook(source), "01_x", student=True)


def test_the_course_notebooks_make_student_versions_without_solutions(tmp_path):
    written = write_versions(NOTEBOOKS, tmp_path / "student", tmp_path / "solutions")
    assert len(written) == 2 * len(NOTEBOOKS)
    for path in NOTEBOOKS:
        student = nbformat.read(tmp_path / "student" / path.name, as_version=4)
        text = "\n".join(c.source for c in student.cells)
        assert "SOLUTION" not in text and all(not c.get("outputs") for c in student.cells)
        exercise_cells = [c for c in student.cells if c.cell_type == "code" and c.source.startswith("# Exercise ")]
        assert [c.source.split()[2] for c in exercise_cells] == checks.ids(path.stem), path.name
        for cell in exercise_cells:  # the header names the registered exercise and its points
            ex = checks.EXERCISES[cell.source.split()[2]]
            assert cell.source.splitlines()[0].startswith(f"# Exercise {ex.id} · {ex.points} point"), cell.source[:80]
        solution = nbformat.read(tmp_path / "solutions" / path.name, as_version=4)
        assert "SOLUTION" not in "\n".join(c.source for c in solution.cells)


def test_notebook_name_from_metadata_or_file_name():
    assert notebook_name(Path("whatever.ipynb"), _notebook("1", name="03_vqvae_refinement")) == "03_vqvae_refinement"
    assert notebook_name(Path("Copy of 01_text_encoding (2).ipynb"), nbformat.v4.new_notebook()) == "01"
    assert notebook_name(Path("homework.ipynb"), nbformat.v4.new_notebook()) is None


def test_course_student_command(tmp_path, capsys):
    from textimg.course import main

    assert main(["--student", str(tmp_path / "s"), "--only", "00"]) == 0
    assert "wrote 1 student notebook(s)" in capsys.readouterr().out
    assert (tmp_path / "s" / "00_introduction.ipynb").is_file()


# ---- the grader --------------------------------------------------------------------------------

GOOD = [
    "from textimg import checks\nfrom textimg.data import ATTRIBUTES",
    "checks.check_num_compositions(756)",
    "checks.check_caption_for('a big turquoise plus sign in the lower right')",
    "from textimg.data import ShapesDataset\nlabels = ShapesDataset(1000, split='train', seed=0).labels_tensor()\n"
    "checks.check_bottom_row_count(int(((labels[:, 2] == 1) & (labels[:, 3] >= 6)).sum()))",
    "def my_caption(labels):\n    w = {a: ATTRIBUTES[a][i] for a, i in labels.items()}\n"
    "    return f\"a {w['size']} {w['color']} {w['shape']} in the {w['position']}\"\n\n\n"
    "checks.check_caption_writer(my_caption)",
]


def _submit(folder: Path, student: str, cells: list[str]) -> None:
    (folder / student).mkdir(parents=True)
    nbformat.write(_notebook(*cells), folder / student / "00_introduction.ipynb")


def _tree_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for top in paths:
        for p in sorted(top.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(str(p).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.skipif(not NAMESPACES, reason="no unprivileged user namespaces here (process isolation: tested below)")
def test_the_grader_contains_hostile_submissions(tmp_path):
    subs = tmp_path / "subs"
    package = ROOT / "textimg"
    _submit(subs, "full", GOOD)
    _submit(subs, "one_wrong", [GOOD[0], "checks.check_num_compositions(864)", *GOOD[2:]])
    _submit(subs, "loop", [*GOOD[:2], "while True:\n    pass", *GOOD[2:]])
    _submit(subs, "stubborn_loop", [*GOOD[:2], "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                                    "while True:\n    pass", *GOOD[2:]])
    _submit(subs, "crash", [*GOOD[:3], "import os\nos._exit(3)", *GOOD[3:]])
    _submit(subs, "exit", [*GOOD[:2], "import sys\nsys.exit(1)", *GOOD[2:]])
    _submit(subs, "flood", [*GOOD[:2], "for _ in range(60):\n    print('x' * 2**20)", *GOOD[2:]])
    _submit(subs, "vandal", [
        GOOD[0],
        # rebinding the score in its own process changes what it sees, not what it gets
        "checks.EXERCISES['00.1'].score = lambda response: (True, 'free points')\nchecks.check_num_compositions(1)",
        # its own copy of the package is its to break; the grader's is out of reach
        f"import pathlib, textimg.exercises\npathlib.Path(textimg.exercises.__file__).write_text('')\n"
        f"try:\n    pathlib.Path({str(package / 'checks.py')!r}).write_text('')\n"
        "except OSError as err:\n    print(err)",
        "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3)",  # no network: an error, no more
        *GOOD[2:],
        f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)",  # the grader's pid: not in its PID space
    ])
    before = _tree_hash(package, ROOT / "checkpoints")
    results = grade([subs], Limits(timeout=75, cell_timeout=25, memory_gb=8), isolation="namespace", jobs=2)
    assert _tree_hash(package, ROOT / "checkpoints") == before
    got = {r.student: (r.total, r.status.split(" ")[0]) for r in results}
    assert got == {"full": (9, "graded"), "one_wrong": (7, "graded"), "loop": (9, "graded"),
                   "stubborn_loop": (2, "timed"), "crash": (4, "crashed"), "exit": (9, "graded"),
                   "flood": (9, "graded"), "vandal": (7, "graded")}, [(r.student, r.messages) for r in results]
    wrong = next(r for r in results if r.student == "one_wrong")
    assert wrong.points == {"00.1": 0, "00.2": 2, "00.3": 2, "00.4": 3}
    assert "not reached" in next(r for r in results if r.student == "stubborn_loop").messages["00.3"]


def test_process_isolation_restores_the_graders_files_and_flags_the_student(tmp_path):
    subs = tmp_path / "subs"
    target = ROOT / "textimg" / "checks.py"
    _submit(subs, "vandal", [*GOOD, f"import pathlib\np = pathlib.Path({str(target)!r})\np.write_text(p.read_text() + "
                                    "'\\nraise SystemExit\\n')\n(p.parent / 'planted.py').write_text('x = 1')"])
    _submit(subs, "zz_after", GOOD)  # graded after the vandal, with the grader's files as they were
    before = target.read_bytes()
    results = grade([subs], Limits(timeout=120, memory_gb=8), isolation="process")
    assert target.read_bytes() == before and not (target.parent / "planted.py").exists()
    vandal, after = results
    assert vandal.total == 9 and any("restored" in f and "checks.py" in f for f in vandal.flags), vandal.flags
    assert after.total == 9 and not after.flags


def test_reports_and_the_classroom_exit_code(tmp_path):
    results = [grading.Result("ann", "00_introduction", "a.ipynb", points={"00.1": 2, "00.2": 0}),
               grading.Result("ann", "01_text_encoding", "b.ipynb", points={"01.1": 3},
                              status="timed out after 600 s"),
               grading.Result("bob", "00_introduction", "c.ipynb", points={"00.1": 2, "00.2": 2})]
    grading.write_reports(results, tmp_path / "g.csv", tmp_path / "g.json")
    rows = (tmp_path / "g.csv").read_text().splitlines()
    assert rows[0] == "student,00.1,00.2,01.1,total,status"
    assert rows[1] == "ann,2,0,3,5,01_text_encoding: timed out after 600 s" and rows[2] == "bob,2,2,0,4,"
    table = grading.table(results)
    assert "ann" in table and "5/" in table and "timed out" in table
    data = json.loads((tmp_path / "g.json").read_text())
    assert data[0]["max"] == 4 and data[0]["total"] == 2
    assert grading.passed(tmp_path / "g.json", "00.1") and not grading.passed(tmp_path / "g.json", "00.2")


def test_not_a_notebook_and_an_unknown_notebook_score_zero_without_running(tmp_path):
    (tmp_path / "junk.ipynb").write_text("not json")
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "essay.ipynb")
    results = grade([tmp_path], isolation="process")
    assert sorted(r.status.split(" ")[0] for r in results) == ["not", "unreadable"]
    assert all(r.total == 0 for r in results)


def test_solution_notebooks_score_full_marks_and_student_notebooks_zero(tmp_path):
    """Each notebook in the quick preset, twice: its solution version (the committed notebook, markers
    removed) must earn every point and raise no error; its student version must earn none and not
    crash. This is also CI's run of the notebooks (it replaces nbval): the cells marked
    NBVAL_CHECK_OUTPUT must print what the committed run printed."""
    subs, keep = tmp_path / "subs", tmp_path / "keep"
    write_versions(NOTEBOOKS, subs / "student", subs / "solution")
    results = grade([subs], Limits(timeout=900, memory_gb=8), jobs=2, keep=keep)
    assert len(results) == 2 * len(NOTEBOOKS)
    for r in results:
        maximum = sum(checks.EXERCISES[i].points for i in r.points)
        assert r.status == "graded", (r.student, r.notebook, r.status)
        if r.student == "solution":
            assert r.total == maximum, (r.notebook, {i: m for i, m in r.messages.items() if r.points[i] == 0})
        else:
            assert r.total == 0, (r.notebook, r.points)
    for path in NOTEBOOKS:
        executed = nbformat.read(keep / f"solution_{path.stem}.ipynb", as_version=4)
        errors = [o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, (path.name, errors[0].get("ename"), errors[0].get("evalue"))
        committed = nbformat.read(path, as_version=4)
        for mine, theirs in zip(executed.cells, committed.cells):
            if mine.cell_type == "code" and "# NBVAL_CHECK_OUTPUT" in mine.source:
                text = lambda cell: "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")  # noqa: E731
                assert text(mine) == text(theirs), (path.name, mine.source[:60])


def test_the_guide_and_the_workflow_are_in_step_with_the_exercises():
    from textimg import REPO_URL
    from textimg.classroom import classroom_workflow, exercise_table

    assert exercise_table() in (ROOT / "docs" / "instructors.md").read_text(encoding="utf-8")
    committed = (ROOT / "docs" / "classroom" / "classroom.yml").read_text(encoding="utf-8")
    assert committed == classroom_workflow(REPO_URL), "run: textimg-course --workflow docs/classroom/classroom.yml"
    for i in checks.ids():
        assert f"--require {i}" in committed and f"max-score: {checks.EXERCISES[i].points}" in committed
    assert "pip install -q -e \".course[grade]\"" in committed


def test_grade_command_line_errors(tmp_path, capsys):
    from textimg.cli import main

    assert main(["grade"]) == 1
    assert "name at least one submitted notebook" in capsys.readouterr().err
    assert main(["grade", str(tmp_path / "missing.ipynb")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["grade", "--from-json", str(tmp_path / "g.json")]) == 1
    assert "--require" in capsys.readouterr().err
