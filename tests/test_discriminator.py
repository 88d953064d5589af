"""Tests for textimg.discriminator: the configs, the projection discriminator's DOutput worked by hand,
the attribute head, the PatchGAN, spectral normalisation, and DiffAugment."""

import pytest
import torch
from torch.nn.utils import parametrize

from textimg.discriminator import (
    AUGMENTATIONS,
    Discriminator,
    DiscriminatorConfig,
    DOutput,
    PatchDiscriminator,
    PatchDiscriminatorConfig,
    apply_augment,
    augment_params,
    diff_augment,
    minibatch_std,
    parse_policy,
)

from helpers import images, random_text


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two, and on a busy 2-core machine two
    OpenMP threads spin-wait for each other. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_d(seed: int = 0, **overrides) -> Discriminator:
    torch.manual_seed(seed)
    return Discriminator(DiscriminatorConfig.preset("quick", text_dim=32, **overrides))  # tiny-bert's 32-d vectors




# --- configs --------------------------------------------------------------------------------------

def test_configs_presets_and_round_trip():
    sizes = [Discriminator(DiscriminatorConfig.preset(p)).num_parameters() for p in ("quick", "cpu", "gpu")]
    assert sizes[0] < 100_000 < sizes[1] < 1_500_000 < sizes[2], sizes
    patch = [PatchDiscriminator(PatchDiscriminatorConfig.preset(p)).num_parameters() for p in ("quick", "cpu", "gpu")]
    assert patch[0] < 100_000 < patch[1] < 1_500_000 < patch[2], patch
    for cls in (DiscriminatorConfig, PatchDiscriminatorConfig):
        cfg = cls.preset("cpu")
        assert cls.from_dict(cfg.to_dict()) == cfg
        with pytest.raises(ValueError, match=f"unknown {cls.__name__} field"):
            cls.from_dict({**cfg.to_dict(), "colour": 1})
        with pytest.raises(ValueError, match="unknown preset"):
            cls.preset("huge")
    assert DiscriminatorConfig.preset("cpu", spectral_norm=False).spectral_norm is False
    with pytest.raises(ValueError, match="image_size"):
        DiscriminatorConfig(image_size=64)
    with pytest.raises(ValueError, match="num_layers"):
        PatchDiscriminatorConfig(num_layers=0)


def test_attribute_head_config():
    cfg = DiscriminatorConfig.preset("quick", text_dim=32, num_classes=[3, 2])  # a JSON list becomes a tuple
    assert cfg.num_classes == (3, 2)
    assert DiscriminatorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="at least 2 classes"):
        DiscriminatorConfig(num_classes=(3, 1))
    assert tiny_d().classifier is None  # () means no head, and no parameters for one
    assert tiny_d(num_classes=(3, 2)).num_parameters() > tiny_d().num_parameters()


# --- the projection discriminator -----------------------------------------------------------------

def test_projection_discriminator_shapes_and_text_by_hand():
    d = tiny_d().eval()
    x, text = images(3), random_text(3)
    out = d(x, text)
    assert isinstance(out, DOutput) and out.logits.shape == (3,)
    assert out.wrong_logits is None and out.attributes is None  # no wrong captions given, no attribute head
    h = d.features(x)
    assert h.shape == (3, 32)
    zero = d(x, torch.zeros(3, 32)).logits  # a zero caption vector: psi(phi(x)) alone
    torch.testing.assert_close(zero, d.psi(h).squeeze(1))
    torch.testing.assert_close(out.logits - zero, (d.embed(text.pooled) * h).sum(1))  # + <W c, phi(x)>
    torch.testing.assert_close(out.logits, d.project(h, text))
    assert (d(x, random_text(3, seed=1)).logits - out.logits).abs().min() > 1e-4  # the text changes every logit
    assert torch.equal(d(x, text).logits, d(x, text.pooled).logits)  # a TextEncoding or its pooled vector


def test_wrong_captions_score_the_same_images():
    """GAN-CLS: with ``wrong_text`` D projects the same phi(x) onto the mismatched captions too."""
    d = tiny_d().eval()
    x, text, wrong = images(4), random_text(4), random_text(4, seed=1)
    out = d(x, text, wrong)
    assert out.wrong_logits.shape == (4,)
    torch.testing.assert_close(out.logits, d(x, text).logits, atol=0, rtol=0)  # the right captions: unchanged
    torch.testing.assert_close(out.wrong_logits, d(x, wrong).logits, atol=0, rtol=0)
    assert (out.wrong_logits - out.logits).abs().min() > 1e-4
    torch.testing.assert_close(d(x, text, wrong.pooled).wrong_logits, out.wrong_logits, atol=0, rtol=0)


def test_attribute_head_reads_the_features():
    d = tiny_d(num_classes=(3, 2)).eval()  # eval: spectral norm's power iteration holds still
    x, text = images(5), random_text(5)
    out = d(x, text)
    assert [a.shape for a in out.attributes] == [(5, 3), (5, 2)]
    logits = d.classifier(d.features(x))  # (5, 3 + 2)
    torch.testing.assert_close(out.attributes[0], logits[:, :3])
    torch.testing.assert_close(out.attributes[1], logits[:, 3:])
    plain = tiny_d(seed=1).eval()  # the same D without the head gives the same logits
    plain.load_state_dict({k: v for k, v in d.state_dict().items() if not k.startswith("classifier.")})
    torch.testing.assert_close(plain(x, text).logits, out.logits, atol=0, rtol=0)


# --- the PatchGAN ---------------------------------------------------------------------------------

def test_minibatch_std_by_hand():
    h = torch.arange(8 * 2 * 1 * 1, dtype=torch.float32).view(8, 2, 1, 1)  # image i, feature c: 2i + c
    out = minibatch_std(h, group=4)
    assert out.shape == (8, 3, 1, 1) and torch.equal(out[:, :2], h)
    # groups are strided: images {0, 2, 4, 6} and {1, 3, 5, 7}; each feature's population std is
    # std(0, 4, 8, 12) = sqrt(20) in both groups
    assert torch.allclose(out[:, 2].flatten(), torch.full((8,), 20 ** 0.5), atol=1e-4)
    copies = minibatch_std(torch.ones(4, 3, 4, 4).mul(torch.randn(1, 3, 4, 4)))  # four identical images
    assert copies[:, 3].abs().max() < 1e-3  # no spread: the telltale zero
    assert minibatch_std(torch.randn(6, 2, 4, 4), group=4).shape == (6, 3, 4, 4)  # groups of 3 divide 6
    assert minibatch_std(torch.randn(1, 2, 4, 4))[:, 2].eq(0).all()  # one image: no spread to measure


def test_minibatch_std_option_adds_one_channel_and_couples_the_batch():
    d = tiny_d(minibatch_std=True)
    assert d.fc.in_features == tiny_d().fc.in_features + 16  # one more 4x4 channel
    x, text = images(4), random_text(4)
    alone = d(x[:1], text[:1]).logits
    together = d(x, text).logits
    assert together.shape == (4,) and not torch.allclose(alone, together[:1])  # the others' spread counts
    assert DiscriminatorConfig.from_dict(d.cfg.to_dict()).minibatch_std


def test_patch_discriminator_shapes():
    x = images(2, size=64)
    out = PatchDiscriminator(PatchDiscriminatorConfig.preset("cpu"))(x)
    assert isinstance(out, DOutput) and out.logits.shape == (2, 1, 6, 6)
    assert out.wrong_logits is None and out.attributes is None
    torch.manual_seed(0)
    patch = PatchDiscriminator(PatchDiscriminatorConfig.preset("quick"))
    assert patch(x).logits.shape == (2, 1, 14, 14)
    assert torch.equal(patch(x, random_text(2)).logits, patch(x).logits)  # captions are ignored


def test_patch_logits_are_local():
    """Each logit sees a patch: changing the bottom-right corner leaves the top-left logit alone."""
    torch.manual_seed(0)
    patch = PatchDiscriminator(PatchDiscriminatorConfig.preset("quick")).eval()
    x = images(1, size=64)
    y = x.clone()
    y[..., 48:, 48:] = 1.0
    a, b = patch(x).logits, patch(y).logits
    assert torch.equal(a[..., 0, 0], b[..., 0, 0]) and not torch.equal(a[..., -1, -1], b[..., -1, -1])


@pytest.mark.parametrize("kind", ["projection", "patch"])
def test_spectral_norm_option(kind):
    def make(sn):
        torch.manual_seed(0)
        if kind == "projection":
            return tiny_d(spectral_norm=sn, num_classes=(3, 2)), lambda m: m(images(2), random_text(2))
        patch = PatchDiscriminator(PatchDiscriminatorConfig.preset("quick", spectral_norm=sn))
        return patch, lambda m: m(images(2, 64))

    plain, _ = make(False)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    d, call = make(True)
    layers = [m for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    expected = 10 if kind == "projection" else 4  # six convs, fc, psi, embed, classifier; or the PatchGAN's four
    assert len(layers) == expected and all(parametrize.is_parametrized(m, "weight") for m in layers)
    for _ in range(30):  # the power iteration converges over training-mode forwards
        call(d.train())
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.02)


# --- DiffAugment ----------------------------------------------------------------------------------

def test_parse_policy():
    assert parse_policy("color, translation") == {"color", "translation"} == set(AUGMENTATIONS)
    assert parse_policy("") == set() and parse_policy("translation,") == {"translation"}
    with pytest.raises(ValueError, match=r"unknown augmentation\(s\) \['cutout'\]"):
        parse_policy("color,cutout")


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
    diff_augment(x, rng=torch.Generator().manual_seed(0))
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
    with pytest.raises(ValueError, match="exceed the padding"):
        apply_augment(x, {"shift": torch.tensor([[5, 0], [0, 0]])})  # at most 32 / 8 = 4 pixels
    bright = apply_augment(x, {"brightness": torch.tensor([0.25, -0.5]).view(2, 1, 1, 1)})
    torch.testing.assert_close(bright, x + torch.tensor([0.25, -0.5]).view(2, 1, 1, 1))
    p = augment_params(x, "color,translation", torch.Generator().manual_seed(3))
    assert set(p) == {"brightness", "saturation", "contrast", "shift"} and p["shift"].abs().max() <= 4
    assert set(augment_params(x, "translation", torch.Generator())) == {"shift"}
    x_real, x_fake = images(2, seed=1), images(2, seed=2)
    both = apply_augment(torch.cat([x_real, x_fake]), {k: torch.cat([v, v]) for k, v in p.items()})
    assert torch.equal(apply_augment(x_real, p), both[:2]) and torch.equal(apply_augment(x_fake, p), both[2:])
