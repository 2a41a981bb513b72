"""Tests for hf_signround.evaluation on a tiny random Llama and a tiny trained tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.tiny import trained_word_tokenizer
from hf_signround.evaluation import heldout_windows, perplexity, tokens_per_second

# Ten texts of ten words: w0 .. w99, each word once, so a token's word names its stream position.
TEXTS = [" ".join(f"w{i}" for i in range(start, start + 10)) for start in range(0, 100, 10)]


@pytest.fixture(scope="module")
def word_tok() -> PreTrainedTokenizerFast:
    return trained_word_tokenizer(TEXTS)


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------- heldout_windows


def test_heldout_windows_spacing(word_tok: PreTrainedTokenizerFast) -> None:
    w = heldout_windows(word_tok, TEXTS, n_windows=4, seqlen=8)  # 100 tokens -> 12 windows
    assert w.shape == (4, 8) and w.dtype == torch.long
    # round(linspace(0, 11, 4)) = 0, 4, 7, 11
    for row, k in zip(w, [0, 4, 7, 11]):
        assert word_tok.convert_ids_to_tokens(row.tolist()) == [f"w{i}" for i in range(8 * k, 8 * k + 8)]
    assert torch.equal(w, heldout_windows(word_tok, TEXTS, n_windows=4, seqlen=8))


def test_heldout_windows_all_and_one(word_tok: PreTrainedTokenizerFast) -> None:
    every = heldout_windows(word_tok, TEXTS, n_windows=10, seqlen=10)
    assert torch.equal(every.flatten(), torch.tensor(word_tok(" ".join(TEXTS))["input_ids"]))
    first = heldout_windows(word_tok, TEXTS, n_windows=1, seqlen=10)
    assert torch.equal(first, every[:1])


def test_heldout_windows_too_little_text(word_tok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=r"not enough held-out text: 100 tokens available, 128 tokens needed \(n_windows=4 x seqlen=32\); pass more text, or lower n_windows/seqlen"):
        heldout_windows(word_tok, TEXTS, n_windows=4, seqlen=32)


# ---------------------------------------------------------------- perplexity


def manual_ppl(model: LlamaForCausalLM, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(input_ids=row[None]).logits[0].float()
            nll += F.cross_entropy(logits[:-1], row[1:], reduction="sum").item()
            count += row.numel() - 1
    return math.exp(nll / count)


def test_perplexity_matches_hand_computation(tiny_llama: LlamaForCausalLM) -> None:
    windows = torch.randint(0, 64, (7, 16), generator=torch.Generator().manual_seed(1))
    expected = manual_ppl(tiny_llama, windows)
    p1 = perplexity(tiny_llama, windows, batch_size=1)
    p3 = perplexity(tiny_llama, windows, batch_size=3)
    assert p1 == pytest.approx(expected, rel=1e-6)
    assert abs(p1 - p3) < 1e-5
    assert 32 < p1 < 128  # random init: near the vocabulary size


def test_perplexity_restores_training_flag(tiny_llama: LlamaForCausalLM) -> None:
    seen: list[bool] = []
    handle = tiny_llama.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    try:
        tiny_llama.train()
        perplexity(tiny_llama, torch.zeros(2, 4, dtype=torch.long), batch_size=1)
        assert tiny_llama.training
        tiny_llama.eval()
        perplexity(tiny_llama, torch.zeros(2, 4, dtype=torch.long))
        assert not tiny_llama.training
    finally:
        handle.remove()
        tiny_llama.eval()
    assert seen == [False, False, False]


def test_perplexity_bad_windows(tiny_llama: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match="seqlen>=2"):
        perplexity(tiny_llama, torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------- tokens_per_second


def test_tokens_per_second(tiny_llama: LlamaForCausalLM, word_tok: PreTrainedTokenizerFast) -> None:
    prompt = " ".join(word_tok.convert_ids_to_tokens([5, 6, 7]))  # ids inside the model's vocab of 64
    tps = tokens_per_second(tiny_llama, word_tok, prompt, max_new_tokens=4)
    assert tps > 0 and math.isfinite(tps)
    assert not tiny_llama.training



@pytest.fixture
def bars(monkeypatch) -> list[tuple[str, float, float]]:
    """(description, count, total) of every progress bar evaluation closes."""
    from tqdm.auto import tqdm

    from hf_signround import evaluation

    closed = []

    class Recording(tqdm):
        def close(self):
            if not self.disable:
                closed.append((self.desc, self.n, self.total))
            super().close()

    monkeypatch.setattr(evaluation, "tqdm", Recording)
    return closed


def test_generation_shows_a_progress_bar_over_the_new_tokens(tiny_llama, word_tok, bars) -> None:
    prompt = " ".join(word_tok.convert_ids_to_tokens([5, 6, 7]))
    tokens_per_second(tiny_llama, word_tok, prompt, max_new_tokens=5)
    assert bars == [("generating", 5, 5)]


def test_perplexity_progress_counts_windows(tiny_llama, bars) -> None:
    perplexity(tiny_llama, torch.randint(0, 64, (5, 8)), batch_size=2)
    assert bars == [("perplexity", 5, 5)]
