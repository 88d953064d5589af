"""Tests for textimg.gan: losses on hand-computed logits, R1 on a hand-made D, DiffAugment, the
discriminators, mismatched captions, one-network steps, the non-finite guard, exact resume and
safe, atomic checkpoints, the refiner's fine-tuning. Also the diversity and sharpness metrics."""

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import textimg.utils
from textimg.data import ShapesDataset, parse_caption
from textimg.gan import (CHECKPOINT_NAME, BatchOrder, Discriminator, DiscriminatorConfig, GANTrainConfig,
                         NonFiniteLossError, PatchDiscriminator, PatchDiscriminatorConfig, apply_augment,
                         augment_params, d_loss_bce, d_loss_hinge, d_step, diff_augment, finetune_refiner,
                         g_loss_hinge, g_loss_nonsaturating, g_loss_saturating, g_step, mismatched_captions,
                         mismatched_indices, r1_penalty, train_gan)
from textimg.generator import Generator, GeneratorConfig
from textimg.metrics import Judge, JudgeConfig, diversity, judge_features, sharpness
from textimg.text import TextEncoding
from textimg.utils import load_checkpoint
from textimg.vqvae import Refiner, RefinerConfig

LOG2 = math.log(2.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two, and on a busy 2-core machine two
    OpenMP threads spin-wait for each other (100x slower in our runs). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
CAPTIONS = ["a small red circle in the top left", "a big blue square in the middle",
            "a tiny green star in the bottom right", "a large yellow triangle in the center"]


def tiny_g(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(GeneratorConfig.preset("quick", text_dim=32))  # tiny-bert's vectors are 32-d


def tiny_d(seed: int = 0, **overrides) -> Discriminator:
    torch.manual_seed(seed)
    return Discriminator(DiscriminatorConfig.preset("quick", text_dim=32, **overrides))


def random_text(batch: int, seed: int = 0) -> TextEncoding:
    g = torch.Generator().manual_seed(seed)
    return TextEncoding(torch.randn(batch, 5, 32, generator=g), torch.ones(batch, 5, dtype=torch.bool),
                        torch.randn(batch, 32, generator=g))


def images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def parameters(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- configs --------------------------------------------------------------------------------------

def test_configs_presets_and_round_trip():
    sizes = [Discriminator(DiscriminatorConfig.preset(p)).num_parameters() for p in ("quick", "cpu", "gpu")]
    assert sizes[0] < 100_000 < sizes[1] < 1_500_000 < sizes[2], sizes
    for cls in (DiscriminatorConfig, PatchDiscriminatorConfig, GANTrainConfig):
        cfg = cls.preset("cpu")
        assert cls.from_dict(cfg.to_dict()) == cfg
        with pytest.raises(ValueError, match=f"unknown {cls.__name__} field"):
            cls.from_dict({**cfg.to_dict(), "colour": 1})
        with pytest.raises(ValueError, match="unknown preset"):
            cls.preset("huge")
    assert DiscriminatorConfig.preset("cpu", spectral_norm=False).spectral_norm is False
    with pytest.raises(ValueError, match="d_loss"):
        GANTrainConfig(d_loss="wasserstein")
    with pytest.raises(ValueError, match="g_loss"):
        GANTrainConfig(g_loss="minimax")
    with pytest.raises(ValueError, match="cutout"):
        GANTrainConfig(augment="color,cutout")
    with pytest.raises(ValueError, match="image_size"):
        DiscriminatorConfig(image_size=64)


# --- losses, by hand ------------------------------------------------------------------------------

def test_bce_losses_on_zero_logits_are_log_2():
    zero = torch.zeros(4)
    assert d_loss_bce(zero, zero).item() == pytest.approx(2 * LOG2)  # -log(1/2) - log(1/2)
    assert d_loss_bce(zero, zero, zero).item() == pytest.approx(2 * LOG2)  # log 2 + (log 2 + log 2) / 2
    assert g_loss_nonsaturating(zero).item() == pytest.approx(LOG2)  # -log(1/2)
    assert g_loss_saturating(zero).item() == pytest.approx(-LOG2)  # log(1 - 1/2)


def test_bce_losses_match_the_log_formula_and_bce_with_logits():
    real, fake, wrong = torch.tensor([1.0, 2.0, -0.5]), torch.tensor([0.3, -1.0, -2.0]), torch.tensor([0.5, 1.5, 0.0])
    D = torch.sigmoid
    by_formula = -torch.log(D(real)).mean() - torch.log(1 - D(fake)).mean()
    by_bce = (F.binary_cross_entropy_with_logits(real, torch.ones(3))
              + F.binary_cross_entropy_with_logits(fake, torch.zeros(3)))
    assert d_loss_bce(real, fake).item() == pytest.approx(by_formula.item(), rel=1e-6)
    assert d_loss_bce(real, fake).item() == pytest.approx(by_bce.item(), rel=1e-6)
    cls = -torch.log(D(real)).mean() - 0.5 * (torch.log(1 - D(fake)).mean() + torch.log(1 - D(wrong)).mean())
    assert d_loss_bce(real, fake, wrong).item() == pytest.approx(cls.item(), rel=1e-6)  # Reed's 1/2 each
    assert g_loss_nonsaturating(fake).item() == pytest.approx(-torch.log(D(fake)).mean().item(), rel=1e-6)
    assert g_loss_saturating(fake).item() == pytest.approx(torch.log(1 - D(fake)).mean().item(), rel=1e-6)


def test_bce_losses_stay_finite_for_large_logits():
    big = torch.tensor([1000.0])
    assert d_loss_bce(big, -big).item() == pytest.approx(0.0, abs=1e-12)  # D right and sure: no loss
    assert d_loss_bce(-big, big).item() == pytest.approx(2000.0)  # D wrong and sure: large, not inf
    assert g_loss_nonsaturating(-big).item() == pytest.approx(1000.0)
    assert math.isinf(-torch.log(torch.sigmoid(-big)).item())  # the naive formula is not finite
    half = torch.tensor([20.0], dtype=torch.float16)
    assert d_loss_bce(half, -half).dtype == torch.float32  # computed in float32


def test_saturating_loss_gradient_vanishes_when_d_is_confident():
    """D(G(z)) = sigmoid(-10) ~ 4.5e-5: the minimax loss gives G almost no gradient, the non-saturating one ~1."""
    grads = {}
    for name, fn in (("saturating", g_loss_saturating), ("nonsaturating", g_loss_nonsaturating)):
        logit = torch.tensor([-10.0], requires_grad=True)
        fn(logit).backward()
        grads[name] = logit.grad.item()
    assert abs(grads["saturating"]) == pytest.approx(torch.sigmoid(torch.tensor(-10.0)).item(), rel=1e-4)
    assert abs(grads["saturating"]) < 1e-4 and abs(grads["nonsaturating"]) > 0.99
    assert grads["saturating"] < 0 and grads["nonsaturating"] < 0  # both push the logit up (toward "real")


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1
    assert d_loss_hinge(real, fake).item() == pytest.approx(5 / 6 + 1)
    assert d_loss_hinge(real, fake, torch.tensor([-3.0, 0.0, 0.0])).item() == pytest.approx(5 / 6 + 0.5 * (1 + 2 / 3))
    assert g_loss_hinge(fake).item() == pytest.approx(1 / 3)


def test_r1_penalty_on_a_linear_discriminator():
    """D(x) = <w, x>: grad_x D = w for every image, so R1 = gamma / 2 * ||w||^2, and d R1 / d w = gamma * w."""
    w = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (x * w).sum(dim=(1, 2, 3))  # (5,)
    penalty = r1_penalty(logits, x, gamma=10.0)
    assert penalty.item() == pytest.approx(5.0 * w.pow(2).sum().item(), rel=1e-5)
    penalty.backward()  # create_graph: the penalty trains D's weights
    torch.testing.assert_close(w.grad, 10.0 * w.detach())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert r1_penalty((x * w).sum(dim=(1, 2, 3)), x, 10.0, scaler).item() == pytest.approx(penalty.item())


# --- DiffAugment ----------------------------------------------------------------------------------

def test_diff_augment_shape_seed_and_gradient():
    x = images(4).requires_grad_(True)
    a = diff_augment(x, "color,translation", torch.Generator().manual_seed(0))
    assert a.shape == x.shape
    assert torch.equal(a, diff_augment(x, "color,translation", torch.Generator().manual_seed(0)))
    assert not torch.equal(a, diff_augment(x, "color,translation", torch.Generator().manual_seed(1)))
    a.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable: G's gradient passes through
    assert diff_augment(x, "") is x
    state = torch.get_rng_state()
    diff_augment(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # an explicit generator: the global RNG is untouched
    with pytest.raises(ValueError, match="unknown augmentation"):
        diff_augment(x, "flip")


def test_translation_and_colour_by_hand_and_the_same_params_for_a_pair():
    x = -torch.ones(2, 3, 32, 32)
    x[:, :, 10, 20] = 1.0  # one bright pixel on the dark background
    params = {"shift": torch.tensor([[2, -3], [-4, 4]])}
    moved = apply_augment(x, params)
    assert moved[0, :, 12, 17].eq(1).all() and moved[1, :, 6, 24].eq(1).all()
    assert moved.eq(1).sum() == 2 * 3  # the pixel moved, nothing else appeared (replicated dark border)
    bright = apply_augment(x, {"brightness": torch.tensor([0.25, -0.5]).view(2, 1, 1, 1)})
    torch.testing.assert_close(bright, x + torch.tensor([0.25, -0.5]).view(2, 1, 1, 1))
    p = augment_params(x, "color,translation", torch.Generator().manual_seed(3))
    assert set(p) == {"brightness", "saturation", "contrast", "shift"} and p["shift"].abs().max() <= 4
    x_real, x_fake = images(2, seed=1), images(2, seed=2)
    both = apply_augment(torch.cat([x_real, x_fake]), {k: torch.cat([v, v]) for k, v in p.items()})
    assert torch.equal(apply_augment(x_real, p), both[:2]) and torch.equal(apply_augment(x_fake, p), both[2:])


# --- the discriminators ---------------------------------------------------------------------------

def test_projection_discriminator_shapes_and_text_by_hand():
    d = tiny_d().eval()
    x, text = images(3), random_text(3)
    logits = d(x, text)
    assert logits.shape == (3,)
    h = d.features(x)
    assert h.shape == (3, 32)
    zero = d(x, torch.zeros(3, 32))  # a zero caption vector: psi(phi(x)) alone
    torch.testing.assert_close(logits - zero, (d.embed(text.pooled) * h).sum(1))  # + <W c, phi(x)>
    assert (d(x, random_text(3, seed=1)) - logits).abs().min() > 1e-4  # the text changes every logit
    assert torch.equal(d(x, text), d(x, text.pooled))  # a TextEncoding or its pooled vector


def test_patch_discriminator_shapes():
    x = images(2, size=64)
    assert PatchDiscriminator(PatchDiscriminatorConfig.preset("cpu"))(x).shape == (2, 1, 6, 6)
    assert PatchDiscriminator(PatchDiscriminatorConfig.preset("quick"))(x).shape == (2, 1, 14, 14)


@pytest.mark.parametrize("kind", ["projection", "patch"])
def test_spectral_norm_option(kind):
    from torch.nn.utils import parametrize

    def make(sn):
        torch.manual_seed(0)
        if kind == "projection":
            return tiny_d(spectral_norm=sn), lambda m: m(images(2), random_text(2))
        return PatchDiscriminator(PatchDiscriminatorConfig.preset("quick", spectral_norm=sn)), lambda m: m(images(2, 64))

    plain, _ = make(False)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    d, call = make(True)
    convs = [m for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert convs and all(parametrize.is_parametrized(m, "weight") for m in convs)
    for _ in range(30):  # the power iteration converges over training-mode forwards
        call(d.train())
    for m in convs:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.02)


# --- mismatched captions --------------------------------------------------------------------------

def test_mismatched_captions_never_match_and_cover_the_candidates():
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n_distinct = 2 + trial % 3
        batch = [CAPTIONS[int(i)] for i in torch.randint(n_distinct, (8,), generator=g)]
        if len(set(batch)) < 2:
            continue
        wrong = mismatched_captions(batch, g)
        assert all(w != c for w, c in zip(wrong, batch))
        idx = mismatched_indices(batch, g)
        assert idx.shape == (8,) and all(batch[j] != batch[i] for i, j in enumerate(idx.tolist()))
    batch = [CAPTIONS[0], CAPTIONS[0], CAPTIONS[1], CAPTIONS[2]]
    picks = {tuple(mismatched_indices(batch, g).tolist()) for _ in range(200)}
    assert {p[0] for p in picks} == {2, 3} and {p[2] for p in picks} == {0, 1, 3}  # every candidate, in time
    assert torch.equal(mismatched_indices(batch, torch.Generator().manual_seed(5)),
                       mismatched_indices(batch, torch.Generator().manual_seed(5)))  # seeded


def test_mismatch_by_labels_skips_synonyms_and_all_equal_is_an_error():
    captions = ["a big red star", "a large red star", "a big blue star"]
    labels = [{"color": 0, "shape": 4}, {"color": 0, "shape": 4}, {"color": 1, "shape": 4}]
    for seed in range(20):
        idx = mismatched_indices(labels, torch.Generator().manual_seed(seed)).tolist()
        assert idx[0] == 2 and idx[1] == 2 and idx[2] in (0, 1)  # the synonym is not a mismatch
    with pytest.raises(ValueError, match="all 3 captions of the batch are the same"):
        mismatched_captions([CAPTIONS[0]] * 3)
    with pytest.raises(ValueError, match="the same"):
        mismatched_indices(labels[:2])


# --- one step for one network ---------------------------------------------------------------------

def test_d_step_changes_only_d_and_g_step_only_g(tiny_bert):
    g, d = tiny_g(), tiny_d()
    g_opt, d_opt = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    text = tiny_bert.encode(CAPTIONS)
    x_real, z = images(4), torch.randn(4, 16)
    x_fake = g(z, text)  # with a graph: d_step must detach it
    g_before, d_before = snapshot(g), snapshot(d)
    stats = d_step(d, d_opt, x_real, x_fake, text, text.pooled[[1, 2, 3, 0]], r1_gamma=1.0,
                   augment="color,translation", rng=torch.Generator().manual_seed(0))
    assert set(stats) == {"d_loss", "d_adv", "r1", "d_aux", "d_real", "d_fake", "d_wrong"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())
    assert same(snapshot(g), g_before) and all(p.grad is None for p in g.parameters())
    assert not same(snapshot(d), d_before)

    d_before, d_grads = snapshot(d), [p.grad.clone() for p in d.parameters()]
    stats = g_step(g, d, g_opt, z, text, augment="color,translation", rng=torch.Generator().manual_seed(1))
    assert set(stats) == {"g_loss", "g_adv", "g_aux", "kl", "d_fake_g"}
    assert same(snapshot(d), d_before)  # parameters *and* spectral norm's u, v buffers
    assert all(torch.equal(p.grad, grad) for p, grad in zip(d.parameters(), d_grads))  # no gradient added to D
    assert all(p.requires_grad for p in d.parameters())
    assert d.training and not same(snapshot(g), g_before)


def test_d_step_learns_to_tell_real_from_fake():
    d = tiny_d()
    opt = torch.optim.Adam(d.parameters(), 2e-3)
    x_real, x_fake, text = images(8).clamp(0, 1), images(8, seed=1).clamp(-1, 0), random_text(8)
    first = d_step(d, opt, x_real, x_fake, text)
    for step in range(30):
        last = d_step(d, opt, x_real, x_fake, text, step=step)
    assert last["d_loss"] < 0.3 * first["d_loss"] and last["d_real"] > 0.8 > 0.2 > last["d_fake"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_steps_under_autocast_with_a_shared_grad_scaler(dtype):
    """The mixed-precision path (CUDA's, run here on the CPU): bf16 needs no scaler; fp16 shares one
    enabled GradScaler between both steps, which skips a step whose scaled gradients overflow."""
    g, d = tiny_g(), tiny_d()
    g_opt, d_opt = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    text, z = random_text(4), torch.randn(4, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        x_fake = g(z, text)
    assert x_fake.dtype == dtype
    g_before, d_before = parameters(g), parameters(d)
    d_stats = d_step(d, d_opt, images(4), x_fake, text, text.pooled[[1, 2, 3, 0]], r1_gamma=1.0,
                     scaler=scaler, amp_dtype=dtype)
    g_stats = g_step(g, d, g_opt, z, text, scaler=scaler, amp_dtype=dtype)
    assert math.isfinite(d_stats["d_adv"]) and math.isfinite(g_stats["g_loss"])
    assert not same(parameters(g), g_before)
    if dtype == torch.bfloat16:
        assert math.isfinite(d_stats["r1"]) and not same(parameters(d), d_before)
    else:  # R1's gradient, scaled by 2^16, overflows float16 at first: the step is skipped, the scale halved
        assert scaler.get_scale() < 2.0 ** 16


class NaNDiscriminator(Discriminator):
    def project(self, h, text):
        return super().project(h, text) * float("nan")


def test_non_finite_losses_raise_before_any_update():
    d = NaNDiscriminator(DiscriminatorConfig.preset("quick", text_dim=32))
    d_opt = torch.optim.Adam(d.parameters(), 1e-3)
    before = parameters(d)
    with pytest.raises(NonFiniteLossError, match="step 7: d_loss is nan"):
        d_step(d, d_opt, images(2), images(2, seed=1), random_text(2), step=7)
    assert same(parameters(d), before) and d_opt.state == {}  # (the forward's power iteration moved u, v)

    g, d = tiny_g(), tiny_d()
    g_opt = torch.optim.Adam(g.parameters(), 1e-3)
    before = snapshot(g)
    with pytest.raises(NonFiniteLossError, match="step 3: g_loss is inf"):
        g_step(g, d, g_opt, torch.randn(2, 16), random_text(2), kl_weight=float("inf"), step=3)
    assert same(snapshot(g), before) and g_opt.state == {}
    assert issubclass(NonFiniteLossError, FloatingPointError)


# --- train_gan: exact resume, safe and atomic checkpoints ------------------------------------------

@pytest.fixture(scope="module")
def shapes32():
    return ShapesDataset(40, image_size=32)


CFG = GANTrainConfig.preset("quick", batch_size=8, r1_gamma=0.1)


def run(tiny_bert, data, steps, seed=0, **kwargs):
    g, d = tiny_g(seed), tiny_d(seed)  # (seeds the global RNG)
    history = train_gan(g, d, tiny_bert, data, CFG, steps=steps, progress=False, log_every=1, **kwargs)
    return g, d, history


def test_train_gan_history_and_the_global_rng(tiny_bert, shapes32):
    g, d = tiny_g(), tiny_d()
    state = torch.get_rng_state()
    h = train_gan(g, d, tiny_bert, shapes32, CFG, steps=3, progress=False, log_every=1)
    assert torch.equal(torch.get_rng_state(), state)  # every draw comes from train_gan's own generators
    assert h["step"] == [0, 1, 2] and h["seconds"] > 0
    assert all(len(h[k]) == 3 for k in ("d_loss", "g_loss", "d_real", "d_fake", "d_wrong", "r1", "kl"))
    assert all(0 < v < 1 for v in h["d_wrong"])


def test_resume_is_bit_exact(tiny_bert, shapes32, tmp_path):
    g_a, d_a, h_a = run(tiny_bert, shapes32, 6, checkpoint_dir=tmp_path / "a", checkpoint_every=100)
    run(tiny_bert, shapes32, 3, checkpoint_dir=tmp_path / "b", checkpoint_every=3)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)["step"] == 3

    torch.manual_seed(12345)  # clobber every global RNG, and start from other weights
    random.seed(12345)
    np.random.seed(12345)
    g_b, d_b, h_b = run(tiny_bert, shapes32, 6, seed=99, checkpoint_dir=tmp_path / "b", resume=True)

    assert same(snapshot(g_b), snapshot(g_a)) and same(snapshot(d_b), snapshot(d_a))
    assert {k: v for k, v in h_b.items() if k != "seconds"} == {k: v for k, v in h_a.items() if k != "seconds"}
    a, b = (load_checkpoint(tmp_path / run_ / CHECKPOINT_NAME) for run_ in ("a", "b"))
    assert a["step"] == b["step"] == 6

    def assert_equal(x, y, where):
        if isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                assert_equal(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                assert_equal(u, v, f"{where}[{i}]")
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), where
        else:
            assert x == y, where

    for key in ("g_opt", "d_opt", "data", "rng", "generator", "discriminator"):
        assert_equal(a[key], b[key], key)  # optimiser state, the data order, the RNG states
    next_a, next_b = BatchOrder(40, 8), BatchOrder(40, 8)
    next_a.load_state_dict(a["data"])
    next_b.load_state_dict(b["data"])
    assert torch.equal(next_a.next(), next_b.next())  # the next batch is the same

    with pytest.raises(ValueError, match="differs in"):  # a changed config is refused
        train_gan(tiny_g(), tiny_d(), tiny_bert, shapes32, GANTrainConfig.preset("quick", batch_size=4),
                  steps=7, checkpoint_dir=tmp_path / "b", progress=False)


def test_a_failed_write_leaves_the_last_checkpoint_intact(tiny_bert, shapes32, tmp_path, monkeypatch):
    run(tiny_bert, shapes32, 2, checkpoint_dir=tmp_path, checkpoint_every=1)
    path = tmp_path / CHECKPOINT_NAME
    good = path.read_bytes()
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):  # writes half a checkpoint, then the disk "fills up"
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(len(good) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(textimg.utils.torch, "save", half_save)
    with pytest.raises(OSError, match="No space"):
        run(tiny_bert, shapes32, 3, checkpoint_dir=tmp_path, checkpoint_every=1)
    monkeypatch.undo()
    assert path.read_bytes() == good and load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temporary file left


def test_a_non_finite_step_writes_no_checkpoint(tiny_bert, shapes32, tmp_path):
    run(tiny_bert, shapes32, 2, checkpoint_dir=tmp_path, checkpoint_every=1)
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()
    torch.manual_seed(0)
    poisoned = NaNDiscriminator(DiscriminatorConfig.preset("quick", text_dim=32))
    with pytest.raises(NonFiniteLossError, match="step 0: d_loss"):
        train_gan(tiny_g(), poisoned, tiny_bert, shapes32, CFG, steps=4, checkpoint_dir=tmp_path,
                  checkpoint_every=1, resume=False, progress=False)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == good


class Payload:
    ran = False

    def __reduce__(self):
        return (Payload.run, ())

    @staticmethod
    def run():
        Payload.ran = True
        return "pwned"


def test_loading_refuses_pickled_objects(tiny_bert, shapes32, tmp_path, monkeypatch):
    torch.save({"format": "textimg.gan_training/1", "step": 1, "payload": Payload()}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="could not be read"):
        run(tiny_bert, shapes32, 2, checkpoint_dir=tmp_path)
    assert not Payload.ran  # weights_only=True: the pickle's code never ran

    calls = []
    real_load = torch.load
    monkeypatch.setattr(textimg.utils.torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    (tmp_path / CHECKPOINT_NAME).unlink()
    run(tiny_bert, shapes32, 1, checkpoint_dir=tmp_path)
    run(tiny_bert, shapes32, 2, checkpoint_dir=tmp_path)  # resumes
    assert calls and all(kw.get("weights_only") is True for kw in calls)


# --- the refiner's adversarial fine-tuning ---------------------------------------------------------

def test_finetune_refiner_runs_and_changes_the_refiner(tiny_bert):
    torch.manual_seed(0)
    refiner = Refiner(RefinerConfig.preset("quick", text_dim=32))
    patch_d = PatchDiscriminator(PatchDiscriminatorConfig.preset("quick", spectral_norm=True))
    before = snapshot(refiner)
    state = torch.get_rng_state()
    h = finetune_refiner(refiner, patch_d, ShapesDataset(16), tiny_bert, steps=3, batch_size=4, adaptive=True,
                         r1_gamma=0.1, progress=False, log_every=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert h["step"] == [0, 1, 2] and all(math.isfinite(v) for k in ("recon", "r_adv", "d_loss") for v in h[k])
    assert all(v > 0 for v in h["adv_weight"])
    assert not same(snapshot(refiner), before)
    with pytest.raises(ValueError, match="encoder"):
        finetune_refiner(refiner, patch_d, ShapesDataset(4), None, steps=1, progress=False)


# --- metrics: diversity and sharpness -------------------------------------------------------------

def test_diversity_is_zero_for_copies_and_positive_otherwise():
    torch.manual_seed(0)
    judge = Judge(JudgeConfig.preset("quick")).train()
    one = images(1, seed=0).expand(5, -1, -1, -1)
    assert judge_features(judge, one).shape == (5, 128) and judge.training  # mode restored
    assert diversity(judge, one) == pytest.approx(0.0, abs=1e-5)  # a collapsed generator
    different = images(5, seed=1)
    assert diversity(judge, different) > 1e-3
    f = judge_features(judge, different[:2])
    assert diversity(judge, different[:2]) == pytest.approx((f[0] - f[1]).norm().item(), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        diversity(judge, different[:1])


def test_sharpness_prefers_a_sharp_edge_to_its_blur():
    sharp = -torch.ones(1, 3, 32, 32)
    sharp[..., 16:] = 1.0  # a vertical edge
    kernel = torch.ones(3, 1, 5, 5) / 25
    blurred = F.conv2d(F.pad(sharp, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
    assert sharpness(sharp) > 5 * sharpness(blurred) > 0
    assert sharpness(-torch.ones(2, 3, 16, 16)) == 0.0  # a flat image


# --- the AC-GAN head ------------------------------------------------------------------------------

def test_classify_loss_by_hand_and_its_errors():
    d = tiny_d(num_classes=[3, 2]).eval()  # a JSON list becomes a tuple; eval: spectral norm holds still
    assert d.cfg.num_classes == (3, 2)
    assert DiscriminatorConfig.from_dict(d.cfg.to_dict()) == d.cfg
    h = torch.randn(5, d.cfg.feature_dim)
    labels = torch.tensor([[0, 1], [2, 0], [1, 1], [0, 0], [2, 1]])
    logits = d.classifier(h)  # (5, 3 + 2)
    expected = (torch.nn.functional.cross_entropy(logits[:, :3], labels[:, 0])
                + torch.nn.functional.cross_entropy(logits[:, 3:], labels[:, 1])) / 2
    assert torch.allclose(d.classify_loss(h, labels), expected)
    with pytest.raises(ValueError, match=r"labels must be \(B, 2\)"):
        d.classify_loss(h, labels[:, :1])
    with pytest.raises(ValueError, match="no classifier head"):
        tiny_d().classify_loss(h, labels)
    with pytest.raises(ValueError, match="at least 2 classes"):
        tiny_d(num_classes=(3, 1))


def test_aux_loss_trains_the_head_in_d_step_and_only_g_in_g_step(tiny_bert):
    g, d = tiny_g(), tiny_d(num_classes=(6, 8, 2, 9))
    g_opt, d_opt = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    text, z = tiny_bert.encode(CAPTIONS), torch.randn(4, 16)
    labels = torch.tensor([list(parse_caption(c).values()) for c in CAPTIONS])  # (4, 4)
    head = d.classifier.weight.detach().clone() if hasattr(d.classifier, "weight") else None
    stats = d_step(d, d_opt, images(4), g(z, text), text, labels=labels)
    assert stats["d_aux"] > 0 and not torch.equal(d.classifier.weight.detach(), head)
    without = d_step(tiny_d(num_classes=(6, 8, 2, 9)), torch.optim.Adam(d.parameters()), images(4), g(z, text), text)
    assert without["d_aux"] == 0
    d_before = snapshot(d)
    stats = g_step(g, d, g_opt, z, text, labels=labels)
    assert stats["g_aux"] > 0 and same(snapshot(d), d_before)


def test_train_gan_with_the_aux_head(tiny_bert, shapes32):
    g, d = tiny_g(), tiny_d(num_classes=tuple(len(v) for v in ShapesDataset.ATTRIBUTES.values()))
    h = train_gan(g, d, tiny_bert, shapes32, CFG, steps=2, progress=False, log_every=1)
    assert all(v > 0 for v in h["d_aux"] + h["g_aux"])
    captions_only = [{"image": shapes32[i]["image"], "caption": shapes32[i]["caption"]} for i in range(8)]
    with pytest.raises(ValueError, match="'labels' dict"):
        train_gan(tiny_g(), tiny_d(num_classes=(6, 8, 2, 9)), tiny_bert, captions_only, CFG, steps=1, progress=False)


# --- measuring a generator, and the committed checkpoints -----------------------------------------

def test_save_and_load_generator_round_trip_and_hash(tmp_path):
    from textimg.gan import load_generator, save_generator
    from textimg.utils import ChecksumError

    g = tiny_g()
    directory = save_generator(g, tmp_path / "ckpt" / "gen", {"steps": 3}, tmp_path / "ckpt" / "MANIFEST.json")
    loaded = load_generator(directory, tmp_path / "ckpt" / "MANIFEST.json")
    assert same(snapshot(loaded), snapshot(g)) and not loaded.training
    z, text = torch.randn(2, 16), random_text(2)
    assert torch.equal(loaded(z, text), g.eval()(z, text))
    save_generator(tiny_g(seed=1), directory, manifest=None)  # replaced behind the manifest's back
    with pytest.raises(ChecksumError, match=r"model\.safetensors"):
        load_generator(directory, tmp_path / "ckpt" / "MANIFEST.json")


def test_evaluate_generator_scores_with_the_judge(tiny_bert):
    from textimg.gan import evaluate_generator
    from textimg.metrics import load_judge

    judge = load_judge()
    s = evaluate_generator(tiny_g(), tiny_bert, judge, num_samples=8, diversity_captions=2, diversity_samples=3)
    assert set(s["accuracy"]) == {"shape", "color", "size", "position", "all"} and s["size"] == 32
    assert all(0 <= v <= 1 for v in s["accuracy"].values()) and s["diversity"] > 0 and s["sharpness"] > 0
    refiner = Refiner(RefinerConfig.preset("quick", text_dim=32))
    assert evaluate_generator(tiny_g(), tiny_bert, judge, num_samples=4, diversity_captions=1,
                              diversity_samples=2, refiner=refiner)["size"] == 64


@pytest.mark.parametrize("name", ["generator_gan", "refiner_gan"])
def test_committed_gan_checkpoints_load_and_match_the_manifest(name):
    from textimg.gan import GENERATOR_DIR, REFINER_GAN_DIR, load_generator
    from textimg.metrics import CHECKPOINTS, MANIFEST
    from textimg.utils import sha256_file
    from textimg.vqvae import load_refiner

    directory = {"generator_gan": GENERATOR_DIR, "refiner_gan": REFINER_GAN_DIR}[name]
    entries = json.loads(MANIFEST.read_text())
    for file in ("model.safetensors", "config.json"):
        assert entries[f"{name}/{file}"] == sha256_file(CHECKPOINTS / name / file)
    model = load_generator(directory) if name == "generator_gan" else load_refiner(directory)
    config = json.loads((directory / "config.json").read_text())
    assert config["training"]["function"].startswith("textimg.")  # how it was made, reproducibly
    assert config["training"]["steps"] > 0 and config["training"]["preset"] in ("cpu", "gpu")
    assert config["parameters"] == sum(p.numel() for p in model.parameters())


def test_an_unconditional_d_step_refuses_captions_and_labels():
    d = PatchDiscriminator(PatchDiscriminatorConfig.preset("quick"))
    opt = torch.optim.Adam(d.parameters())
    x = images(2, size=64)
    with pytest.raises(ValueError, match="need text"):
        d_step(d, opt, x, x, labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="need text"):
        d_step(d, opt, x, x, wrong_text=torch.zeros(2, 32))
