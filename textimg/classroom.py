"""Student and solution notebooks from the one source: the committed notebooks.

Solutions in the committed notebooks are marked the way otter-grader and nbgrader mark them:

- a region of a code cell between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` lines;
- one line ``name = value  # SOLUTION``, an answer given by value;
- in markdown, a region between ``<!-- BEGIN SOLUTION -->`` and ``<!-- END SOLUTION -->``.

The student version replaces each code region by ``...  # your code here`` (at the region's
indentation), each answer line by ``name = ...  # your answer``, drops markdown regions, and clears
every output; checks and hints stay. The solution version only drops the marker lines and keeps the
outputs of the committed run. Both carry ``metadata.textimg`` naming the notebook, so the grader
knows which exercises a renamed file ("Copy of 01_text_encoding.ipynb") holds.
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import nbformat

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
MD_BEGIN, MD_END = "<!-- BEGIN SOLUTION -->", "<!-- END SOLUTION -->"
_ANSWER = re.compile(r"^(?P<lhs>\s*[\w\[\]\"'., ]+?\s*=\s*)(?P<rhs>.+?)\s*# SOLUTION\s*$")


def _strip_code(source: str, student: bool, where: str) -> str:
    out, region = [], None
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN:
            if region is not None:
                raise ValueError(f"{where}: '{BEGIN}' inside another solution region")
            region = line[: len(line) - len(line.lstrip())]  # its indentation
            if student:
                out.append(f"{region}...  # your code here")
            continue
        if stripped == END:
            if region is None:
                raise ValueError(f"{where}: '{END}' without '{BEGIN}'")
            region = None
            continue
        if region is not None and student:
            continue
        match = _ANSWER.match(line)
        if match:
            line = f"{match['lhs']}...  # your answer" if student else f"{match['lhs']}{match['rhs']}"
        elif line.rstrip().endswith("# SOLUTION"):
            raise ValueError(f"{where}: '# SOLUTION' only marks a line 'name = value  # SOLUTION': {line.strip()!r}")
        out.append(line)
    if region is not None:
        raise ValueError(f"{where}: '{BEGIN}' without '{END}'")
    return "\n".join(out)


def _strip_markdown(source: str, student: bool, where: str) -> str:
    pattern = re.compile(re.escape(MD_BEGIN) + r"(.*?)" + re.escape(MD_END), re.S)
    if source.count(MD_BEGIN) != source.count(MD_END):
        raise ValueError(f"{where}: unbalanced '{MD_BEGIN}' / '{MD_END}'")
    return pattern.sub("" if student else r"\1", source)


def _compiles(source: str) -> bool:
    lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]  # IPython magics
    try:
        ast.parse("\n".join(lines))
        return True
    except SyntaxError:
        return False


def make_version(nb: nbformat.NotebookNode, name: str, student: bool) -> nbformat.NotebookNode:
    """The student (``student=True``) or solution version of notebook ``nb`` (named ``name``, e.g.
    "01_text_encoding"); raises ValueError on a broken marker, naming the cell."""
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb.cells):
        where = f"{name}, cell {i}"
        if cell.cell_type == "code":
            cell.source = _strip_code(cell.source, student, where)
            if student:
                if not _compiles(cell.source):
                    raise ValueError(f"{where}: the student version does not compile")
                cell.outputs, cell.execution_count = [], None
        elif cell.cell_type == "markdown":
            cell.source = _strip_markdown(cell.source, student, where)
    nb.metadata["textimg"] = {"notebook": name, "version": "student" if student else "solution"}
    return nb


def write_versions(notebooks: list[Path], student_dir: Path | None = None,
                   solution_dir: Path | None = None) -> list[Path]:
    """Writes the student and/or solution version of each notebook; returns the paths written."""
    written = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        for folder, student in ((student_dir, True), (solution_dir, False)):
            if folder is None:
                continue
            folder.mkdir(parents=True, exist_ok=True)
            nbformat.write(make_version(nb, path.stem, student), folder / path.name)
            written.append(folder / path.name)
    return written


def notebook_name(path: Path, nb: nbformat.NotebookNode | None = None) -> str | None:
    """Which course notebook a file is: from ``metadata.textimg`` if present, else from an ``NN_`` in its
    name ("Copy of 01_text_encoding (2).ipynb" is "01"); None if neither says."""
    meta = (nb or {}).get("metadata", {}).get("textimg", {}) if nb is not None else {}
    if isinstance(meta, dict) and isinstance(meta.get("notebook"), str) and re.match(r"\d\d_", meta["notebook"]):
        return meta["notebook"]
    match = re.search(r"(?<!\d)(\d\d)_[A-Za-z]", path.name)
    return match.group(0)[:2] if match else None


def classroom_workflow(repo_url: str, ref: str = "main", notebooks: list[str] | None = None) -> str:
    """A GitHub Classroom workflow (``.github/workflows/classroom.yml`` in the assignment's template
    repository): installs the course from the instructor's repository at ``ref`` (never from the
    student's copy, whose package a student could edit), grades the student's ``notebooks/`` once,
    then turns each exercise into one Classroom test worth its points."""
    from .checks import EXERCISES, ids

    chosen = [i for i in ids() if notebooks is None or i[:2] in {n[:2] for n in notebooks}]
    owner_repo = repo_url.rstrip("/").removeprefix("https://github.com/")
    steps = []
    for i in chosen:
        ex = EXERCISES[i]
        steps.append(f"""      - name: "{i} {ex.title}"
        id: ex-{i.replace('.', '-')}
        uses: classroom-resources/autograding-command-grader@v1
        with:
          test-name: "{i} {ex.title}"
          command: textimg grade --from-json grades.json --require {i}
          timeout: 1
          max-score: {ex.points}""")
    runners = ",".join(f"ex-{i.replace('.', '-')}" for i in chosen)
    keys = [i.replace(".", "-") for i in chosen]
    env = "\n".join(f"          EX-{k}_RESULTS: \"${{{{steps.ex-{k}.outputs.result}}}}\"" for k in keys)
    return f"""# GitHub Classroom autograding for the textimg course (written by `textimg-course --workflow`).
# Put it in the assignment's template repository as .github/workflows/classroom.yml.
name: Autograding
on: [push, workflow_dispatch, repository_dispatch]
permissions:
  checks: write
  actions: read
  contents: read
jobs:
  grade:
    runs-on: ubuntu-latest
    timeout-minutes: 45
    if: github.actor != 'github-classroom[bot]'
    steps:
      - uses: actions/checkout@v4  # the student's repository: only its notebooks/ are read
      - uses: actions/checkout@v4  # the course, from the instructor's repository: the grader and its checks
        with:
          repository: {owner_repo}
          ref: {ref}
          path: .course
      - uses: actions/setup-python@v5
        with:
          python-version: "3.11"
      - name: Install the course (CPU-only torch)
        run: |
          pip install -q torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu
          pip install -q -e ".course[grade]"
      - name: Run and score the notebooks (quick preset, sandboxed)
        run: textimg grade notebooks --jobs 2 --json grades.json --csv grades.csv
{chr(10).join(steps)}
      - name: Report
        uses: classroom-resources/autograding-grading-reporter@v1
        env:
{env}
        with:
          runners: {runners}
"""


KINDS = {"build": "build it", "function": "write a function", "value": "answer", "predict": "predict, then run"}


def exercise_table() -> str:
    """The graded exercises as a markdown table (docs/instructors.md holds this table; a test keeps it in step)."""
    from .checks import EXERCISES, ids

    rows = ["| id | points | kind | exercise |", "|---|---|---|---|"]
    for i in ids():
        ex = EXERCISES[i]
        rows.append(f"| {i} | {ex.points} | {KINDS[ex.kind]} | {ex.title} |")
    return "\n".join(rows)
