"""Tiny random models, a word-level tokenizer and a corpus, built in code (no hub access)."""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the a model layer weight scale group bit round sign gradient block token text data python "
    "function class value list dict loop error file read write import return print def if else for "
    "while true false none and or not in is of to with as on at by from"
).split()


def make_corpus(n_texts: int = 40, words_per_text: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_text)) + "." for _ in range(n_texts)]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, ".": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=1, pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_neox(seed: int = 0) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, rotary_pct=0.5, bos_token_id=1, eos_token_id=1, pad_token_id=2,
    )
    return GPTNeoXForCausalLM(cfg).eval()


ARCHS = {"llama": tiny_llama, "neox": tiny_neox}

_SMALL = dict(vocab_size=64, bos_token_id=1, eos_token_id=1, pad_token_id=2, max_position_embeddings=256)
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)
# One tiny model per architecture family the plug-in supports (tests/test_zoo.py): model_type -> config keywords
ZOO = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": {**_DECODER, "head_dim": 16},
    "gemma2": {**_DECODER, "head_dim": 16},
    "gemma3_text": {**_DECODER, "head_dim": 16},
    "olmo2": _DECODER,
    "starcoder2": _DECODER,
    "phi3": {**_DECODER, "pad_token_id": 2},
    "gpt_neox": {**_DECODER, "num_key_value_heads": None, "rotary_pct": 0.5},
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
                   num_kv_heads=2),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "mixtral": {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**_DECODER, **_MOE, "num_experts": 4, "shared_expert_intermediate_size": 64},
    "qwen3_moe": {**_DECODER, **_MOE, "num_experts": 4, "head_dim": 16},
    "olmoe": {**_DECODER, "num_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {**_DECODER, **_MOE, "num_key_value_heads": 4, "n_routed_experts": 4, "first_k_dense_replace": 1,
                    "n_group": 1, "topk_group": 1, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16},
    "gpt_oss": {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
    "phimoe": {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
    "minimax": {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
    "ernie4_5_moe": {**_DECODER, "moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32},
    "glm4_moe": {**_DECODER, **_MOE, "n_routed_experts": 4, "first_k_dense_replace": 0, "head_dim": 16},
    "hunyuan_v1_moe": {**_DECODER, "num_experts": 4, "moe_topk": 2, "head_dim": 16},
}


def tiny_zoo_model(model_type: str, seed: int = 0):
    """A random two-block causal LM of ``model_type`` (see ``ZOO``), float32, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = {k: v for k, v in {**_SMALL, **ZOO[model_type]}.items() if v is not None}
    cfg = AutoConfig.for_model(model_type, **kw)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()




def trained_word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer trained on ``texts`` (special tokens [UNK]=0, <eos>=1)."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="[UNK]")
