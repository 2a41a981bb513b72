"""Fixtures: tiny models, tokenizer and corpus from tests/tiny.py."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # The Triton kernel tests run in Triton's CPU interpreter, which must be chosen before
    # triton is first imported (transformers' imports below pull it in).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from transformers import PreTrainedTokenizerFast

from tests.tiny import ARCHS, make_corpus, make_tokenizer, tiny_llama


@pytest.fixture
def float32_in_bfloat16():
    """``torch.set_float32_matmul_precision("medium")`` for one test: float32 products may compute in bfloat16."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="session", params=sorted(ARCHS))
def model_dir(request, tmp_path_factory, tokenizer):
    """A saved float checkpoint of each tiny architecture, with its tokenizer."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    ARCHS[request.param]().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
