"""Bit packing of low-bit integer codes into ``int32`` words.

Primitive
---------
:func:`pack_int32_lastdim` packs a 2-D ``uint8`` tensor ``(R, C)`` along its last
dimension. The last dimension is cut into blocks of 32 values (zero padded at the
end when ``C % 32 != 0``); every block becomes exactly ``bits`` ``int32`` words, so
the result is ``int32 (R, ceil(C / 32) * bits)``.

bits in {2, 4, 8} -- word ``j`` of a block holds values ``j*P .. (j+1)*P - 1`` with
``P = 32 // bits``; value ``i`` of the word sits at bit offset ``i * bits``::

    4-bit, one block of 32 values v0..v31 -> 4 words
    word 0: bit 31 [ v7 | v6 | v5 | v4 | v3 | v2 | v1 | v0 ] bit 0
    word 1:        [ v15| v14| ...                  | v8 ]
    word 2:        [ v23| ...                       | v16]
    word 3:        [ v31| ...                       | v24]

bits == 3 -- the low two bits and the high bit are stored separately, so no bits
are wasted and every value is decodable with shifts/masks only::

    word 0: [ lo(v15) | ... | lo(v1) | lo(v0) ]   2 bits each, v_i at bit 2*i
    word 1: [ lo(v31) | ... | lo(v17)| lo(v16)]   2 bits each, v_(16+i) at bit 2*i
    word 2: [ hi(v31) | ... | hi(v1) | hi(v0) ]   1 bit each (bit 2 of v_i) at bit i

    v_k = ((w[k // 16] >> 2*(k % 16)) & 3) | (((w[2] >> k) & 1) << 2)

Words are two's complement ``int32``: a word whose bit 31 is set is negative.

Storage formats
---------------
Weight codes ``q`` are ``uint8 (N, K)`` (``N = out_features``, ``K = in_features``),
zero points ``z`` are integers ``(N, G)`` with ``G = ceil(K / group_size)`` groups
along ``K`` (:func:`num_groups`): column ``k`` belongs to group ``k // group_size``, so
the last group is shorter when ``group_size`` does not divide ``K`` (GPTQ's ``g_idx``).

* ``qweight`` -- ``int32 (ceil(K/32)*bits, N)``, contiguous; packed along ``K``
  with ``N`` as the fastest dimension so that a GEMM/GEMV kernel reading one
  packed row loads consecutive output channels (coalesced)::

              n=0   n=1  ...  n=N-1
      row 0 [ w0  | w0  | ... | w0  ]   block 0 of K (k = 0..31), word 0
      ...
      row b*bits + j                    block b of K, word j

  ``qweight == pack_int32_lastdim(q, bits).T.contiguous()``.
* ``qzeros`` -- ``int32 (G, ceil(N/32)*bits)``; zero points packed along ``N``:
  ``qzeros == pack_int32_lastdim(z.T.to(uint8), bits)``.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along K: ``ceil(K / group_size)``, or 1 for ``group_size == -1`` (per output row)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"group_size={group_size!r} must be -1 or a positive integer")
    return 1 if group_size == -1 else -(-in_features // group_size)


def group_index(in_features: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``g_idx``: the group of every input column, int64 (K,)."""
    k = torch.arange(in_features, device=device)
    return torch.zeros_like(k) if group_size == -1 else k // group_size

__all__ = [
    "SUPPORTED_BITS",
    "num_groups",
    "check_bits",
    "pack_int32_lastdim",
    "unpack_int32_lastdim",
    "pack_qweight_kmajor",
    "unpack_qweight_kmajor",
    "pack_qzeros_nmajor",
    "unpack_qzeros_nmajor",
    "packed_rows",
]

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)
_BLOCK = 32


def check_bits(bits: int, where: str = "bits") -> int:
    """Return ``bits`` if it is a supported bit width, else raise ``ValueError`` naming ``where``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{where}={bits!r} is not supported: choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    return bits


def packed_rows(length: int, bits: int) -> int:
    """Number of ``int32`` words needed to pack ``length`` values of ``bits`` bits."""
    check_bits(bits)
    return -(-length // _BLOCK) * bits


def _check_2d(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def _check_code_range(t: torch.Tensor, bits: int, name: str) -> None:
    # Values of meta tensors are unknown; only shapes can be validated there.
    if t.device.type == "meta" or t.numel() == 0:
        return
    qmax = (1 << bits) - 1
    lo = int(t.min())
    hi = int(t.max())
    if lo < 0 or hi > qmax:
        raise ValueError(
            f"{name} out of range for bits={bits}: found values in [{lo}, {hi}], "
            f"expected [0, {qmax}]"
        )


def _to_int32_words(words64: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as two's complement int32."""
    # Explicit wrap-around: an out-of-range int64 -> int32 cast is not guaranteed to wrap.
    signed = torch.where(words64 >= (1 << 31), words64 - (1 << 32), words64)
    return signed.to(torch.int32)


def pack_int32_lastdim(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8 (R, C)`` codes along the last dim into ``int32 (R, ceil(C/32)*bits)``.

    See the module docstring for the exact bit layout.
    """
    check_bits(bits)
    _check_2d(codes, "codes")
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must have dtype torch.uint8, got {codes.dtype}")
    _check_code_range(codes, bits, "codes")

    rows, cols = codes.shape
    nblocks = -(-cols // _BLOCK)
    pad = nblocks * _BLOCK - cols
    v = codes.to(torch.int64)
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.reshape(rows, nblocks, _BLOCK)
    device = codes.device

    if bits == 3:
        shifts_lo = torch.arange(16, device=device, dtype=torch.int64) * 2
        lo = (v & 3).reshape(rows, nblocks, 2, 16) << shifts_lo
        shifts_hi = torch.arange(_BLOCK, device=device, dtype=torch.int64)
        hi = ((v >> 2) & 1) << shifts_hi
        # Fields never overlap, so summing equals bitwise OR.
        words = torch.cat([lo.sum(dim=-1), hi.sum(dim=-1, keepdim=True)], dim=-1)
    else:
        per_word = _BLOCK // bits
        shifts = torch.arange(per_word, device=device, dtype=torch.int64) * bits
        words = (v.reshape(rows, nblocks, bits, per_word) << shifts).sum(dim=-1)

    return _to_int32_words(words.reshape(rows, nblocks * bits))


def unpack_int32_lastdim(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32_lastdim`: ``int32 (R, ceil(C/32)*bits)`` -> ``uint8 (R, C)``."""
    check_bits(bits)
    _check_2d(words, "words")
    if words.dtype != torch.int32:
        raise ValueError(f"words must have dtype torch.int32, got {words.dtype}")
    if length < 0:
        raise ValueError(f"length must be non-negative, got {length}")
    expected = packed_rows(length, bits)
    if words.shape[1] != expected:
        raise ValueError(
            f"words has {words.shape[1]} columns but {length} values of {bits} bits "
            f"need {expected}"
        )

    rows = words.shape[0]
    nblocks = expected // bits
    device = words.device
    # int32 throughout: a right shift of a negative word fills with ones from the top, but the
    # mask keeps only the ``bits`` lowest bits, which are the same as a logical shift's.
    w = words.reshape(rows, nblocks, bits)

    if bits == 3:
        shifts_lo = torch.arange(16, device=device, dtype=torch.int32) * 2
        lo = ((w[..., :2, None] >> shifts_lo) & 3).reshape(rows, nblocks, _BLOCK)
        shifts_hi = torch.arange(_BLOCK, device=device, dtype=torch.int32)
        hi = (w[..., 2:3] >> shifts_hi) & 1
        v = lo | (hi << 2)
    else:
        per_word = _BLOCK // bits
        shifts = torch.arange(per_word, device=device, dtype=torch.int32) * bits
        v = (w[..., None] >> shifts) & ((1 << bits) - 1)

    return v.reshape(rows, nblocks * _BLOCK)[:, :length].to(torch.uint8)


def pack_qweight_kmajor(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack weight codes ``uint8 (N, K)`` into ``qweight int32 (ceil(K/32)*bits, N)``."""
    return pack_int32_lastdim(codes, bits).T.contiguous()


def unpack_qweight_kmajor(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Unpack ``qweight int32 (ceil(K/32)*bits, N)`` into codes ``uint8 (N, K)``."""
    _check_2d(qweight, "qweight")
    return unpack_int32_lastdim(qweight.T, bits, in_features)


def pack_qzeros_nmajor(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer zero points ``(N, G)`` into ``qzeros int32 (G, ceil(N/32)*bits)``."""
    check_bits(bits)
    _check_2d(zeros, "zeros")
    if zeros.dtype.is_floating_point or zeros.dtype.is_complex or zeros.dtype == torch.bool:
        raise ValueError(f"zeros must have an integer dtype, got {zeros.dtype}")
    # Range check before the uint8 cast, which would silently wrap.
    _check_code_range(zeros, bits, "zeros")
    return pack_int32_lastdim(zeros.T.to(torch.uint8), bits)


def unpack_qzeros_nmajor(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Unpack ``qzeros int32 (G, ceil(N/32)*bits)`` into zero points ``uint8 (N, G)``."""
    return unpack_int32_lastdim(qzeros, bits, out_features).T.contiguous()
