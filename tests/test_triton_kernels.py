"""The Triton kernels against ``reference.linear_reference``: every kernel x bits x group x sym x dtype.

On a machine without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set here before the kernels are first imported); with CUDA they are compiled and run on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install triton); its kernels cannot be tested")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hf_signround.kernels.reference import dequantize_packed, linear_reference
from hf_signround.kernels.triton_kernels import CONFIGS
from hf_signround.kernels.triton_launch import DEQUANT_MIN_ROWS, dequantize, kernel_for_rows, quant_linear
from hf_signround.qlinear import QuantLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BITS = [2, 3, 4, 8]
GROUPS = [32, 64, 128, -1]
DTYPES = [torch.float16, torch.bfloat16]
ROWS = {"gemv": 1, "decode": 5, "prefill": 40, "dequant": 40}
# Allowed normwise error of the fused result against the reference in the activation dtype:
# both round the same float32 weights once; they differ by summation order and one output rounding.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def _layer(n: int, k: int, bits: int, group_size: int, sym: bool, dtype: torch.dtype, *, bias: bool = True,
           seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    g = 1 if group_size == -1 else -(-k // group_size)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8)
    scales = torch.rand(n, g, generator=gen) * 0.02 + 1e-3
    zeros = None if sym else torch.randint(0, 2**bits, (n, g), generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    layer = QuantLinear.from_codes(codes, scales, zeros, bits=bits, group_size=group_size, sym=sym, bias=b,
                                   scale_dtype=torch.float16, bias_dtype=dtype)
    return layer.to(DEVICE)


def _run(layer: QuantLinear, x: torch.Tensor, **kw) -> torch.Tensor:
    return quant_linear(x, layer.qweight, layer.scales, layer.qzeros, layer.bias, layer.bits, layer.group_size,
                        layer.in_features, **kw)


def _assert_matches_reference(layer: QuantLinear, x: torch.Tensor, y: torch.Tensor) -> None:
    ref = linear_reference(x, layer.qweight, layer.scales, layer.qzeros, layer.bias, bits=layer.bits,
                           group_size=layer.group_size, in_features=layer.in_features)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert torch.isfinite(y).all(), "non-finite output (an unwritten or garbage element)"
    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < TOL[x.dtype], f"normwise error {err:.2e} vs the reference"
    # Element-wise too: no single output may be far off (a wrong tile edge hides in a norm).
    worst = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert worst < 4 * TOL[x.dtype], f"worst element error {worst:.2e}"


def _x(rows: int, k: int, dtype: torch.dtype, seed: int = 1, lead: tuple[int, ...] = ()) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, rows, k, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kernel", sorted(ROWS))
def test_kernel_matches_reference(kernel: str, bits: int, group_size: int, sym: bool, dtype: torch.dtype) -> None:
    # N=72: not a multiple of 32 (masked columns, a partial qzeros word); K=320: the last
    # G128 group is short and the last K tile is partial.
    layer = _layer(72, 320, bits, group_size, sym, dtype, seed=bits * 100 + group_size)
    x = _x(ROWS[kernel], 320, dtype)
    y = _run(layer, x, kernel=kernel, config=CONFIGS[kernel][0])
    _assert_matches_reference(layer, x, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_writes_the_reference_weight_exactly(bits: int, group_size: int, sym: bool, dtype) -> None:
    layer = _layer(72, 320, bits, group_size, sym, dtype, seed=bits * 10 + group_size)
    for out in (torch.float32, dtype):
        w = dequantize(layer.qweight, layer.scales, layer.qzeros, bits, group_size, 320, out)
        ref = dequantize_packed(layer.qweight, layer.scales, layer.qzeros, bits=bits, group_size=group_size,
                                in_features=320, out_dtype=out).T
        assert w.shape == (320, 72) and w.is_contiguous() and w.dtype == out
        if out == torch.bfloat16 and DEVICE == "cpu":
            # Triton's interpreter rounds float32 to bfloat16 toward zero, a GPU to nearest: one step apart.
            step = torch.finfo(torch.bfloat16).eps * ref.float().abs()
            assert ((w.float() - ref.float()).abs() <= step).all()
        else:
            assert torch.equal(w, ref)


def test_kernel_for_rows() -> None:
    assert [kernel_for_rows(m) for m in (1, 2, 16, 17, DEQUANT_MIN_ROWS, DEQUANT_MIN_ROWS + 1)] == [
        "gemv", "decode", "decode", "prefill", "prefill", "dequant"]


@pytest.mark.parametrize("kernel", sorted(ROWS))
@pytest.mark.parametrize("index", range(max(len(c) for c in CONFIGS.values())))
def test_every_config(kernel: str, index: int) -> None:
    if index >= len(CONFIGS[kernel]):
        pytest.skip(f"{kernel} has {len(CONFIGS[kernel])} configs")
    cfg = CONFIGS[kernel][index]
    for bits, group_size in ((4, 128), (3, 64)):
        layer = _layer(100, 576, bits, group_size, sym=False, dtype=torch.float16, seed=index)
        x = _x(ROWS[kernel], 576, torch.float16, seed=index)
        _assert_matches_reference(layer, x, _run(layer, x, kernel=kernel, config=cfg))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kernel", ["gemv", "decode"])
def test_split_k_is_deterministic_and_resets(kernel: str, bits: int) -> None:
    # K=96 with BLOCK_K=64 is 2 tiles over 4 splits: two splits own no tile and still arrive.
    cfg = {**CONFIGS[kernel][0], "SPLIT_K": 4, "BLOCK_K": 64}
    layer = _layer(50, 96, bits, 32, sym=False, dtype=torch.float16)
    x = _x(ROWS[kernel], 96, torch.float16)
    first = _run(layer, x, kernel=kernel, config=cfg)
    _assert_matches_reference(layer, x, first)
    again = _run(layer, x, kernel=kernel, config=cfg)  # the counters must be back at zero
    assert torch.equal(first, again)


def test_auto_split_k() -> None:
    from hf_signround.kernels.triton_launch import _auto_split

    assert _auto_split(tiles=1000, k_tiles=64, device=torch.device(DEVICE)) == 1  # enough programs already
    assert 1 < _auto_split(tiles=8, k_tiles=64, device=torch.device(DEVICE)) <= 16
    assert _auto_split(tiles=1, k_tiles=3, device=torch.device(DEVICE)) == 3  # never more splits than K tiles


@pytest.mark.parametrize(
    "n,k,rows,group_size",
    [(1, 32, 1, 32), (33, 100, 1, -1), (7, 31, 3, -1), (100, 200, 17, 64), (40, 1, 2, -1), (65, 96, 16, 32)],
)
@pytest.mark.parametrize("bits", [3, 4])
def test_odd_shapes(n: int, k: int, rows: int, group_size: int, bits: int) -> None:
    layer = _layer(n, k, bits, group_size, sym=False, dtype=torch.float16, bias=n % 2 == 1)
    x = _x(rows, k, torch.float16, lead=(2,))  # a leading batch dimension too
    y = _run(layer, x)
    assert y.shape == (2, rows, n)
    _assert_matches_reference(layer, x, y)


def test_empty_input() -> None:
    layer = _layer(8, 64, 4, 32, sym=True, dtype=torch.float16)
    y = _run(layer, torch.empty(0, 64, dtype=torch.float16, device=DEVICE))
    assert y.shape == (0, 8)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"group_size": 16}, "multiple of 32"),
        ({"group_size": 48}, "multiple of 32"),
        ({"dtype": torch.float32}, "float16 or bfloat16"),
        ({"in_features": 65}, "in_features=65"),
        ({"kernel": "gemv", "rows": 2}, "one row"),
        ({"kernel": "bogus"}, "not one of"),
    ],
)
def test_unsupported_inputs_raise(change: dict, match: str) -> None:
    group_size = change.get("group_size", 32)
    layer = _layer(8, 64, 4, group_size, sym=True, dtype=torch.float16)
    x = _x(change.get("rows", 1), 64, change.get("dtype", torch.float16))
    with pytest.raises(ValueError, match=match):
        quant_linear(x, layer.qweight, layer.scales, layer.qzeros, layer.bias, 4, group_size,
                     change.get("in_features", 64), kernel=change.get("kernel"))


def test_non_contiguous_buffers_raise() -> None:
    layer = _layer(64, 64, 4, 32, sym=True, dtype=torch.float16)
    scales = layer.scales.detach().T.contiguous().T  # same values, transposed strides
    with pytest.raises(ValueError, match="contiguous"):
        quant_linear(_x(1, 64, torch.float16), layer.qweight, scales, None, None, 4, 32, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="config tuning times kernels on a GPU")
def test_tuning_picks_a_correct_config() -> None:
    from hf_signround.kernels import triton_launch

    layer = _layer(4096, 1024, 4, 128, sym=False, dtype=torch.float16)
    for rows in (1, 8, 100, 300):
        x = _x(rows, 1024, torch.float16)
        _assert_matches_reference(layer, x, _run(layer, x))
    assert {key[0] for key in triton_launch.TUNED} >= {"gemv", "decode", "prefill", "dequant"}
