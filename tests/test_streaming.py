"""The streaming quantizer: the same checkpoint as from_pretrained + save_pretrained, bit for bit,
with memory that does not grow with the model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_signround import SignRoundV2Config
from hf_signround.shards import CheckpointError
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


MIXED = {"avg_bits": 3.0, "bit_options": [(2, 32), (4, 32)]}


@pytest.mark.parametrize("iters,mixed", [(0, False), (3, False), (0, True), (2, True)], ids=["rtn", "tuned",
                                                                                           "rtn-mixed", "tuned-mixed"])
def test_streaming_writes_what_from_pretrained_writes(model_dir, tmp_path, corpus, tokenizer, iters, mixed):
    kw = MIXED if mixed else {}
    resident = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config(iters, corpus, tokenizer,
                                                                                          **kw))
    resident.save_pretrained(tmp_path / "resident")
    result = quantize_checkpoint(model_dir, tmp_path / "streamed", config(iters, corpus, tokenizer, **kw),
                                 max_shard_size="40KB")
    reports = result.reports
    assert len(reports) == 2 and all(r.specs for r in reports.values())
    assert iters == 0 or all(r.loss_after is not None for r in reports.values())
    assert result.plan == resident.hf_quantizer.result.plan
    if mixed:  # the allocation scored the same blocks the same way: same scores, same choices
        assert result.allocation.scores == resident.hf_quantizer.result.allocation.scores
        assert len({s.bits for s in result.plan.values()}) == 2 and result.realized_avg_bits <= 3.0

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


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_streaming_refuses_to_write_over_its_input(llama_dir, tmp_path):
    before = _listing(llama_dir)
    rtn = SignRoundV2Config(bits=4, group_size=32, iters=0)
    with pytest.raises(ValueError, match=f"OUT {llama_dir} is the input {llama_dir}: writing there would destroy"):
        quantize_checkpoint(llama_dir, llama_dir, rtn)
    with pytest.raises(ValueError, match=f"OUT {llama_dir}/q lies inside the input {llama_dir}"):
        quantize_checkpoint(llama_dir, llama_dir / "q", rtn)
    assert _listing(llama_dir) == before


def test_streaming_replaces_an_earlier_save_whole(llama_dir, tmp_path):
    out = tmp_path / "out"
    rtn = SignRoundV2Config(bits=4, group_size=32, iters=0)
    quantize_checkpoint(llama_dir, out, rtn, max_shard_size="30KB")
    assert (out / "model.safetensors.index.json").is_file()
    quantize_checkpoint(llama_dir, out, rtn)  # one file now: no shard or index of the first save is left
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    with pytest.raises(ValueError, match=f"OUT {out} is not empty: pass --overwrite"):
        quantize_checkpoint(llama_dir, out, rtn, overwrite=False)


def test_an_interrupted_run_leaves_out_as_it_was(llama_dir, tmp_path, monkeypatch):
    import hf_signround.streaming as streaming

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier checkpoint")
    calls = []

    def interrupt():  # Ctrl-C after the first block is written
        calls.append(1)
        if len(calls) == 4:  # 3 tensors outside the blocks, then block 0
            raise KeyboardInterrupt

    monkeypatch.setattr(streaming, "return_freed_memory", interrupt)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(llama_dir, out, SignRoundV2Config(bits=4, group_size=32, iters=0), max_shard_size="20KB")
    assert len(calls) == 4
    assert _listing(out) == {"model.safetensors": b"an earlier checkpoint"}  # no .shard-*.tmp either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder


def test_a_damaged_source_fails_before_any_work(llama_dir, tmp_path):
    import shutil

    source = Path(shutil.copytree(llama_dir, tmp_path / "fp"))
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{weights} is not a valid safetensors file: its tensors end at byte"):
        quantize_checkpoint(source, tmp_path / "out", SignRoundV2Config(iters=0))
    assert not (tmp_path / "out").exists()


def test_nonfinite_weights_in_a_streamed_block(tmp_path):
    from tests.test_quantize import BAD, message, with_nonfinite
    from tests.tiny import tiny_llama

    with_nonfinite(tiny_llama()).save_pretrained(tmp_path / "fp")
    with pytest.raises(ValueError, match=re.escape(message())):
        quantize_checkpoint(tmp_path / "fp", tmp_path / "out", SignRoundV2Config(bits=4, group_size=32, iters=0))
    assert not (tmp_path / "out").exists()

    skip = SignRoundV2Config(bits=4, group_size=32, iters=0, skip_nonfinite=True)
    quantize_checkpoint(tmp_path / "fp", tmp_path / "streamed", skip)
    resident = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=skip)
    resident.save_pretrained(tmp_path / "resident")
    streamed, expected = tensors(tmp_path / "streamed"), tensors(tmp_path / "resident")
    assert streamed.keys() == expected.keys() and f"{BAD}.weight" in streamed
    for key, value in expected.items():
        torch.testing.assert_close(streamed[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    saved = json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"]
    assert BAD not in saved["layer_config"] and len(saved["layer_config"]) == 13
    AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")  # passes the load checks
