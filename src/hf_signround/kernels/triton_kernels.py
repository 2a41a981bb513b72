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

* ``gemv_kernel`` -- decode, ``M == 1``: CUDA-core dot products. A program owns ``BLOCK_N``
  outputs and a K range; it loads each packed tile once and walks its fields with
  compile-time shifts (k = row * codes_per_row + field), so every word is read once.
* ``gemm_kernel`` -- tensor-core tiles ``BLOCK_M x BLOCK_N``: the ``decode`` configs
  (``BLOCK_M = 16``, split-K) serve 2..16 rows, the ``prefill`` configs large ``M``.

Split-K (``SPLIT_K > 1``): each split writes float32 partials to a workspace
``(SPLIT_K, M, N)``, then takes a ticket on a per-tile counter; the last split to arrive
sums the partials, adds the bias, stores the output and resets the counter to zero. One
launch, deterministic order, no memset, no host synchronisation (CUDA-graph safe).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["CONFIGS", "gemm_kernel", "gemv_kernel"]

# A float32 with the exponent of 1.0 and an empty mantissa.
_ONE_BITS = 0x3F800000


@triton.jit
def _as_unit_float(v, BITS: tl.constexpr):
    """Bits [23-BITS, 23) of int32 ``v`` as the float ``1 + q / 2**BITS``."""
    mask: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
    return ((v & mask) | _ONE_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _shift(v, by: tl.constexpr):
    """``v << by`` for ``by >= 0``, else ``v >> -by`` (callers mask off sign-extended bits)."""
    if by >= 0:
        return v << by
    else:
        return v >> (-by)


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
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """``y[0, n] = sum_k x[0, k] * W[n, k]`` for one row of activations. Grid: (cdiv(N, BLOCK_N), SPLIT_K)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # A "unit" is one packed row (2/4/8 bits: 32/BITS consecutive k) or, for 3 bits, one
    # block of 32 k held in three rows (low bits of k 0..15, of k 16..31, high bits).
    PER_UNIT: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    UNITS: tl.constexpr = BLOCK_K // PER_UNIT
    ONE_GROUP: tl.constexpr = (GROUP_SIZE == -1) | (GROUP_SIZE % BLOCK_K == 0)
    acc = tl.zeros([UNITS, BLOCK_N], tl.float32)
    first, last = _k_tiles(K, BLOCK_K, SPLIT_K, pid_k)
    for tile in range(first, last):
        unit = tile * UNITS + tl.arange(0, UNITS)
        k_unit = unit * PER_UNIT  # first k of each unit
        w_mask = (k_unit < K)[:, None] & n_ok[None, :]
        if ONE_GROUP:
            S, C = _scale_terms(s_ptr, qz_ptr, _group_of(tile * BLOCK_K, GROUP_SIZE), offs_n[None, :],
                                n_ok[None, :], N, ZW, BITS, SYM)
        else:
            S, C = _scale_terms(s_ptr, qz_ptr, _group_of(k_unit, GROUP_SIZE)[:, None], offs_n[None, :],
                                w_mask, N, ZW, BITS, SYM)
        if BITS == 3:
            base = qw_ptr + (unit * 3)[:, None] * N + offs_n[None, :]
            lo0 = tl.load(base, mask=w_mask, other=0)
            lo1 = tl.load(base + N, mask=w_mask, other=0)
            hi = tl.load(base + 2 * N, mask=w_mask, other=0)
            for t in tl.static_range(32):
                lo = lo0 if t < 16 else lo1
                v = (_shift(lo, 20 - 2 * (t % 16)) & (3 << 20)) | (_shift(hi, 22 - t) & (1 << 22))
                xk = tl.load(x_ptr + k_unit + t, mask=k_unit + t < K, other=0.0).to(tl.float32)
                acc += xk[:, None] * (_as_unit_float(v, 3) * S - C)
        else:
            w = tl.load(qw_ptr + unit[:, None] * N + offs_n[None, :], mask=w_mask, other=0)
            for i in tl.static_range(PER_UNIT):
                v = _shift(w, 23 - BITS - i * BITS)
                xk = tl.load(x_ptr + k_unit + i, mask=k_unit + i < K, other=0.0).to(tl.float32)
                acc += xk[:, None] * (_as_unit_float(v, BITS) * S - C)
    y = tl.sum(acc, axis=0)
    _epilogue(y[None, :], y_ptr, b_ptr, ws_ptr, lock_ptr, tl.zeros([1], tl.int32), offs_n, 1, N, pid_n, pid_k,
              HAS_BIAS, SPLIT_K)


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, qz_ptr, offs_k, offs_n, k_first, K, N, ZW,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYM: tl.constexpr, ONE_GROUP: tl.constexpr):
    """Float32 weights ``W[k, n]`` of one ``(BLOCK_K, BLOCK_N)`` tile, k in natural order."""
    n_ok = offs_n < N
    mask = (offs_k < K)[:, None] & n_ok[None, :]
    if BITS == 3:
        blk = offs_k // 32
        t = offs_k % 32
        lo = tl.load(qw_ptr + (blk * 3 + t // 16)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        hi = tl.load(qw_ptr + (blk * 3 + 2)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        code = ((lo >> (2 * (t % 16))[:, None]) & 3) | (((hi >> t[:, None]) & 1) << 2)
    else:
        bit = offs_k * BITS
        w = tl.load(qw_ptr + (bit >> 5)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        code = (w >> (bit & 31)[:, None]) & ((1 << BITS) - 1)
    if ONE_GROUP:
        S, C = _scale_terms(s_ptr, qz_ptr, _group_of(k_first, GROUP_SIZE), offs_n[None, :], n_ok[None, :],
                            N, ZW, BITS, SYM)
    else:
        S, C = _scale_terms(s_ptr, qz_ptr, _group_of(offs_k, GROUP_SIZE)[:, None], offs_n[None, :], mask,
                            N, ZW, BITS, SYM)
    return _as_unit_float(code << (23 - BITS), BITS) * S - C


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
        w = _dequant_tile(qw_ptr, s_ptr, qz_ptr, offs_k, offs_n, tile * BLOCK_K, K, N, ZW,
                          BITS, GROUP_SIZE, SYM, ONE_GROUP)
        b = w.to(a.dtype)
        if DOT_F32:  # the same rounded operands, multiplied exactly in float32
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    _epilogue(acc, y_ptr, b_ptr, ws_ptr, lock_ptr, offs_m, offs_n, M, N, pid_m * grid_n + pid_n, pid_k,
              HAS_BIAS, SPLIT_K)


def _cfg(num_warps: int, num_stages: int, **meta: int) -> dict:
    return {**meta, "num_warps": num_warps, "num_stages": num_stages}


# Candidate configs per kernel kind, best guess first (the interpreter and CUDA-graph capture
# without prior tuning use the first that fits). Small on purpose: each is compiled and timed
# once per (shape, bits, group size, symmetry, dtype) on first use.
CONFIGS: dict[str, list[dict]] = {
    "gemv": [
        _cfg(4, 4, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1),
        _cfg(4, 4, BLOCK_N=32, BLOCK_K=128, SPLIT_K=1),
        _cfg(4, 4, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2),
        _cfg(4, 3, BLOCK_N=128, BLOCK_K=128, SPLIT_K=4),
        _cfg(8, 4, BLOCK_N=64, BLOCK_K=256, SPLIT_K=2),
        _cfg(4, 4, BLOCK_N=32, BLOCK_K=256, SPLIT_K=1),
    ],
    "decode": [
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, GROUP_M=1),
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, GROUP_M=1),
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, GROUP_M=1),
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, SPLIT_K=4, GROUP_M=1),
        _cfg(4, 3, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, GROUP_M=1),
        _cfg(8, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=2, GROUP_M=1),
    ],
    "prefill": [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, GROUP_M=8),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, GROUP_M=8),
    ],
}
