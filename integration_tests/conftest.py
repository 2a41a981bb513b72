"""The real model (SmolLM2-135M-Instruct, converted once into the cache) and real text."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from hf_signround.assets import heldout_texts, smollm2_path
from hf_signround.evaluation import heldout_windows


@pytest.fixture(scope="session")
def smollm2_dir():
    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def heldout(smollm2_tokenizer):
    """8 held-out windows of 512 tokens (the benchmark uses 40): enough to separate schemes."""
    return heldout_windows(smollm2_tokenizer, heldout_texts(), n_windows=8, seqlen=512)
