"""TextToImagePipeline: shapes, determinism, save/load (today's layout and textimg 0.1's), bad input;
the one evaluator and its metrics table; the committed pipeline; train_pipeline (layout, facts, resume)."""

import json

import pytest
import torch

from textimg.config import MANIFEST, PIPELINE_DIR
from textimg.data import ShapesDataset, parse_caption
from textimg.generator import Generator, GeneratorConfig
from textimg.pipeline import PipelineTrainConfig, TextToImagePipeline, evaluate_pipeline, metrics_table, train_pipeline
from textimg.refiner import Refiner, RefinerConfig, bicubic
from textimg.utils import ChecksumError, read_config, read_json, sha256_file

PROMPTS = ["a small red circle at the top left", "a large blue star in the center"]
FACTS = ("command", "textimg", "machine", "date")  # what every saved config's "training" records


@pytest.fixture(scope="module")
def pipe(tiny_bert):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        generator = Generator(GeneratorConfig.preset("quick", text_dim=tiny_bert.dim))
        refiner = Refiner(RefinerConfig.preset("quick", text_cond=True, text_dim=tiny_bert.dim))
    return TextToImagePipeline(generator, refiner, tiny_bert)


@pytest.fixture(scope="module")
def committed(minilm):
    return TextToImagePipeline.from_pretrained(text_encoder=minilm)


def test_generate_shape_range_and_pil(pipe):
    x = pipe.generate(PROMPTS, seed=1)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    low = pipe.generate(PROMPTS, seed=1, size=32)  # the generator's images, before the refiner
    assert low.shape == (2, 3, 32, 32) and 0 <= low.min() and low.max() <= 1
    assert torch.allclose(pipe.sample(PROMPTS, seed=1, size=32), low * 2 - 1, atol=1e-6)  # sample: [-1, 1]
    with pytest.raises(ValueError, match="size must be 32"):
        pipe.generate(PROMPTS, size=48)
    images = pipe(PROMPTS, seed=1)
    assert len(images) == 2 and images[0].size == (64, 64) and images[0].mode == "RGB"
    as_tensor = torch.tensor(list(images[1].getdata()), dtype=torch.float32).T.reshape(3, 64, 64) / 255
    assert (as_tensor - x[1]).abs().max() <= 0.5 / 255 + 1e-6


def test_the_refiner_refines_the_generator_s_images(pipe, tiny_bert):
    low = pipe.sample(PROMPTS, seed=5, size=32)  # (2, 3, 32, 32) in [-1, 1]
    high = pipe.sample(PROMPTS, seed=5)
    assert torch.allclose(high, bicubic(low), atol=1e-5)  # an untrained refiner is bicubic upsampling
    without = TextToImagePipeline(pipe.generator, None, tiny_bert)
    assert torch.allclose(without.sample(PROMPTS, seed=5), bicubic(low), atol=1e-6)
    assert "refiner=bicubic" in repr(without) and "Refiner(" in repr(pipe)


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
    with pytest.raises(TypeError, match="Refiner"):
        TextToImagePipeline(pipe.generator, pipe.generator, tiny_bert)


# --- saving and loading -------------------------------------------------------------------------

def test_save_load_gives_identical_images(pipe, tiny_bert, tmp_path):
    d = pipe.save_pretrained(tmp_path / "p", facts={"note": "test"})
    assert sorted(p.name for p in d.iterdir()) == ["generator", "pipeline.json", "refiner"]
    for part in ("generator", "refiner"):
        assert sorted(p.name for p in (d / part).iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((d / "pipeline.json").read_text())
    assert config["format"] == "textimg.pipeline/2" and config["class"] == "TextToImagePipeline"
    assert config["components"] == {"generator": "Generator", "refiner": "Refiner"}
    assert config["text_encoder"] == "tiny-bert" and config["note"] == "test"
    generator_config = read_config(d / "generator")
    assert generator_config["class"] == "Generator" and generator_config["config"] == pipe.generator.cfg.to_dict()
    assert generator_config["weights_sha256"] == sha256_file(d / "generator" / "model.safetensors")
    loaded = TextToImagePipeline.from_pretrained(d)  # loads its own tiny-bert by name
    assert loaded.text_encoder.name == "tiny-bert"
    assert torch.equal(loaded.generate(PROMPTS, seed=4), pipe.generate(PROMPTS, seed=4))
    without = TextToImagePipeline(pipe.generator, None, tiny_bert)  # bicubic instead of a refiner
    g = without.save_pretrained(tmp_path / "g")
    assert not (g / "refiner").exists()
    assert json.loads((g / "pipeline.json").read_text())["components"] == {"generator": "Generator", "refiner": None}
    reloaded = TextToImagePipeline.from_pretrained(g, text_encoder=tiny_bert)
    assert reloaded.refiner is None and reloaded.text_encoder is tiny_bert
    assert torch.equal(reloaded.generate(PROMPTS, seed=4), without.generate(PROMPTS, seed=4))


def save_v1(pipe: TextToImagePipeline, directory):
    """The folder textimg 0.1's save_pretrained wrote: one config.json, one model.safetensors."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    parts = {"generator": pipe.generator, "refiner": pipe.refiner}
    state = {f"{name}.{k}": v.detach().cpu().contiguous().clone()
             for name, model in parts.items() if model is not None for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {"format": "textimg.pipeline/1", "text_encoder": pipe.text_encoder.name,
              "generator": pipe.generator.cfg.to_dict(),
              "refiner": pipe.refiner.cfg.to_dict() if pipe.refiner is not None else None,
              "weights_sha256": sha256_file(directory / "model.safetensors")}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_textimg_0_1_pipeline_folder_loads(pipe, tiny_bert, tmp_path):
    old = save_v1(pipe, tmp_path / "v1")
    loaded = TextToImagePipeline.from_pretrained(old)  # its own tiny-bert, by the recorded name
    assert loaded.text_encoder.name == "tiny-bert" and isinstance(loaded.refiner, Refiner)
    assert loaded.generator.cfg == pipe.generator.cfg and loaded.refiner.cfg == pipe.refiner.cfg
    assert torch.equal(loaded.generate(PROMPTS, seed=4), pipe.generate(PROMPTS, seed=4))
    assert torch.equal(loaded.generate(PROMPTS, seed=4, size=32), pipe.generate(PROMPTS, seed=4, size=32))
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "model.safetensors"]  # read, not rewritten

    without = TextToImagePipeline(pipe.generator, None, tiny_bert)
    old_without = save_v1(without, tmp_path / "v1_bicubic")
    loaded = TextToImagePipeline.from_pretrained(old_without, text_encoder=tiny_bert)
    assert loaded.refiner is None
    assert torch.equal(loaded.generate(PROMPTS, seed=4), without.generate(PROMPTS, seed=4))

    flip = bytearray((old / "model.safetensors").read_bytes())
    flip[-10] ^= 0xFF
    (old / "model.safetensors").write_bytes(bytes(flip))
    with pytest.raises(ChecksumError, match=r"v1/model\.safetensors does not match"):
        TextToImagePipeline.from_pretrained(old, text_encoder=tiny_bert)
    config = json.loads((old_without / "config.json").read_text())
    config["generator"]["channels"] *= 2
    (old_without / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not describe the same pipeline"):
        TextToImagePipeline.from_pretrained(old_without, text_encoder=tiny_bert)
    (old_without / "config.json").write_text(json.dumps({**config, "format": "textimg.pipeline/9"}))
    with pytest.raises(ValueError, match="not a textimg pipeline config"):
        TextToImagePipeline.from_pretrained(old_without, text_encoder=tiny_bert)


def test_missing_and_corrupted_files_are_named(pipe, tiny_bert, tmp_path):
    with pytest.raises(FileNotFoundError, match="no pipeline directory"):
        TextToImagePipeline.from_pretrained(tmp_path / "nothing")
    d = pipe.save_pretrained(tmp_path / "p")
    weights, config = d / "generator" / "model.safetensors", d / "generator" / "config.json"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"generator/model\.safetensors"):
        TextToImagePipeline.from_pretrained(d, text_encoder=tiny_bert)
    cfg = json.loads(config.read_text())
    del cfg["weights_sha256"]  # without the recorded hash, a truncated file still fails clearly
    config.write_text(json.dumps(cfg))
    weights.write_bytes(bytes(data[:100]))
    with pytest.raises(ValueError, match=r"generator/model\.safetensors could not be read"):
        TextToImagePipeline.from_pretrained(d, text_encoder=tiny_bert)
    config.write_text("{not json")
    with pytest.raises(ValueError, match=r"generator/config\.json is not valid JSON"):
        TextToImagePipeline.from_pretrained(d, text_encoder=tiny_bert)
    config.unlink()
    with pytest.raises(FileNotFoundError, match=r"generator/config\.json is missing"):
        TextToImagePipeline.from_pretrained(d, text_encoder=tiny_bert)
    (d / "pipeline.json").unlink()
    with pytest.raises(FileNotFoundError, match="no pipeline.json in"):
        TextToImagePipeline.from_pretrained(d, text_encoder=tiny_bert)


def test_weights_of_another_architecture_are_refused(pipe, tiny_bert, tmp_path):
    d = pipe.save_pretrained(tmp_path / "p")
    cfg = json.loads((d / "generator" / "config.json").read_text())
    cfg["config"]["channels"] *= 2
    (d / "generator" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not describe the same Generator"):
        TextToImagePipeline.from_pretrained(d, text_encoder=tiny_bert)
    d = pipe.save_pretrained(tmp_path / "q")
    config = json.loads((d / "pipeline.json").read_text())
    swapped = {**config, "components": {"generator": "Refiner", "refiner": "Refiner"}}
    (d / "pipeline.json").write_text(json.dumps(swapped))
    with pytest.raises(ValueError, match="names a Refiner for 'generator'"):
        TextToImagePipeline.from_pretrained(d, text_encoder=tiny_bert)


# --- the one evaluator --------------------------------------------------------------------------

def test_evaluate_pipeline_reports_every_number(pipe):
    results = evaluate_pipeline(pipe, num_samples=48, diversity_captions=2, diversity_samples=4)
    assert results["images"] == 48 and results["size"] == 64 and results["seed"] == 0
    for key in ("seen", "heldout", "structures"):
        assert set(results[key]) == {"shape", "color", "size", "position", "all"}
    assert results["fid"] >= 0 and results["fid_floor"] >= 0
    assert results["fid"] > results["fid_floor"]  # an untrained generator is far from real images
    assert results["diversity"] >= 0 and results["diversity_real"] > 0
    assert results["sharpness"] >= 0 and results["sharpness_real"] > 0
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
    assert "| held-out sentence structures |" in table
    assert f"{mistakes[0][0]} read as {mistakes[0][1]} ({mistakes[0][2]})" in table
    assert "48 images per set, 64x64, seed 0." in table


def test_evaluate_pipeline_at_32_without_a_refiner(pipe, tiny_bert):
    bare = TextToImagePipeline(pipe.generator, None, tiny_bert)  # a bare generator, wrapped
    results = evaluate_pipeline(bare, num_samples=8, size=32, parts=("seen", "diversity"), diversity_captions=2,
                                diversity_samples=3)
    assert results["size"] == 32 and results["images"] == 8
    assert set(results) == {"images", "seed", "size", "seen", "mistakes", "sharpness", "sharpness_real",
                            "diversity", "diversity_real"}  # only the parts asked for
    assert set(results["seen"]) == {"shape", "color", "size", "position", "all"}
    assert all(0 <= v <= 1 for v in results["seen"].values()) and results["diversity"] > 0
    table = metrics_table(results)
    assert "8 images per set, 32x32" in table and "judge-FID" not in table and "refiner PSNR" not in table
    refined = evaluate_pipeline(pipe, num_samples=4, size=32, parts=("refiner",))
    assert "refiner" not in refined  # at 32x32 there is nothing refined to measure


def test_evaluate_pipeline_in_another_grammar(pipe, monkeypatch):
    """``grammar`` writes the test captions; ``structures`` captions the seen items' labels in held-out structures."""
    import textimg.pipeline

    asked = []
    real_sample = textimg.pipeline.TextToImagePipeline.sample
    monkeypatch.setattr(textimg.pipeline.TextToImagePipeline, "sample",
                        lambda self, captions, **kw: asked.append(list(captions)) or real_sample(self, captions, **kw))
    evaluate_pipeline(pipe, num_samples=6, size=32, parts=("seen", "heldout", "structures"), grammar="rich")
    rich = TextToImagePipeline(pipe.generator, None, pipe.text_encoder, grammar="rich")
    evaluate_pipeline(rich, num_samples=6, size=32, parts=("seen", "heldout", "structures"))  # its own grammar
    assert asked[3:] == asked[:3]
    seen, held, structures = asked[:3]
    assert seen == ShapesDataset(12, split="test", grammar="rich").captions()[:6]
    assert held == ShapesDataset(6, split="heldout", grammar="rich").captions()
    assert structures == ShapesDataset(6, split="test", grammar="heldout").captions()
    assert [parse_caption(c) for c in structures] == [parse_caption(c) for c in seen]  # the same items
    with pytest.raises(ValueError, match="grammar must be 'templates' or 'rich'"):
        PipelineTrainConfig.preset("quick", grammar="heldout")
    with pytest.raises(ValueError, match="unknown grammar 'poetry'"):
        TextToImagePipeline(pipe.generator, None, pipe.text_encoder, grammar="poetry")


def test_evaluate_pipeline_refuses_unknown_parts_and_sizes(pipe):
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['accuracy'\]"):
        evaluate_pipeline(pipe, num_samples=4, parts=("seen", "accuracy"))
    for size in (16, 48, 128, "64"):
        with pytest.raises(ValueError, match="size must be 32 or 64"):
            evaluate_pipeline(pipe, num_samples=4, size=size)


# --- the committed pipeline ---------------------------------------------------------------------

def test_committed_pipeline_layout_and_recorded_scores():
    assert sorted(p.name for p in PIPELINE_DIR.iterdir()) == ["generator", "pipeline.json", "refiner"]
    entries = json.loads(MANIFEST.read_text())
    assert entries["pipeline/pipeline.json"] == sha256_file(PIPELINE_DIR / "pipeline.json")
    config = read_json(PIPELINE_DIR / "pipeline.json")
    assert config["format"] == "textimg.pipeline/2" and config["text_encoder"] == "minilm"
    test = config["test"]  # what the one evaluator measured on 2000 test captions
    assert test["images"] == 2000 and test["size"] == 64
    assert test["seen"]["all"] >= 0.90, test["seen"]  # 0.933 when committed
    assert test["seen"]["color"] > 0.99 and test["seen"]["size"] > 0.99
    assert config["test_32"]["size"] == 32 and config["test_32"]["seen"]["all"] >= 0.90  # 0.9545: before the refiner


def test_committed_pipeline_draws_what_it_is_asked(committed):
    assert committed.refiner is not None and committed.text_encoder.name == "minilm"
    results = evaluate_pipeline(committed, num_samples=200, parts=("seen",))
    scores = results["seen"]
    assert scores["color"] > 0.95 and scores["size"] > 0.95  # the committed pipeline: 100 % / 100 %
    assert scores["all"] >= 0.85, scores  # 93 % on 2000 test captions; a random generator scores ~0.3 %


def test_committed_generator_loads_and_matches_the_manifest():
    """checkpoints/pipeline/generator: the stage-4 generator trained adversarially (was generator_gan/)."""
    directory = PIPELINE_DIR / "generator"
    entries = json.loads(MANIFEST.read_text())
    for file in ("model.safetensors", "config.json"):
        assert entries[f"pipeline/generator/{file}"] == sha256_file(directory / file)
    generator = Generator.from_pretrained(directory)
    assert isinstance(generator, Generator) and not generator.training
    assert generator.cfg == GeneratorConfig.preset("cpu", text_dim=384)  # the cpu recipe, MiniLM's vectors


def test_committed_generator_records_how_it_was_made():
    config = read_config(PIPELINE_DIR / "generator")
    training = config.get("training")
    assert isinstance(training, dict), f"{PIPELINE_DIR / 'generator' / 'config.json'} records no training facts"
    assert training["command"].startswith("textimg")  # how it was made, reproducibly
    assert training["steps"] > 0 and training["preset"] in ("cpu", "gpu")
    for key in FACTS:
        assert key in training, key


# --- training every stage -----------------------------------------------------------------------

def check_facts(training: dict, where) -> None:
    for key in FACTS:
        assert key in training, f"{where}: no {key!r} in its training facts"


def test_train_pipeline_layout_facts_and_resume(tmp_path, monkeypatch):
    import textimg.gan

    cfg = PipelineTrainConfig.preset("quick", num_train=64, gan_steps=6, checkpoint_every=3, eval_samples=16)
    straight = train_pipeline(tmp_path / "a", "quick", cfg, progress=False, command="textimg test",
                              log=lambda *a: None)
    out = tmp_path / "a"
    assert straight == out / "pipeline"
    assert sorted(p.name for p in out.iterdir()) == ["pipeline", "refiner", "train_config.json", "training"]
    assert sorted(p.name for p in (out / "training").iterdir()) == ["gan_training.pt", "text_cache.safetensors",
                                                                     "vqvae_training.pt"]
    assert sorted(p.name for p in straight.iterdir()) == ["generator", "pipeline.json", "refiner"]
    record = read_json(out / "train_config.json")
    assert record["preset"] == "quick" and record["config"] == cfg.to_dict()
    for folder, cls, stage, steps in ((out / "refiner", "Refiner", "refiner", cfg.refiner_steps),
                                      (straight / "generator", "Generator", "gan", cfg.gan_steps),
                                      (straight / "refiner", "Refiner", "refiner_gan", cfg.refiner_gan_steps)):
        config = read_config(folder)
        assert config["class"] == cls and config["text_encoder"] == "minilm"
        check_facts(config["training"], folder)
        assert config["training"]["command"] == "textimg test" and config["training"]["preset"] == "quick"
        assert config["training"]["stage"] == stage and config["training"]["steps"] == steps
    pipeline = read_json(straight / "pipeline.json")
    check_facts(pipeline["training"], straight / "pipeline.json")
    test = pipeline["test"]
    assert test["images"] == 16 and test["size"] == 64 and set(test["seen"]) == {"shape", "color", "size",
                                                                                 "position", "all"}
    assert {"heldout", "fid", "diversity", "refiner"} <= set(test)
    test_32 = pipeline["test_32"]  # the generator's own images, before the refiner
    assert test_32["images"] == 16 and test_32["size"] == 32 and {"seen", "diversity"} <= set(test_32)
    TextToImagePipeline.from_pretrained(straight)  # loads as saved

    real_train_gan = textimg.gan.train_gan

    def interrupted(*args, steps, **kwargs):  # stops after 3 of the 6 GAN steps, as Ctrl-C would
        real_train_gan(*args, steps=3, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(textimg.gan, "train_gan", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_pipeline(tmp_path / "b", "quick", cfg, progress=False, command="textimg test", log=lambda *a: None)
    assert (tmp_path / "b" / "refiner" / "config.json").is_file()
    assert (tmp_path / "b" / "training" / "gan_training.pt").is_file()
    assert not (tmp_path / "b" / "pipeline" / "generator").exists()
    monkeypatch.setattr(textimg.gan, "train_gan", real_train_gan)
    lines = []
    resumed = train_pipeline(tmp_path / "b", "quick", cfg, progress=False, command="textimg test", log=lines.append)
    assert any("refiner" in line and "skipped" in line for line in lines)
    for part in ("generator", "refiner"):  # the GAN resumed exactly; the short fine-tuning starts again, seeded
        weights = part + "/model.safetensors"
        assert (resumed / weights).read_bytes() == (straight / weights).read_bytes(), part
    with pytest.raises(ValueError, match="preset 'quick'"):
        train_pipeline(tmp_path / "b", "cpu", progress=False, log=lambda *a: None)


def test_gpu_preset_trains_every_stage_with_its_own_sizes(tmp_path):
    """The `gpu` recipe's networks and batch sizes go through every stage (a few steps, on the CPU),
    so a GPU session meets no shape or config error that `quick` and `cpu` would not show."""
    cfg = PipelineTrainConfig.preset("gpu", num_train=96, refiner_steps=2, gan_steps=2, refiner_gan_steps=1,
                                     checkpoint_every=1, eval_samples=4)
    path = train_pipeline(tmp_path / "gpu", "gpu", cfg, device="cpu", progress=False, log=lambda *a: None)
    pipe = TextToImagePipeline.from_pretrained(path)
    assert pipe.generator.cfg == GeneratorConfig.preset("gpu", text_dim=pipe.text_encoder.dim)
    assert pipe.refiner.cfg == RefinerConfig.preset("gpu", text_cond=True, text_dim=pipe.text_encoder.dim)
    images = pipe.generate(PROMPTS, seed=0)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert json.loads((tmp_path / "gpu" / "train_config.json").read_text())["preset"] == "gpu"
    assert read_config(path / "generator")["training"]["command"] == "textimg train --preset gpu"
