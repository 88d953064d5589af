"""Test setup: the quick preset, no network; one shared encoder of each kind."""

import os

os.environ.setdefault("TEXTIMG_PRESET", "quick")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download: everything they load ships with the package
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def minilm():
    """The real pretrained all-MiniLM-L6-v2 (loaded once, ~2 s). Tests must not change its settings."""
    from textimg.text import TextEncoder

    return TextEncoder("minilm")


@pytest.fixture(scope="session")
def tiny_bert():
    """A tiny random BERT with MiniLM's tokenizer: fast stand-in for stages that only need shapes."""
    from textimg.text import TextEncoder

    return TextEncoder("tiny-bert")
