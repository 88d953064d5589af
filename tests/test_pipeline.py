"""TextToImagePipeline: shapes, determinism, save/load, bad input; the metrics table; resumable training."""

import json

import pytest
import torch

from textimg.generator import Generator, GeneratorConfig
from textimg.pipeline import PipelineTrainConfig, TextToImagePipeline, evaluate_pipeline, metrics_table, train_pipeline
from textimg.utils import ChecksumError
from textimg.vqvae import Refiner, RefinerConfig

PROMPTS = ["a small red circle at the top left", "a large blue star in the center"]


@pytest.fixture(scope="module")
def pipe(tiny_bert):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        generator = Generator(GeneratorConfig.preset("quick", text_dim=tiny_bert.dim))
        refiner = Refiner(RefinerConfig.preset("quick", text_cond=True, text_dim=tiny_bert.dim))
    return TextToImagePipeline(generator, refiner, tiny_bert)


def test_generate_shape_range_and_pil(pipe):
    x = pipe.generate(PROMPTS, seed=1)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    low = pipe.generate(PROMPTS, seed=1, refine_output=False)
    assert low.shape == (2, 3, 32, 32)
    images = pipe(PROMPTS, seed=1)
    assert len(images) == 2 and images[0].size == (64, 64) and images[0].mode == "RGB"
    as_tensor = torch.tensor(list(images[1].getdata()), dtype=torch.float32).T.reshape(3, 64, 64) / 255
    assert (as_tensor - x[1]).abs().max() <= 0.5 / 255 + 1e-6


def test_same_seed_same_images_and_global_rng_untouched(pipe):
    state = torch.random.get_rng_state()
    a, b = pipe.generate(PROMPTS, seed=7), pipe.generate(PROMPTS, seed=7)
    assert torch.equal(a, b)
    assert torch.equal(state, torch.random.get_rng_state())
    assert not torch.equal(a, pipe.generate(PROMPTS, seed=8))
    torch.manual_seed(123)  # the global RNG's state must not matter either
    assert torch.equal(a, pipe.generate(PROMPTS, seed=7))
    assert torch.allclose(a, pipe.generate(PROMPTS, seed=7, batch_size=1), atol=1e-5)


def test_num_per_prompt_groups_images_by_prompt(pipe):
    grouped = pipe.generate(PROMPTS, seed=3, num_per_prompt=2)
    spelled = pipe.generate([PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]], seed=3)
    assert grouped.shape == (4, 3, 64, 64)
    assert torch.allclose(grouped, spelled, atol=1e-6)
    with pytest.raises(ValueError, match="num_per_prompt"):
        pipe.generate(PROMPTS, num_per_prompt=0)


def test_interpolation_ends_at_both_prompts(pipe):
    path = pipe.interpolate(PROMPTS[0], PROMPTS[1], steps=5, seed=2)
    assert path.shape == (5, 3, 64, 64)
    assert torch.allclose(path[0], pipe.generate(PROMPTS[0], seed=2)[0], atol=1e-4)
    assert torch.allclose(path[-1], pipe.generate(PROMPTS[1], seed=2)[0], atol=1e-4)
    with pytest.raises(ValueError, match="steps"):
        pipe.interpolate(PROMPTS[0], PROMPTS[1], steps=1)


@pytest.mark.parametrize("prompts, error, match", [
    ([], ValueError, "empty list"),
    (["fine", "  "], ValueError, "position 1 is empty"),
    (["fine", 3], TypeError, "position 1 is not a str"),
    (None, TypeError, "list of strings"),
])
def test_bad_prompts_get_clear_errors(pipe, prompts, error, match):
    with pytest.raises(error, match=match):
        pipe.generate(prompts)


def test_bad_seed_and_mismatched_parts(pipe, tiny_bert, minilm):
    with pytest.raises(TypeError, match="seed"):
        pipe.generate(PROMPTS, seed=1.5)
    with pytest.raises(ValueError, match="text_dim"):
        TextToImagePipeline(pipe.generator, pipe.refiner, minilm)
    with pytest.raises(TypeError, match="Generator"):
        TextToImagePipeline(pipe.refiner, None, tiny_bert)


def test_save_load_gives_identical_images(pipe, tiny_bert, tmp_path):
    pipe.save_pretrained(tmp_path / "p", facts={"note": "test"})
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["format"] == "textimg.pipeline/1" and config["text_encoder"] == "tiny-bert"
    assert config["note"] == "test" and len(config["weights_sha256"]) == 64
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "p")  # loads its own tiny-bert by name
    assert torch.equal(loaded.generate(PROMPTS, seed=4), pipe.generate(PROMPTS, seed=4))
    without = TextToImagePipeline(pipe.generator, None, tiny_bert)  # bicubic instead of a refiner
    without.save_pretrained(tmp_path / "g")
    assert TextToImagePipeline.from_pretrained(tmp_path / "g", encoder=tiny_bert).refiner is None


def test_missing_and_corrupted_files_are_named(pipe, tiny_bert, tmp_path):
    with pytest.raises(FileNotFoundError, match="no pipeline directory"):
        TextToImagePipeline.from_pretrained(tmp_path / "nothing")
    d = pipe.save_pretrained(tmp_path / "p")
    weights, config = d / "model.safetensors", d / "config.json"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="model.safetensors"):
        TextToImagePipeline.from_pretrained(d, encoder=tiny_bert)
    cfg = json.loads(config.read_text())
    del cfg["weights_sha256"]  # without the recorded hash, a truncated file still fails clearly
    config.write_text(json.dumps(cfg))
    weights.write_bytes(bytes(data[:100]))
    with pytest.raises(ValueError, match="model.safetensors could not be read"):
        TextToImagePipeline.from_pretrained(d, encoder=tiny_bert)
    config.write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        TextToImagePipeline.from_pretrained(d, encoder=tiny_bert)
    config.unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        TextToImagePipeline.from_pretrained(d, encoder=tiny_bert)


def test_weights_of_another_architecture_are_refused(pipe, tiny_bert, tmp_path):
    d = pipe.save_pretrained(tmp_path / "p")
    cfg = json.loads((d / "config.json").read_text())
    cfg["generator"]["channels"] *= 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not describe the same pipeline"):
        TextToImagePipeline.from_pretrained(d, encoder=tiny_bert)


def test_committed_pipeline_draws_what_it_is_asked(minilm):
    from textimg.data import ShapesDataset
    from textimg.metrics import caption_accuracy, load_judge

    committed = TextToImagePipeline.from_pretrained(encoder=minilm)
    assert committed.refiner is not None and committed.text_encoder == "minilm"
    captions = ShapesDataset(200, split="test").captions()
    scores = caption_accuracy(load_judge(), committed.generate(captions) * 2 - 1, captions)
    assert scores["color"] > 0.9 and scores["size"] > 0.9  # the committed GAN: 100 % / 99.8 %
    assert scores["all"] > 0.25  # 37-39 % on the test split; a random generator scores ~0.3 %


def test_evaluate_pipeline_reports_every_number(pipe):
    results = evaluate_pipeline(pipe, num_samples=48, diversity_captions=2, diversity_samples=4)
    for key in ("seen", "heldout"):
        assert set(results[key]) == {"shape", "color", "size", "position", "all"}
    assert results["fid"] >= 0 and results["fid_floor"] >= 0
    assert results["fid"] > results["fid_floor"]  # an untrained generator is far from real images
    assert results["diversity"] >= 0 and results["diversity_real"] > 0
    assert {"psnr_refiner", "psnr_bicubic", "ssim_refiner", "usage", "perplexity"} <= set(results["refiner"])
    mistakes = results["mistakes"]  # an untrained generator: shape errors, most frequent first
    assert 1 <= len(mistakes) <= 3 and all(a[-1] >= b[-1] for a, b in zip(mistakes, mistakes[1:]))
    assert sum(n for *_, n in mistakes) <= round(48 * (1 - results["seen"]["shape"]))
    with pytest.raises(ValueError, match="num_samples must be an int >= 2"):
        evaluate_pipeline(pipe, num_samples=1)
    with pytest.raises(ValueError, match="diversity_captions"):
        evaluate_pipeline(pipe, num_samples=4, diversity_captions=0)
    table = metrics_table(results)
    assert "seen compositions" in table and "real vs real floor" in table and "codebook usage" in table
    assert f"{mistakes[0][0]} read as {mistakes[0][1]} ({mistakes[0][2]})" in table


def test_train_pipeline_resumes_after_an_interruption(tmp_path, monkeypatch):
    import textimg.gan

    cfg = PipelineTrainConfig.preset("quick", num_train=64, gan_steps=6, checkpoint_every=3)
    straight = train_pipeline(tmp_path / "a", "quick", cfg, progress=False, log=lambda *a: None)

    real_train_gan = textimg.gan.train_gan

    def interrupted(*args, steps, **kwargs):  # stops after 3 of the 6 GAN steps, as Ctrl-C would
        real_train_gan(*args, steps=3, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(textimg.gan, "train_gan", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_pipeline(tmp_path / "b", "quick", cfg, progress=False, log=lambda *a: None)
    assert (tmp_path / "b" / "refiner" / "config.json").is_file()
    assert not (tmp_path / "b" / "generator").exists()
    monkeypatch.setattr(textimg.gan, "train_gan", real_train_gan)
    lines = []
    resumed = train_pipeline(tmp_path / "b", "quick", cfg, progress=False, log=lines.append)
    assert any("refiner" in line and "skipped" in line for line in lines)
    assert (resumed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="preset 'quick'"):
        train_pipeline(tmp_path / "b", "cpu", progress=False, log=lambda *a: None)


def test_gpu_preset_trains_every_stage_with_its_own_sizes(tmp_path):
    """The `gpu` recipe's networks and batch sizes go through every stage (a few steps, on the CPU),
    so a GPU session meets no shape or config error that `quick` and `cpu` would not show."""
    cfg = PipelineTrainConfig.preset("gpu", num_train=96, refiner_steps=2, refiner_batch_size=4, gan_steps=2,
                                     refiner_gan_steps=1, checkpoint_every=1)
    path = train_pipeline(tmp_path / "gpu", "gpu", cfg, device="cpu", progress=False, log=lambda *a: None)
    pipe = TextToImagePipeline.from_pretrained(path)
    assert pipe.generator.cfg == GeneratorConfig.preset("gpu", text_dim=pipe.encoder.dim)
    assert pipe.refiner.cfg == RefinerConfig.preset("gpu", text_cond=True, text_dim=pipe.encoder.dim)
    images = pipe.generate(PROMPTS, seed=0)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert json.loads((tmp_path / "gpu" / "train_config.json").read_text())["preset"] == "gpu"
