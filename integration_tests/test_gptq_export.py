"""SmolLM2-135M-Instruct exported as GPTQ and served by auto-round's loaders (CPU).

Measured (W4G128 round-to-nearest; 576-wide layers regrouped to G64, exact): symmetric through
auto-round's float16 torch kernel, max |Δlogit| 0.11 on logits up to 39.5, perplexity equal to
4 digits; asymmetric through auto-round-lib's float32 kernel, max |Δlogit| 1.5e-4.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_signround import SignRoundV2Config
from hf_signround.export import export_gptq

pytest.importorskip("auto_round", reason="the independent GPTQ loader comes from auto-round (pip install -e '.[test]')")
from transformers import AutoRoundConfig

pytestmark = pytest.mark.slow  # about a minute per scheme on 2 CPU cores


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_smollm2_gptq_export_serves_with_auto_round(smollm2_dir, heldout, tmp_path, sym):
    if not sym:
        pytest.importorskip("auto_round_kernel", reason="auto-round-lib runs asymmetric GPTQ on CPU (x86-64 Linux)")
    cfg = SignRoundV2Config(bits=4, group_size=128, sym=sym, iters=0)
    ours = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=cfg)
    result = export_gptq(ours, tmp_path)
    assert result.regrouped["model.layers.0.self_attn.q_proj"] == (128, 64)  # 576 = 4.5 x 128
    assert result.quantization_config["group_size"] == 64

    backend, dtype = ("auto_round:torch_zp", torch.float16) if sym else ("auto", torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=AutoRoundConfig(backend=backend),
                                                  device_map="cpu", dtype=dtype)
    ids = heldout[:1, :128]
    with torch.no_grad():
        ref, out = ours(input_ids=ids).logits.float(), theirs(input_ids=ids).logits.float()
    diff = (out - ref).abs()
    if sym:  # float16 compute
        assert diff.max() < 0.01 * ref.abs().max() and diff.mean() < 1e-3 * ref.abs().max()
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.98
    else:  # float32 compute, another summation order
        assert diff.max() < 1e-4 * ref.abs().max()
        assert torch.equal(out.argmax(-1), ref.argmax(-1))
