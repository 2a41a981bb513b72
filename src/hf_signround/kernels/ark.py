"""CPU kernels of auto-round-lib (``auto_round_kernel``, "ARK": Intel's BesTLA weight-only GEMMs).

Why these: among the CPU candidates measured side by side (``benchmarks/cpu_inference.py``,
``docs/BENCHMARKS.md``) they were the fastest exact path for float32 activations: float32
compute, so a layer's output matches the reference to about 5e-7 relative, with every bit
width (2, 3, 4, 8), symmetric or not. torch's own ``_weight_int4pack_mm_for_cpu`` and
``_weight_int8pack_mm`` ran float32 activations 8-30x slower than a dense product there.

Layout handed to ARK's ``repack_quantized_weight`` (``N`` out, ``K`` in features):

* codes ``int8 (K, N)``, centred: ``q - 2**(bits-1)``;
* scales ``float32 (K / gs, N)``; zero points ``int8 (K / gs, N)`` centred likewise (asymmetric only).

ARK needs ``K % gs == 0``. A group size that does not divide ``K`` (SmolLM2's G128 on 576
columns) is re-expressed exactly with ``gs = gcd(group_size, K)``: each ARK group lies inside
one of ours and repeats its scale and zero point. ARK computes in float32 (its bfloat16
compute type corrupted the heap on an AVX-512 CPU without BF16); other activation dtypes are
cast to float32 and the result back.

The packed blob can stand in for ``qweight`` in memory: ARK's ``unpack_weight`` gives
``W = s * (q - z)`` in float32, exact for 16-bit scales and integer ``q - z``, so ``W / s + z``
is the stored code. :func:`prepare` checks that round trip on every code before it sets
``holds_codes``.

Eager calls go straight to ARK's native ``woqgemm`` (its Python wrapper re-validates every
call: 15 us against 8 us per call on a 192x576 layer, 210 layers a token on SmolLM2); under
``torch.compile`` the call is the custom op ``hf_signround::ark_linear``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from hf_signround.packing import pack_qweight_kmajor, unpack_qweight_kmajor, unpack_qzeros_nmajor

__all__ = ["ArkWeights", "ark_group", "ark_linear", "codes_from_blob", "prepare"]

_WEIGHT_TYPE = {2: "int2", 3: "int3", 4: "int4", 8: "int8"}
_COMPUTE = "fp32"
_CHUNK = 256  # output rows checked at a time: bounds the float32 temporaries of the round trip


def _ark():
    import auto_round_kernel

    return auto_round_kernel


@dataclass
class ArkWeights:
    """One layer's weights in ARK's packed form, and the arguments its kernel takes."""

    blob: torch.Tensor  # int8 (packed size,)
    bias: torch.Tensor  # float32 (N,), or empty for no bias
    group: int  # ARK's group size (divides K)
    bits: int
    asym: bool
    holds_codes: bool = False  # every stored code comes back from the blob exactly (checked by prepare)

    def stored_qweight(self, layer) -> torch.Tensor:
        """``layer``'s stored ``qweight``, rebuilt from the blob and the layer's scales and zero points."""
        codes = codes_from_blob(self, layer.scales, layer.qzeros, group_size=layer.group_size,
                                in_features=layer.in_features)
        if codes is None:  # prepare() checked the round trip, so only changed scales get here
            raise RuntimeError(f"{layer.extra_repr()}: the scales changed after the weights were packed for "
                               "auto-round-lib's kernel, so the stored codes cannot be rebuilt; reload the model")
        return pack_qweight_kmajor(codes, self.bits)


def ark_group(in_features: int, group_size: int) -> int:
    """ARK's group size for one of ours: ``K`` per channel, else ``gcd(group_size, K)``."""
    return in_features if group_size == -1 else math.gcd(group_size, in_features)


def _our_group(in_features: int, group_size: int, columns: torch.Tensor) -> torch.Tensor:
    return columns // (in_features if group_size == -1 else group_size)


def prepare(qweight, scales, qzeros, bias, *, bits: int, group_size: int, in_features: int) -> ArkWeights:
    """Repack a layer's stored tensors for ARK, and check whether the codes come back exactly."""
    ark = _ark()
    k, n = in_features, qweight.shape[1]
    group = ark_group(k, group_size)
    offset = 1 << (bits - 1)
    codes = unpack_qweight_kmajor(qweight, bits, k)  # uint8 (N, K)
    centred = (codes.T.to(torch.int16) - offset).to(torch.int8).contiguous()  # (K, N)
    rows = _our_group(k, group_size, torch.arange(0, k, group))  # our group of each ARK group
    s = scales.float()[rows].contiguous()
    asym = qzeros is not None
    if asym:
        z = unpack_qzeros_nmajor(qzeros, bits, n).T  # (G, N)
        zp = (z.to(torch.int16) - offset).to(torch.int8)[rows].contiguous()
    else:
        zp = torch.empty(0, dtype=torch.int8)
    blob = ark.repack_quantized_weight(centred, s, zp, group, _COMPUTE, _WEIGHT_TYPE[bits], "fp32", asym)
    del centred
    b = torch.empty(0) if bias is None else bias.detach().float().contiguous()
    weights = ArkWeights(blob, b, group, bits, asym)
    # One call through ARK's public wrapper validates the blob against these arguments.
    ark.woqgemm(torch.zeros(1, k), blob, b, n, k, group, _COMPUTE, _WEIGHT_TYPE[bits], "fp32", asym)
    back = codes_from_blob(weights, scales, qzeros, group_size=group_size, in_features=k)
    weights.holds_codes = back is not None and torch.equal(back, codes)
    return weights


def codes_from_blob(weights: ArkWeights, scales, qzeros, *, group_size: int, in_features: int) -> torch.Tensor | None:
    """The stored codes ``uint8 (N, K)`` read back from the blob; ``None`` if a scale makes that impossible."""
    k, n = in_features, scales.shape[1]
    s = scales.float().T  # (N, G)
    if not bool(torch.isfinite(s).all()) or bool((s == 0).any()):
        return None  # W / s cannot give q - z back
    w = _ark().unpack_weight(weights.blob, torch.float32, n, k, weights.group, _COMPUTE,
                             _WEIGHT_TYPE[weights.bits], "fp32", weights.asym).reshape(n, k)
    g_idx = _our_group(k, group_size, torch.arange(k))
    z = (unpack_qzeros_nmajor(qzeros, weights.bits, n) if qzeros is not None
         else torch.full((n, s.shape[1]), 1 << (weights.bits - 1), dtype=torch.uint8))
    codes = torch.empty((n, k), dtype=torch.uint8)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        q = torch.round(w[lo:hi] / s[lo:hi, g_idx]) + z[lo:hi, g_idx]
        if not bool(((q >= 0) & (q < (1 << weights.bits))).all()):
            return None
        codes[lo:hi] = q.to(torch.uint8)
    return codes


@torch.library.custom_op("hf_signround::ark_linear", mutates_args=())
def ark_linear_op(x: torch.Tensor, blob: torch.Tensor, bias: torch.Tensor, n: int, k: int, group: int, bits: int,
                  asym: bool) -> torch.Tensor:
    """``y = x @ W.T + bias`` by ARK, for a float32 ``(M, K)`` contiguous ``x``."""
    return _gemm(x, blob, bias, n, k, group, bits, asym)


@ark_linear_op.register_fake
def _(x, blob, bias, n, k, group, bits, asym):
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


def _gemm(x: torch.Tensor, blob: torch.Tensor, bias: torch.Tensor, n: int, k: int, group: int, bits: int,
          asym: bool) -> torch.Tensor:
    out = torch.empty((x.shape[0], n), dtype=torch.float32)
    if x.shape[0]:
        lib, f32, types = _native()
        # The arguments ARK's own woqgemm passes, without its per-call validation (done once in prepare()).
        lib.woqgemm(0, x.shape[0], n, k, x.data_ptr(), f32, blob.data_ptr(), out.data_ptr(), bias.data_ptr(), group,
                    f32, types[bits], f32, asym, blob.numel())
    return out


@functools.cache
def _native():
    """ARK's CPU library, its float32 type code and its weight type codes by bit width."""
    ark = _ark()
    return ark.cpu_lib, ark.cvtstr_dtype(_COMPUTE), {b: ark.cvtstr_dtype(t) for b, t in _WEIGHT_TYPE.items()}


def ark_linear(x: torch.Tensor, weights: ArkWeights, out_features: int) -> torch.Tensor:
    """``F.linear`` for any float ``x (..., K)``: computed in float32, returned in ``x``'s dtype."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous():  # ARK reads raw float32 rows
        x2 = x2.to(torch.float32, memory_format=torch.contiguous_format)
    args = (weights.blob, weights.bias, out_features, k, weights.group, weights.bits, weights.asym)
    y = ark_linear_op(x2, *args) if torch.compiler.is_compiling() else _gemm(x2, *args)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
