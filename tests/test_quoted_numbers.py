"""Every number the docs quote about a committed model is checked against the record that code wrote.

A quoted number carries a marker naming its record and key, invisible when the Markdown is rendered:

    all four attributes in **93.3 %**<!--#pipeline:test.seen.all-->

``%`` after the number means the recorded fraction times 100; the recorded value is rounded to the
quoted number's decimals the way Python prints it, so a quote agrees with the printouts. A date or a
back-quoted word can be checked the same way
(``2026-11-30<!--#run:date-->``, ```cpu`<!--#run:preset-->``).
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORDS = {
    "pipeline": "checkpoints/pipeline/pipeline.json",
    "generator": "checkpoints/pipeline/generator/config.json",
    "pipeline-refiner": "checkpoints/pipeline/refiner/config.json",
    "refiner": "checkpoints/refiner/config.json",
    "judge": "checkpoints/judge/config.json",
    "run": "notebooks/RUN.json",  # textimg-course --inplace: the run whose outputs are committed
}
DOCS = ["README.md", "BENCHMARKS.md", "checkpoints/README.md", "docs/instructors.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))]
MARKER = re.compile(r"(?:`(?P<word>[\w.-]+)`|(?P<date>\d{4}-\d{2}-\d{2})|(?P<num>-?\d[\d,]*(?:\.\d+)?)(?P<pct>\s?%)?)"
                    r"(?:\*\*)?<!--#(?P<record>[\w/-]+):(?P<key>[^\s>]+?)-->")


def record_value(record: str, key: str, root: Path = ROOT):
    """The value at dotted ``key`` in ``record`` (a name from RECORDS, or ``bench/NAME`` for
    benchmarks/results/NAME.json); a ``/N`` suffix divides it by N (e.g. seconds/60 for minutes)."""
    key, _, divisor = key.partition("/")
    path = RECORDS.get(record) or (f"benchmarks/results/{record[6:]}.json" if record.startswith("bench/") else None)
    if path is None:
        raise KeyError(f"unknown record {record!r}")
    value = json.loads((root / path).read_text(encoding="utf-8"))
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value / float(divisor) if divisor else value


def doc_text(path: Path) -> str:
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return path.read_text(encoding="utf-8")


def mismatches(text: str, root: Path = ROOT) -> tuple[int, list[str]]:
    """(how many markers, a line for each quoted value that differs from its record)."""
    found, wrong = 0, []
    for m in MARKER.finditer(text):
        found += 1
        where = f"{m.group(0)!r}"
        try:
            value = record_value(m["record"], m["key"], root)
        except (KeyError, IndexError, ValueError, TypeError, OSError) as err:
            wrong.append(f"{where}: no such record value ({err})")
            continue
        if m["num"] is None:
            quoted = m["word"] or m["date"]
            if quoted != str(value):
                wrong.append(f"{where}: the record says {value!r}")
            continue
        quoted = m["num"].replace(",", "")
        decimals = len(quoted.partition(".")[2])
        # rounded as the code prints it (f"{0.9985:.1%}" is 99.8 %: the float is just below the half)
        expected = f"{float(value):.{decimals}%}"[:-1] if m["pct"] else f"{float(value):.{decimals}f}"
        if float(quoted) != float(expected):
            wrong.append(f"{where}: the record gives {expected}")
    return found, wrong


@pytest.mark.parametrize("doc", DOCS)
def test_quoted_numbers_match_their_records(doc):
    found, wrong = mismatches(doc_text(ROOT / doc))
    assert not wrong, f"{doc} quotes numbers its records do not hold:\n" + "\n".join(wrong)


def test_the_headline_numbers_are_checked():
    """The committed pipeline's scores and the notebooks' run are quoted with markers where a reader looks first."""
    readme = doc_text(ROOT / "README.md")
    for key in ["pipeline:test.seen.all", "pipeline:test.heldout.all", "run:preset", "run:date"]:
        assert f"<!--#{key}-->" in readme, key
    assert mismatches(doc_text(ROOT / "checkpoints/README.md"))[0] >= 20
    assert mismatches(doc_text(ROOT / "notebooks/05_pipeline.ipynb"))[0] >= 4


def test_a_number_changed_by_hand_is_caught():
    readme = doc_text(ROOT / "README.md")
    m = next(m for m in MARKER.finditer(readme) if m["num"])
    assert mismatches(m.group(0)) == (1, [])
    digit = m.start("num") - m.start()
    changed = m.group(0)[:digit] + str((int(m["num"][0]) + 1) % 10) + m.group(0)[digit + 1:]
    found, wrong = mismatches(changed)
    assert found == 1 and len(wrong) == 1 and "the record gives" in wrong[0]


def test_markers_read_percent_rounding_dates_and_words(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks/RUN.json").write_text(json.dumps(
        {"preset": "cpu", "date": "2026-11-30", "notebooks": {"a": {"seconds": 1686.0}}, "acc": [0.9335]}))
    ok = ("**93.3 %**<!--#run:acc.0--> 93%<!--#run:acc.0--> 0.933<!--#run:acc.0-->"
          " 28.1<!--#run:notebooks.a.seconds/60--> 1,686<!--#run:notebooks.a.seconds-->"
          " `cpu`<!--#run:preset--> 2026-11-30<!--#run:date-->")
    assert mismatches(ok, tmp_path) == (7, [])
    bad = ("93.4 %<!--#run:acc.0--> `gpu`<!--#run:preset--> 2026-12-01<!--#run:date--> 1<!--#run:nothing-->"
           " 1<!--#x:y-->")
    found, wrong = mismatches(bad, tmp_path)
    assert found == 5 and len(wrong) == 5
