"""The textimg command: train -> generate -> evaluate on the quick preset, train-judge, and clear errors on
bad input."""

import json
import shlex
import subprocess
import sys

import pytest
from PIL import Image

from textimg.cli import main
from textimg.pipeline import TextToImagePipeline, training_grammar


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`textimg train --preset quick --grammar rich` into a fresh directory."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--preset", "quick", "--out", str(out), "--num-train", "64", "--grammar", "rich",
                 "--no-progress"]) == 0
    return out


def test_train_writes_every_stage_and_resumes(trained, capsys):
    assert (trained / "refiner" / "model.safetensors").is_file()  # the refiner before fine-tuning
    pipeline = trained / "pipeline"
    assert sorted(p.name for p in pipeline.iterdir()) == ["generator", "pipeline.json", "refiner"]
    for part in ("generator", "refiner"):
        assert (pipeline / part / "model.safetensors").is_file() and (pipeline / part / "config.json").is_file()
    for name in ("gan_training.pt", "vqvae_training.pt", "text_cache.safetensors"):
        assert (trained / "training" / name).is_file(), name
    assert json.loads((trained / "train_config.json").read_text())["preset"] == "quick"
    recorded = json.loads((pipeline / "pipeline.json").read_text())
    argv = ["train", "--preset", "quick", "--out", str(trained), "--num-train", "64", "--grammar", "rich",
            "--no-progress"]
    assert recorded["training"]["command"] == "textimg " + shlex.join(argv)  # recorded as it was typed
    assert recorded["training"]["config"]["grammar"] == "rich"
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("(done, skipped)") == 3


def test_generate_writes_a_grid(trained, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large green triangle at the bottom right\n\n")
    out = tmp_path / "grid.png"
    code = main(["generate", "--model", str(trained / "pipeline"), "--per-prompt", "3", "--seed", "2",
                 "--prompts-file", str(prompts), "a small red circle at the top left", "--out", str(out)])
    assert code == 0
    assert "6 images (2 prompts x 3, seed 2)" in capsys.readouterr().out
    width, height = Image.open(out).size
    assert (width, height) == (3 * 66 + 2, 2 * 66 + 2)  # 64-pixel images, 2-pixel padding


def test_generate_with_the_committed_pipeline(tmp_path):
    out = tmp_path / "sub" / "one.jpg"
    assert main(["generate", "a large blue star in the center", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)  # one image: no grid padding


def test_evaluate_prints_a_table_and_writes_json(trained, tmp_path, capsys):
    path = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", str(trained / "pipeline"), "--num-samples", "40", "--json", str(path),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "seen compositions" in printed and "real vs real floor" in printed
    results = json.loads(path.read_text())
    assert set(results["seen"]) == {"shape", "color", "size", "position", "all"}
    assert results["images"] == 40 and results["fid_floor"] > 0


def test_evaluate_record_writes_the_measurements_into_the_pipeline(trained, capsys):
    """--record: the record every quoted number comes from, written by the evaluator, weights untouched."""
    pipeline = trained / "pipeline"
    weights = (pipeline / "generator" / "model.safetensors").read_bytes()
    assert main(["evaluate", "--record", "--model", str(pipeline), "--num-samples", "8", "--no-progress"]) == 0
    assert f"recorded in {pipeline / 'pipeline.json'}" in capsys.readouterr().out
    record = json.loads((pipeline / "pipeline.json").read_text())
    assert record["evaluated"]["command"] == "textimg evaluate --record --num-samples 8"
    assert record["test"]["images"] == record["test_bicubic"]["images"] == 8 and record["test_32"]["size"] == 32
    assert record["training"]["command"].startswith("textimg train")  # what training recorded is kept
    assert TextToImagePipeline.from_pretrained(pipeline).grammar == "rich"  # what it was trained on, read back
    assert training_grammar({"training": {"config": {}}}) == training_grammar({}) == "templates"  # unrecorded
    assert (pipeline / "generator" / "model.safetensors").read_bytes() == weights
    assert main(["generate", "--model", str(pipeline), "a small red circle at the top left",
                 "--out", str(trained / "after.png")]) == 0  # still loads: hashes agree


@pytest.mark.parametrize("argv", [
    [],
    ["paint"],
    ["train", "--preset", "huge"],
    ["train", "--gan-steps", "0"],
    ["train", "--grammar", "heldout"],
    ["generate", "x", "--seed", "abc"],
    ["generate", "x", "--per-prompt", "-1"],
    ["evaluate", "--num-samples", "many"],
    ["train-judge", "--out", "x", "--preset", "gpu"],
])
def test_bad_arguments_exit_2_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: textimg" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["generate"], "no prompts"),
    (["generate", "  "], "prompt at position 0 is empty"),
    (["generate", "x", "--out", "grid.gif"], "--out must end in"),
    (["generate", "x", "--model", "/nonexistent/pipeline"], "no pipeline directory at /nonexistent/pipeline"),
    (["generate", "--prompts-file", "/nonexistent.txt"], "no prompts file"),
    (["evaluate", "--device", "cuda:7" if not __import__("torch").cuda.is_available() else "tpu"], "--device"),
])
def test_bad_input_exits_1_with_one_clear_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_judge_saves_a_judge(tmp_path, capsys):
    from textimg.metrics import Judge, JudgeConfig, load_judge

    out = tmp_path / "judge"
    assert main(["train-judge", "--out", str(out), "--preset", "quick", "--no-progress"]) == 0
    assert f"judge saved to {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    judge = load_judge(out)  # checked against the SHA-256 in its config.json
    assert isinstance(judge, Judge) and judge.cfg == JudgeConfig.preset("quick")
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["command"] == "textimg " + shlex.join(["train-judge", "--out", str(out), "--preset", "quick",
                                                          "--no-progress"])
    for key in ("textimg", "machine", "date"):
        assert key in training, key
    assert {"test_64", "test_32", "heldout_64", "heldout_32"} <= set(training["test"])


def test_train_judge_needs_an_output_directory(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-judge", "--preset", "quick"])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err


def test_python_dash_m_runs_the_same_command():
    done = subprocess.run([sys.executable, "-m", "textimg", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "{train,generate,evaluate,train-judge,grade}" in done.stdout


def test_inception_fid_without_torch_fidelity_is_a_clear_error(capsys):
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch-fidelity is installed here")
    assert main(["evaluate", "--num-samples", "8", "--inception-fid", "--no-progress"]) == 1
    assert "pip install torch-fidelity" in capsys.readouterr().err


def test_train_diffusion_then_generate_and_evaluate_with_it(tmp_path, capsys):
    """`textimg train --diffusion`: both U-Nets and the measured pipeline, resumable; generate and
    evaluate load it by the kind its pipeline.json names."""
    out = tmp_path / "diffusion"
    argv = ["train", "--diffusion", "--preset", "quick", "--out", str(out), "--num-train", "32", "--no-progress"]
    assert main(argv) == 0
    pipeline = out / "pipeline"
    record = json.loads((pipeline / "pipeline.json").read_text())
    assert record["class"] == "DiffusionPipeline" and record["components"] == {"base": "UNet", "superres": "UNet"}
    assert record["training"]["command"] == "textimg " + shlex.join(argv)
    assert record["test"]["images"] == 4 and "structures" in record["test"] and "refiner" not in record["test"]
    assert record["test_bicubic"]["size"] == 64 and record["test_32"]["size"] == 32
    base = json.loads((out / "base" / "config.json").read_text())
    assert base["training"]["weights"] == "EMA" and base["training"]["steps"] == 10
    capsys.readouterr()
    assert main(argv) == 0  # again: every stage is done and skipped
    assert capsys.readouterr().out.count("(done, skipped)") == 2
    grid = tmp_path / "grid.png"
    assert main(["generate", "--model", str(pipeline), "a small red circle at the top left", "--per-prompt", "2",
                 "--out", str(grid)]) == 0
    assert Image.open(grid).size[1] == 64 + 2 * 2  # one row of 64x64 images with the grid's padding
    assert main(["evaluate", "--model", str(pipeline), "--num-samples", "4", "--no-progress"]) == 0
    assert "held-out sentence structures" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["train", "--diffusion", "--gan-steps", "5"], "--gan-steps size the GAN pipeline"),
    (["train", "--base-steps", "5"], "--base-steps and --sr-steps size the diffusion pipeline: add --diffusion"),
])
def test_train_refuses_flags_of_the_other_pipeline(argv, match, capsys, tmp_path):
    assert main([*argv, "--preset", "quick", "--out", str(tmp_path / "x")]) == 1
    assert match in capsys.readouterr().err
