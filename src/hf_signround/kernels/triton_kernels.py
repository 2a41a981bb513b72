"""Triton kernels for packed low-bit linear layers, and their candidate launch configs.

All kernels read the packed buffers of :mod:`hf_signround.packing` as they are (``qweight``
int32 ``(ceil(K/32)*bits, N)``, ``scales`` ``(G, N)``, ``qzeros`` int32 ``(G, ceil(N/32)*bits)``)
and dequantize tile by tile inside the K loop; no dense weight is ever written out.

Dequantization trick (exact, no slow int->float conversion): a ``bits``-wide code ``q`` moved
to the top of a float32 mantissa and OR-ed with the exponent of 1.0 reads as ``f = 1 + q/2**bits``.
With ``S = s * 2**bits`` and ``C = s * (2**bits + z)`` (both exact in float32 for float16 or
bfloat16 scales), one fused multiply-add ``f * S - C`` yields ``s * (q - z)`` rounded once,
the reference's float32 weight (``kernels/reference.py``).

Kernels (``M`` rows of activations, ``N`` outputs, ``K`` inputs):

* ``gemv_kernel`` -- decode, ``M == 1``: CUDA-core FMAs. A program owns ``BLOCK_N`` outputs
  and a K range (split-K); it accumulates ``x[k] * W[k, n]`` in a float32 tile and reduces
  over k once at the end.
* ``gemm_kernel`` -- tensor-core tiles ``BLOCK_M x BLOCK_N``: the ``decode`` configs
  (``BLOCK_M = 16``, split-K) serve 2..16 rows, the ``prefill`` configs large ``M``.
* ``dequant_kernel`` -- writes the dense ``W.T`` ``(K, N)`` in the activation dtype, for a
  cuBLAS product at large ``M`` (the one place a dense weight exists, for one call): the
  fused prefill tiles measured 0.4-0.6x cuBLAS on an H200, and a dequantization costs one
  read of the packed weight and one write of ``2·N·K`` bytes.

Both dequantize with ``_dequant_tile``: each packed word is loaded once (cp.async-pipelined)
and expanded to its 32/bits codes in registers. (Loading one word per k, GPTQ-Triton style,
was measured 1.9x slower for M=16 and prefill on an H200: 8x the shared-memory traffic.)

Split-K (``SPLIT_K > 1``): each split writes float32 partials to a workspace
``(SPLIT_K, M, N)``, then takes a ticket on a per-tile counter; the last split to arrive
sums the partials, adds the bias, stores the output and resets the counter to zero. One
launch, deterministic order, no memset, no host synchronisation (CUDA-graph safe).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["CONFIGS", "dequant_kernel", "gemm_kernel", "gemv_kernel"]

# A float32 with the exponent of 1.0 and an empty mantissa.
_ONE_BITS = tl.constexpr(0x3F800000)


@triton.jit
def _as_unit_float(v, BITS: tl.constexpr):
    """Bits [23-BITS, 23) of int32 ``v`` as the float ``1 + q / 2**BITS``."""
    mask: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
    return ((v & mask) | _ONE_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _zeros(qz_ptr, g, offs_n, n_ok, ZW, BITS: tl.constexpr):
    """Zero points ``z[n, g]`` as float32, unpacked from ``qzeros`` (G, ZW) packed along N."""
    row = qz_ptr + g * ZW
    if BITS == 3:
        blk = offs_n // 32
        t = offs_n % 32
        lo = tl.load(row + blk * 3 + t // 16, mask=n_ok, other=0)
        hi = tl.load(row + blk * 3 + 2, mask=n_ok, other=0)
        z = ((lo >> (2 * (t % 16))) & 3) | (((hi >> t) & 1) << 2)
    else:
        bit = offs_n * BITS
        word = tl.load(row + (bit >> 5), mask=n_ok, other=0)
        z = (word >> (bit & 31)) & ((1 << BITS) - 1)
    return z.to(tl.float32)


@triton.jit
def _scale_terms(s_ptr, qz_ptr, g, offs_n, n_ok, N, ZW, BITS: tl.constexpr, SYM: tl.constexpr):
    """``S = s * 2**BITS`` and ``C = s * (2**BITS + z)`` for groups ``g`` (broadcast against ``offs_n``)."""
    s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if SYM:
        z = 1.0 * (1 << (BITS - 1))
    else:
        z = _zeros(qz_ptr, g, offs_n, n_ok, ZW, BITS)
    return s * (1.0 * (1 << BITS)), s * (z + 1.0 * (1 << BITS))


@triton.jit
def _group_of(k, GROUP_SIZE: tl.constexpr):
    if GROUP_SIZE == -1:
        return k * 0
    else:
        return k // GROUP_SIZE


@triton.jit
def _k_tiles(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, pid_k):
    """The K tiles ``[first, last)`` that split ``pid_k`` owns."""
    tiles = (K + BLOCK_K - 1) // BLOCK_K  # not tl.cdiv: the interpreter fails on it in some kernels
    per_split = (tiles + SPLIT_K - 1) // SPLIT_K
    first = pid_k * per_split
    return first, tl.minimum(first + per_split, tiles)


@triton.jit
def _store_output(acc, y_ptr, b_ptr, offs, mask, offs_n, n_ok, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        # The reference adds the bias in the activation dtype.
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(y_ptr.dtype.element_ty)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue(acc, y_ptr, b_ptr, ws_ptr, lock_ptr, offs_m, offs_n, M, N, tile, pid_k,
              HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    n_ok = offs_n < N
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    offs = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        _store_output(acc, y_ptr, b_ptr, offs, mask, offs_n, n_ok, HAS_BIAS)
    else:
        tl.store(ws_ptr + pid_k * M * N + offs, acc, mask=mask)
        # Every thread's partial is written before the ticket is taken (release at GPU scope).
        tl.debug_barrier()
        ticket = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:
            total = tl.zeros(acc.shape, tl.float32)
            for split in range(SPLIT_K):
                # .cg: read from L2, where the other splits' partials are.
                total += tl.load(ws_ptr + split * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            _store_output(total, y_ptr, b_ptr, offs, mask, offs_n, n_ok, HAS_BIAS)
            tl.atomic_xchg(lock_ptr + tile, 0)


@triton.jit
def gemv_kernel(
    x_ptr, qw_ptr, s_ptr, qz_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    N, K, ZW,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
):
    """``y[0, n] = sum_k x[0, k] * W[n, k]`` for one row of activations. Grid: (cdiv(N, BLOCK_N), SPLIT_K).

    CUDA-core FMAs into a ``(BLOCK_K, BLOCK_N)`` float32 accumulator, reduced over k once at the end.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ONE_GROUP: tl.constexpr = (GROUP_SIZE == -1) | (GROUP_SIZE % BLOCK_K == 0)
    first, last = _k_tiles(K, BLOCK_K, SPLIT_K, pid_k)
    acc = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    # tl.range pipelines the loads (cp.async), STAGES tiles in flight.
    for tile in tl.range(first, last, num_stages=STAGES):
        offs_k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = _dequant_tile(qw_ptr, s_ptr, qz_ptr, tile, offs_n, K, N, ZW, BLOCK_K, BLOCK_N, BITS, GROUP_SIZE, SYM,
                          ONE_GROUP)
        acc += x[:, None] * w
    y = tl.sum(acc, axis=0)
    _epilogue(y[None, :], y_ptr, b_ptr, ws_ptr, lock_ptr, tl.zeros([1], tl.int32), offs_n, 1, N, pid_n, pid_k,
              HAS_BIAS, SPLIT_K)


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, qz_ptr, tile, offs_n, K, N, ZW, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYM: tl.constexpr, ONE_GROUP: tl.constexpr):
    """Float32 weights ``W[k, n]`` of K tile ``tile``, shape ``(BLOCK_K, BLOCK_N)``, k in natural order.

    Each packed word is loaded once (a ``(units, 1, BLOCK_N)`` tile) and expanded in registers
    to ``(units, codes per unit, BLOCK_N)``, which reshapes to k order (k = unit * P + i).
    """
    n_ok = offs_n < N
    if BITS == 3:
        UNITS: tl.constexpr = BLOCK_K // 32
        unit = tile * UNITS + tl.arange(0, UNITS)
        k_unit = unit * 32
        ok = (k_unit < K)[:, None, None] & n_ok[None, None, :]
        row = qw_ptr + (unit * 3)[:, None, None] * N + offs_n[None, None, :]
        lo = tl.load(row + tl.arange(0, 2)[None, :, None] * N, mask=ok, other=0)            # (U, 2, BN)
        hi = tl.load(row + 2 * N, mask=ok, other=0)                                          # (U, 1, BN)
        lo_codes = (lo[:, :, None, :] >> (2 * tl.arange(0, 16))[None, None, :, None]) & 3    # (U, 2, 16, BN)
        hi_bits = (hi >> tl.arange(0, 32)[None, :, None]) & 1                                # (U, 32, BN)
        code = tl.reshape(lo_codes, [UNITS, 32, BLOCK_N]) | (hi_bits << 2)
        f = _as_unit_float(code << 20, 3)
    else:
        PER_UNIT: tl.constexpr = 32 // BITS
        UNITS: tl.constexpr = BLOCK_K // PER_UNIT
        unit = tile * UNITS + tl.arange(0, UNITS)
        k_unit = unit * PER_UNIT
        ok = (k_unit < K)[:, None, None] & n_ok[None, None, :]
        w = tl.load(qw_ptr + unit[:, None, None] * N + offs_n[None, None, :], mask=ok, other=0)  # (U, 1, BN)
        code = (w >> (BITS * tl.arange(0, PER_UNIT))[None, :, None]) & ((1 << BITS) - 1)       # (U, P, BN)
        f = _as_unit_float(code << (23 - BITS), BITS)
    if ONE_GROUP:
        S, C = _scale_terms(s_ptr, qz_ptr, _group_of(tile * BLOCK_K, GROUP_SIZE), offs_n[None, None, :],
                            n_ok[None, None, :], N, ZW, BITS, SYM)
    else:
        S, C = _scale_terms(s_ptr, qz_ptr, _group_of(k_unit, GROUP_SIZE)[:, None, None], offs_n[None, None, :],
                            ok, N, ZW, BITS, SYM)
    return tl.reshape(f * S - C, [BLOCK_K, BLOCK_N])


@triton.jit
def gemm_kernel(
    x_ptr, qw_ptr, s_ptr, qz_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, ZW,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_F32: tl.constexpr = False,
):
    """``y = x @ W.T`` on tensor cores. Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K).

    ``DOT_F32`` is for Triton's CPU interpreter, whose bfloat16 ``tl.dot`` returns garbage (3.9).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped tile order: GROUP_M row-tiles share each weight tile while it is in L2.
    grid_m = (M + BLOCK_M - 1) // BLOCK_M
    grid_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kk = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    ONE_GROUP: tl.constexpr = (GROUP_SIZE == -1) | (GROUP_SIZE % BLOCK_K == 0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first, last = _k_tiles(K, BLOCK_K, SPLIT_K, pid_k)
    for tile in range(first, last):
        offs_k = tile * BLOCK_K + offs_kk
        a = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & (offs_k < K)[None, :],
                    other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, qz_ptr, tile, offs_n, K, N, ZW, BLOCK_K, BLOCK_N, BITS, GROUP_SIZE, SYM,
                          ONE_GROUP)
        b = w.to(a.dtype)
        if DOT_F32:  # the same rounded operands, multiplied exactly in float32
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    _epilogue(acc, y_ptr, b_ptr, ws_ptr, lock_ptr, offs_m, offs_n, M, N, pid_m * grid_n + pid_n, pid_k,
              HAS_BIAS, SPLIT_K)


@triton.jit
def dequant_kernel(
    qw_ptr, s_ptr, qz_ptr, w_ptr,
    N, K, ZW,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``w[k, n] = W[n, k]`` in ``w_ptr``'s dtype, ``(K, N)`` row-major. Grid: (cdiv(K, BLOCK_K), cdiv(N, BLOCK_N))."""
    tile = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
    ONE_GROUP: tl.constexpr = (GROUP_SIZE == -1) | (GROUP_SIZE % BLOCK_K == 0)
    w = _dequant_tile(qw_ptr, s_ptr, qz_ptr, tile, offs_n, K, N, ZW, BLOCK_K, BLOCK_N, BITS, GROUP_SIZE, SYM,
                      ONE_GROUP)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def _cfg(num_warps: int, num_stages: int, **meta: int) -> dict:
    return {**meta, "num_warps": num_warps, "num_stages": num_stages}


# Candidate configs per kernel kind, best first (the interpreter, and CUDA-graph capture without
# prior tuning, use the first). Chosen from a sweep of 190 configs on an H200 (docs/BENCHMARKS.md);
# each is compiled and timed once per (shape, bits, group size, symmetry, dtype) on first use.
# SPLIT_K=0: the launcher splits K until the grid holds about 4 programs per multiprocessor.
CONFIGS: dict[str, list[dict]] = {
    "gemv": [
        _cfg(1, 3, BLOCK_N=64, BLOCK_K=64, SPLIT_K=0),
        _cfg(2, 5, BLOCK_N=32, BLOCK_K=128, SPLIT_K=0),
        _cfg(2, 3, BLOCK_N=128, BLOCK_K=64, SPLIT_K=0),
        _cfg(1, 5, BLOCK_N=64, BLOCK_K=64, SPLIT_K=0),
        _cfg(4, 5, BLOCK_N=64, BLOCK_K=64, SPLIT_K=0),
    ],
    "decode": [
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=0, GROUP_M=1),
        _cfg(2, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, SPLIT_K=0, GROUP_M=1),
        _cfg(2, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=0, GROUP_M=1),
        _cfg(8, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=0, GROUP_M=1),
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=0, GROUP_M=1),
    ],
    "prefill": [
        _cfg(8, 4, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, GROUP_M=8),
    ],
    # Not swept on a GPU yet (no device was lent since it was written): benchmarks/gpu_check.py times them.
    "dequant": [
        _cfg(4, 1, BLOCK_N=128, BLOCK_K=64),
        _cfg(4, 1, BLOCK_N=256, BLOCK_K=32),
        _cfg(8, 1, BLOCK_N=128, BLOCK_K=128),
        _cfg(2, 1, BLOCK_N=64, BLOCK_K=64),
    ],
}
