"""Tests for textimg.diffusion: the schedule and its conversions, the loss by hand, overfitting one batch,
guidance, thresholding, the samplers (seeds, the global RNG), the cross-check against diffusers'
DDIMScheduler / DDPMScheduler, train_diffusion (history, the SR model, exact resume) and DiffusionPipeline
(shapes, bad input, save/load)."""

import json
import math
import random

import numpy as np
import pytest
import torch

from textimg.data import ShapesDataset
from textimg.diffusion import (
    DiffusionPipeline,
    DiffusionTrainConfig,
    UNet,
    UNetConfig,
    alpha_bar,
    alphas_cumprod,
    ddim_sample,
    ddpm_sample,
    diffusion_loss,
    dynamic_threshold,
    eps_from_v,
    eps_from_x0,
    guided,
    learning_rate,
    low_res_condition,
    q_sample,
    sampling_timesteps,
    snr,
    static_clip,
    train_diffusion,
    v_from,
    x0_from_eps,
    x0_from_v,
)
from textimg.pipeline import TextToImagePipeline
from textimg.refiner import bicubic
from textimg.utils import load_checkpoint, seeded

from helpers import random_text, same, snapshot

PROMPTS = ["a small red circle at the top left", "a large blue star in the center"]


def unet(superres: bool = False, seed: int = 0, **overrides) -> UNet:
    """A quick-preset U-Net for tiny-bert (text_dim 32), every weight moved off its initial value so that
    the zero-initialised output layers do not hide what the caption does."""
    cfg = (UNetConfig.superres if superres else UNetConfig.preset)("quick", text_dim=32, **overrides)
    with seeded(seed):
        model = UNet(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# --- the schedule ------------------------------------------------------------------------------

def test_schedule_endpoints_monotonic_and_the_discrete_grid():
    assert alpha_bar(torch.tensor(0.0)).item() == 1.0
    end = alpha_bar(torch.tensor(1.0)).item()
    assert 0 < end < 1e-12  # tiny but positive: every formula stays finite
    ab = alpha_bar(torch.linspace(0, 1, 1001))
    assert (ab.diff() < 0).all()  # strictly decreasing
    assert alpha_bar(torch.tensor([-0.5, 1.5])).tolist() == [1.0, end]  # t is clamped to [0, 1]
    s = 0.008  # by hand: cos^2((t + s) / (1 + s) pi / 2), normalised by its value at 0
    f = [math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 for t in (0.0, 0.5)]
    assert alpha_bar(torch.tensor(0.5)).item() == pytest.approx(f[1] / f[0], rel=1e-6)
    ac = alphas_cumprod()  # grid step i is time (i + 1) / 1000 ...
    assert ac.shape == (1000,) and ac.dtype == torch.float32 and (ac.diff() < 0).all()
    assert torch.allclose(ac[:-1], alpha_bar((torch.arange(999) + 1) / 1000), rtol=1e-4, atol=0)
    assert ac[-1].item() == pytest.approx(0.001 * ac[-2].item(), rel=1e-6)  # ... except the capped last beta
    assert sampling_timesteps(10) == list(range(999, 0, -100))
    assert sampling_timesteps(1) == [999] and sampling_timesteps(1000) == list(range(999, -1, -1))


def test_q_sample_statistics():
    x0 = torch.full((4000, 3, 4, 4), 0.5)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    ab = alpha_bar(torch.tensor(0.3)).item()
    x_t = q_sample(x0, torch.full((4000,), ab), noise)  # (B,) and scalar ab broadcast alike
    assert torch.equal(x_t, q_sample(x0, ab, noise))
    assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.5, abs=0.01)
    assert x_t.std().item() == pytest.approx(math.sqrt(1 - ab), rel=0.01)


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1, torch.randn(5, 3, 8, 8, generator=g)
    ab = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.01])
    x_t, v = q_sample(x0, ab, eps), v_from(x0, eps, ab)
    assert torch.allclose(x0_from_v(x_t, v, ab), x0, atol=1e-5)
    assert torch.allclose(eps_from_v(x_t, v, ab), eps, atol=1e-5)
    assert torch.allclose(x0_from_eps(x_t, eps, ab), x0, atol=1e-4)
    assert torch.allclose(eps_from_x0(x_t, x0, ab), eps, atol=1e-4)
    assert torch.allclose(snr(ab), ab / (1 - ab))


# --- the U-Net and its loss --------------------------------------------------------------------

def test_unet_shapes_config_and_errors():
    base, sr = unet(), unet(superres=True)
    text = random_text(2)
    assert base(torch.randn(2, 3, 32, 32), torch.rand(2), text).shape == (2, 3, 32, 32)
    low = low_res_condition(torch.rand(2, 3, 32, 32) * 2 - 1, 64, 0.2, torch.randn(2, 3, 64, 64))
    assert sr(torch.randn(2, 3, 64, 64), torch.rand(2), text, low_res=low, aug_level=0.2).shape == (2, 3, 64, 64)
    assert sr.cfg.image_size == 64 and sr.cfg.cond_channels == 3 and sr.cfg.attn_resolutions == (8,)
    with pytest.raises(ValueError, match="needs low_res"):
        sr(torch.randn(2, 3, 64, 64), torch.rand(2), text)
    with pytest.raises(ValueError, match="takes neither"):
        base(torch.randn(2, 3, 32, 32), torch.rand(2), text, low_res=torch.zeros(2, 3, 32, 32), aug_level=0.1)
    cfg = json.loads(json.dumps(base.cfg.to_dict()))  # as config.json holds it: tuples become lists
    assert UNetConfig.from_dict(cfg) == base.cfg
    with pytest.raises(ValueError, match="halved"):
        UNetConfig(image_size=30)
    with pytest.raises(ValueError, match="cond_channels"):
        UNetConfig(cond_channels=1)
    fresh = UNet(UNetConfig.preset("quick", text_dim=32))  # zero-initialised output: v = 0 at first
    assert fresh(torch.randn(2, 3, 32, 32), torch.rand(2), text).abs().max() == 0


def test_dropped_captions_use_the_null_caption():
    model, text, x, t = unet(), random_text(3), torch.randn(3, 3, 32, 32), torch.rand(3)
    cond, null = model(x, t, text), model(x, t, None)
    assert not torch.allclose(cond, null, atol=1e-4)  # the caption matters
    mixed = model(x, t, text, torch.tensor([False, True, False]))
    assert torch.allclose(mixed[[0, 2]], cond[[0, 2]], atol=1e-6) and torch.allclose(mixed[1], null[1], atol=1e-6)
    short, other = random_text(3), random_text(3, seed=1)  # two real words each, then padding ...
    short.mask[:, 2:] = other.mask[:, 2:] = False
    other.tokens[:, :2] = short.tokens[:, :2]
    other.pooled.copy_(short.pooled)
    assert torch.allclose(model(x, t, short), model(x, t, other), atol=1e-6)  # ... whose values cannot matter


def test_loss_equals_the_formula_by_hand():
    model, text = unet(), random_text(4)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.randn(4, 3, 32, 32, generator=g)
    t, drop = torch.tensor([0.05, 0.3, 0.6, 0.95]), torch.tensor([False, True, False, False])
    f = [math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2 for u in [0.0] + t.tolist()]
    ab = torch.tensor([fi / f[0] for fi in f[1:]]).view(4, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    err = (model(x_t, t, text, drop) - v).pow(2).mean(dim=(1, 2, 3))  # (4,)
    assert diffusion_loss(model, x0, text, t, noise, drop).item() == pytest.approx(err.mean().item(), rel=1e-4)
    s = ab.flatten() / (1 - ab.flatten())
    weighted = (err * torch.minimum(s, torch.tensor(5.0)) / (s + 1)).mean()
    assert diffusion_loss(model, x0, text, t, noise, drop, min_snr=5.0).item() == pytest.approx(weighted.item(),
                                                                                                 rel=1e-4)


def test_overfits_one_batch(tiny_bert):
    data = ShapesDataset(8, image_size=32)
    x0 = torch.stack([data[i]["image"] for i in range(8)])
    text = tiny_bert.encode(data.captions())
    g = torch.Generator().manual_seed(0)
    t, noise = torch.rand(8, generator=g), torch.randn(x0.shape, generator=g)
    with seeded(0):
        model = UNet(UNetConfig.preset("quick", text_dim=tiny_bert.dim))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = diffusion_loss(model, x0, text, t, noise)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


# --- guidance and thresholding -----------------------------------------------------------------

def test_guidance_scale_one_is_conditional_and_zero_unconditional():
    model, text, x, t = unet(), random_text(2), torch.randn(2, 3, 32, 32), torch.rand(2)
    cond, uncond = model(x, t, text), model(x, t, text, torch.ones(2, dtype=torch.bool))
    assert torch.equal(guided(model, x, t, text, 1.0), cond)
    assert torch.allclose(guided(model, x, t, text, 0.0), uncond, atol=1e-6)
    assert torch.equal(guided(model, x, t, None, 3.0), model(x, t, None))  # no caption: nothing to guide
    w3 = guided(model, x, t, text, 3.0)  # one batch of 2B
    assert torch.allclose(w3, uncond + 3.0 * (cond - uncond), atol=1e-5)
    sr, low = unet(superres=True), torch.randn(2, 3, 64, 64)  # the SR model's inputs are doubled too
    xs = torch.randn(2, 3, 64, 64)
    c, u = sr(xs, t, text, low_res=low, aug_level=0.2), sr(xs, t, None, low_res=low, aug_level=0.2)
    assert torch.allclose(guided(sr, xs, t, text, 2.0, low, 0.2), u + 2.0 * (c - u), atol=1e-5)


def test_thresholding_on_hand_made_tensors():
    inside = torch.linspace(-0.9, 0.9, 100)  # |x| <= 1 everywhere: s = 1, unchanged
    flat = torch.full((100,), 2.0)  # quantile 2: clamp to 2, divide by 2
    outlier = torch.cat([torch.full((99,), 0.5), torch.tensor([10.0])])
    x0 = torch.stack([inside, flat, outlier]).view(3, 1, 10, 10)
    out = dynamic_threshold(x0, 0.995).view(3, 100)
    assert torch.equal(out[0], inside)
    assert torch.allclose(out[1], torch.ones(100))
    s = 0.5 + (0.995 * 99 - 98) * (10.0 - 0.5)  # the 0.995 quantile of |x|, interpolated between ranks 98 and 99
    assert torch.allclose(out[2], torch.cat([torch.full((99,), 0.5 / s), torch.tensor([1.0])]))
    clipped = torch.full((100,), 0.5)
    clipped[-1] = 1.0
    assert torch.equal(dynamic_threshold(x0, 0.5).view(3, 100)[2], clipped)  # the median (0.5) < 1: plain clipping
    assert torch.equal(static_clip(x0).view(3, 100)[2, -2:], torch.tensor([0.5, 1.0]))


# --- samplers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", [ddim_sample, ddpm_sample])
def test_samplers_are_seeded_and_leave_the_global_rng_alone(sampler):
    model, text = unet(), random_text(2)
    state = torch.random.get_rng_state()
    a = sampler(model, (2, 3, 32, 32), text, steps=3, rng=torch.Generator().manual_seed(1))
    b = sampler(model, (2, 3, 32, 32), text, steps=3, rng=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 3, 32, 32) and a.abs().max() <= 1  # static clipping
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.allclose(a, sampler(model, (2, 3, 32, 32), text, steps=3, rng=torch.Generator().manual_seed(2)))
    rng = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 3, 32, 32, generator=rng)  # the same start, given, and the same draws after it
    assert torch.equal(a, sampler(model, (2, 3, 32, 32), text, steps=3, x_T=x_T, rng=rng))


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"), (dict(steps=1001), "steps"), (dict(scale=-1.0), "guidance scale"),
    (dict(threshold="bogus"), "unknown threshold"), (dict(percentile=0.0), "percentile"),
])
def test_sampler_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ddim_sample(unet(), (1, 3, 32, 32), None, **kwargs)


class Dummy(torch.nn.Module):
    """A fixed stand-in "model" whose v (sometimes far outside [-1, 1]) depends on x_t and t; it records its inputs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x_t, t, text=None, drop=None, low_res=None, aug_level=None):
        self.seen.append(x_t.clone())
        return torch.sin(3 * x_t) * 1.5 + t.view(-1, 1, 1, 1) * x_t


def test_schedule_and_samplers_match_diffusers_bit_for_bit():
    diffusers = pytest.importorskip("diffusers")
    common = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                  timestep_spacing="trailing")
    ddim = diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
    assert torch.equal(alphas_cumprod(), ddim.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x0, noise, steps = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g), \
        torch.tensor([0, 250, 700, 999])
    ab = alphas_cumprod()[steps]
    assert torch.equal(q_sample(x0, ab, noise), ddim.add_noise(x0, noise, steps))
    assert torch.equal(v_from(x0, noise, ab), ddim.get_velocity(x0, noise, steps))

    def reference(scheduler, n, seed, **step_kwargs):  # diffusers' loop with the same dummy and the same draws
        scheduler.set_timesteps(n)
        rng = torch.Generator().manual_seed(seed)
        x, model = torch.randn(2, 3, 8, 8, generator=rng), Dummy()
        for step in scheduler.timesteps:
            v = model(x, torch.full((2,), (int(step) + 1) / 1000))
            x = scheduler.step(v, step, x, generator=rng, **step_kwargs).prev_sample
        return x, model.seen

    thresholds = {None: dict(clip_sample=False), "static": dict(clip_sample=True),  # large max: Imagen's rule
                  "dynamic": dict(clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.9,
                                  sample_max_value=1e9)}
    for threshold, config in thresholds.items():
        for eta in (0.0, 1.0):
            ours = Dummy()
            x = ddim_sample(ours, (2, 3, 8, 8), None, steps=10, scale=1.0, eta=eta, threshold=threshold,
                            percentile=0.9, rng=torch.Generator().manual_seed(3))
            scheduler = diffusers.DDIMScheduler(**common, set_alpha_to_one=True, **config)
            x_ref, seen = reference(scheduler, 10, 3, eta=eta, use_clipped_model_output=True)
            assert torch.equal(x, x_ref), (threshold, eta)
            assert all(torch.equal(a, b) for a, b in zip(ours.seen, seen)) and len(seen) == 10  # every step

    for n in (1000, 10):
        for threshold in (None, "static"):
            ours = Dummy()
            x = ddpm_sample(ours, (2, 3, 8, 8), None, steps=n, scale=1.0, threshold=threshold,
                            rng=torch.Generator().manual_seed(4))
            scheduler = diffusers.DDPMScheduler(**common, **thresholds[threshold])
            x_ref, seen = reference(scheduler, n, 4)
            assert all(torch.equal(a, b) for a, b in zip(ours.seen, seen)) and len(seen) == n
            if n == 1000:
                assert torch.equal(x, x_ref)
            else:  # diffusers adds noise whenever the timestep is > 0, so after the last step (timestep 99,
                # variance 0, clamped to 1e-20) it adds 1e-10 * z; we return the posterior mean. Every step
                # before it is bit for bit the same (the model's inputs above).
                assert torch.allclose(x, x_ref, atol=1e-8, rtol=0) and not torch.equal(x, x_ref)


# --- training ----------------------------------------------------------------------------------

def test_learning_rate_warms_up_and_decays_to_the_end():
    cfg = DiffusionTrainConfig(lr=2e-3, lr_min=2e-4, warmup=10)
    assert learning_rate(0, 100, cfg) == pytest.approx(2e-4)
    assert learning_rate(9, 100, cfg) == pytest.approx(2e-3) == learning_rate(10, 100, cfg)
    assert learning_rate(99, 100, cfg) == pytest.approx(2e-4)
    lrs = [learning_rate(s, 100, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(ValueError, match="p_uncond"):
        DiffusionTrainConfig(p_uncond=1.0)


CFG = DiffusionTrainConfig.preset("quick", batch_size=4, warmup=1)


@pytest.fixture(scope="module")
def shapes32():
    return ShapesDataset(16, image_size=32)


def test_train_diffusion_history_ema_and_the_global_rng(tiny_bert, shapes32):
    model, ema = unet(), unet(seed=1)
    weights = [snapshot(model)]  # the model's weights at the start and after each step
    state = torch.get_rng_state()
    h = train_diffusion(model, ema, tiny_bert, shapes32, CFG, steps=3, progress=False, log_every=1,
                        callback=lambda step, stats: weights.append(snapshot(model)))
    assert torch.equal(torch.get_rng_state(), state)
    assert set(h) == {"step", "loss", "lr", "grad_norm", "seconds"} and h["step"] == [0, 1, 2]
    assert all(v > 0 for v in h["loss"]) and h["lr"][-1] == pytest.approx(CFG.lr_min)
    assert not same(weights[-1], weights[0])
    expected = weights[0]  # the EMA starts as the model, then decays by min(0.999, (1 + k) / (10 + k))
    for k in range(3):
        decay = min(CFG.ema_decay, (1 + k) / (10 + k))
        expected = {n: decay * expected[n] + (1 - decay) * weights[k + 1][n] for n in expected}
    assert all(torch.allclose(ema.state_dict()[n], expected[n], atol=1e-6) for n in expected)
    assert not any(p.requires_grad for p in ema.parameters())
    with pytest.raises(ValueError, match="32x32"):
        train_diffusion(unet(), unet(), tiny_bert, ShapesDataset(4), CFG, steps=1, progress=False)
    with pytest.raises(ValueError, match="same config"):
        train_diffusion(unet(), unet(superres=True), tiny_bert, shapes32, CFG, steps=1, progress=False)


def test_train_diffusion_trains_a_super_resolution_model(tiny_bert):
    model, ema = unet(superres=True), unet(superres=True)
    before = snapshot(model)
    seen = []

    def low_res_fn(x):  # the 32x32 images the SR model learns to upsample
        seen.append(x.shape)
        return torch.nn.functional.avg_pool2d(x, 2)

    h = train_diffusion(model, ema, tiny_bert, ShapesDataset(8, image_size=64), CFG, steps=2, progress=False,
                        log_every=1, low_res_fn=low_res_fn)
    assert len(h["loss"]) == 2 and not same(snapshot(model), before)
    assert seen == [(4, 3, 64, 64)] * 2


class Interrupted(Exception):
    pass


def test_resume_is_bit_exact(tiny_bert, shapes32, tmp_path):
    def run(steps=6, stop=None, seed=0, **kwargs):
        def callback(step, stats):
            if step == stop:
                raise Interrupted
        model, ema = unet(seed=seed), unet(seed=seed)
        history = train_diffusion(model, ema, tiny_bert, shapes32, CFG, steps=steps, progress=False, log_every=1,
                                  callback=callback, checkpoint_every=1, **kwargs)
        return model, ema, history

    model_a, ema_a, h_a = run(checkpoint_dir=tmp_path / "a")
    with pytest.raises(Interrupted):
        run(stop=3, checkpoint_dir=tmp_path / "b")  # stopped during step 3: steps 0-2 are saved
    assert load_checkpoint(tmp_path / "b" / "diffusion_training.pt")["step"] == 3
    torch.manual_seed(12345)  # clobber every global RNG, and start from other weights
    random.seed(12345)
    np.random.seed(12345)
    model_b, ema_b, h_b = run(seed=99, checkpoint_dir=tmp_path / "b")
    assert same(snapshot(model_b), snapshot(model_a)) and same(snapshot(ema_b), snapshot(ema_a))
    assert {k: v for k, v in h_b.items() if k != "seconds"} == {k: v for k, v in h_a.items() if k != "seconds"}
    a, b = (load_checkpoint(tmp_path / d / "diffusion_training.pt") for d in ("a", "b"))
    for group_a, group_b in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert all(torch.equal(group_a[k], group_b[k]) for k in group_a)
    with pytest.raises(ValueError, match="differs in"):  # another budget means another learning-rate schedule
        run(steps=8, checkpoint_dir=tmp_path / "b")


# --- the pipeline ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tiny_bert):
    return DiffusionPipeline(unet(), unet(superres=True), tiny_bert)


FAST = dict(steps=2, guidance=3.0)


def test_generate_shape_range_seeds_and_pil(pipe, tiny_bert):
    state = torch.random.get_rng_state()
    x = pipe.generate(PROMPTS, seed=1, **FAST)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, pipe.generate(PROMPTS, seed=1, **FAST))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.allclose(x, pipe.generate(PROMPTS, seed=2, **FAST))
    assert torch.allclose(x, pipe.generate(PROMPTS, seed=1, batch_size=1, **FAST), atol=1e-4)
    assert pipe.generate(PROMPTS, seed=1, size=32, **FAST).shape == (2, 3, 32, 32)  # the base model's images
    assert pipe.generate(PROMPTS[0], num_per_prompt=3, **FAST).shape == (3, 3, 64, 64)
    images = pipe(PROMPTS, seed=1, **FAST)
    assert len(images) == 2 and images[0].size == (64, 64) and images[0].mode == "RGB"
    without = DiffusionPipeline(pipe.base, None, tiny_bert)  # bicubic instead of super-resolution
    low = without.sample(PROMPTS, seed=1, size=32, **FAST)
    assert torch.allclose(without.sample(PROMPTS, seed=1, **FAST), bicubic(low), atol=1e-6)
    assert "superres=bicubic" in repr(without) and "superres=UNet(" in repr(pipe)


@pytest.mark.parametrize("prompts, kwargs, error, match", [
    ([], {}, ValueError, "empty list"),
    (["fine", 3], {}, TypeError, "position 1 is not a str"),
    (["fine", "  "], {}, ValueError, "position 1 is empty"),
    (PROMPTS, dict(guidance=-1), ValueError, "guidance scale"),
    (PROMPTS, dict(steps=0), ValueError, "steps"),
    (PROMPTS, dict(threshold="bogus"), ValueError, "unknown threshold 'bogus'"),
    (PROMPTS, dict(size=48), ValueError, "size must be 32"),
    (PROMPTS, dict(seed=1.5), TypeError, "seed"),
    (PROMPTS, dict(guidence=3.0), ValueError, r"unknown sampling setting\(s\) \['guidence'\]"),
    (PROMPTS, dict(aug_level=2.0), ValueError, "aug_level must be in"),
])
def test_bad_input_gets_clear_errors(pipe, prompts, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe.generate(prompts, **kwargs)


def test_settings_view_and_super_resolution_alone(pipe, tiny_bert):
    """with_settings: the same networks with other defaults (what evaluate_pipeline measures);
    superresolve: the SR stage on given low-res images, as sample() runs it."""
    view = pipe.with_settings(**FAST)
    assert view.base is pipe.base and pipe.settings == DiffusionPipeline.SAMPLING  # the original is unchanged
    assert view.settings == {**DiffusionPipeline.SAMPLING, **FAST}
    assert torch.equal(view.sample(PROMPTS, seed=1), pipe.sample(PROMPTS, seed=1, **FAST))
    assert torch.equal(view.sample(PROMPTS, seed=1, guidance=1.0), pipe.sample(PROMPTS, seed=1, steps=2, guidance=1.0))
    low = torch.rand(2, 3, 32, 32) * 2 - 1
    up = pipe.superresolve(low, PROMPTS, seed=3, **FAST)
    assert up.shape == (2, 3, 64, 64) and torch.equal(up, pipe.superresolve(low, PROMPTS, seed=3, **FAST))
    assert not torch.equal(up, pipe.superresolve(low, PROMPTS, seed=3, aug_level=0.0, **FAST))  # the level matters
    with pytest.raises(ValueError, match="one prompt per image"):
        pipe.superresolve(low, PROMPTS[:1], **FAST)
    with pytest.raises(ValueError, match="no super-resolution model"):
        DiffusionPipeline(pipe.base, None, tiny_bert).superresolve(low, PROMPTS)


def test_mismatched_parts_are_refused(pipe, tiny_bert, minilm):
    with pytest.raises(ValueError, match="text_dim"):
        DiffusionPipeline(pipe.base, None, minilm)
    with pytest.raises(TypeError, match="base"):
        DiffusionPipeline(pipe.superres, None, tiny_bert)
    with pytest.raises(TypeError, match="superres"):
        DiffusionPipeline(pipe.base, pipe.base, tiny_bert)


def test_save_load_gives_identical_images(pipe, tiny_bert, tmp_path):
    d = pipe.save_pretrained(tmp_path / "p", facts={"note": "test"})
    assert sorted(p.name for p in d.iterdir()) == ["base", "pipeline.json", "superres"]
    config = json.loads((d / "pipeline.json").read_text())
    assert config["class"] == "DiffusionPipeline" and config["components"] == {"base": "UNet", "superres": "UNet"}
    assert config["text_encoder"] == "tiny-bert" and config["note"] == "test"
    loaded = DiffusionPipeline.from_pretrained(d, text_encoder=tiny_bert)
    assert loaded.superres.cfg == pipe.superres.cfg
    assert torch.equal(loaded.generate(PROMPTS, seed=4, **FAST), pipe.generate(PROMPTS, seed=4, **FAST))
    without = DiffusionPipeline(pipe.base, None, tiny_bert).save_pretrained(tmp_path / "b")
    assert DiffusionPipeline.from_pretrained(without, text_encoder=tiny_bert).superres is None
    with pytest.raises(ValueError, match="does not describe a TextToImagePipeline"):  # another kind is refused
        TextToImagePipeline.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="textimg train --diffusion"):
        DiffusionPipeline.from_pretrained(tmp_path / "nothing")
