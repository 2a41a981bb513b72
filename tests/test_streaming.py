"""The streaming quantizer: the same checkpoint as from_pretrained + save_pretrained, bit for bit,
with memory that does not grow with the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_signround import SignRoundV2Config
from hf_signround.streaming import quantize_checkpoint

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[1, 4, 5, 6, 7, 8, 9, 10]])


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - not iterable
    return out


def config(iters, corpus, tokenizer, **kw):
    return SignRoundV2Config(bits=3, group_size=32, iters=iters, batch_size=4, nsamples=8, seqlen=32,
                             dataset=corpus, tokenizer=tokenizer, **kw)


@pytest.mark.parametrize("iters", [0, 3])
def test_streaming_writes_what_from_pretrained_writes(model_dir, tmp_path, corpus, tokenizer, iters):
    resident = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config(iters, corpus, tokenizer))
    resident.save_pretrained(tmp_path / "resident")
    reports = quantize_checkpoint(model_dir, tmp_path / "streamed", config(iters, corpus, tokenizer),
                                  max_shard_size="40KB")
    assert len(reports) == 2 and all(r.specs for r in reports.values())
    assert iters == 0 or all(r.loss_after is not None for r in reports.values())

    streamed, expected = tensors(tmp_path / "streamed"), tensors(tmp_path / "resident")
    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[k], expected[k]) for k in expected)
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()  # written in several shards
    saved = json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"]
    assert saved == json.loads((tmp_path / "resident" / "config.json").read_text())["quantization_config"]

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, resident(input_ids=IDS).logits)


def test_tied_embeddings_are_written_once(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "fp")
    rtn = SignRoundV2Config(bits=4, group_size=32, iters=0)
    quantize_checkpoint(tmp_path / "fp", tmp_path / "q", rtn)
    written = tensors(tmp_path / "q")
    assert "model.embed_tokens.weight" in written and "lm_head.weight" not in written
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    resident = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=rtn)
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, resident(input_ids=IDS).logits)


def test_streaming_errors(llama_dir, tmp_path, corpus, tokenizer):
    with pytest.raises(ValueError, match="avg_bits needs the whole-model sensitivity pass"):
        quantize_checkpoint(llama_dir, tmp_path / "o", SignRoundV2Config(iters=0, avg_bits=3.0))
    with pytest.raises(ValueError, match="iters=2 tunes on calibration data: pass dataset="):
        quantize_checkpoint(llama_dir, tmp_path / "o", SignRoundV2Config(iters=2))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        quantize_checkpoint(tmp_path / "bin", tmp_path / "o", SignRoundV2Config(iters=0))
    quantize_checkpoint(llama_dir, tmp_path / "q", SignRoundV2Config(bits=4, group_size=32, iters=0))
    with pytest.raises(ValueError, match="is already quantized"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "o", SignRoundV2Config(iters=0))


@pytest.mark.slow  # two fresh processes quantizing 11M- and 45M-parameter models: ~40 s on 2 cores
def test_peak_memory_does_not_grow_with_the_model():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--sizes", "test-2", "test-12", "--dtype", "float32",
         "--modes", "streaming", "--max-shard-size", "8MB", "--json"],
        capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    small, big = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    model_growth = big["checkpoint_mb"] - small["checkpoint_mb"]  # 130 MB: ten more 13.6 MB blocks
    peak_growth = big["streaming_peak_mb"] - small["streaming_peak_mb"]  # measured: 8 MB
    assert model_growth > 120
    assert peak_growth < 0.25 * model_growth, (small, big)
