"""QuantLinear's backend dispatch, the config/env switch, and torch.compile over both paths."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_signround import SignRoundV2Config
from hf_signround.kernels import backend as backend_mod
from hf_signround.kernels.backend import ENV_VAR, choose, triton_installed
from hf_signround.kernels.reference import linear_reference
from hf_signround.qlinear import QuantLinear, set_backend
from hf_signround.quantize import quantize_model
from tests.tiny import tiny_llama

needs_triton = pytest.mark.skipif(not triton_installed(), reason="Triton is not installed (pip install triton)")
# Where the Triton path runs in this session: the GPU, or Triton's CPU interpreter (conftest sets
# TRITON_INTERPRET=1 when there is no GPU).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runs_triton = pytest.mark.skipif(DEVICE == "cpu" and not backend_mod.triton_interpret(),
                                 reason="needs a GPU or TRITON_INTERPRET=1")


def _layer(backend: str = "auto", bits: int = 4, group_size: int = 32, dtype=torch.float16, k: int = 96,
           n: int = 40) -> QuantLinear:
    gen = torch.Generator().manual_seed(0)
    g = -(-k // group_size) if group_size > 0 else 1
    codes = torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8)
    zeros = torch.randint(0, 2**bits, (n, g), generator=gen)
    scales = torch.rand(n, g, generator=gen) * 0.02 + 1e-3
    return QuantLinear.from_codes(codes, scales, zeros, bits=bits, group_size=group_size, sym=False,
                                  bias=torch.randn(n, generator=gen), bias_dtype=dtype, backend=backend)


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def select_backend(requested: str, x: torch.Tensor, bits: int, group_size: int) -> str:
    return choose(requested, _layer(bits=bits, group_size=group_size), x.device, x.dtype).name


def test_auto_never_picks_triton_for_cpu_inputs(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 96)
    assert select_backend("auto", x, 4, 128) in ("ark", "torch")
    assert select_backend("auto", x.half(), 4, 128) in ("ark", "aten_int4", "torch")
    assert select_backend("torch", x, 4, 128) == "torch"


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = _layer("triton")
    with pytest.raises(RuntimeError, match="backend='triton'.*CUDA tensor.*TRITON_INTERPRET=1"):
        layer(torch.randn(1, 96, dtype=torch.float16))


def test_explicit_triton_without_triton_raises(monkeypatch) -> None:
    monkeypatch.setattr(backend_mod, "_TRITON_INSTALLED", False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        _layer("triton")(torch.randn(1, 96, dtype=torch.float16))
    # auto quietly falls back to a CPU kernel
    assert select_backend("auto", torch.randn(1, 96, dtype=torch.float16), 4, 32) != "triton"


@needs_triton
@runs_triton
@pytest.mark.parametrize("group_size,dtype,match", [(16, torch.float16, "multiple of 32"),
                                                    (32, torch.float32, "float16 or bfloat16")])
def test_explicit_triton_on_unsupported_layer_raises(group_size, dtype, match) -> None:
    layer = _layer("triton", group_size=group_size, dtype=dtype).to(DEVICE)
    x = torch.randn(1, 96, dtype=dtype, device=DEVICE)
    with pytest.raises(RuntimeError, match=match):
        layer(x)
    assert select_backend("auto", x, 4, group_size) != "triton"


def test_env_var_overrides_the_layer(monkeypatch) -> None:
    layer = _layer("triton")
    x = torch.randn(3, 96, dtype=torch.float16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(ENV_VAR, "torch")
    ref = linear_reference(x, layer.qweight, layer.scales, layer.qzeros, layer.bias, bits=4, group_size=32,
                           in_features=96)
    assert torch.equal(layer(x), ref)
    assert layer.kernel == "torch"
    monkeypatch.setenv(ENV_VAR, "cuda")
    assert torch.equal(layer(x), ref)  # read when a kernel is chosen, not on every call
    layer.release()
    with pytest.raises(ValueError, match=f"{ENV_VAR}='cuda' is not a backend"):
        layer(x)


def test_bad_backend_names_raise() -> None:
    with pytest.raises(ValueError, match="backend='fast' is not a backend"):
        _layer("fast")
    with pytest.raises(ValueError, match="backend='fast'"):
        SignRoundV2Config(backend="fast")
    with pytest.raises(ValueError, match="backend='gpu'"):
        set_backend(torch.nn.Sequential(_layer()), "gpu")


def test_config_backend_reaches_every_layer_and_survives_reload(tmp_path) -> None:
    model = tiny_llama()
    config = SignRoundV2Config(bits=4, group_size=32, iters=0, backend="torch")
    result = quantize_model(model, config)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and {m.backend for m in layers} == {"torch"}
    model.config.quantization_config = result.checkpoint_config(config)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert {m.backend for m in again.modules() if isinstance(m, QuantLinear)} == {"torch"}
    assert again.config.quantization_config.backend == "torch"
    assert set_backend(again, "auto") == len(layers)


def test_compile_fullgraph_torch_backend_matches_eager() -> None:
    layer = _layer("torch", dtype=torch.float32)
    x = torch.randn(2, 5, 96)
    eager = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


@needs_triton
@runs_triton
def test_compile_fullgraph_triton_backend_matches_eager() -> None:
    layer = _layer("triton").to(DEVICE)
    x = torch.randn(3, 96, dtype=torch.float16, device=DEVICE)
    eager = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)  # fullgraph: any graph break is an error
    assert torch.equal(compiled(x), eager)


@needs_triton
@runs_triton
@pytest.mark.parametrize("rows", [1, 5, 40, 200], ids=["gemv", "decode", "prefill", "dequant"])
def test_eager_triton_skips_the_custom_op_and_matches_it_bit_for_bit(rows, monkeypatch) -> None:
    layer = _layer("triton").to(DEVICE)
    x = torch.randn(2, rows, 96, dtype=torch.float16, device=DEVICE)
    strided = torch.randn(rows, 2 * 96, dtype=torch.float16, device=DEVICE)[:, ::2]  # not contiguous
    with torch.no_grad():
        want = [backend_mod.quant_linear_op(t, layer.qweight, layer.scales, layer.qzeros, layer.bias, 4, 32, 96)
                for t in (x, strided)]

        def refuse(*args):
            raise AssertionError("an eager call went through the custom op")

        monkeypatch.setattr(backend_mod, "quant_linear_op", refuse)
        for _ in range(2):  # the first call resolves the launch, the second reuses it
            assert torch.equal(layer(x), want[0]) and torch.equal(layer(strided), want[1])
    assert layer.kernel == "triton"
    with pytest.raises(ValueError, match="last dimension is 95, but the layer has in_features=96"):
        layer(x[..., :95])
    # Autograd through the input keeps the custom op (it says it has no derivative), as before.
    with pytest.raises(AssertionError, match="went through the custom op"):
        layer(x.clone().requires_grad_())


@needs_triton
@runs_triton
def test_triton_prepare_checks_the_stored_tensors_once() -> None:
    layer = _layer("triton").to(DEVICE)
    layer.scales.data = layer.scales.data[:, :-1].contiguous()  # damaged after construction
    with pytest.raises(ValueError, match=r"scales must be float \(3, 40\)"):
        layer(torch.randn(1, 96, dtype=torch.float16, device=DEVICE))


@needs_triton
@runs_triton
def test_custom_op_passes_opcheck() -> None:
    layer = _layer("triton").to(DEVICE)
    x = torch.randn(2, 96, dtype=torch.float16, device=DEVICE)
    args = (x, layer.qweight, layer.scales, layer.qzeros, layer.bias, 4, 32, 96)
    torch.library.opcheck(torch.ops.hf_signround.quant_linear.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_triton
@runs_triton
def test_model_forward_triton_matches_torch() -> None:
    model = tiny_llama().to(torch.float16)
    quantize_model(model, SignRoundV2Config(bits=3, group_size=32, iters=0, backend="triton"))
    model.to(DEVICE)
    ids = torch.randint(3, 60, (1, 7), device=DEVICE)
    with torch.no_grad():
        fused = model(ids).logits.float()
        set_backend(model, "torch")
        ref = model(ids).logits.float()
    assert ((fused - ref).norm() / ref.norm()).item() < 5e-3
