"""The benchmark scripts still run (tiny settings): a figure in BENCHMARKS.md must stay reproducible."""

import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_ablate_gan_runs_every_variant(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import ablate_gan

    out = tmp_path / "ablation.json"
    results = ablate_gan.main(["--preset", "quick", "--steps", "2", "--num-train", "64", "--num-eval", "16",
                               "--json", str(out)])
    assert list(results["variants"]) == list(ablate_gan.VARIANTS)
    for row in results["variants"].values():
        assert 0 <= row["accuracy"]["all"] <= row["accuracy"]["shape"] <= 1
        assert row["diversity"] > 0 and row["ms_per_step"] > 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
