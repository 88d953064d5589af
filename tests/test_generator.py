"""Tests for textimg.generator: shapes and contracts on tiny configs, hand-worked values, learning, and
saving / loading (also a textimg 0.1 folder)."""

import json

import pytest
import torch

from textimg.data import ShapesDataset
from textimg.generator import (
    ConditionalNorm2d,
    ConditioningAugmentation,
    Generator,
    GeneratorConfig,
    RegressionConfig,
    SelfAttention2d,
    UpBlock,
    WordCrossAttention,
    regression_loss,
    sample,
    train_regression,
)
from textimg.metrics import Judge
from textimg.text import TextEncoding
from textimg.utils import ChecksumError, ModelMixin, read_config, sha256_file

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
        runs.append((train_regression(g, tiny_bert, ds, RegressionConfig(batch_size=16, lr=3e-3, seed=3), steps=25,
                                      progress=False, log_every=5), g))
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not touched
    h = runs[0][0]
    assert h["step"] == [0, 5, 10, 15, 20, 24] and len(h["loss"]) == len(h["pixel"]) == len(h["kl"]) == 6
    assert h["pixel"][-1] < 0.5 * h["pixel"][0] and h["seconds"] > 0
    for loss, pixel, kl in zip(h["loss"], h["pixel"], h["kl"]):  # loss = pixel + kl_weight * KL
        assert loss == pytest.approx(pixel + 1e-3 * kl, rel=1e-5)
    assert runs[0][0]["loss"] == runs[1][0]["loss"]  # same seed, same run
    assert all(torch.equal(v, runs[1][1].state_dict()[k]) for k, v in runs[0][1].state_dict().items())
    other = train_regression(make(seed=1), tiny_bert, ds, RegressionConfig(batch_size=16, lr=3e-3, seed=4), steps=6,
                             progress=False, log_every=5)
    assert other["loss"][1] != h["loss"][1]  # another seed, another batch order and noise


def test_regression_config_and_kl_weight(tiny_bert):
    cfg = RegressionConfig()
    assert (cfg.batch_size, cfg.lr, cfg.kl_weight, cfg.seed) == (64, 2e-3, 1e-3, 0)
    assert RegressionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown RegressionConfig field"):
        RegressionConfig.from_dict({"steps": 3})
    ds = ShapesDataset(16, image_size=32)
    h = train_regression(make(), tiny_bert, ds, RegressionConfig(batch_size=8, kl_weight=2.0), steps=2,
                         progress=False, log_every=1)
    assert h["step"] == [0, 1]
    for loss, pixel, kl in zip(h["loss"], h["pixel"], h["kl"]):
        assert loss == pytest.approx(pixel + 2.0 * kl, rel=1e-5)


def test_sample_is_seeded_and_leaves_the_global_rng_alone(tiny_bert):
    g = make(gates=0.5).train()
    state = torch.get_rng_state()
    a = sample(g, tiny_bert, [SHORT, OTHER], seed=1)
    assert torch.equal(torch.get_rng_state(), state) and g.training  # mode restored
    assert torch.equal(a, sample(g, tiny_bert, [SHORT, OTHER], seed=1))
    assert not torch.equal(a, sample(g, tiny_bert, [SHORT, OTHER], seed=2))
    assert a.shape == (2, 3, 32, 32)


# --- saving and loading ---------------------------------------------------------------------------

def test_save_and_load_round_trip_and_hash(tmp_path):
    g = make(gates=0.5)
    manifest = tmp_path / "ckpt" / "MANIFEST.json"
    directory = g.save_pretrained(tmp_path / "ckpt" / "gen", {"steps": 3}, manifest)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    config = read_config(directory)
    assert config["class"] == "Generator" and GeneratorConfig.from_dict(config["config"]) == g.cfg
    assert config["steps"] == 3 and config["weights_sha256"] == sha256_file(directory / "model.safetensors")
    assert set(json.loads(manifest.read_text())) == {"gen/model.safetensors", "gen/config.json"}
    loaded = Generator.from_pretrained(directory, manifest)
    assert isinstance(loaded, Generator) and not loaded.training and loaded.cfg == g.cfg
    assert all(torch.equal(v, g.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert loaded.state_dict().keys() == g.state_dict().keys()
    z, text = torch.randn(2, 16), TextEncoding(torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool),
                                               torch.randn(2, 32))
    assert torch.equal(loaded(z, text), g.eval()(z, text))
    assert isinstance(ModelMixin.from_pretrained(directory), Generator)  # the class named in config.json
    with pytest.raises(ValueError, match="holds a Generator, not a Judge"):
        Judge.from_pretrained(directory)

    make(seed=1).save_pretrained(directory)  # replaced behind the manifest's back
    Generator.from_pretrained(directory)  # by itself the folder is consistent ...
    with pytest.raises(ChecksumError, match=r"gen/model\.safetensors does not match its SHA-256"):
        Generator.from_pretrained(directory, manifest)  # ... but not the one the manifest recorded
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"model\.safetensors does not match the SHA-256 recorded in"):
        Generator.from_pretrained(directory)


def write_v1_folder(directory, generator: Generator, config: dict):
    """A folder as textimg 0.1 wrote it (utils.save_pretrained_module): the weights and a config.json of
    another form, without a hash of the weights."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    state = {k: v.contiguous().clone() for k, v in generator.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("layout", ["save_generator", "notebook_02"])
def test_a_textimg_0_1_folder_still_loads(tmp_path, layout):
    """0.1's save_generator wrote {"model": "Generator", "generator": cfg, ...facts}; notebook 02 wrote
    {"generator": cfg, "encoder", "steps", ...}. Both load through ModelMixin's upgrade, unchanged on disk."""
    g = make(gates=0.5, self_attention=False)
    cfg = g.cfg.to_dict()
    config = ({"model": "Generator", "generator": cfg, "steps": 3} if layout == "save_generator" else
              {"generator": cfg, "encoder": "tiny-bert", "steps": 5, "preset": "quick", "loss": "regression"})
    write_v1_folder(tmp_path / "old", g, config)
    before = (tmp_path / "old" / "config.json").read_bytes()
    loaded = Generator.from_pretrained(tmp_path / "old")
    assert loaded.cfg == g.cfg and not loaded.cfg.self_attention and not loaded.training
    assert all(torch.equal(v, g.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert (tmp_path / "old" / "config.json").read_bytes() == before  # not rewritten
    if layout == "save_generator":
        assert isinstance(ModelMixin.from_pretrained(tmp_path / "old"), Generator)  # "model" names the class
        with pytest.raises(ValueError, match="holds a Generator, not a Judge"):
            Judge.from_pretrained(tmp_path / "old")
    else:  # no class named: only a caller who says which class can load it
        with pytest.raises(ValueError, match="not a textimg model config"):
            ModelMixin.from_pretrained(tmp_path / "old")
    config["generator"] = {**cfg, "channels": cfg["channels"] * 2}  # a config that does not fit the weights
    write_v1_folder(tmp_path / "wrong", g, config)
    with pytest.raises(ValueError, match=r"model\.safetensors and .*config\.json do not describe the same Generator"):
        Generator.from_pretrained(tmp_path / "wrong")
