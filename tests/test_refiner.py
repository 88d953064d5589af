"""Tests for textimg.refiner: the refiner's shapes (an untrained one is bicubic upsampling), text
conditioning, its training inputs, train_refiner, refine, evaluate_refiner, the adversarial
fine-tuning (adaptive_weight, refiner_step, finetune_refiner), and the committed refiners
(checkpoints/refiner and checkpoints/pipeline/refiner). Also PSNR and SSIM by hand, the measures
evaluate_refiner reports."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from textimg.config import MANIFEST, PIPELINE_DIR, REFINER_DIR
from textimg.data import ShapesDataset
from textimg.discriminator import PatchDiscriminator, PatchDiscriminatorConfig
from textimg.metrics import psnr, ssim
from textimg.refiner import (
    Refiner,
    RefinerConfig,
    RefinerGANConfig,
    adaptive_weight,
    bicubic,
    evaluate_refiner,
    finetune_refiner,
    refine,
    refiner_step,
    train_refiner,
)
from textimg.text import TextEncoding
from textimg.training import Engine
from textimg.utils import ChecksumError, read_config, sha256_file
from textimg.vqvae import VQVAE, ResBlock, VQTrainConfig, VQVAEConfig

from helpers import random_text, same, snapshot


def tiny_refiner(seed: int = 0, **overrides) -> Refiner:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Refiner(RefinerConfig.preset("quick", text_dim=32, **overrides))  # tiny-bert-sized text vectors


def real_images(n: int, split: str = "train", seed: int = 0) -> torch.Tensor:
    ds = ShapesDataset(n, split=split, seed=seed, cache=False)
    return torch.stack([ds[i]["image"] for i in range(n)])  # (n, 3, 64, 64)




def without_seconds(history: dict) -> dict:
    return {k: v for k, v in history.items() if k != "seconds"}


def perturb_zero_inits(refiner: Refiner, seed: int = 0) -> Refiner:
    """Gives the zero-initialised layers (FiLM, the last conv) random weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in refiner.modules():
            if isinstance(m, ResBlock) and m.film is not None:
                m.film.weight.copy_(torch.randn(m.film.weight.shape, generator=g))
        last = refiner.decoder.up[-1]
        last.weight.copy_(0.1 * torch.randn(last.weight.shape, generator=g))
    return refiner


# --- the model ----------------------------------------------------------------------------------

def test_configs_presets_and_round_trip():
    sizes = [Refiner(RefinerConfig.preset(p, text_cond=False)).num_parameters() for p in ("quick", "cpu", "gpu")]
    assert sizes[0] < 100_000 < sizes[1] < 500_000 < sizes[2], sizes
    cfg = RefinerConfig.preset("cpu", num_codes=128)
    assert RefinerConfig.from_dict(cfg.to_dict()) == cfg and cfg.num_codes == 128 and cfg.cond_dim == 64
    with pytest.raises(ValueError, match="unknown RefinerConfig field"):
        RefinerConfig.from_dict({**cfg.to_dict(), "codes": 1})
    assert RefinerConfig().levels == 1  # 32x32 latents, one code per input pixel
    assert isinstance(Refiner(RefinerConfig.preset("quick")), VQVAE)  # a VQ-VAE with a residual output
    with pytest.raises(ValueError, match="unknown preset"):
        RefinerConfig.preset("huge")
    with pytest.raises(ValueError, match="upsample"):
        RefinerConfig(upsample="lanczos")
    with pytest.raises(ValueError, match="multiple of low_size"):
        RefinerConfig(low_size=24)

    gan = RefinerGANConfig(adaptive=True, r1_gamma=0.1)
    assert RefinerGANConfig.from_dict(gan.to_dict()) == gan
    with pytest.raises(ValueError, match="d_loss"):
        RefinerGANConfig(d_loss="wasserstein")
    with pytest.raises(ValueError):
        RefinerGANConfig(augment="rotation")  # not a DiffAugment policy


def test_refiner_shapes_and_the_residual_starts_as_bicubic():
    refiner = tiny_refiner()
    x_low = torch.rand(3, 3, 32, 32) * 2 - 1
    x_rec, vq = refiner(x_low, random_text(3))
    assert x_rec.shape == (3, 3, 64, 64) and x_rec.abs().max() <= 1
    assert vq.z_q.shape == (3, 16, 32, 32) and vq.indices.shape == (3, 32, 32)
    assert torch.allclose(x_rec, bicubic(x_low))  # the residual starts at zero: untrained = bicubic
    assert torch.equal(refiner.upsample(x_low), bicubic(x_low))
    assert bicubic(x_low, 32).shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="expected"):
        refiner(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="pooled"):
        refiner(x_low, random_text(2))


def test_text_conditioning_changes_the_output_only_when_on():
    x_low = torch.rand(2, 3, 32, 32) * 2 - 1
    text_a, text_b = random_text(2, seed=1), random_text(2, seed=2)
    refiner = perturb_zero_inits(tiny_refiner()).eval()
    out_a, out_b, out_none = (refiner(x_low, t)[0] for t in (text_a, text_b, None))
    assert not torch.allclose(out_a, out_b)
    zeros = TextEncoding(text_a.tokens, text_a.mask, torch.zeros_like(text_a.pooled))
    assert torch.equal(out_none, refiner(x_low, zeros)[0])  # None = the null caption (zeros)

    plain = perturb_zero_inits(tiny_refiner(text_cond=False)).eval()
    assert plain.text_proj is None
    assert torch.equal(plain(x_low, text_a)[0], plain(x_low, text_b)[0])  # text ignored
    assert torch.equal(plain(x_low, text_a)[0], plain(x_low)[0])


def test_training_inputs_downsample_and_drop_captions(tiny_bert):
    data = ShapesDataset(8, split="train", seed=2, cache=False)
    x_real = torch.stack([data[i]["image"] for i in range(8)])
    captions = data.captions()
    refiner = tiny_refiner()
    x_low, kept = refiner.training_inputs(x_real, captions, tiny_bert, torch.Generator().manual_seed(0), 0.0)
    assert torch.equal(x_low, F.avg_pool2d(x_real, 2)) and x_low.shape == (8, 3, 32, 32)  # as ShapesDataset's 32x32
    assert torch.equal(kept.pooled, tiny_bert.encode(captions).pooled)
    _, dropped = refiner.training_inputs(x_real, captions, tiny_bert, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(dropped.pooled, torch.zeros_like(kept.pooled))  # every caption the null caption
    _, half = refiner.training_inputs(x_real, captions, tiny_bert, torch.Generator().manual_seed(0), 0.5)
    zeroed = (half.pooled == 0).all(dim=1)
    keep = torch.rand(8, generator=torch.Generator().manual_seed(0)) >= 0.5  # the draws come from the rng
    assert torch.equal(zeroed, ~keep) and torch.equal(half.pooled[keep], kept.pooled[keep])
    x_low, none = tiny_refiner(text_cond=False).training_inputs(x_real, captions)
    assert none is None and torch.equal(x_low, F.avg_pool2d(x_real, 2))


def test_refine_batches_in_eval_mode_and_restores_the_mode():
    refiner = perturb_zero_inits(tiny_refiner()).train()
    x_low, text = torch.rand(5, 3, 32, 32) * 2 - 1, random_text(5)
    whole, indices = refine(refiner, x_low, text, return_indices=True)
    parts, part_indices = refine(refiner, x_low, text, batch_size=2, return_indices=True)  # 3 batches
    assert torch.allclose(parts, whole, atol=1e-5) and torch.equal(part_indices, indices)
    assert indices.shape == (5, 32, 32) and refiner.training
    before = refiner.quantizer.codebook.clone()
    refine(refiner, x_low, text)
    assert torch.equal(refiner.quantizer.codebook, before)  # eval mode: no EMA updates, no restarts


# --- training -----------------------------------------------------------------------------------

def test_refiner_overfits_one_batch_beyond_bicubic():
    x_real = real_images(8)
    bicubic_mse = (bicubic(F.avg_pool2d(x_real, 2)) - x_real).pow(2).mean().item()
    refiner = tiny_refiner(text_cond=False)
    history = train_refiner(refiner, x_real, VQTrainConfig(batch_size=8, lr=3e-3), steps=150, progress=False,
                            log_every=149)
    assert history["recon"][0] == pytest.approx(bicubic_mse, rel=1e-4)  # it starts as bicubic ...
    assert history["recon"][-1] < 0.6 * bicubic_mse, (bicubic_mse, history["recon"])  # ... and learns the detail


def test_training_is_seeded_and_leaves_the_global_rng_alone(tiny_bert):
    data = ShapesDataset(40, split="train", seed=3)
    runs = []
    for _ in range(2):
        refiner = tiny_refiner(seed=1)
        state = torch.random.get_rng_state()
        runs.append(train_refiner(refiner, data, VQTrainConfig(batch_size=8), steps=4, progress=False, log_every=1,
                                  text_encoder=tiny_bert))
        assert torch.equal(torch.random.get_rng_state(), state)
    assert without_seconds(runs[0]) == without_seconds(runs[1])
    with pytest.raises(ValueError, match="encoder"):
        train_refiner(tiny_refiner(), data, steps=1, progress=False)
    with pytest.raises(TypeError, match="train_vqvae"):
        train_refiner(VQVAE(VQVAEConfig.preset("quick")), data, steps=1, progress=False)
    with pytest.raises(TypeError):  # the loose keywords are gone: they live in VQTrainConfig
        train_refiner(tiny_refiner(), data, steps=1, progress=False, text_encoder=tiny_bert, text_dropout=0.5)


def test_evaluate_refiner_of_an_untrained_refiner_is_bicubic():
    scores = evaluate_refiner(tiny_refiner(), 8, split="test", seed=1)  # no encoder: the null caption
    assert scores["images"] == 8 and scores["split"] == "test"
    assert scores["psnr_refiner"] == pytest.approx(scores["psnr_bicubic"], abs=1e-3)
    assert scores["ssim_refiner"] == pytest.approx(scores["ssim_bicubic"], abs=1e-4)
    assert 20 < scores["psnr_bicubic"] < 60 and 0 < scores["ssim_bicubic"] < 1
    assert 0 < scores["usage"] <= 1 and 1 <= scores["perplexity"] <= tiny_refiner().cfg.num_codes


# --- adversarial fine-tuning --------------------------------------------------------------------

def test_adaptive_weight_balances_the_two_gradients_by_hand():
    w = torch.nn.Parameter(torch.ones(2, 3))
    x = torch.arange(6.0).view(2, 3)
    rec, adv = (3 * w * x).sum(), (w * x).sum()  # gradients 3x and x: norms in the ratio 3
    weight = adaptive_weight(rec, adv, w)
    expected = 3 * x.norm() / (x.norm() + 1e-4)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-6) and not weight.requires_grad
    assert adaptive_weight((w * x).sum(), 0 * (w * x).sum(), w, max_weight=50.0).item() == 50.0  # clamped
    assert w.grad is None  # torch.autograd.grad: nothing accumulated


def test_refiner_step_trains_the_refiner_only(tiny_bert):
    refiner = tiny_refiner()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        patch_d = PatchDiscriminator(PatchDiscriminatorConfig.preset("quick", spectral_norm=True))
    x_real = real_images(4)
    x_low, text = refiner.training_inputs(x_real, ShapesDataset(4).captions(), tiny_bert)
    r_before, d_before = snapshot(refiner), snapshot(patch_d)
    flags = [p.requires_grad for p in patch_d.parameters()]
    opt = torch.optim.Adam(refiner.parameters(), 1e-3)
    stats = refiner_step(refiner, patch_d, opt, x_low, x_real, text, RefinerGANConfig(augment="", adaptive=True),
                         Engine(rng=torch.Generator().manual_seed(0)))
    assert set(stats) == {"r_loss", "recon", "vq_loss", "r_adv", "adv_weight", "perplexity", "d_fake_r"}
    assert all(math.isfinite(v) for v in stats.values()) and stats["adv_weight"] > 0
    assert 0 < stats["d_fake_r"] < 1
    assert not same(snapshot(refiner), r_before)
    assert same(snapshot(patch_d), d_before)  # frozen, in eval mode: spectral norm's u, v untouched too
    assert [p.requires_grad for p in patch_d.parameters()] == flags and patch_d.training


def test_finetune_refiner_runs_and_changes_the_refiner(tiny_bert):
    refiner = tiny_refiner()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        patch_d = PatchDiscriminator(PatchDiscriminatorConfig.preset("quick", spectral_norm=True))
    before = snapshot(refiner)
    state = torch.get_rng_state()
    cfg = RefinerGANConfig(batch_size=4, adaptive=True, r1_gamma=0.1)
    h = finetune_refiner(refiner, patch_d, ShapesDataset(16), tiny_bert, cfg, steps=3, progress=False, log_every=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert h["step"] == [0, 1, 2] and all(math.isfinite(v) for k in ("recon", "r_adv", "d_loss") for v in h[k])
    assert set(h) == {"step", "recon", "vq_loss", "r_adv", "adv_weight", "perplexity", "d_loss", "d_real", "d_fake",
                      "seconds"}
    assert all(v > 0 for v in h["adv_weight"])
    assert not same(snapshot(refiner), before)
    with pytest.raises(ValueError, match="encoder"):
        finetune_refiner(refiner, patch_d, ShapesDataset(4), None, RefinerGANConfig(batch_size=4), steps=1,
                         progress=False)


# --- image measures -----------------------------------------------------------------------------

def test_psnr_and_ssim_by_hand():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert psnr(x, x) == math.inf and ssim(x, x) == pytest.approx(1.0)
    black = -torch.ones(2, 3, 16, 16)
    off = black.clone()
    off[0] += 0.2  # 0.1 on the [0, 1] scale: MSE 0.01, 20 dB
    off[1] += 0.02  # 0.01: MSE 1e-4, 40 dB
    assert psnr(off, black) == pytest.approx(30.0, abs=1e-3)  # per image, then averaged
    assert psnr(off[:1], black[:1]) == pytest.approx(20.0, abs=1e-3)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert ssim(noisy, x) < 0.9 and psnr(noisy, x) < psnr((x + noisy) / 2, x)


# --- the committed refiners ---------------------------------------------------------------------

def test_committed_refiner_matches_its_manifest_and_loads_safely():
    recorded = json.loads(MANIFEST.read_text())
    for name in ("model.safetensors", "config.json"):
        assert recorded[f"refiner/{name}"] == sha256_file(REFINER_DIR / name)
    weights = (REFINER_DIR / "model.safetensors").read_bytes()
    header = int.from_bytes(weights[:8], "little")
    json.loads(weights[8:8 + header])  # a safetensors file: a JSON header and raw tensors, no pickle
    assert len(weights) < 5_000_000
    refiner = Refiner.from_pretrained(REFINER_DIR)  # checked against MANIFEST.json (inside checkpoints/)
    assert isinstance(refiner, Refiner) and not refiner.training
    facts = read_config(REFINER_DIR)
    assert facts["class"] == "Refiner" and facts["weights_sha256"] == recorded["refiner/model.safetensors"]
    assert facts["test"]["usage"] >= 0.9 and facts["test"]["psnr_refiner"] > facts["test"]["psnr_bicubic"]


def test_committed_refiner_beats_bicubic_on_real_test_images(minilm):
    refiner = Refiner.from_pretrained(REFINER_DIR)
    facts = read_config(REFINER_DIR)
    encoder = minilm if facts["text_encoder"] == "minilm" else None
    scores = evaluate_refiner(refiner, 64, split="test", seed=1, text_encoder=encoder)
    assert scores["psnr_refiner"] > scores["psnr_bicubic"] + 3, scores
    assert scores["ssim_refiner"] > scores["ssim_bicubic"], scores


def test_a_tampered_refiner_is_refused(tmp_path):
    shutil.copytree(REFINER_DIR, tmp_path / "refiner")
    shutil.copy(MANIFEST, tmp_path / "MANIFEST.json")
    Refiner.from_pretrained(tmp_path / "refiner", tmp_path / "MANIFEST.json")  # the copy is fine
    weights = tmp_path / "refiner" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"refiner/model\.safetensors does not match"):
        Refiner.from_pretrained(tmp_path / "refiner", tmp_path / "MANIFEST.json")
    with pytest.raises(ChecksumError, match=r"refiner/model\.safetensors does not match the SHA-256 recorded in"):
        Refiner.from_pretrained(tmp_path / "refiner")  # outside checkpoints/: config.json's own hash catches it


def test_committed_pipeline_refiner_loads_and_matches_the_manifest():
    """checkpoints/pipeline/refiner: checkpoints/refiner after adversarial fine-tuning (was refiner_gan/)."""
    directory = PIPELINE_DIR / "refiner"
    entries = json.loads(MANIFEST.read_text())
    for file in ("model.safetensors", "config.json"):
        assert entries[f"pipeline/refiner/{file}"] == sha256_file(directory / file)
    refiner = Refiner.from_pretrained(directory)
    base = Refiner.from_pretrained(REFINER_DIR)
    assert isinstance(refiner, Refiner) and not refiner.training
    assert refiner.cfg == base.cfg and refiner.cfg.text_cond  # the same network, fine-tuned: moved, not far
    assert not same(snapshot(refiner), snapshot(base))
    scores = json.loads((PIPELINE_DIR / "pipeline.json").read_text())["test"]["refiner"]
    assert scores["psnr_refiner"] > scores["psnr_bicubic"] + 3 and scores["ssim_refiner"] > scores["ssim_bicubic"]


def test_committed_pipeline_refiner_records_how_it_was_made():
    config = read_config(PIPELINE_DIR / "refiner")
    training = config.get("training")
    assert isinstance(training, dict), f"{PIPELINE_DIR / 'refiner' / 'config.json'} records no training facts"
    assert "textimg" in training["command"]  # how it was made (a textimg 0.1 recipe, kept as recorded)
    assert training["steps"] > 0 and training["preset"] in ("cpu", "gpu")
    assert "migrated" in config  # made before textimg 0.2's layout, and says so
    for key in ("textimg", "torch", "date"):  # textimg 0.1 did not record its machine here
        assert key in training, key
