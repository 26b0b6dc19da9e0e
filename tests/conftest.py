"""Shared fixtures: a tiny tokenizer and tiny random Llama models (tests/support/tiny_models.py), built in
milliseconds, deterministic."""

from __future__ import annotations

import os

# Tiny models gain nothing from threads, and on a busy 2-core machine spinning OpenMP threads make each
# small matmul up to 10x slower; subprocesses started by tests inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.support.tiny_models import make_tiny_llama, make_tiny_tokenizer  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama():
    """A fresh 2-layer random Llama (vocab 512, hidden 64) for each test."""
    return make_tiny_llama()


@pytest.fixture(scope="session")
def bundled_tokenizer():
    """The bundled SmolLM2 tokenizer and chat template (cached as an HF folder after the first use)."""
    from transformers import AutoTokenizer

    from tunelab.models.bundled import tokenizer_dir

    return AutoTokenizer.from_pretrained(tokenizer_dir())
