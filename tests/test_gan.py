"""Tests for textimg.gan: losses on hand-computed logits, the attribute loss, R1 on a hand-made D,
mismatched captions, one-network steps (plain, through an Accelerator, under bf16 autocast and with
an fp16 GradScaler), the non-finite guard, and train_gan: history, exact resume, safe and atomic
checkpoints, the attribute head."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import textimg.utils
from textimg.data import NUM_CLASSES, ShapesDataset, parse_caption
from textimg.discriminator import Discriminator, DiscriminatorConfig, PatchDiscriminator, PatchDiscriminatorConfig
from textimg.gan import (
    D_LOSSES,
    G_LOSSES,
    LOGGED,
    GANTrainConfig,
    attribute_labels,
    attribute_loss,
    d_loss_bce,
    d_loss_hinge,
    d_step,
    g_loss_hinge,
    g_loss_nonsaturating,
    g_loss_saturating,
    g_step,
    mismatched_captions,
    mismatched_indices,
    mode_seeking_loss,
    r1_penalty,
    train_gan,
)
from textimg.generator import Generator, GeneratorConfig
from textimg.training import BatchOrder, Engine, NonFiniteLossError, make_accelerator
from textimg.utils import load_checkpoint

from helpers import images, random_text, same, snapshot

LOG2 = math.log(2.0)
CHECKPOINT = "gan_training.pt"  # train_gan's file in its checkpoint folder


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
NO_AUGMENT = GANTrainConfig(augment="")  # what d_step / g_step use by default


def tiny_g(seed: int = 0, **overrides) -> Generator:
    torch.manual_seed(seed)
    return Generator(GeneratorConfig.preset("quick", text_dim=32, **overrides))  # tiny-bert's vectors are 32-d


def tiny_d(seed: int = 0, **overrides) -> Discriminator:
    torch.manual_seed(seed)
    return Discriminator(DiscriminatorConfig.preset("quick", text_dim=32, **overrides))





def parameters(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.named_parameters()}



def seeded_engine(seed: int, accelerator=None) -> Engine:
    return Engine(accelerator, torch.Generator().manual_seed(seed))


# --- the training config ----------------------------------------------------------------------------

def test_train_config_presets_round_trip_and_errors():
    cfg = GANTrainConfig.preset("cpu")
    assert GANTrainConfig.from_dict(cfg.to_dict()) == cfg
    assert [GANTrainConfig.preset(p).batch_size for p in ("quick", "cpu", "gpu")] == [16, 32, 64]
    with pytest.raises(ValueError, match="unknown GANTrainConfig field"):
        GANTrainConfig.from_dict({**cfg.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        GANTrainConfig.preset("huge")
    with pytest.raises(ValueError, match="d_loss"):
        GANTrainConfig(d_loss="wasserstein")
    with pytest.raises(ValueError, match="g_loss"):
        GANTrainConfig(g_loss="minimax")
    with pytest.raises(ValueError, match="cutout"):
        GANTrainConfig(augment="color,cutout")
    assert D_LOSSES == {"bce": d_loss_bce, "hinge": d_loss_hinge}
    assert G_LOSSES == {"nonsaturating": g_loss_nonsaturating, "saturating": g_loss_saturating, "hinge": g_loss_hinge}


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


def test_attribute_loss_by_hand_and_its_errors():
    d = tiny_d(num_classes=[3, 2]).eval()  # eval: spectral norm holds still
    x, text = images(5), random_text(5)
    labels = torch.tensor([[0, 1], [2, 0], [1, 1], [0, 0], [2, 1]])
    logits = d.classifier(d.features(x))  # (5, 3 + 2)
    expected = (F.cross_entropy(logits[:, :3], labels[:, 0]) + F.cross_entropy(logits[:, 3:], labels[:, 1])) / 2
    attributes = d(x, text).attributes
    torch.testing.assert_close(attribute_loss(attributes, labels), expected)
    perfect = (torch.tensor([[50.0, 0, 0]]), torch.tensor([[0, 50.0]]))  # sure and right: no loss
    assert attribute_loss(perfect, torch.tensor([[0, 1]])).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"labels must be \(B, 2\)"):
        attribute_loss(attributes, labels[:, :1])
    with pytest.raises(ValueError, match="no attribute head"):
        attribute_loss(tiny_d()(x, text).attributes, labels)


def test_attribute_labels_from_label_dicts():
    meanings = [{"shape": 1, "color": 2, "size": 0, "position": 8}, {"shape": 5, "color": 7, "size": 1, "position": 0}]
    labels = attribute_labels(meanings, NUM_CLASSES, torch.device("cpu"))
    assert labels.dtype == torch.long and labels.tolist() == [[1, 2, 0, 8], [5, 7, 1, 0]]
    assert attribute_labels(["a caption", "another"], (), torch.device("cpu")) is None  # no head: no labels
    with pytest.raises(ValueError, match="'labels' dict"):
        attribute_labels(["a big red star", "a small blue circle"], NUM_CLASSES, torch.device("cpu"))


# --- R1 ---------------------------------------------------------------------------------------------

def linear_d_logits(seed: int = 0):
    """D(x) = <w, x> on 5 images: grad_x D = w for every image."""
    w = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(seed + 1), requires_grad=True)
    return w, x, (x * w).sum(dim=(1, 2, 3))  # (5,)


def test_r1_penalty_on_a_linear_discriminator():
    """R1 = gamma / 2 * ||w||^2, and d R1 / d w = gamma * w."""
    w, x, logits = linear_d_logits()
    penalty = r1_penalty(logits, x, gamma=10.0)
    assert penalty.dtype == torch.float32 and penalty.ndim == 0
    assert penalty.item() == pytest.approx(5.0 * w.pow(2).sum().item(), rel=1e-5)
    penalty.backward()  # create_graph: the penalty trains D's weights
    torch.testing.assert_close(w.grad, 10.0 * w.detach())
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    assert r1_penalty((x * w).sum(dim=(1, 2, 3)), x, 10.0, disabled).item() == pytest.approx(penalty.item())


def test_r1_penalty_with_an_enabled_grad_scaler_gives_the_unscaled_value():
    """fp16's recipe: the logits are scaled (2^10) before differentiating and the gradient divided back,
    so the penalty, and its gradient for D, are the unscaled ones."""
    w, x, logits = linear_d_logits()
    plain = r1_penalty(logits, x, gamma=10.0)
    (plain_grad,) = torch.autograd.grad(plain, w)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 10
    w2, x2, logits2 = linear_d_logits()
    scaled = r1_penalty(logits2, x2, gamma=10.0, scaler=scaler)
    assert scaled.item() == pytest.approx(plain.item(), rel=1e-6)
    (scaled_grad,) = torch.autograd.grad(scaled, w2)
    torch.testing.assert_close(scaled_grad, plain_grad)
    # the scaler did scale: had the gradient not been divided back, R1 would be 2^20 times larger
    assert scaled.item() < 2.0 * plain.item() and scaler.get_scale() == 2.0 ** 10


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
        wrong = mismatched_captions(captions, torch.Generator().manual_seed(seed), keys=labels)
        assert wrong[:2] == [captions[2]] * 2 and wrong[2] in captions[:2]
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
    cfg = GANTrainConfig(r1_gamma=1.0, augment="color,translation")
    g_before, d_before = snapshot(g), parameters(d)
    state = torch.get_rng_state()
    stats = d_step(d, d_opt, x_real, x_fake, text, text.pooled[[1, 2, 3, 0]], cfg=cfg, engine=seeded_engine(0))
    assert set(stats) == {"d_loss", "d_adv", "r1", "d_aux", "d_real", "d_fake", "d_wrong"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())
    assert stats["r1"] > 0 and stats["d_aux"] == 0 and stats["d_loss"] == pytest.approx(stats["d_adv"] + stats["r1"])
    assert same(snapshot(g), g_before) and all(p.grad is None for p in g.parameters())
    assert not same(parameters(d), d_before)

    d_before, d_grads = snapshot(d), [p.grad.clone() for p in d.parameters()]
    stats = g_step(g, d, g_opt, z, text, cfg=cfg, engine=seeded_engine(1))
    assert set(stats) == {"g_loss", "g_adv", "g_aux", "kl", "ms", "d_fake_g"} and stats["ms"] == 0
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())
    assert same(snapshot(d), d_before)  # parameters *and* spectral norm's u, v buffers
    assert all(torch.equal(p.grad, grad) for p, grad in zip(d.parameters(), d_grads))  # no gradient added to D
    assert all(p.requires_grad for p in d.parameters())
    assert d.training and not same(snapshot(g), g_before)
    assert torch.equal(torch.get_rng_state(), state)  # every draw came from the engine's generator


def test_steps_are_seeded_by_the_engine(tiny_bert):
    """The augmentation (and conditioning augmentation's noise) come from ``engine.rng``: the same seed
    gives the same step, another seed another one."""
    text, x_fake = tiny_bert.encode(CAPTIONS), images(4, seed=1)
    cfg = GANTrainConfig(augment="color,translation")

    def d_run(seed):
        d = tiny_d()
        return d_step(d, torch.optim.Adam(d.parameters(), 1e-3), images(4), x_fake, text, text.pooled[[1, 2, 3, 0]],
                      cfg=cfg, engine=seeded_engine(seed)), snapshot(d)

    def g_run(seed):
        g, z = tiny_g(), torch.randn(4, 16, generator=torch.Generator().manual_seed(9))
        return g_step(g, tiny_d(), torch.optim.Adam(g.parameters(), 1e-3), z, text, cfg=cfg,
                      engine=seeded_engine(seed)), snapshot(g)

    for run_ in (d_run, g_run):
        (a, net_a), (b, net_b), (c, _) = run_(0), run_(0), run_(1)
        assert a == b and same(net_a, net_b)
        assert a != c


@pytest.mark.parametrize("d_loss, g_loss", [("bce", "nonsaturating"), ("hinge", "hinge"), ("bce", "saturating")])
def test_steps_use_the_losses_of_the_config(d_loss, g_loss):
    """d_adv and g_adv are the config's losses of D's logits before the step, worked out here by hand
    (no spectral norm, so the logits do not depend on how often D ran)."""
    cfg = GANTrainConfig(d_loss=d_loss, g_loss=g_loss, augment="", kl_weight=0.5)
    d = tiny_d(spectral_norm=False)
    x_real, x_fake, text, wrong = images(4), images(4, seed=1), random_text(4), random_text(4, seed=1)
    with torch.no_grad():
        real, fake = d(x_real, text, wrong), d(x_fake, text)
    stats = d_step(d, torch.optim.Adam(d.parameters(), 1e-3), x_real, x_fake, text, wrong, cfg=cfg)
    assert stats["d_adv"] == pytest.approx(D_LOSSES[d_loss](real.logits, fake.logits, real.wrong_logits).item(),
                                           rel=1e-5)
    assert stats["d_real"] == pytest.approx(torch.sigmoid(real.logits).mean().item(), rel=1e-5)
    assert stats["d_fake"] == pytest.approx(torch.sigmoid(fake.logits).mean().item(), rel=1e-5)
    assert stats["d_wrong"] == pytest.approx(torch.sigmoid(real.wrong_logits).mean().item(), rel=1e-5)
    assert stats["d_loss"] == stats["d_adv"] and stats["r1"] == 0  # r1_gamma = 0
    assert math.isnan(d_step(d, torch.optim.Adam(d.parameters()), x_real, x_fake, text, cfg=cfg)["d_wrong"])

    g, z = tiny_g(), torch.randn(4, 16)
    with torch.no_grad():  # G in training mode: conditioning augmentation draws from the engine's generator
        x, kl, _ = g.train()(z, text, rng=torch.Generator().manual_seed(2), return_aux=True)
        logits = d.eval()(x, text).logits
    stats = g_step(g, d.train(), torch.optim.Adam(g.parameters(), 1e-3), z, text, cfg=cfg, engine=seeded_engine(2))
    assert stats["g_adv"] == pytest.approx(G_LOSSES[g_loss](logits).item(), rel=1e-5)
    assert stats["kl"] == pytest.approx(kl.item(), rel=1e-5) and stats["kl"] > 0
    assert stats["g_loss"] == pytest.approx(stats["g_adv"] + 0.5 * stats["kl"], rel=1e-5)
    assert stats["d_fake_g"] == pytest.approx(torch.sigmoid(logits).mean().item(), rel=1e-5)


def test_d_step_learns_to_tell_real_from_fake():
    d = tiny_d()
    opt = torch.optim.Adam(d.parameters(), 2e-3)
    x_real, x_fake, text = images(8).clamp(0, 1), images(8, seed=1).clamp(-1, 0), random_text(8)
    first = d_step(d, opt, x_real, x_fake, text)
    engine = Engine()
    for step in range(30):
        engine.step = step
        last = d_step(d, opt, x_real, x_fake, text, cfg=NO_AUGMENT, engine=engine)
    assert last["d_loss"] < 0.3 * first["d_loss"] and last["d_real"] > 0.8 > 0.2 > last["d_fake"]


def test_steps_through_a_cpu_accelerator(tiny_bert):
    """What train_gan does: an Accelerator (no mixed precision on the CPU) in the Engine; d_step trains
    only D and g_step only G, through ``accelerator.backward``."""
    accelerator = make_accelerator("cpu", amp=False)
    assert accelerator.device.type == "cpu" and accelerator.mixed_precision == "no"
    g, d = tiny_g(), tiny_d(num_classes=NUM_CLASSES)
    G, D, g_opt, d_opt = accelerator.prepare(g, d, torch.optim.Adam(g.parameters(), 1e-3),
                                             torch.optim.Adam(d.parameters(), 1e-3))
    engine = seeded_engine(0, accelerator)
    assert engine.scaler is None  # float32: no GradScaler
    text, z = tiny_bert.encode(CAPTIONS), torch.randn(4, 16)
    labels = torch.tensor([list(parse_caption(c).values()) for c in CAPTIONS])  # (4, 4)
    cfg = GANTrainConfig(r1_gamma=1.0)  # the training default: DiffAugment "color,translation"
    with torch.no_grad(), engine.autocast():
        x_fake = G(z, text, rng=engine.rng)
    g_before, d_before = snapshot(g), parameters(d)
    d_stats = d_step(D, d_opt, images(4), x_fake, text, text.pooled[[1, 2, 3, 0]], labels, cfg, engine)
    assert all(math.isfinite(v) for v in d_stats.values()) and d_stats["r1"] > 0 and d_stats["d_aux"] > 0
    assert same(snapshot(g), g_before) and not same(parameters(d), d_before)
    d_before = snapshot(d)
    g_stats = g_step(G, D, g_opt, z, text, labels, cfg, engine)
    assert all(math.isfinite(v) for v in g_stats.values()) and g_stats["g_aux"] > 0
    assert same(snapshot(d), d_before) and not same(snapshot(g), g_before)


@pytest.fixture
def bf16_accelerator():
    """A real Accelerator with bf16 autocast on the CPU (make_accelerator uses mixed precision on CUDA
    only, so the test builds it itself). Accelerate keeps one state per process: reset before and after."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state(reset_partial_state=True)


def test_steps_under_bf16_autocast(bf16_accelerator):
    """The mixed-precision path without a scaler (bf16): both networks run in bf16 inside the steps,
    the losses are float32 and finite, and each step trains its own network."""
    engine = seeded_engine(0, bf16_accelerator)
    assert engine.scaler is None
    g, d = tiny_g(), tiny_d()
    g_opt, d_opt = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    dtypes = []
    d.convs[0].register_forward_hook(lambda m, i, o: dtypes.append(("D", o.dtype)))
    g.to_rgb.register_forward_hook(lambda m, i, o: dtypes.append(("G", o.dtype)))
    text, z = random_text(4), torch.randn(4, 16)
    with torch.no_grad(), engine.autocast():
        x_fake = g(z, text)
    assert x_fake.dtype == torch.bfloat16
    dtypes.clear()
    g_before, d_before = parameters(g), parameters(d)
    d_stats = d_step(d, d_opt, images(4), x_fake, text, text.pooled[[1, 2, 3, 0]], cfg=GANTrainConfig(r1_gamma=1.0),
                     engine=engine)
    assert dtypes == [("D", torch.bfloat16)] * 2  # the real and the fake batch
    assert all(math.isfinite(v) for v in d_stats.values()) and d_stats["r1"] > 0
    assert not same(parameters(d), d_before) and same(parameters(g), g_before)
    dtypes.clear()
    d_before = parameters(d)
    g_stats = g_step(g, d, g_opt, z, text, cfg=GANTrainConfig(), engine=engine)
    assert dtypes == [("G", torch.bfloat16), ("D", torch.bfloat16)]
    assert all(math.isfinite(v) for v in g_stats.values())
    assert not same(parameters(g), g_before) and same(parameters(d), d_before)


class Float16Accelerator:
    """What Accelerate does with fp16 on CUDA, here on the CPU (where Accelerate makes no GradScaler):
    fp16 autocast, a GradScaler that ``backward`` scales the loss with, and optimisers wrapped in
    Accelerate's AcceleratedOptimizer, which skips a step whose scaled gradients overflowed."""

    def __init__(self, init_scale: float):
        make_accelerator("cpu", amp=False)  # Accelerate's process state, which AcceleratedOptimizer reads
        self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)

    def unwrap_model(self, model):  # one process: nothing wraps the models
        return model

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.float16)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def optimizer(self, params):
        from accelerate.optimizer import AcceleratedOptimizer

        return AcceleratedOptimizer(torch.optim.Adam(params, 1e-3), scaler=self.scaler)


def test_steps_with_an_fp16_grad_scaler_shared_by_both_steps():
    """fp16 shares one GradScaler between both steps. R1's gradient, scaled by 2^16, overflows float16
    at first: d_step must not call that a non-finite loss (its guard is the adversarial loss), and the
    step is skipped and the scale halved; g_step then updates G at the lowered scale."""
    accelerator = Float16Accelerator(init_scale=2.0 ** 16)
    engine = seeded_engine(0, accelerator)
    assert engine.scaler is accelerator.scaler
    g, d = tiny_g(), tiny_d()
    g_opt, d_opt = accelerator.optimizer(g.parameters()), accelerator.optimizer(d.parameters())
    text, z = random_text(4), torch.randn(4, 16)
    with torch.no_grad(), engine.autocast():
        x_fake = g(z, text)
    assert x_fake.dtype == torch.float16
    g_before, d_before = parameters(g), parameters(d)
    d_stats = d_step(d, d_opt, images(4), x_fake, text, text.pooled[[1, 2, 3, 0]], cfg=GANTrainConfig(r1_gamma=1.0),
                     engine=engine)
    assert math.isfinite(d_stats["d_adv"]) and not math.isfinite(d_stats["r1"])
    assert d_opt.step_was_skipped and same(parameters(d), d_before) and accelerator.scaler.get_scale() == 2.0 ** 15
    g_stats = g_step(g, d, g_opt, z, text, cfg=GANTrainConfig(), engine=engine)
    assert all(math.isfinite(v) for v in g_stats.values())
    assert not g_opt.step_was_skipped and not same(parameters(g), g_before) and same(parameters(d), d_before)

    nan_d = NaNDiscriminator(DiscriminatorConfig.preset("quick", text_dim=32))  # a NaN adversarial loss still raises
    with pytest.raises(NonFiniteLossError, match="d_loss is nan"):
        d_step(nan_d, accelerator.optimizer(nan_d.parameters()), images(2), images(2, seed=1), random_text(2),
               engine=engine)


class NaNDiscriminator(Discriminator):
    def project(self, h, text):
        return super().project(h, text) * float("nan")


def test_non_finite_losses_raise_before_any_update():
    d = NaNDiscriminator(DiscriminatorConfig.preset("quick", text_dim=32))
    d_opt = torch.optim.Adam(d.parameters(), 1e-3)
    before = parameters(d)
    engine = Engine()
    engine.step = 7
    with pytest.raises(NonFiniteLossError, match="step 7: d_loss is nan"):
        d_step(d, d_opt, images(2), images(2, seed=1), random_text(2), engine=engine)
    assert same(parameters(d), before) and d_opt.state == {}  # (the forward's power iteration moved u, v)

    g, d = tiny_g(), tiny_d()
    g_opt = torch.optim.Adam(g.parameters(), 1e-3)
    before = snapshot(g)
    engine.step = 3
    with pytest.raises(NonFiniteLossError, match="step 3: g_loss is inf"):
        g_step(g, d, g_opt, torch.randn(2, 16), random_text(2), cfg=GANTrainConfig(augment="", kl_weight=float("inf")),
               engine=engine)
    assert same(snapshot(g), before) and g_opt.state == {}
    assert issubclass(NonFiniteLossError, FloatingPointError)


def test_an_unconditional_d_step_refuses_labels():
    d = PatchDiscriminator(PatchDiscriminatorConfig.preset("quick"))
    opt = torch.optim.Adam(d.parameters())
    x = images(2, size=64)
    before = parameters(d)
    with pytest.raises(ValueError, match="need text"):
        d_step(d, opt, x, x, labels=torch.zeros(2, 4, dtype=torch.long))
    assert same(parameters(d), before) and opt.state == {}
    stats = d_step(d, opt, x, images(2, size=64, seed=1))  # without captions it trains
    assert math.isnan(stats["d_wrong"]) and not same(parameters(d), before)


def test_an_unconditional_d_step_refuses_mismatched_captions():
    d = PatchDiscriminator(PatchDiscriminatorConfig.preset("quick"))
    x = images(2, size=64)
    with pytest.raises(ValueError, match="need text"):
        d_step(d, torch.optim.Adam(d.parameters()), x, x, wrong_text=torch.zeros(2, 32))


def test_aux_loss_trains_the_head_in_d_step_and_only_g_in_g_step(tiny_bert):
    g, d = tiny_g(), tiny_d(num_classes=NUM_CLASSES)
    g_opt, d_opt = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    text, z = tiny_bert.encode(CAPTIONS), torch.randn(4, 16)
    labels = torch.tensor([list(parse_caption(c).values()) for c in CAPTIONS])  # (4, 4)
    head = {k: v.detach().clone() for k, v in d.classifier.named_parameters()}
    stats = d_step(d, d_opt, images(4), g(z, text), text, labels=labels)
    assert stats["d_aux"] > 0 and stats["d_loss"] == pytest.approx(stats["d_adv"] + stats["d_aux"], rel=1e-6)
    assert all(not torch.equal(v, head[k]) for k, v in d.classifier.named_parameters())  # the head learned
    other = tiny_d(num_classes=NUM_CLASSES)
    other_head = {k: v.detach().clone() for k, v in other.classifier.named_parameters()}
    without = d_step(other, torch.optim.Adam(other.parameters()), images(4), g(z, text), text)
    assert without["d_aux"] == 0
    assert all(torch.equal(v, other_head[k]) for k, v in other.classifier.named_parameters())  # no labels, no signal
    half = GANTrainConfig(augment="", aux_weight=0.5)
    third = tiny_d(num_classes=NUM_CLASSES)
    weighted = d_step(third, torch.optim.Adam(third.parameters()), images(4), g(z, text), text, labels=labels,
                      cfg=half)
    assert weighted["d_loss"] == pytest.approx(weighted["d_adv"] + 0.5 * weighted["d_aux"], rel=1e-6)
    d_before = snapshot(d)
    stats = g_step(g, d, g_opt, z, text, labels=labels)
    assert stats["g_aux"] > 0 and same(snapshot(d), d_before)


# --- train_gan: history, exact resume, safe and atomic checkpoints --------------------------------

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
    g_before, d_before = snapshot(g), snapshot(d)
    state = torch.get_rng_state()
    h = train_gan(g, d, tiny_bert, shapes32, CFG, steps=3, progress=False, log_every=1)
    assert torch.equal(torch.get_rng_state(), state)  # every draw comes from train_gan's own generators
    assert set(h) == {"step", "seconds", *LOGGED}
    assert h["step"] == [0, 1, 2] and h["seconds"] > 0
    assert all(len(h[k]) == 3 for k in LOGGED)
    assert all(0 < v < 1 for v in h["d_wrong"]) and all(v > 0 for v in h["r1"])
    assert h["d_aux"] == h["g_aux"] == [0.0] * 3  # no attribute head
    assert not same(snapshot(g), g_before) and not same(snapshot(d), d_before)  # trained in place
    h = train_gan(tiny_g(), tiny_d(), tiny_bert, shapes32, CFG, steps=5, progress=False, log_every=2)
    assert h["step"] == [0, 2, 4]  # every log_every steps, and the last
    with pytest.raises(ValueError, match="32x32"):
        train_gan(tiny_g(), tiny_d(), tiny_bert, ShapesDataset(8), CFG, steps=1, progress=False)


def test_resume_is_bit_exact(tiny_bert, shapes32, tmp_path):
    g_a, d_a, h_a = run(tiny_bert, shapes32, 6, checkpoint_dir=tmp_path / "a", checkpoint_every=100)
    run(tiny_bert, shapes32, 3, checkpoint_dir=tmp_path / "b", checkpoint_every=3)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT)["step"] == 3

    torch.manual_seed(12345)  # clobber every global RNG, and start from other weights
    random.seed(12345)
    np.random.seed(12345)
    g_b, d_b, h_b = run(tiny_bert, shapes32, 6, seed=99, checkpoint_dir=tmp_path / "b", resume=True)

    assert same(snapshot(g_b), snapshot(g_a)) and same(snapshot(d_b), snapshot(d_a))
    assert {k: v for k, v in h_b.items() if k != "seconds"} == {k: v for k, v in h_a.items() if k != "seconds"}
    a, b = (load_checkpoint(tmp_path / run_ / CHECKPOINT) for run_ in ("a", "b"))
    assert a["step"] == b["step"] == 6
    assert a["format"] == "textimg.training/1" and a["loop"] == "gan_training"

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

    for key in ("g_opt", "d_opt", "data", "rng", "generator", "discriminator", "history"):
        assert_equal(a[key], b[key], key)  # optimiser state, the data order, the RNG states
    next_a, next_b = BatchOrder(40, 8), BatchOrder(40, 8)
    next_a.load_state_dict(a["data"])
    next_b.load_state_dict(b["data"])
    assert torch.equal(next_a.next(), next_b.next())  # the next batch is the same

    with pytest.raises(ValueError, match="differs in"):  # a changed config is refused
        train_gan(tiny_g(), tiny_d(), tiny_bert, shapes32, GANTrainConfig.preset("quick", batch_size=4),
                  steps=7, checkpoint_dir=tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="differs in"):  # so is another discriminator
        train_gan(tiny_g(), tiny_d(channels=4), tiny_bert, shapes32, CFG, steps=7, checkpoint_dir=tmp_path / "b",
                  progress=False)


def test_a_failed_write_leaves_the_last_checkpoint_intact(tiny_bert, shapes32, tmp_path, monkeypatch):
    run(tiny_bert, shapes32, 2, checkpoint_dir=tmp_path, checkpoint_every=1)
    path = tmp_path / CHECKPOINT
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
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]  # no temporary file left


def test_a_non_finite_step_writes_no_checkpoint(tiny_bert, shapes32, tmp_path):
    run(tiny_bert, shapes32, 2, checkpoint_dir=tmp_path, checkpoint_every=1)
    good = (tmp_path / CHECKPOINT).read_bytes()
    torch.manual_seed(0)
    poisoned = NaNDiscriminator(DiscriminatorConfig.preset("quick", text_dim=32))
    with pytest.raises(NonFiniteLossError, match="step 0: d_loss"):
        train_gan(tiny_g(), poisoned, tiny_bert, shapes32, CFG, steps=4, checkpoint_dir=tmp_path,
                  checkpoint_every=1, resume=False, progress=False)
    assert (tmp_path / CHECKPOINT).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]


class Payload:
    ran = False

    def __reduce__(self):
        return (Payload.run, ())

    @staticmethod
    def run():
        Payload.ran = True
        return "pwned"


def test_loading_refuses_pickled_objects(tiny_bert, shapes32, tmp_path, monkeypatch):
    torch.save({"format": "textimg.training/1", "loop": "gan_training", "step": 1, "payload": Payload()},
               tmp_path / CHECKPOINT)
    with pytest.raises(ValueError, match="could not be read"):
        run(tiny_bert, shapes32, 2, checkpoint_dir=tmp_path)
    assert not Payload.ran  # weights_only=True: the pickle's code never ran

    calls = []
    real_load = torch.load
    monkeypatch.setattr(textimg.utils.torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    (tmp_path / CHECKPOINT).unlink()
    run(tiny_bert, shapes32, 1, checkpoint_dir=tmp_path)
    _, _, h = run(tiny_bert, shapes32, 2, checkpoint_dir=tmp_path)  # resumes
    assert h["step"] == [0, 1] and load_checkpoint(tmp_path / CHECKPOINT)["step"] == 2
    assert calls and all(kw.get("weights_only") is True for kw in calls)


# --- the AC-GAN head in the loop --------------------------------------------------------------------

def test_train_gan_with_the_aux_head(tiny_bert, shapes32):
    g, d = tiny_g(), tiny_d(num_classes=NUM_CLASSES)
    h = train_gan(g, d, tiny_bert, shapes32, CFG, steps=2, progress=False, log_every=1)
    assert all(v > 0 for v in h["d_aux"] + h["g_aux"])
    captions_only = [{"image": shapes32[i]["image"], "caption": shapes32[i]["caption"]} for i in range(8)]
    with pytest.raises(ValueError, match="'labels' dict"):
        train_gan(tiny_g(), tiny_d(num_classes=NUM_CLASSES), tiny_bert, captions_only, CFG, steps=1, progress=False)


# --- variety: mode seeking ------------------------------------------------------------------------

def test_mode_seeking_loss_by_hand():
    z1, z2 = torch.zeros(2, 4), torch.ones(2, 4)  # mean |z1 - z2| = 1 for both pairs
    x1 = torch.zeros(2, 3, 2, 2)
    x2 = torch.stack([torch.full((3, 2, 2), 0.5), torch.full((3, 2, 2), 1.5)])  # mean |x1 - x2|: 0.5, 1.5
    assert mode_seeking_loss(x1, x2, z1, z2, eps=0).item() == pytest.approx(1 / 1.0)  # ratio (0.5 + 1.5) / 2
    assert mode_seeking_loss(x1, x2, z1, 2 * z2, eps=0).item() == pytest.approx(2.0)  # twice the noise distance
    copies = mode_seeking_loss(x1, x1, z1, z2)  # G ignores its noise: the loss is as large as eps allows
    assert copies.item() == pytest.approx(1e5)
    x2.requires_grad_(True)
    mode_seeking_loss(x1, x2, z1, z2).backward()
    assert (x2.grad < 0).all()  # descending the loss pushes x2 away from x1


def test_g_step_with_mode_seeking_draws_from_the_engine_and_trains_only_g(tiny_bert):
    text, z = tiny_bert.encode(CAPTIONS), torch.randn(4, 16)
    cfg = GANTrainConfig(augment="", ms_weight=1.0)
    runs = []
    for _ in range(2):
        g, d = tiny_g(), tiny_d()
        d_before = snapshot(d)
        state = torch.get_rng_state()
        stats = g_step(g, d, torch.optim.Adam(g.parameters(), 1e-3), z, text, cfg=cfg, engine=seeded_engine(3))
        assert torch.equal(torch.get_rng_state(), state) and same(snapshot(d), d_before)
        assert stats["ms"] > 0
        assert stats["g_loss"] == pytest.approx(stats["g_adv"] + stats["kl"] + stats["ms"], rel=1e-5)
        runs.append((stats, snapshot(g)))
    assert runs[0][0] == runs[1][0] and same(runs[0][1], runs[1][1])  # the second z comes from the engine
    plain = g_step(tiny_g(), tiny_d(), torch.optim.Adam(tiny_g().parameters(), 1e-3), z, text,
                   cfg=GANTrainConfig(augment=""), engine=seeded_engine(3))
    assert plain["g_adv"] == pytest.approx(runs[0][0]["g_adv"])  # the same first draw: the loss only adds a term


def test_train_gan_with_mode_seeking_logs_it(tiny_bert, shapes32):
    cfg = GANTrainConfig(batch_size=4, augment="", ms_weight=0.5)
    h = train_gan(tiny_g(), tiny_d(minibatch_std=True), tiny_bert, shapes32, cfg, steps=2, progress=False,
                  log_every=1)
    assert len(h["ms"]) == 2 and all(v > 0 for v in h["ms"])
