"""What grading costs: each notebook's solution and student version through ``textimg grade``.

    python benchmarks/bench_grading.py [--jobs 1] [--json benchmarks/results/grading.json]

Writes the student and solution versions of every course notebook, grades them as a class of two
("solution" and "student") in the quick preset, and records per notebook the seconds each took in
its sandbox (kernel start, the whole notebook, the scoring) and the points earned, with the
machine, the isolation used and the torch threads per submission.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import tempfile
from pathlib import Path

from textimg.checks import EXERCISES
from textimg.classroom import write_versions
from textimg.course import course_notebooks
from textimg.grading import Limits, grade, namespaces_available
from textimg.training import describe_machine
from textimg.utils import save_json

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="submissions at once (threads: cores // jobs)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "grading.json")
    args = parser.parse_args()

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with tempfile.TemporaryDirectory() as tmp:
        subs = Path(tmp) / "subs"
        write_versions(course_notebooks(ROOT / "notebooks"), subs / "student", subs / "solution")
        results = grade([subs], Limits(threads=threads), jobs=args.jobs)
    notebooks: dict[str, dict] = {}
    for r in results:
        entry = notebooks.setdefault(r.notebook, {"max_points": sum(EXERCISES[i].points for i in r.points)})
        entry[r.student] = {"seconds": r.seconds, "points": r.total, "status": r.status}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    record = {
        "date": datetime.date.today().isoformat(), "machine": describe_machine(), "commit": commit.stdout.strip(),
        "jobs": args.jobs, "threads_per_submission": threads,
        "isolation": "namespace" if namespaces_available() else "process",
        "notebooks": dict(sorted(notebooks.items())),
        "total_seconds": {kind: round(sum(n[kind]["seconds"] for n in notebooks.values()), 1)
                          for kind in ("solution", "student")},
    }
    save_json(record, args.json)
    for name, n in record["notebooks"].items():
        sol = n["solution"]
        print(f"{name:26s} solution {sol['points']:>2}/{n['max_points']:<2} {sol['seconds']:>6.1f} s"
              f"   student {n['student']['points']:>2} {n['student']['seconds']:>6.1f} s")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
