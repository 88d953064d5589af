"""Tests for textimg.generator: shapes and contracts on tiny configs, hand-worked values, and learning."""

import pytest
import torch

from textimg.data import ShapesDataset
from textimg.generator import (ConditioningAugmentation, ConditionalNorm2d, Generator, GeneratorConfig,
                               SelfAttention2d, UpBlock, WordCrossAttention, regression_loss, sample,
                               train_regression)
from textimg.text import TextEncoding

SHORT = "a small red circle in the top left"
LONG = "in the bottom right corner there is a huge turquoise plus sign"
OTHER = "a big blue square in the middle"


def tiny(**overrides) -> GeneratorConfig:
    return GeneratorConfig.preset("quick", text_dim=32, **overrides)  # tiny-bert's vectors are 32-d


def make(seed=0, gates=None, **overrides) -> Generator:
    """A tiny generator; ``gates`` sets both attention gammas (they start at 0, i.e. switched off)."""
    torch.manual_seed(seed)
    g = Generator(tiny(**overrides))
    if gates is not None:
        for block in (g.self_attn, g.cross_attn):
            if block is not None:
                block.gamma.data.fill_(gates)
    return g


# --- config ---------------------------------------------------------------------------------------

def test_presets_and_dict_round_trip():
    sizes = [Generator(GeneratorConfig.preset(p)).num_parameters() for p in ("quick", "cpu", "gpu")]
    assert sizes[0] < 100_000 < sizes[1] < 1_500_000 < sizes[2]
    cfg = GeneratorConfig.preset("cpu", self_attention=False)
    assert GeneratorConfig.from_dict(cfg.to_dict()) == cfg and not cfg.self_attention
    with pytest.raises(ValueError, match="unknown GeneratorConfig field"):
        GeneratorConfig.from_dict({**cfg.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        GeneratorConfig.preset("huge")
    with pytest.raises(ValueError, match="image_size must be 32"):
        GeneratorConfig(image_size=64)


# --- blocks, by hand ----------------------------------------------------------------------------

def test_conditioning_augmentation_kl_by_hand():
    ca = ConditioningAugmentation(text_dim=5, cond_dim=3)
    torch.nn.init.zeros_(ca.proj.weight)
    with torch.no_grad():
        ca.proj.bias.copy_(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))  # mu = 1, logvar = 0
    c, kl = ca.eval()(torch.randn(2, 5))
    assert torch.equal(c, torch.ones(2, 3))  # eval mode: the mean
    assert kl.item() == pytest.approx(0.5)  # 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2) = 0.5 * 1
    c1, _ = ca.train()(torch.randn(2, 5), torch.Generator().manual_seed(0))
    c2, _ = ca(torch.randn(2, 5), torch.Generator().manual_seed(0))
    assert torch.equal(c1, c2) and not torch.equal(c1, torch.ones(2, 3))  # sampled, from the rng


def test_conditional_norm_starts_as_plain_norm_and_is_per_sample():
    norm = ConditionalNorm2d(16, cond_dim=4)
    x, c = torch.randn(3, 16, 4, 4), torch.randn(3, 4)
    torch.testing.assert_close(norm(x, c), torch.nn.functional.group_norm(x, 8))
    torch.testing.assert_close(norm(x[1:2], c[1:2]), norm(x, c)[1:2])  # no batch statistics
    assert sum(p.numel() for p in ConditionalNorm2d(16, None).parameters()) == 32  # plain affine


def test_up_blocks_double_the_side():
    x, c = torch.randn(2, 8, 4, 4), torch.randn(2, 5)
    assert UpBlock(8, 6, cond_dim=5)(x, c).shape == (2, 6, 8, 8)
    assert UpBlock(8, 6, cond_dim=None, transposed=True)(x, c).shape == (2, 6, 8, 8)


def test_self_attention_is_identity_at_init_and_returns_its_map():
    attn = SelfAttention2d(16)
    x = torch.randn(2, 16, 4, 4)
    y, a = attn(x, return_attention=True)
    assert torch.equal(y, x) and a.shape == (2, 16, 16)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 16))


def test_word_attention_ignores_padding():
    attn = WordCrossAttention(channels=8, text_dim=6, attn_dim=4)
    attn.gamma.data.fill_(1.0)
    x, tokens = torch.randn(2, 8, 3, 3), torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    y, a = attn(x, tokens, mask, return_attention=True)
    assert a.shape == (2, 9, 5)  # (B, HW, T)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 9))
    assert (a[0, :, 3:] == 0).all() and (a[1] > 0).all()
    junk = tokens.clone()
    junk[0, 3:] = 100.0  # whatever sits under the padding
    assert torch.equal(attn(x, junk, mask)[0], y[0])
    y_short = attn(x[:1], tokens[:1, :3], mask[:1, :3])  # the same caption, unpadded
    torch.testing.assert_close(y_short, y[:1], atol=1e-6, rtol=0)


# --- the generator --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def texts(tiny_bert):
    return tiny_bert.encode([SHORT, LONG, OTHER])


def test_output_shape_and_range(texts):
    g = make()
    out = g.forward_with_aux(torch.randn(3, 16), texts, return_attention=True)
    assert out.image.shape == (3, 3, 32, 32) and out.image.dtype == torch.float32
    assert out.image.abs().max() <= 1.0 and torch.isfinite(out.image).all()
    assert out.kl.ndim == 0 and out.kl >= 0
    T = texts.tokens.shape[1]
    assert out.attention["cross"].shape == (3, 256, T) and out.attention["self"].shape == (3, 256, 256)
    assert g.forward_with_aux(torch.randn(3, 16), texts).attention == {}
    assert g(torch.randn(3, 16), texts).shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="batch size"):
        g(torch.randn(2, 16), texts)


def test_noise_and_text_change_the_output(texts):
    g = make(gates=0.5).eval()
    z = torch.randn(1, 16)
    one = texts[0]
    assert (g(z, one) - g(torch.randn(1, 16), one)).abs().max() > 1e-3  # noise matters
    assert (g(z, one) - g(z, texts[2])).abs().max() > 1e-3  # text matters


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_padding_tokens_do_not_change_the_output(tiny_bert, mode):
    """A caption alone (no padding) and the same caption padded inside a batch with a longer one
    give the same image. GroupNorm normalises each sample on its own, so the batch's other images
    cannot leak in (with BatchNorm in training mode they would); in training mode conditioning
    augmentation samples noise, so that case turns it off (eval mode uses its mean)."""
    g = make(gates=1.0, cond_aug=(mode == "eval")).train(mode == "train")
    alone, batch = tiny_bert.encode([SHORT]), tiny_bert.encode([SHORT, LONG])
    assert alone.tokens.shape[1] < batch.tokens.shape[1] and not batch.mask[0].all()  # SHORT is padded
    z = torch.randn(1, 16)
    x_alone = g(z, alone)
    x_batch = g(torch.cat([z, torch.randn(1, 16)]), batch)
    torch.testing.assert_close(x_batch[:1], x_alone, atol=1e-5, rtol=0)
    junk = TextEncoding(batch.tokens.clone(), batch.mask, batch.pooled)
    junk.tokens[~batch.mask] = 50.0  # garbage under the mask changes nothing either
    torch.testing.assert_close(g(z, junk[0]), g(z, batch[0]), atol=1e-6, rtol=0)
    # ... while the same garbage, unmasked, does: the test can fail
    unmasked = TextEncoding(junk.tokens, torch.ones_like(batch.mask), batch.pooled)
    assert (g(z, unmasked[0]) - x_alone).abs().max() > 1e-3


def test_gradients_reach_every_parameter(texts):
    g = make()  # at init the attention gates are 0: only gamma itself learns (SAGAN's start)
    g.forward_with_aux(torch.randn(3, 16), texts).image.pow(2).mean().backward()
    assert g.self_attn.gamma.grad.abs() > 0 and g.self_attn.query.weight.grad.abs().sum() == 0
    g = make(gates=0.5)  # once the gates have moved, every parameter learns
    out = g.forward_with_aux(torch.randn(3, 16), texts)
    (out.image.pow(2).mean() + out.kl).backward()
    dead = [n for n, p in g.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


@pytest.mark.parametrize("switch, prefix", [("self_attention", "self_attn."), ("cross_attention", "cross_attn."),
                                            ("cond_aug", "ca."), ("text_norm", ".film.")])
def test_each_switch_removes_its_parameters(switch, prefix):
    on, off = make(), make(**{switch: False})
    assert any(prefix in n for n, _ in on.named_parameters())
    assert not any(prefix in n for n, _ in off.named_parameters())
    assert off.num_parameters() < on.num_parameters()


def test_overfits_one_batch(tiny_bert):
    ds = ShapesDataset(8, image_size=32)
    x_real = torch.stack([ds[i]["image"] for i in range(8)])  # (8, 3, 32, 32)
    text = tiny_bert.encode(ds.captions())
    g = make(cond_aug=False)
    z = torch.randn(8, 16)
    opt = torch.optim.Adam(g.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = regression_loss(g(z, text), x_real)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_train_regression_learns_and_repeats(tiny_bert):
    ds = ShapesDataset(48, image_size=32)
    runs = []
    for _ in range(2):
        g = make(seed=1)
        state = torch.get_rng_state()
        runs.append(train_regression(g, tiny_bert, ds, steps=25, batch_size=16, lr=3e-3, seed=3,
                                     progress=False, log_every=5))
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not touched
    h = runs[0]
    assert h["step"] == [0, 5, 10, 15, 20, 24] and len(h["loss"]) == len(h["pixel"]) == len(h["kl"]) == 6
    assert h["pixel"][-1] < 0.5 * h["pixel"][0]
    assert runs[0]["loss"] == runs[1]["loss"]  # same seed, same run


def test_sample_is_seeded_and_leaves_the_global_rng_alone(tiny_bert):
    g = make(gates=0.5).train()
    state = torch.get_rng_state()
    a = sample(g, tiny_bert, [SHORT, OTHER], seed=1)
    assert torch.equal(torch.get_rng_state(), state) and g.training  # mode restored
    assert torch.equal(a, sample(g, tiny_bert, [SHORT, OTHER], seed=1))
    assert not torch.equal(a, sample(g, tiny_bert, [SHORT, OTHER], seed=2))
    assert a.shape == (2, 3, 32, 32)
