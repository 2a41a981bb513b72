"""The GPTQ export read by an independent loader: auto-round (PyPI, CPU), through transformers.

* symmetric checkpoints, 2/3/4/8 bits with a mixed-bit override: the whole model loads with
  auto-round's pure-torch GPTQ kernel (float16) and its logits match ours to fp16 tolerance;
* asymmetric layers, 2/3/4/8 bits, zero points of 0 included: auto-round's torch GPTQ layer
  decodes our tensors to bit-identical outputs;
* asymmetric checkpoints: with ``auto-round-lib`` (x86-64 Linux) the whole model loads with its
  CPU kernel and, computing in float32, reproduces our logits exactly.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_signround import SignRoundV2Config
from hf_signround.export import export_gptq
from hf_signround.export.gptq import gptq_layer_tensors
from tests.test_export_gptq import random_layer

pytest.importorskip("auto_round", reason="the independent GPTQ loader comes from auto-round (pip install -e '.[test]')")
from transformers import AutoRoundConfig

IDS = torch.tensor([[1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])  # within every tiny vocabulary (64)
DOWN8 = {"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": -1, "sym": True}}


def quantized(llama_dir, bits, sym):
    cfg = SignRoundV2Config(bits=bits, group_size=32, sym=sym, iters=0, layer_config=DOWN8)
    return AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def load_with_auto_round(path, backend, **kw):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=AutoRoundConfig(backend=backend),
                                                device_map="cpu", **kw)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_auto_round_serves_symmetric_export(llama_dir, tmp_path, bits):
    ours = quantized(llama_dir, bits, sym=True)
    export_gptq(ours, tmp_path)
    theirs = load_with_auto_round(tmp_path, "auto_round:torch_zp")
    down = theirs.model.layers[0].mlp.down_proj
    assert type(down).__module__.startswith("auto_round_extension") and down.bits == 8  # the dynamic override
    assert theirs.model.layers[0].mlp.up_proj.bits == bits
    ref, out = logits(ours), logits(theirs)
    # auto-round computes in float16: allow its rounding, nothing more
    assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_auto_round_decodes_asymmetric_layers_exactly(bits):
    from auto_round_extension.torch.qlinear_torch_zp import (
        QuantLinear as AutoRoundGPTQLinear,
    )

    layer = random_layer(bits, 32, sym=False, seed=bits)  # has zero points of 0
    tensors, spec = gptq_layer_tensors(layer)
    assert spec["mirrored"] > 0
    theirs = AutoRoundGPTQLinear(bits, spec["group_size"], layer.in_features, layer.out_features, bias=True)
    theirs.load_state_dict({k: v for k, v in tensors.items() if k != "g_idx"})  # g_idx is implied (no act-order)
    eye = torch.eye(layer.in_features, dtype=torch.float16)
    expected = layer.dequantize_weight(torch.float16).T + layer.bias.half()
    assert torch.equal(theirs(eye), expected)


class _Fp32Compute:
    """auto-round-lib with its compute type pinned to float32 instead of ``"auto"``.

    On CPUs with AVX512-BF16 or VNNI, ``"auto"`` computes in bfloat16 or int8, so the logits
    differ from ours by that rounding whatever the checkpoint holds; in float32 any difference
    would be the decoding of our tensors.
    """

    def __init__(self, ark):
        self._ark = ark

    def __getattr__(self, name):
        fn = getattr(self._ark, name)
        if name not in ("repack_quantized_weight", "woqgemm"):
            return fn
        return lambda *args, **kw: fn(*("fp32" if a == "auto" else a for a in args), **kw)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_auto_round_kernel_serves_asymmetric_export_exactly(llama_dir, tmp_path, monkeypatch, bits):
    pytest.importorskip("auto_round_kernel", reason="auto-round-lib (x86-64 Linux wheels) runs asymmetric GPTQ on CPU")
    import auto_round_kernel.qlinear as ark_qlinear

    ours = quantized(llama_dir, bits, sym=False)
    export_gptq(ours, tmp_path)
    ref = logits(ours)
    # its own compute choice (bf16/int8 where the CPU has them): equal up to that rounding
    theirs = load_with_auto_round(tmp_path, "auto", dtype=torch.float32)
    assert type(theirs.model.layers[0].mlp.down_proj).__module__ == "auto_round_kernel.qlinear"
    assert theirs.model.layers[0].mlp.down_proj.bits == 8
    assert (logits(theirs) - ref).abs().max() <= 2e-2 * ref.abs().max()
    # computing in float32: bit-identical
    monkeypatch.setattr(ark_qlinear, "ark", _Fp32Compute(ark_qlinear.ark))
    theirs = load_with_auto_round(tmp_path, "auto", dtype=torch.float32)
    assert torch.equal(logits(theirs), ref)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt2"])
def test_auto_round_serves_per_expert_and_conv1d_exports(model_type, tmp_path):
    # auto-round splits Qwen3-MoE's experts into per-expert Linears and reads experts.{e}.gate_proj
    # from our export; GPT-2's Conv1D layers load as GPTQ layers. (It leaves Mixtral's experts
    # fused in transformers 5, so Mixtral's block_sparse_moe.experts.{e}.w1 export is checked
    # exactly in tests/test_zoo.py instead.)
    from tests.tiny import tiny_zoo_model

    tiny_zoo_model(model_type).save_pretrained(tmp_path / "fp")
    cfg = SignRoundV2Config(bits=4, group_size=32, sym=True, iters=0)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    export_gptq(ours, tmp_path / "gptq")
    theirs = load_with_auto_round(tmp_path / "gptq", "auto_round:torch_zp")
    served = [m for m in theirs.modules() if type(m).__module__.startswith("auto_round_extension")]
    assert len(served) == sum(1 for m in ours.modules() if hasattr(m, "qweight"))
    ref, out = logits(ours), logits(theirs)
    assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()
