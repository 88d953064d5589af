"""Tests for textimg.vqvae: the quantiser on a hand-made codebook, its gradients, EMA updates and
restarts, the VQ-VAE's shapes on tiny configs, and train_vqvae (learning, seeding, exact resume).
The refiner built on it is tested in test_refiner.py."""

import pytest
import torch

from textimg.data import ShapesDataset
from textimg.metrics import codebook_perplexity, codebook_usage
from textimg.refiner import Refiner, RefinerConfig
from textimg.vqvae import VQVAE, VectorQuantizer, VQTrainConfig, VQVAEConfig, train_vqvae

CODEBOOK = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])  # K = 4 codes, D = 2


def as_latents(vectors: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(h*w, D) vectors -> z_e (1, D, h, w), vector i at row i // w, column i % w."""
    return vectors.view(1, h, w, -1).permute(0, 3, 1, 2).contiguous()


def hand_vq(**kwargs) -> VectorQuantizer:
    vq = VectorQuantizer(4, 2, **kwargs)
    vq.reset_codebook(CODEBOOK)
    return vq


def real_images(n: int, split: str = "train", seed: int = 0) -> torch.Tensor:
    ds = ShapesDataset(n, split=split, seed=seed, cache=False)
    return torch.stack([ds[i]["image"] for i in range(n)])  # (n, 3, 64, 64)


def tiny_vqvae(seed: int = 0) -> VQVAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VQVAE(VQVAEConfig.preset("quick"))


def without_seconds(history: dict) -> dict:
    return {k: v for k, v in history.items() if k != "seconds"}


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
    vectors = codes[[0, 0, 1, 5, 5, 1]] + 0.01 * torch.arange(1.0, 7.0)[:, None]  # uses 0, 1 and (dead-looking) 5
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


# --- the model and the configs ------------------------------------------------------------------

def test_configs_presets_and_round_trip():
    sizes = [VQVAE(VQVAEConfig.preset(p)).num_parameters() for p in ("quick", "cpu", "gpu")]
    assert sizes[0] < 100_000 < sizes[1] < 500_000 < sizes[2], sizes
    cfg = VQVAEConfig.preset("cpu", num_codes=128)
    assert VQVAEConfig.from_dict(cfg.to_dict()) == cfg and cfg.num_codes == 128
    with pytest.raises(ValueError, match="unknown VQVAEConfig field"):
        VQVAEConfig.from_dict({**cfg.to_dict(), "codes": 1})
    assert VQVAEConfig().levels == 2  # 16x16 latents
    with pytest.raises(ValueError, match="unknown preset"):
        VQVAEConfig.preset("huge")
    with pytest.raises(ValueError, match="levels"):
        VQVAEConfig(levels=0)
    with pytest.raises(ValueError, match="not divisible"):
        VQVAEConfig(image_size=36, levels=3)

    train = VQTrainConfig.preset("quick", lr=1e-3)
    assert train.batch_size == 8 and train.lr == 1e-3 and VQTrainConfig.from_dict(train.to_dict()) == train
    assert VQTrainConfig() == VQTrainConfig(batch_size=32, lr=2e-3, recon_loss="mse", text_dropout=0.1, seed=0)
    with pytest.raises(ValueError, match="recon_loss"):
        VQTrainConfig(recon_loss="l3")
    with pytest.raises(ValueError, match="unknown VQTrainConfig field"):  # the old loose keyword is no field
        VQTrainConfig.from_dict({"steps": 10})


def test_vqvae_shapes():
    vqvae = tiny_vqvae()
    x_rec, vq = vqvae(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert x_rec.shape == (2, 3, 64, 64)  # unbounded, like the paper's (clamp to show it)
    assert vq.z_q.shape == (2, 16, 16, 16) and vq.indices.shape == (2, 16, 16)
    assert vq.loss.ndim == vq.perplexity.ndim == vq.usage.ndim == 0
    assert vqvae.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 16, 16)
    assert vqvae.decode(vq.z_q).shape == (2, 3, 64, 64)
    x = torch.zeros(3, 3, 64, 64)
    (same,) = vqvae.training_inputs(x, None)  # a VQ-VAE reconstructs its input
    assert same is x


# --- training -----------------------------------------------------------------------------------

def test_vqvae_overfits_one_batch():
    model = tiny_vqvae()
    history = train_vqvae(model, real_images(16), VQTrainConfig(batch_size=16, lr=3e-3), steps=80, progress=False,
                          log_every=20)
    assert history["step"] == [0, 20, 40, 60, 79]
    assert set(history) == {"step", "loss", "recon", "vq_loss", "commit_loss", "codebook_loss", "perplexity",
                            "usage", "seconds"}
    assert history["recon"][-1] < history["recon"][0] / 8, history["recon"]
    assert all(0 < u <= 1 for u in history["usage"]) and history["seconds"] > 0


def test_train_vqvae_is_seeded_and_leaves_the_global_rng_alone():
    data = real_images(24, seed=3)
    runs = []
    for _ in range(2):
        state = torch.random.get_rng_state()
        runs.append(train_vqvae(tiny_vqvae(seed=1), data, VQTrainConfig.preset("quick", seed=5), steps=4,
                                progress=False, log_every=1))
        assert torch.equal(torch.random.get_rng_state(), state)
    assert without_seconds(runs[0]) == without_seconds(runs[1])
    other = train_vqvae(tiny_vqvae(seed=1), data, VQTrainConfig.preset("quick", seed=6), steps=4, progress=False,
                        log_every=1)  # another seed: another batch order
    assert without_seconds(other) != without_seconds(runs[0])
    with pytest.raises(TypeError):  # the loose keywords are gone: they live in VQTrainConfig
        train_vqvae(tiny_vqvae(), data, steps=1, progress=False, batch_size=8)


def test_training_resumes_exactly_from_a_checkpoint(tmp_path, tiny_bert):
    """6 steps straight == 3 steps, an interruption, a fresh model, resume to 6 (checkpoint every 3).
    A text-conditioned Refiner, so the text dropout and code restarts draw from the saved generator too."""
    data = ShapesDataset(40, split="train")
    cfg = VQTrainConfig(batch_size=8)

    def fresh():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return Refiner(RefinerConfig.preset("quick", text_dim=tiny_bert.dim))

    straight = fresh()
    h1 = train_vqvae(straight, data, cfg, steps=6, text_encoder=tiny_bert, progress=False, log_every=1,
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
        train_vqvae(fresh(), Interrupting(), cfg, steps=6, text_encoder=tiny_bert, progress=False,
                    log_every=1, checkpoint_dir=tmp_path / "b", checkpoint_every=3)
    assert (tmp_path / "b" / "vqvae_training.pt").is_file()
    torch.manual_seed(999)  # the global RNG plays no part
    resumed = fresh()
    h2 = train_vqvae(resumed, data, cfg, steps=6, text_encoder=tiny_bert, progress=False, log_every=1,
                     checkpoint_dir=tmp_path / "b", checkpoint_every=3)
    assert h2["step"] == h1["step"] == list(range(6)) and h2["recon"] == h1["recon"]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    with pytest.raises(ValueError, match=r"this run differs in \['train_config\.batch_size'\]"):
        train_vqvae(fresh(), data, VQTrainConfig(batch_size=4), steps=6, text_encoder=tiny_bert, progress=False,
                    checkpoint_dir=tmp_path / "b")
