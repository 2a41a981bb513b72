"""The CPU kernels behind QuantLinear (auto-round-lib's ARK, torch's int4 kernel) against the reference.

Stated tolerances: relative Frobenius error of a layer's output against the exact float32
product of the dequantized weight. Measured worst cases over the grid below: ARK 5e-7 with
float32 activations (float32 compute, another summation order), 1.9e-3 bfloat16 / 2.4e-4
float16 (the output rounded once); torch's int4 kernel 5.4e-3 bfloat16 / 5.0e-4 float16 (its
scale and zero are rounded to the activation dtype). The reference itself, in bfloat16,
rounds the weight and the output.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from hf_signround import SignRoundV2Config
from hf_signround.export import export_gptq
from hf_signround.kernels import backend as backend_mod
from hf_signround.kernels.backend import ENV_VAR, ark_installed, choose
from hf_signround.qlinear import QuantLinear, prepare_model, set_backend
from tests.test_qlinear import _direct_weight, _make
from tests.tiny import tiny_llama

needs_ark = pytest.mark.skipif(not ark_installed(), reason="auto-round-lib is not installed (pip install auto-round-lib)")
TOL = {
    ("ark", torch.float32): 2e-6, ("ark", torch.bfloat16): 4e-3, ("ark", torch.float16): 1e-3,
    ("aten_int4", torch.bfloat16): 1e-2, ("aten_int4", torch.float16): 1e-3, ("aten_int4", torch.float32): 2e-6,
}
SHAPES = [(64, 256), (48, 200), (192, 576)]  # 200: K with no multiple of 32; 48/64 columns: small N


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def _layer(bits, group_size, sym, n, k, backend, seed=0):
    codes, scales, zeros, bias = _make(n, k, bits, group_size, sym, seed=seed)
    layer = QuantLinear.from_codes(codes, scales, zeros, bits=bits, group_size=group_size, sym=sym, bias=bias,
                                   scale_dtype=torch.float16, backend=backend)
    return layer, _direct_weight(codes, scales, zeros, bits, group_size), bias


def _rel(y: torch.Tensor, exact: torch.Tensor) -> float:
    return ((y.float() - exact).norm() / exact.norm()).item()


@needs_ark
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1, 48])  # 48 and 128 leave short last groups on K=200
@pytest.mark.parametrize("sym", [False, True])
def test_ark_matches_the_reference(dtype, bits, group_size, sym):
    for n, k in SHAPES:
        layer, w, bias = _layer(bits, group_size, sym, n, k, "ark", seed=bits * 31 + n)
        for rows in (1, 7):
            x = torch.randn(rows, k).to(dtype)
            y = layer(x)
            assert y.dtype == dtype and layer.kernel == "ark"
            assert _rel(y, F.linear(x.float(), w, bias.float())) < TOL["ark", dtype], (n, k, rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_aten_int4_matches_the_reference(dtype, bits, group_size, sym):
    for n, k in [(64, 256), (192, 576), (48, 96)]:
        layer, w, bias = _layer(bits, group_size, sym, n, k, "aten_int4", seed=bits * 17 + n)
        x = torch.randn(5, k).to(dtype)
        y = layer(x)
        assert y.dtype == dtype and layer.kernel == "aten_int4"
        assert _rel(y, F.linear(x.float(), w, bias.float())) < TOL["aten_int4", dtype], (n, k)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_aten_int4_computes_float32_activations_in_bfloat16_when_allowed(bits, group_size, sym, float32_in_bfloat16):
    for n, k in [(64, 256), (192, 576)]:
        layer, w, bias = _layer(bits, group_size, sym, n, k, "aten_int4", seed=bits * 17 + n)
        x = torch.randn(5, k)
        y = layer(x)
        assert y.dtype == torch.float32 and layer.kernel == "aten_int4"
        w4 = layer._plan.prepared
        assert w4.scale_zero.dtype == torch.bfloat16 and w4.bias.dtype == torch.float32
        # the product computed in bfloat16, returned in float32, the bias added in float32
        product = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), w4.packed, w4.group, w4.scale_zero)
        assert torch.equal(y, product.float() + w4.bias)
        assert 1e-4 < _rel(y, F.linear(x, w, bias.float())) < TOL["aten_int4", torch.bfloat16], (n, k)


def test_float32_activations_stay_float32_by_default():
    assert torch.get_float32_matmul_precision() == "highest" and not backend_mod.bf16_allowed_for_float32()
    layer, w, bias = _layer(4, 32, True, 64, 256, "aten_int4")
    x = torch.randn(3, 256)
    assert _rel(layer(x), F.linear(x, w, bias.float())) < TOL["aten_int4", torch.float32]
    assert layer._plan.prepared.scale_zero.dtype == torch.float32


@pytest.mark.parametrize("bits,group_size,n,k,match", [
    (8, 32, 64, 256, "at most 4 bits"),
    (4, 32, 40, 256, "divisible by 16"),
    (4, 48, 64, 200, "groups of 32-256 columns"),
])
def test_aten_int4_refuses_what_it_cannot_run(bits, group_size, n, k, match):
    layer, _, _ = _layer(bits, group_size, True, n, k, "aten_int4")
    with pytest.raises(RuntimeError, match=f"backend='aten_int4' was requested, but .*{match}"):
        layer(torch.randn(1, k, dtype=torch.bfloat16))


@needs_ark
def test_ark_keeps_one_copy_and_gives_the_stored_codes_back():
    layer, _, _ = _layer(3, 48, False, 48, 200, "ark")
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 200)
    y = layer(x)
    assert layer.qweight.device.type == "meta" and layer.qweight.shape == stored["qweight"].shape
    state = layer.state_dict()
    assert state.keys() == stored.keys() and all(torch.equal(state[k], stored[k]) for k in stored)
    assert torch.equal(layer.stored_qweight(), stored["qweight"])
    assert torch.equal(layer.dequantize_weight(torch.float32),
                       QuantLinear.from_codes(*_make(48, 200, 3, 48, False)[:3], bits=3, group_size=48, sym=False,
                                              bias=None).dequantize_weight(torch.float32))
    layer.to(torch.device("cpu"))  # a move restores the stored tensors and chooses again on the next call
    assert layer.kernel is None and torch.equal(layer.qweight, stored["qweight"])
    assert torch.equal(layer(x), y) and layer.kernel == "ark"
    layer.load_state_dict(stored)  # loading new values drops the converted ones
    assert layer.kernel is None and torch.equal(layer.qweight, stored["qweight"])


@pytest.mark.parametrize("bits,group_size,n,k", [(2, 32, 64, 256), (3, 128, 192, 576), (4, -1, 48, 1088),
                                                  (4, 64, 32, 96)])
def test_aten_int4_keeps_one_copy_and_gives_the_stored_codes_back(bits, group_size, n, k):
    layer, _, _ = _layer(bits, group_size, False, n, k, "aten_int4", seed=bits + n)
    stored = {name: v.clone() for name, v in layer.state_dict().items()}
    x = torch.randn(2, k, dtype=torch.bfloat16)
    y = layer(x)
    assert layer.kernel == "aten_int4" and layer.qweight.device.type == "meta"
    state = layer.state_dict()
    assert state.keys() == stored.keys() and all(torch.equal(state[name], stored[name]) for name in stored)
    assert torch.equal(layer.stored_qweight(), stored["qweight"])
    layer.to(torch.device("cpu"))  # a move restores the stored tensors and chooses again on the next call
    assert layer.kernel is None and torch.equal(layer.qweight, stored["qweight"])
    assert torch.equal(layer(x), y)


def test_aten_int4_keeps_the_stored_copy_when_its_codes_do_not_come_back(monkeypatch):
    from hf_signround.kernels import aten_int4

    real = aten_int4.codes_from_packed
    monkeypatch.setattr(aten_int4, "codes_from_packed", lambda w, n, k, columns=None: real(w, n, k, columns) ^ 1)
    layer, _, _ = _layer(4, 32, True, 64, 256, "aten_int4")
    stored = layer.qweight.clone()
    layer(torch.randn(1, 256, dtype=torch.bfloat16))
    assert layer.kernel == "aten_int4" and torch.equal(layer.qweight, stored)


@needs_ark
def test_ark_keeps_the_stored_codes_when_a_scale_is_zero():
    codes, scales, zeros, bias = _make(64, 256, 4, 32, True)
    scales[3, 2] = 0  # W / s cannot give the codes back: the stored qweight stays
    layer = QuantLinear.from_codes(codes, scales, zeros, bits=4, group_size=32, sym=True, bias=bias, backend="ark")
    x = torch.randn(3, 256)
    exact = F.linear(x, _direct_weight(codes, scales, zeros, 4, 32), bias.float())
    assert _rel(layer(x), exact) < TOL["ark", torch.float32]
    assert layer.qweight.device.type == "cpu"


def test_the_kernel_is_chosen_once_per_device_and_dtype(monkeypatch):
    calls = []
    real = backend_mod.choose
    monkeypatch.setattr("hf_signround.qlinear.choose", lambda *a: calls.append(a[2:]) or real(*a))
    layer, _, _ = _layer(4, 32, True, 64, 256, "auto")
    for _ in range(3):
        layer(torch.randn(1, 256))
    assert len(calls) == 1
    layer(torch.randn(1, 256, dtype=torch.bfloat16))
    layer(torch.randn(2, 256, dtype=torch.bfloat16))
    assert calls == [(torch.device("cpu"), torch.float32), (torch.device("cpu"), torch.bfloat16)]
    set_backend(torch.nn.Sequential(layer), "torch")
    layer(torch.randn(1, 256, dtype=torch.bfloat16))
    assert len(calls) == 3 and layer.kernel == "torch"


def test_auto_order_on_cpu(monkeypatch, caplog):
    layer, _, _ = _layer(4, 32, True, 64, 256, "auto")
    cpu = torch.device("cpu")
    eight, _, _ = _layer(8, 32, True, 64, 256, "auto")
    monkeypatch.setattr(backend_mod, "_ARK_INSTALLED", True)
    assert choose("auto", layer, cpu, torch.float32).name == "ark"
    assert choose("auto", layer, cpu, torch.bfloat16).name == "aten_int4"
    assert choose("auto", eight, cpu, torch.bfloat16).name == "ark"
    # float16: torch's int4 kernel has no fast float16 path (55x slower than bfloat16 at one token)
    assert choose("auto", layer, cpu, torch.float16).name == "ark"
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # float32 may compute in bfloat16
        assert choose("auto", layer, cpu, torch.float32).name == "aten_int4"
        assert choose("auto", eight, cpu, torch.float32).name == "ark"
        torch.set_float32_matmul_precision("high")  # TF32-like precision is not bfloat16's
        assert choose("auto", layer, cpu, torch.float32).name == "ark"
    finally:
        torch.set_float32_matmul_precision(precision)
    monkeypatch.setattr(backend_mod, "_ARK_INSTALLED", False)
    assert choose("auto", layer, cpu, torch.bfloat16).name == "aten_int4"
    assert choose("auto", layer, cpu, torch.float16).name == "aten_int4"
    monkeypatch.setattr(backend_mod, "_SLOW_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="hf_signround.kernels.backend"):
        assert choose("auto", eight, cpu, torch.bfloat16).name == "torch"
        assert choose("auto", layer, cpu, torch.float32).name == "torch"
        assert choose("auto", layer, cpu, torch.float32).name == "torch"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "hf-signround[cpu]" in warnings[1] and "at most 4 bits" in warnings[0]
    with pytest.raises(RuntimeError, match=r"backend='ark' was requested, but auto-round-lib is not installed"):
        choose("ark", layer, cpu, torch.float32)


@needs_ark
def test_compile_fullgraph_through_the_ark_op():
    layer, _, _ = _layer(4, 32, False, 64, 256, "ark")
    x = torch.randn(3, 256)
    eager = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.equal(compiled(x), eager)


@needs_ark
def test_ark_op_passes_opcheck():
    layer, _, _ = _layer(4, 32, False, 64, 256, "ark")
    plan = layer.prepare("cpu", torch.float32)
    w = plan.prepared
    args = (torch.randn(3, 256), w.blob, w.bias, 64, 256, w.group, 4, True)
    torch.library.opcheck(torch.ops.hf_signround.ark_linear.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_ark
def test_a_model_prepared_for_ark_saves_reloads_and_exports_exactly(tmp_path):
    model = tiny_llama()
    config = SignRoundV2Config(bits=3, group_size=32, iters=0)
    from hf_signround.quantize import quantize_model

    model.config.quantization_config = quantize_model(model, config).checkpoint_config(config)
    ids = torch.randint(3, 60, (1, 9))
    with torch.no_grad():
        set_backend(model, "torch")
        reference = model(ids).logits
        stored = {k: v.clone() for k, v in model.state_dict().items()}
        set_backend(model, "auto")
        assert prepare_model(model) == 14
        assert {m.kernel for m in model.modules() if isinstance(m, QuantLinear)} == {"ark"}
        fast = model(ids).logits
    assert _rel(fast, reference) < 1e-5
    model.save_pretrained(tmp_path / "saved")
    exported = export_gptq(model, tmp_path / "gptq")
    set_backend(model, "torch")  # the stored qweight again
    assert export_gptq(model, tmp_path / "gptq-stored").quantization_config == exported.quantization_config
    for name in exported.files:
        assert (tmp_path / "gptq" / name).read_bytes() == (tmp_path / "gptq-stored" / name).read_bytes()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert {m.kernel for m in again.modules() if isinstance(m, QuantLinear)} == {"ark"}  # prepared at load
    again_state = {k: v for k, v in again.state_dict().items()}
    assert again_state.keys() == stored.keys() and all(torch.equal(again_state[k], stored[k]) for k in stored)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, fast)


def test_a_model_loaded_under_medium_precision_runs_int4_in_bfloat16(tmp_path, float32_in_bfloat16):
    """The precision is read when kernels are chosen: at load, or again after ``set_backend``."""
    model = tiny_llama()
    config = SignRoundV2Config(bits=4, group_size=32, iters=0)
    from hf_signround.quantize import quantize_model

    model.config.quantization_config = quantize_model(model, config).checkpoint_config(config)
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 60, (1, 9))
    with torch.no_grad():
        set_backend(model, "torch")
        reference = model(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert {m.kernel for m in loaded.modules() if isinstance(m, QuantLinear)} == {"aten_int4"}
        state, stored = loaded.state_dict(), model.state_dict()  # rebuilt from the kernel's copy, fused or not
        assert state.keys() == stored.keys() and all(torch.equal(state[name], stored[name]) for name in stored)
        fast = loaded(ids).logits
        assert fast.dtype == torch.float32
        assert 1e-5 < _rel(fast, reference) < 1e-2
        torch.set_float32_matmul_precision("highest")
        assert {m.kernel for m in loaded.modules() if isinstance(m, QuantLinear)} == {"aten_int4"}  # kept
        set_backend(loaded, "auto")
        exact = loaded(ids).logits
        assert {m.kernel for m in loaded.modules() if isinstance(m, QuantLinear)} == {"ark" if ark_installed()
                                                                                     else "torch"}
        assert _rel(exact, reference) < 1e-5
