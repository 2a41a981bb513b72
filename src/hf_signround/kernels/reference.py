"""Pure-torch reference for packed weight-only quantized linear layers.

This is the numerical definition any accelerated kernel must reproduce:
``W[n, k] = scales[g, n] * (q[n, k] - z[n, g])`` with ``g = k // group_size``
(the last group is shorter when group_size does not divide K),
computed in float32 and then cast to the requested dtype.

Buffers (``N = out_features``, ``K = in_features``, ``G`` groups):

* ``qweight`` -- ``int32 (ceil(K/32)*bits, N)``, see :mod:`hf_signround.packing`.
* ``scales``  -- float ``(G, N)`` (N contiguous).
* ``qzeros``  -- ``int32 (G, ceil(N/32)*bits)`` or ``None`` for symmetric
  quantization, whose implicit zero point is ``2**(bits-1)``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from hf_signround.packing import (
    check_bits,
    group_index,
    num_groups,
    packed_rows,
    unpack_qweight_kmajor,
    unpack_qzeros_nmajor,
)

logger = logging.getLogger(__name__)

__all__ = ["dequantize_packed", "linear_reference"]


def dequantize_packed(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize packed buffers into a dense ``(N, K)`` weight of ``out_dtype``."""
    check_bits(bits)
    if qweight.ndim != 2 or qweight.shape[0] != packed_rows(in_features, bits):
        raise ValueError(
            f"qweight shape {tuple(qweight.shape)} does not match in_features={in_features}, "
            f"bits={bits} (expected ({packed_rows(in_features, bits)}, N))"
        )
    n = qweight.shape[1]
    g = num_groups(in_features, group_size)
    if tuple(scales.shape) != (g, n):
        raise ValueError(f"scales shape {tuple(scales.shape)} != expected {(g, n)}")

    q = unpack_qweight_kmajor(qweight, bits, in_features).to(torch.float32)
    if qzeros is None:
        z = torch.full((n, g), float(1 << (bits - 1)), dtype=torch.float32, device=q.device)
    else:
        expected_z = (g, packed_rows(n, bits))
        if tuple(qzeros.shape) != expected_z:
            raise ValueError(f"qzeros shape {tuple(qzeros.shape)} != expected {expected_z}")
        z = unpack_qzeros_nmajor(qzeros, bits, n).to(torch.float32)

    g_idx = group_index(in_features, group_size, q.device)
    w = (q - z[:, g_idx]) * scales.T.to(torch.float32)[:, g_idx]
    return w.to(out_dtype)


def linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``F.linear`` with the dequantized weight, in the activation dtype."""
    w = dequantize_packed(
        qweight,
        scales,
        qzeros,
        bits=bits,
        group_size=group_size,
        in_features=in_features,
        out_dtype=x.dtype,
    )
    b = None if bias is None else bias.to(x.dtype)
    return F.linear(x, w, b)
