"""torch's own CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``, the one torchao's int4 CPU layout uses).

It dequantizes ``(c - 8) * scale + zero`` per group of ``gs`` in {32, 64, 128, 256} columns,
with ``scale`` and ``zero`` in the activation dtype. Our ``s * (q - z)`` maps onto it exactly in
real numbers with ``c = q`` (any 2-, 3- or 4-bit code fits in 4 bits), ``scale = s`` and
``zero = s * (8 - z)``; both are rounded to the activation dtype, so in bfloat16 a weight
differs from the reference's by up to about one bfloat16 rounding step (measured in
``tests/test_cpu_kernels.py``).

``backend="auto"`` uses it on CPU for bfloat16/float16 activations, before ARK: on the
project's CPU it ran float32 activations 4-12x slower than a dense product, bfloat16 ones
2.5-4x faster at one token but 0.35-0.4x at 512 (``benchmarks/cpu_kernels.py``). Needs ``N % 16 == 0`` and a ``gs`` that divides both ``K`` and
the layer's group size. It keeps its own copy of the weights (``QuantLinear`` keeps the
stored ones too: this kernel's layout depends on the CPU's instruction set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hf_signround.packing import unpack_qweight_kmajor, unpack_qzeros_nmajor

__all__ = ["Int4Weights", "int4_group", "int4_linear", "prepare", "unsupported_reason"]

GROUPS = (256, 128, 64, 32)  # what the kernel takes, largest (fewest scales) first


@dataclass
class Int4Weights:
    packed: torch.Tensor  # uint8, the kernel's layout
    scale_zero: torch.Tensor  # (K / gs, N, 2) in the activation dtype
    bias: torch.Tensor | None
    group: int


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
            dtype: torch.dtype) -> Int4Weights:
    k, n = in_features, qweight.shape[1]
    group = int4_group(k, group_size)
    codes = unpack_qweight_kmajor(qweight, bits, k).to(torch.int32)  # (N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    rows = torch.arange(0, k, group) // (k if group_size == -1 else group_size)  # our group of each kernel group
    s = scales.float()[rows]  # (K / gs, N)
    z = (unpack_qzeros_nmajor(qzeros, bits, n).T.float() if qzeros is not None
         else torch.full_like(scales, float(1 << (bits - 1)), dtype=torch.float32))[rows]
    scale_zero = torch.stack([s, s * (8 - z)], dim=-1).to(dtype).contiguous()
    return Int4Weights(packed, scale_zero, None if bias is None else bias.detach().to(dtype), group)


def int4_linear(x: torch.Tensor, weights: Int4Weights, out_features: int) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.reshape(-1, k).to(weights.scale_zero.dtype).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weights.packed, weights.group, weights.scale_zero)
    if weights.bias is not None:
        y = y + weights.bias
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
