"""Rewrite every quoted number in front of a record marker from its record, keeping its decimals.

    python benchmarks/refresh_quoted.py README.md BENCHMARKS.md docs/instructors.md notebooks/0*.ipynb

Run it after a benchmark or a notebook run rewrote a record; ``tests/test_quoted_numbers.py`` then
checks the result. Words and dates are rewritten too. Only the quoted value changes: a sentence
that says what the number means is still yours to re-read.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_quoted_numbers import MARKER, record_value  # noqa: E402  (one marker syntax, one reader)


def quoted(m, value) -> str:
    """The text that replaces match ``m``'s value, formatted like the quote it replaces."""
    if m["word"] is not None:
        return f"`{value}`"
    if m["date"] is not None:
        return str(value)
    decimals = len(m["num"].replace(",", "").partition(".")[2])
    text = f"{float(value):.{decimals}%}"[:-1] if m["pct"] else f"{float(value):.{decimals}f}"
    if "," in m["num"]:
        whole, dot, frac = text.partition(".")
        text = f"{int(whole):,}" + dot + frac
    return text


def refresh(text: str) -> tuple[str, int]:
    out, last, changed = [], 0, 0
    for m in MARKER.finditer(text):
        group = "word" if m["word"] is not None else "date" if m["date"] is not None else "num"
        start, end = m.span(group)
        if group == "word":
            start, end = start - 1, end + 1  # the back-quotes
        new = quoted(m, record_value(m["record"], m["key"]))
        changed += new != text[start:end]
        out += [text[last:start], new]
        last = end
    return "".join(out) + text[last:], changed


def main(paths):
    for name in paths:
        path = Path(name)
        if path.suffix == ".ipynb":
            nb = json.loads(path.read_text(encoding="utf-8"))
            total = 0
            for cell in nb["cells"]:
                if cell["cell_type"] == "markdown":
                    text, n = refresh("".join(cell["source"]))
                    if n:
                        cell["source"] = text.splitlines(keepends=True)
                        total += n
            if total:
                path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            text, total = refresh(path.read_text(encoding="utf-8"))
            if total:
                path.write_text(text, encoding="utf-8")
        print(f"{name}: {total} quoted value(s) changed")


if __name__ == "__main__":
    main(sys.argv[1:])
