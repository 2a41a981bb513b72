"""The user story on the real SmolLM2-135M-Instruct with real Python-docs text."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, pipeline

from hf_signround import QuantLinear, SignRoundV2Config
from hf_signround.assets import calibration_texts
from hf_signround.evaluation import perplexity
from hf_signround.qlinear import set_backend


@pytest.fixture(scope="module")
def fp_ppl(smollm2_dir, heldout):
    return perplexity(AutoModelForCausalLM.from_pretrained(smollm2_dir), heldout)


def test_w4g128_round_to_nearest_end_to_end(smollm2_dir, smollm2_tokenizer, heldout, fp_ppl, tmp_path):
    cfg = SignRoundV2Config(bits=4, group_size=128, sym=False, iters=0, dataset=calibration_texts(),
                            tokenizer=smollm2_tokenizer, nsamples=32, seqlen=256)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=cfg)
    qlayers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qlayers) == 30 * 7
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    # q_proj has in_features 576: G128 gives 4 full groups and a last group of 64
    assert model.model.layers[0].self_attn.q_proj.num_groups == 5

    ppl = perplexity(model, heldout)
    # measured on these 8 windows: fp ~12, W4G128 RTN ~16; far worse means a broken quantizer
    assert fp_ppl < ppl < 1.6 * fp_ppl, (fp_ppl, ppl)

    # float32 products allowed in bfloat16: torch's int4 kernel runs every layer, at the same quality
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        set_backend(model, "auto")
        ppl_bf16 = perplexity(model, heldout)
        assert {m.kernel for m in qlayers} == {"aten_int4"}
    finally:
        torch.set_float32_matmul_precision(precision)
        set_backend(model, "auto")
    assert abs(ppl_bf16 / ppl - 1) < 0.005, (ppl, ppl_bf16)  # measured: 0.02 %

    model.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    layer_config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["layer_config"]
    assert len(layer_config) == 210
    fp_bytes = sum(f.stat().st_size for f in smollm2_dir.glob("*.safetensors"))
    q_bytes = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert q_bytes < 0.35 * fp_bytes  # embeddings (tied lm_head) stay fp32

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(input_ids=heldout[:2]).logits, model(input_ids=heldout[:2]).logits)
    out = pipeline("text-generation", model=again, tokenizer=smollm2_tokenizer)(
        "def fib(n):", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert out.startswith("def fib(n):") and len(out) > len("def fib(n):")
