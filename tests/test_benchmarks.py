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


def test_ablate_variety_runs_every_variant_and_merges_its_record(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import ablate_variety

    out = tmp_path / "variety.json"
    tiny = ["--preset", "quick", "--steps", "2", "--num-train", "64", "--num-eval", "8", "--json", str(out)]
    first = ablate_variety.main([*tiny, "--only", "templates", "rich_ms"])
    assert list(first["variants"]) == ["templates", "rich_ms"]
    results = ablate_variety.main([*tiny, "--only", "rich", "rich_ms_small", "rich_mbstd"])  # added to the record
    assert sorted(results["variants"]) == sorted(ablate_variety.VARIANTS)
    for row in results["variants"].values():
        for part in ("templates", "rich", "structures", "heldout"):
            assert 0 <= row[part]["all"] <= row[part]["shape"] <= 1
        assert row["diversity"] > 0 and row["diversity_real"] > 0 and row["fid"] > row["fid_floor"] > 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))


def test_gpu_estimate_counts_flops_and_kernels(monkeypatch):
    """estimate_gpu's two counts on a step whose cost is known by hand: a linear layer, forward and backward."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import estimate_gpu
    import torch

    layer = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32)
    step = estimate_gpu._fit(layer, lambda: layer(x).square().mean())
    flops, ops = estimate_gpu.count(step)
    forward = 2 * 8 * 32 * 16
    assert flops == 2 * forward  # the forward matmul and the weight gradient (x needs no gradient)
    assert 5 < ops < 200


def test_the_gpu_estimate_keeps_every_notebook_within_the_budget():
    """The recorded estimate (benchmarks/results/gpu_estimate.json) covers the training notebooks, each < 10 min."""
    record = json.loads((BENCHMARKS / "results" / "gpu_estimate.json").read_text())
    assert set(record["notebooks"]) == {"02_generation", "03_vqvae_refinement", "04_adversarial_training"}
    for name, notebook in record["notebooks"].items():
        assert notebook["within_budget"] and notebook["training_minutes"] < 10, name
        assert sum(loop["minutes"] for loop in notebook["loops"]) <= notebook["training_minutes"] + 0.1
