"""torch's own CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``, the one torchao's int4 CPU layout uses).

It dequantizes ``(c - 8) * scale + zero`` per group of ``gs`` in {32, 64, 128, 256} columns,
with ``scale`` and ``zero`` in the activation dtype. Our ``s * (q - z)`` maps onto it exactly in
real numbers with ``c = q`` (any 2-, 3- or 4-bit code fits in 4 bits), ``scale = s`` and
``zero = s * (8 - z)``; both are rounded to the activation dtype, so in bfloat16 a weight
differs from the reference's by up to about one bfloat16 rounding step (measured in
``tests/test_cpu_kernels.py``).

It is fast in bfloat16 only (``benchmarks/cpu_kernels.py``, one token: 2.5-5.2x a dense
bfloat16 product, 0.36-0.40x at 512; float32 activations 0.07-0.22x a dense float32 product;
float16 ones 55x slower than bfloat16). So ``backend="auto"`` uses it on CPU for bfloat16
activations, and for float32 ones when PyTorch's float32 matmul precision is ``"medium"``
(``torch.set_float32_matmul_precision``), which allows bfloat16 computation: then the
activations are rounded to bfloat16, the scales and zeros prepared in bfloat16, and the result
returned in float32 (:func:`hf_signround.kernels.backend.int4_compute_dtype`). Needs
``N % 16 == 0`` and a ``gs`` that divides both ``K`` and the layer's group size.

Its packed layout depends on the CPU's instruction set, but the codes come back from it
exactly whatever the layout: the kernel run on one-hot rows with ``scale = 1`` and
``zero = 8`` gives ``c`` itself (:func:`codes_from_packed`). So the packed copy stands in for
``qweight`` in memory (``holds_codes``), as ARK's does; :func:`prepare` checks the first and
last columns' codes come back before it says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hf_signround.packing import pack_qweight_kmajor, unpack_qweight_kmajor, unpack_qzeros_nmajor

__all__ = ["Int4Weights", "codes_from_packed", "int4_group", "int4_linear", "prepare", "unsupported_reason"]

GROUPS = (256, 128, 64, 32)  # what the kernel takes, largest (fewest scales) first


_CHECK = 64  # columns at each end of K whose codes prepare() reads back
_CHUNK = 512  # one-hot rows a call when reading codes back: bounds the temporaries


@dataclass
class Int4Weights:
    packed: torch.Tensor  # uint8, the kernel's layout
    scale_zero: torch.Tensor  # (K / gs, N, 2) in the compute dtype
    bias: torch.Tensor | None
    group: int
    bits: int = 4
    holds_codes: bool = False  # the stored codes come back from ``packed`` (checked by prepare)

    def stored_qweight(self, layer) -> torch.Tensor:
        """``layer``'s stored ``qweight``, rebuilt from the kernel's packed codes."""
        codes = codes_from_packed(self, layer.out_features, layer.in_features)
        return pack_qweight_kmajor(codes, self.bits)


def codes_from_packed(weights: Int4Weights, n: int, k: int, columns: range | list[int] | None = None) -> torch.Tensor:
    """The codes ``uint8 (N, len(columns))`` (default: all ``K``) held in ``weights.packed``.

    The kernel run on one-hot bfloat16 rows with ``scale = 1`` and ``zero = 8`` computes
    ``1 * ((c - 8) * 1 + 8) = c``, an integer below 16, exactly, and one-hot rows pick one column each.
    """
    columns = range(k) if columns is None else columns
    unit = torch.empty(k // weights.group, n, 2, dtype=torch.bfloat16)
    unit[..., 0], unit[..., 1] = 1.0, 8.0
    out = torch.empty(n, len(columns), dtype=torch.uint8)
    index = torch.tensor(columns, dtype=torch.long)
    for lo in range(0, len(columns), _CHUNK):
        hi = min(len(columns), lo + _CHUNK)
        one_hot = torch.zeros(hi - lo, k, dtype=torch.bfloat16)
        one_hot[torch.arange(hi - lo), index[lo:hi]] = 1.0
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(one_hot, weights.packed, weights.group, unit)  # (rows, N)
        out[:, lo:hi] = y.T.to(torch.uint8)
    return out


def int4_group(in_features: int, group_size: int) -> int | None:
    """The kernel's group size for a layer: the largest of :data:`GROUPS` inside every one of our groups."""
    span = in_features if group_size == -1 else math.gcd(group_size, in_features)
    return next((g for g in GROUPS if span % g == 0), None)


def unsupported_reason(bits: int, group_size: int, in_features: int, out_features: int) -> str | None:
    if bits > 4:
        return f"torch's int4 kernel holds at most 4 bits per weight, this layer has {bits}"
    if out_features % 16:
        return f"torch's int4 kernel needs out_features divisible by 16, this layer has {out_features}"
    if int4_group(in_features, group_size) is None:
        return (f"torch's int4 kernel needs groups of 32-256 columns dividing in_features={in_features} and "
                f"group_size={group_size}")
    return None


def prepare(qweight, scales, qzeros, bias, *, bits: int, group_size: int, in_features: int,
            dtype: torch.dtype, bias_dtype: torch.dtype | None = None) -> Int4Weights:
    """The kernel's packed weights, scales and zeros in ``dtype`` (what it computes in), and the bias in
    ``bias_dtype`` (the activations' dtype: it is added after the result is converted back to it)."""
    k, n = in_features, qweight.shape[1]
    group = int4_group(k, group_size)
    codes = unpack_qweight_kmajor(qweight, bits, k).to(torch.int32)  # (N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    rows = torch.arange(0, k, group) // (k if group_size == -1 else group_size)  # our group of each kernel group
    s = scales.float()[rows]  # (K / gs, N)
    z = (unpack_qzeros_nmajor(qzeros, bits, n).T.float() if qzeros is not None
         else torch.full_like(scales, float(1 << (bits - 1)), dtype=torch.float32))[rows]
    scale_zero = torch.stack([s, s * (8 - z)], dim=-1).to(dtype).contiguous()
    bias = None if bias is None else bias.detach().to(bias_dtype or dtype)
    weights = Int4Weights(packed, scale_zero, bias, group, bits)
    ends = sorted({*range(min(_CHECK, k)), *range(max(0, k - _CHECK), k)})
    weights.holds_codes = torch.equal(codes_from_packed(weights, n, k, ends),
                                      codes[:, ends].to(torch.uint8))
    return weights


def int4_linear(x: torch.Tensor, weights: Int4Weights, out_features: int) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.reshape(-1, k).to(weights.scale_zero.dtype).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weights.packed, weights.group, weights.scale_zero).to(x.dtype)
    if weights.bias is not None:
        y = y + weights.bias
    return y.reshape(*x.shape[:-1], out_features)
