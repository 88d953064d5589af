"""Tests for textimg.vqvae: the quantiser on a hand-made codebook, its gradients, EMA updates and
restarts, shapes on tiny configs, learning, and the committed refiner. Also the image metrics
(PSNR, SSIM) and codebook statistics of textimg.metrics that notebook 03 uses."""

import json
import math
import shutil

import pytest
import torch

from textimg.data import ShapesDataset
from textimg.metrics import codebook_perplexity, codebook_usage, psnr, ssim
from textimg.text import TextEncoding
from textimg.utils import ChecksumError, sha256_file
from textimg.vqvae import (MANIFEST, REFINER_DIR, VQVAE, Refiner, RefinerConfig, ResBlock, VectorQuantizer,
                           VQVAEConfig, bicubic, evaluate_refiner, load_refiner, refine, train_refiner, train_vqvae)

CODEBOOK = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])  # K = 4 codes, D = 2


def as_latents(vectors: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(h*w, D) vectors -> z_e (1, D, h, w), vector i at row i // w, column i % w."""
    return vectors.view(1, h, w, -1).permute(0, 3, 1, 2).contiguous()


def hand_vq(**kwargs) -> VectorQuantizer:
    vq = VectorQuantizer(4, 2, **kwargs)
    vq.reset_codebook(CODEBOOK)
    return vq


def random_text(batch: int, dim: int = 32, seed: int = 0) -> TextEncoding:
    g = torch.Generator().manual_seed(seed)
    return TextEncoding(torch.randn(batch, 5, dim, generator=g), torch.ones(batch, 5, dtype=torch.bool),
                        torch.randn(batch, dim, generator=g))


def tiny_refiner(seed: int = 0, **overrides) -> Refiner:
    torch.manual_seed(seed)
    return Refiner(RefinerConfig.preset("quick", text_dim=32, **overrides))  # tiny-bert-sized text vectors


def real_images(n: int, split: str = "train", seed: int = 0) -> torch.Tensor:
    ds = ShapesDataset(n, split=split, seed=seed, cache=False)
    return torch.stack([ds[i]["image"] for i in range(n)])  # (n, 3, 64, 64)


# --- the quantiser, by hand ---------------------------------------------------------------------

def test_nearest_codes_and_losses_by_hand():
    vectors = torch.tensor([[0.1, -0.1], [0.9, 0.2], [0.2, 0.7], [-2.0, -0.5], [0.6, 0.45], [-0.4, -0.4]])
    expected = torch.tensor([0, 1, 2, 3, 1, 0])  # e.g. (0.6, 0.45): 0.3625 to (1, 0), 0.5625 to (0, 0)
    out = hand_vq().eval()(as_latents(vectors, 2, 3))
    assert out.indices.tolist() == [[[0, 1, 2], [3, 1, 0]]] and out.indices.dtype == torch.long
    assert torch.equal(out.z_q, as_latents(CODEBOOK[expected], 2, 3))  # forward: the codes themselves
    mse = (CODEBOOK[expected] - vectors).pow(2).mean()
    assert out.codebook_loss.item() == pytest.approx(mse.item())
    assert out.commit_loss.item() == pytest.approx(0.25 * mse.item())
    assert out.loss.item() == pytest.approx(1.25 * mse.item())  # codebook + beta * commitment
    ema = hand_vq(ema=True).eval()(as_latents(vectors, 2, 3))
    assert ema.loss.item() == pytest.approx(0.25 * mse.item())  # EMA: no codebook loss
    assert torch.equal(hand_vq().embed(out.indices), out.z_q)


def test_straight_through_gradient_reaches_the_encoder_unchanged():
    z_e = torch.randn(2, 2, 3, 3, requires_grad=True)
    out = hand_vq()(z_e)
    out.z_q.retain_grad()
    upstream = torch.randn_like(z_e)
    (out.z_q * upstream).sum().backward()  # any loss on z_q: d loss / d z_q = upstream
    assert torch.equal(out.z_q.grad, upstream) and torch.equal(z_e.grad, upstream)
    assert hand_vq().codebook.grad is None


def test_codebook_loss_moves_only_the_codebook_and_commitment_only_the_encoder():
    vq = hand_vq()
    z_e = torch.randn(2, 2, 3, 3, requires_grad=True)
    vq(z_e).codebook_loss.backward()
    assert vq.codebook.grad.abs().sum() > 0 and z_e.grad is None

    vq = hand_vq()
    z_e = torch.randn(2, 2, 3, 3, requires_grad=True)
    vq(z_e).commit_loss.backward()
    assert z_e.grad.abs().sum() > 0 and vq.codebook.grad is None

    ema = hand_vq(ema=True)
    assert list(ema.parameters()) == [] and "codebook" in dict(ema.named_buffers())  # not trained by gradients


def test_ema_moves_used_codes_toward_their_vectors_in_training_only():
    vectors = torch.tensor([[1.5, 0.2], [1.7, -0.2], [0.1, 1.3], [0.0, 0.9]])  # two to (1, 0), two to (0, 1)
    z_e = as_latents(vectors, 2, 2)
    vq = hand_vq(ema=True, decay=0.5)
    vq.eval()(z_e)
    assert torch.equal(vq.codebook, CODEBOOK) and torch.equal(vq.cluster_size, torch.ones(4))  # eval: untouched
    vq.train()(z_e)
    # cluster_size = 0.5 * 1 + 0.5 * 2, embed_sum = 0.5 * e + 0.5 * (sum of its vectors): e' = (e + sum) / 3
    assert torch.allclose(vq.codebook[1], torch.tensor([4.2, 0.0]) / 3, atol=1e-4)
    assert torch.allclose(vq.codebook[2], torch.tensor([0.1, 3.2]) / 3, atol=1e-4)
    assert torch.allclose(vq.codebook[[0, 3]], CODEBOOK[[0, 3]], atol=1e-4)  # unused codes stay
    for k, assigned in ((1, vectors[:2]), (2, vectors[2:])):
        before = (CODEBOOK[k] - assigned.mean(0)).norm()
        assert (vq.codebook[k] - assigned.mean(0)).norm() < before


def restartable(codes: torch.Tensor, sizes: torch.Tensor, ema: bool) -> VectorQuantizer:
    """A quantiser with restarts, the given codes and usage EMA (and a consistent EMA sum)."""
    vq = VectorQuantizer(len(codes), codes.shape[1], ema=ema, restart_dead=True, dead_threshold=1.0)
    vq.reset_codebook(codes)
    with torch.no_grad():
        vq.cluster_size.copy_(sizes)
        if ema:
            vq.embed_sum.copy_(codes * sizes[:, None])
    return vq


@pytest.mark.parametrize("ema", [False, True])
def test_dead_code_restart_touches_only_unused_codes(ema):
    codes = torch.arange(16.0).view(8, 2)  # codes far apart: (0, 1), (2, 3), ..., (14, 15)
    sizes = torch.tensor([9.0, 9.0, 9.0, 9.0, 0.1, 0.1, 0.1, 0.1])  # usage EMA: codes 4..7 below the threshold
    vq = restartable(codes, sizes, ema)
    vectors = codes[[0, 0, 1, 5, 5, 1]] + 0.01 * torch.arange(1.0, 7.0)[:, None]  # uses codes 0, 1 and (dead-looking) 5
    z_e = as_latents(vectors, 2, 3)
    vq.eval()(z_e)
    assert torch.equal(vq.codebook, codes)  # eval: no restarts

    vq.train()(z_e, rng=torch.Generator().manual_seed(0))
    restarted = [4, 6, 7]  # dead and unused in this batch; 5 was used, 2 and 3 are alive
    kept = [0, 1, 2, 3, 5] if not ema else [2, 3]  # (EMA moves the used codes 0, 1, 5 toward their vectors)
    assert torch.allclose(vq.codebook[kept], codes[kept])
    for k in restarted:
        assert (vq.codebook[k] - vectors).norm(dim=1).min() < 1e-6  # now one of the batch's encoder outputs
    assert torch.equal(vq.cluster_size[restarted], torch.ones(3))  # a fresh start at the threshold
    assert len({tuple(vq.codebook[k].tolist()) for k in restarted}) == 3  # distinct batch positions

    again = restartable(codes, sizes, ema)
    again.train()(z_e, rng=torch.Generator().manual_seed(0))
    assert torch.equal(again.codebook, vq.codebook)  # the rng decides which vectors: repeatable


def test_perplexity_and_usage_by_hand():
    vq = hand_vq().eval()
    one = vq(as_latents(CODEBOOK[[1] * 6], 2, 3))
    assert one.perplexity.item() == pytest.approx(1.0) and one.usage.item() == 0.25
    uniform = vq(as_latents(CODEBOOK[[0, 1, 2, 3] * 2], 2, 4))
    assert uniform.perplexity.item() == pytest.approx(4.0) and uniform.usage.item() == 1.0
    half = vq(as_latents(CODEBOOK[[0, 3] * 3], 2, 3))
    assert half.perplexity.item() == pytest.approx(2.0) and half.usage.item() == 0.5
    for out in (one, uniform, half):  # the metrics helpers agree with the quantiser
        assert codebook_perplexity(out.indices, 4) == pytest.approx(out.perplexity.item())
        assert codebook_usage(out.indices, 4) == out.usage.item()
    assert codebook_usage(torch.tensor([0, 0, 5]), 10) == pytest.approx(0.2)


def test_distances_are_float32_under_autocast():
    vq = VectorQuantizer(2, 2)
    vq.reset_codebook(torch.tensor([[100.0, 0.0], [100.0, 0.3]]))  # bfloat16 cannot tell these distances apart
    z_e = as_latents(torch.tensor([[100.0, 0.2], [100.0, 0.05]]), 1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq.eval()(z_e)
    assert out.indices.tolist() == [[[1, 0]]] and out.z_q.dtype == z_e.dtype


# --- the models ---------------------------------------------------------------------------------

def test_configs_presets_and_round_trip():
    for cls, model in ((VQVAEConfig, VQVAE), (RefinerConfig, Refiner)):
        sizes = [model(cls.preset(p, **({"text_cond": False} if cls is RefinerConfig else {}))).num_parameters()
                 for p in ("quick", "cpu", "gpu")]
        assert sizes[0] < 100_000 < sizes[1] < 500_000 < sizes[2], sizes
        cfg = cls.preset("cpu", num_codes=128)
        assert cls.from_dict(cfg.to_dict()) == cfg and cfg.num_codes == 128
        with pytest.raises(ValueError, match=f"unknown {cls.__name__} field"):
            cls.from_dict({**cfg.to_dict(), "codes": 1})
    assert VQVAEConfig().levels == 2 and RefinerConfig().levels == 1  # 16x16 and 32x32 latents
    with pytest.raises(ValueError, match="unknown preset"):
        RefinerConfig.preset("huge")
    with pytest.raises(ValueError, match="levels"):
        VQVAEConfig(levels=0)
    with pytest.raises(ValueError, match="upsample"):
        RefinerConfig(upsample="lanczos")


def test_vqvae_and_refiner_shapes():
    torch.manual_seed(0)
    vqvae = VQVAE(VQVAEConfig.preset("quick"))
    x_rec, vq = vqvae(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert x_rec.shape == (2, 3, 64, 64)  # unbounded, like the paper's (clamp to show it)
    assert vq.z_q.shape == (2, 16, 16, 16) and vq.indices.shape == (2, 16, 16)
    assert vq.loss.ndim == vq.perplexity.ndim == vq.usage.ndim == 0

    refiner = tiny_refiner()
    x_low = torch.rand(3, 3, 32, 32) * 2 - 1
    x_rec, vq = refiner(x_low, random_text(3))
    assert x_rec.shape == (3, 3, 64, 64) and x_rec.abs().max() <= 1
    assert vq.z_q.shape == (3, 16, 32, 32) and vq.indices.shape == (3, 32, 32)
    assert torch.allclose(x_rec, bicubic(x_low))  # the residual starts at zero: untrained = bicubic
    with pytest.raises(ValueError, match="expected"):
        refiner(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="pooled"):
        refiner(x_low, random_text(2))


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

def test_vqvae_overfits_one_batch():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig.preset("quick"))
    history = train_vqvae(model, real_images(16), steps=80, batch_size=16, lr=3e-3, progress=False, log_every=20)
    assert history["step"] == [0, 20, 40, 60, 79]
    assert history["recon"][-1] < history["recon"][0] / 8, history["recon"]
    assert all(0 < u <= 1 for u in history["usage"]) and history["seconds"] > 0


def test_refiner_overfits_one_batch_beyond_bicubic():
    x_real = real_images(8)
    bicubic_mse = (bicubic(torch.nn.functional.avg_pool2d(x_real, 2)) - x_real).pow(2).mean().item()
    refiner = tiny_refiner(text_cond=False)
    history = train_refiner(refiner, x_real, steps=150, batch_size=8, lr=3e-3, progress=False, log_every=149)
    assert history["recon"][0] == pytest.approx(bicubic_mse, rel=1e-4)  # it starts as bicubic ...
    assert history["recon"][-1] < 0.6 * bicubic_mse, (bicubic_mse, history["recon"])  # ... and learns the detail


def test_training_is_seeded_and_leaves_the_global_rng_alone(tiny_bert):
    data = ShapesDataset(40, split="train", seed=3)
    runs = []
    for _ in range(2):
        refiner = tiny_refiner(seed=1)
        state = torch.random.get_rng_state()
        runs.append(train_refiner(refiner, data, steps=4, batch_size=8, progress=False, log_every=1,
                                  encoder=tiny_bert))
        assert torch.equal(torch.random.get_rng_state(), state)
    assert {k: v for k, v in runs[0].items() if k != "seconds"} == {k: v for k, v in runs[1].items() if k != "seconds"}
    with pytest.raises(ValueError, match="encoder"):
        train_refiner(tiny_refiner(), data, steps=1, progress=False)
    with pytest.raises(TypeError, match="train_vqvae"):
        train_refiner(VQVAE(VQVAEConfig.preset("quick")), data, steps=1, progress=False)
    with pytest.raises(ValueError, match="recon_loss"):
        train_vqvae(VQVAE(VQVAEConfig.preset("quick")), data, steps=1, progress=False, recon_loss="l3")


# --- image metrics ------------------------------------------------------------------------------

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


# --- the committed refiner ----------------------------------------------------------------------

def test_committed_refiner_matches_its_manifest_and_loads_safely():
    recorded = json.loads(MANIFEST.read_text())
    for name in ("model.safetensors", "config.json"):
        assert recorded[f"refiner/{name}"] == sha256_file(REFINER_DIR / name)
    weights = (REFINER_DIR / "model.safetensors").read_bytes()
    header = int.from_bytes(weights[:8], "little")
    json.loads(weights[8:8 + header])  # a safetensors file: a JSON header and raw tensors, no pickle
    assert len(weights) < 5_000_000
    refiner = load_refiner()
    assert isinstance(refiner, Refiner) and not refiner.training
    facts = json.loads((REFINER_DIR / "config.json").read_text())
    assert facts["test"]["usage"] >= 0.9 and facts["test"]["psnr_refiner"] > facts["test"]["psnr_bicubic"]


def test_committed_refiner_beats_bicubic_on_real_test_images(minilm):
    refiner = load_refiner()
    facts = json.loads((REFINER_DIR / "config.json").read_text())
    encoder = minilm if facts["text_encoder"] == "minilm" else None
    scores = evaluate_refiner(refiner, 64, split="test", seed=1, encoder=encoder)
    assert scores["psnr_refiner"] > scores["psnr_bicubic"] + 3, scores
    assert scores["ssim_refiner"] > scores["ssim_bicubic"], scores


def test_a_tampered_refiner_is_refused(tmp_path):
    shutil.copytree(REFINER_DIR, tmp_path / "refiner")
    shutil.copy(MANIFEST, tmp_path / "MANIFEST.json")
    load_refiner(tmp_path / "refiner", tmp_path / "MANIFEST.json")  # the copy is fine
    weights = tmp_path / "refiner" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"refiner/model\.safetensors does not match"):
        load_refiner(tmp_path / "refiner", tmp_path / "MANIFEST.json")


def test_training_resumes_exactly_from_a_checkpoint(tmp_path, tiny_bert):
    """6 steps straight == 3 steps, an interruption, a fresh model, resume to 6 (checkpoint every 3)."""
    from textimg.data import ShapesDataset
    from textimg.vqvae import VQVAE_CHECKPOINT_NAME, train_refiner

    data = ShapesDataset(40, split="train")

    def fresh():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return Refiner(RefinerConfig.preset("quick", text_dim=tiny_bert.dim))

    straight = fresh()
    h1 = train_refiner(straight, data, steps=6, batch_size=8, encoder=tiny_bert, progress=False, log_every=1,
                       checkpoint_dir=tmp_path / "a", checkpoint_every=3)

    class Interrupting(torch.utils.data.Dataset):  # Ctrl-C while the 4th batch is being read
        def __init__(self):
            self.reads = 0

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            self.reads += 1
            if self.reads > 3 * 8:
                raise KeyboardInterrupt
            return data[i]

    with pytest.raises(KeyboardInterrupt):
        train_refiner(fresh(), Interrupting(), steps=6, batch_size=8, encoder=tiny_bert, progress=False,
                      log_every=1, checkpoint_dir=tmp_path / "b", checkpoint_every=3)
    assert (tmp_path / "b" / VQVAE_CHECKPOINT_NAME).is_file()
    torch.manual_seed(999)  # the global RNG plays no part
    resumed = fresh()
    h2 = train_refiner(resumed, data, steps=6, batch_size=8, encoder=tiny_bert, progress=False, log_every=1,
                       checkpoint_dir=tmp_path / "b", checkpoint_every=3)
    assert h2["step"] == h1["step"] == list(range(6)) and h2["recon"] == h1["recon"]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    with pytest.raises(ValueError, match="another run"):
        train_refiner(fresh(), data, steps=6, batch_size=4, encoder=tiny_bert, progress=False,
                      checkpoint_dir=tmp_path / "b")
