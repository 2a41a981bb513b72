"""Tests for hf_signround.qlinear.QuantLinear and the pure-torch reference kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_signround.kernels.reference import dequantize_packed, linear_reference
from hf_signround.qlinear import QuantLinear

BITS = [2, 3, 4, 8]
GROUP_SIZES = [32, 64, 128, -1]


def _make(
    n: int, k: int, bits: int, group_size: int, sym: bool, seed: int = 0, scale_dtype=torch.float16
):
    """Random codes/scales/zeros/bias; scales already cast to scale_dtype as callers do."""
    gen = torch.Generator().manual_seed(seed)
    g = 1 if group_size == -1 else -(-k // group_size)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8)
    scales = (torch.rand(n, g, generator=gen) * 0.02 + 1e-3).to(scale_dtype)
    zeros = None if sym else torch.randint(0, 2**bits, (n, g), generator=gen)
    bias = torch.randn(n, generator=gen).to(scale_dtype)
    return codes, scales, zeros, bias


def _direct_weight(codes, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """Independent float32 evaluation of W[n, k] = s[n, g] * (q[n, k] - z[n, g])."""
    n, k = codes.shape
    gs = k if group_size == -1 else group_size
    g_idx = torch.arange(k) // gs
    s = scales.float()[:, g_idx]
    if zeros is None:
        z = torch.full((n, k), float(2 ** (bits - 1)))
    else:
        z = zeros.float()[:, g_idx]
    return s * (codes.float() - z)


CASES = [(bits, gs, sym) for bits in BITS for gs in GROUP_SIZES for sym in (False, True)]


@pytest.mark.parametrize("bits,group_size,sym", CASES)
@pytest.mark.parametrize("n,k", [(70, 256), (33, 200)])
def test_dequant_and_forward_exact(bits: int, group_size: int, sym: bool, n: int, k: int) -> None:
    codes, scales, zeros, bias = _make(n, k, bits, group_size, sym, seed=bits * 1000 + group_size)
    m = QuantLinear.from_codes(
        codes, scales, zeros, bits=bits, group_size=group_size, sym=sym, bias=bias,
        scale_dtype=torch.float16, backend="torch",  # the reference; other kernels: tests/test_cpu_kernels.py
    )
    w_ref = _direct_weight(codes, scales, zeros, bits, group_size)
    assert torch.equal(m.dequantize_weight(torch.float32), w_ref)
    w_default = m.dequantize_weight()
    assert w_default.dtype == torch.float16
    assert torch.equal(w_default, w_ref.to(torch.float16))

    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(1))
    y = m(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, F.linear(x, w_ref, bias.float()))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [False, True])
def test_k_not_multiple_of_32_per_row_group(bits: int, sym: bool) -> None:
    n, k = 33, 100
    codes, scales, zeros, _ = _make(n, k, bits, -1, sym, seed=bits)
    m = QuantLinear.from_codes(
        codes, scales, zeros, bits=bits, group_size=-1, sym=sym, bias=None,
        scale_dtype=torch.float32, backend="torch",
    )
    assert m.qweight.shape == (4 * bits, n)
    assert m.num_groups == 1
    w_ref = _direct_weight(codes, scales, zeros, bits, -1)
    assert torch.equal(m.dequantize_weight(), w_ref)
    x = torch.randn(7, k)
    assert torch.equal(m(x), F.linear(x, w_ref))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [False, True])
def test_half_activations(dtype: torch.dtype, sym: bool) -> None:
    n, k, bits, gs = 70, 256, 4, 64
    codes, scales, zeros, bias = _make(n, k, bits, gs, sym, seed=7)
    m = QuantLinear.from_codes(
        codes, scales, zeros, bits=bits, group_size=gs, sym=sym, bias=bias,
        scale_dtype=torch.float16,
    )
    x = torch.randn(4, k)
    y = m(x.to(dtype))
    assert y.dtype == dtype
    expected = F.linear(x.to(dtype).float(), _direct_weight(codes, scales, zeros, bits, gs), bias.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("sym,with_bias", [(False, True), (True, False), (False, False), (True, True)])
def test_meta_construction_and_state_dict_roundtrip(sym: bool, with_bias: bool) -> None:
    n, k, bits, gs = 70, 256, 3, 128
    codes, scales, zeros, bias = _make(n, k, bits, gs, sym, seed=3)
    src = QuantLinear.from_codes(
        codes, scales, zeros, bits=bits, group_size=gs, sym=sym,
        bias=bias if with_bias else None, scale_dtype=torch.float16,
    )
    expected_keys = ["qweight", "scales"] + ([] if sym else ["qzeros"]) + (["bias"] if with_bias else [])
    state = src.state_dict()
    assert list(state.keys()) == expected_keys

    with torch.device("meta"):
        dst = QuantLinear(k, n, bits, gs, sym, with_bias, scale_dtype=torch.float16)
    assert dst.qweight.device.type == "meta"
    assert list(dst.state_dict().keys()) == expected_keys
    for key in expected_keys:
        assert dst.state_dict()[key].shape == state[key].shape
        assert dst.state_dict()[key].dtype == state[key].dtype

    dst.load_state_dict(state, assign=True)
    assert all(p.device.type == "cpu" for p in dst.parameters())
    assert all(isinstance(p, nn.Parameter) and not p.requires_grad for p in dst.parameters())
    x = torch.randn(2, k)
    assert torch.equal(dst(x), src(x))


def test_parameters_not_buffers() -> None:
    m = QuantLinear(64, 40, 4, 32, False, True)
    assert [name for name, _ in m.named_parameters()] == ["qweight", "scales", "qzeros", "bias"]
    assert list(m.named_buffers()) == []
    assert all(not p.requires_grad for p in m.parameters())
    assert m.qweight.dtype == torch.int32 and m.qweight.shape == (8, 40)
    assert m.scales.dtype == torch.float16 and m.scales.shape == (2, 40)
    assert m.qzeros.dtype == torch.int32 and m.qzeros.shape == (2, 8)
    assert m.bias.dtype == torch.float16 and m.bias.shape == (40,)
    m2 = QuantLinear(64, 40, 4, -1, True, False, scale_dtype=torch.bfloat16, bias_dtype=torch.float32)
    assert m2.qzeros is None and m2.bias is None
    assert m2.scales.dtype == torch.bfloat16 and m2.scales.shape == (1, 40)
    m3 = QuantLinear(64, 40, 4, -1, True, True, scale_dtype=torch.bfloat16, bias_dtype=torch.float32)
    assert m3.bias.dtype == torch.float32


def test_properties_and_extra_repr() -> None:
    m = QuantLinear(768, 192, 4, 128, False, False)
    assert m.extra_repr() == "in_features=768, out_features=192, bits=4, group_size=128, sym=False, bias=False"
    assert "bits=4" in repr(m)
    assert (m.in_features, m.out_features, m.bits, m.group_size, m.num_groups, m.sym) == (
        768, 192, 4, 128, 6, False,
    )
    m2 = QuantLinear(100, 10, 2, -1, True, True)
    assert m2.group_size == -1 and m2.num_groups == 1 and m2.sym is True
    assert "group_size=-1, sym=True, bias=True" in m2.extra_repr()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym,with_bias", [(False, True), (True, False)])
def test_packed_nbytes(bits: int, sym: bool, with_bias: bool) -> None:
    n, k, gs = 70, 256, 64
    g = k // gs
    m = QuantLinear(k, n, bits, gs, sym, with_bias, scale_dtype=torch.float16)
    fp16_weight_bytes = n * k * 2
    qweight_bytes = fp16_weight_bytes * bits // 16  # K is a multiple of 32: no padding
    scale_bytes = g * n * 2
    zero_bytes = 0 if sym else g * (-(-n // 32) * bits) * 4
    bias_bytes = n * 2 if with_bias else 0
    assert m.packed_nbytes() == qweight_bytes + scale_bytes + zero_bytes + bias_bytes


def test_invalid_config_errors() -> None:
    with pytest.raises(ValueError, match=r"bits=5"):
        QuantLinear(128, 16, 5, 32, False, False)
    # a group size that does not divide in_features leaves a shorter last group
    assert QuantLinear(128, 16, 4, 48, False, False).num_groups == 3
    with pytest.raises(ValueError, match=r"group_size=0"):
        QuantLinear(128, 16, 4, 0, False, False)
    with pytest.raises(ValueError, match=r"group_size=-2"):
        QuantLinear(128, 16, 4, -2, False, False)


def test_from_codes_errors() -> None:
    codes, scales, zeros, _ = _make(16, 64, 4, 32, False)
    with pytest.raises(ValueError, match="sym=True"):
        QuantLinear.from_codes(codes, scales, zeros, bits=4, group_size=32, sym=True, bias=None)
    with pytest.raises(ValueError, match="sym=False"):
        QuantLinear.from_codes(codes, scales, None, bits=4, group_size=32, sym=False, bias=None)
    with pytest.raises(ValueError, match="scales shape"):
        QuantLinear.from_codes(codes, scales[:, :1], zeros, bits=4, group_size=32, sym=False, bias=None)
    with pytest.raises(ValueError, match="out of range"):
        QuantLinear.from_codes(codes, scales, zeros, bits=3, group_size=32, sym=False, bias=None)
    with pytest.raises(ValueError, match="bits=6"):
        QuantLinear.from_codes(codes, scales, zeros, bits=6, group_size=32, sym=False, bias=None)


def test_reference_functions_directly() -> None:
    n, k, bits, gs = 40, 96, 2, 32
    codes, scales, zeros, bias = _make(n, k, bits, gs, False, seed=11, scale_dtype=torch.float32)
    m = QuantLinear.from_codes(
        codes, scales, zeros, bits=bits, group_size=gs, sym=False, bias=bias, scale_dtype=torch.float32
    )
    w = dequantize_packed(
        m.qweight, m.scales, m.qzeros, bits=bits, group_size=gs, in_features=k, out_dtype=torch.float32
    )
    assert torch.equal(w, _direct_weight(codes, scales, zeros, bits, gs))
    x = torch.randn(3, k)
    y = linear_reference(x, m.qweight, m.scales, m.qzeros, m.bias, bits=bits, group_size=gs, in_features=k)
    assert torch.equal(y, F.linear(x, w, bias))
    with pytest.raises(ValueError, match="scales shape"):
        dequantize_packed(
            m.qweight, m.scales.T, m.qzeros, bits=bits, group_size=gs, in_features=k,
            out_dtype=torch.float32,
        )
