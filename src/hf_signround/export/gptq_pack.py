"""GPTQ's int32 packing: codes as one little-endian bit stream, cut into 32-bit words.

GPTQ (AutoGPTQ "v1", as read by vLLM, GPTQModel, auto-round, ExLlama) lays ``bits``-bit
codes end to end, code ``i`` at stream bits ``[i·bits, (i+1)·bits)``, and stores the
stream as consecutive ``int32`` words. 32 codes fill exactly ``bits`` words. For 2/4/8
bits no code crosses a word, so this equals :func:`hf_signround.packing.pack_int32_lastdim`;
for 3 bits two codes of every 32 straddle a word boundary::

    3-bit, codes v0..v31 -> 3 words (96 bits)
    word 0: bit 31 [ v10.lo2 | v9 | v8 | ... | v1 | v0 ] bit 0
    word 1:        [ v21.lo1 | v20 | ... | v11 | v10.hi1 ]
    word 2:        [ v31 | v30 | ... | v22 | v21.hi2 ]

(our own 3-bit layout in ``packing.py`` keeps every code inside a word instead.)

Buffers of a GPTQ layer (``N = out_features``, ``K = in_features``, ``G`` groups):

* ``qweight`` -- ``int32 (K·bits/32, N)``: codes packed along K (:func:`pack_gptq_kmajor`);
* ``qzeros``  -- ``int32 (G, N·bits/32)``: ``zero − 1`` packed along N (v1 convention);
* ``scales``  -- ``float16 (G, N)``;  ``g_idx`` -- ``int32 (K,)``, the group of each column.

K and N must be multiples of 32 (loaders size the buffers as ``K // 32 · bits``).
"""

from __future__ import annotations

import torch

__all__ = ["pack_gptq_bitstream", "pack_gptq_kmajor", "unpack_gptq_bitstream", "unpack_gptq_kmajor"]

_WORD = 32
_MASK32 = 0xFFFFFFFF


def _stream_positions(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit offset of each of 32 codes inside its ``bits``-word block."""
    start = torch.arange(_WORD, device=device, dtype=torch.int64) * bits
    return start // _WORD, start % _WORD


def _check(codes: torch.Tensor, bits: int) -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits} is not a GPTQ bit-width: GPTQ stores 2, 3, 4 or 8 bits")
    if codes.ndim != 2 or codes.shape[1] % _WORD:
        raise ValueError(f"GPTQ packs rows of a multiple of 32 codes, got shape {tuple(codes.shape)}")


def pack_gptq_bitstream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(R, C)`` in ``[0, 2**bits)`` along C into ``int32 (R, C·bits/32)``."""
    _check(codes, bits)
    rows, cols = codes.shape
    v = codes.to(torch.int64).reshape(rows, cols // _WORD, _WORD)
    if int(v.min()) < 0 or int(v.max()) >= 1 << bits:
        raise ValueError(f"codes out of range for {bits} bits: [{int(v.min())}, {int(v.max())}]")
    word, offset = _stream_positions(bits, v.device)
    words = torch.zeros(rows, cols // _WORD, bits, dtype=torch.int64, device=v.device)
    # Fields never overlap, so adding is OR-ing. A code crossing a word boundary puts its
    # low part at the top of its word and its high part at the bottom of the next.
    words.index_add_(2, word, (v << offset) & _MASK32)
    spill = offset + bits > _WORD
    if spill.any():
        words.index_add_(2, word[spill] + 1, v[..., spill] >> (_WORD - offset[spill]))
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement int32
    return words.reshape(rows, -1).to(torch.int32)


def unpack_gptq_bitstream(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_gptq_bitstream`: ``int32 (R, C·bits/32)`` -> ``uint8 (R, C)``."""
    if bits not in (2, 3, 4, 8) or words.ndim != 2 or words.shape[1] % bits:
        raise ValueError(f"cannot unpack words of shape {tuple(words.shape)} as {bits}-bit GPTQ codes")
    rows = words.shape[0]
    w = (words.to(torch.int64) & _MASK32).reshape(rows, -1, bits)
    word, offset = _stream_positions(bits, w.device)
    low = w[..., word] >> offset
    spill = offset + bits > _WORD
    high = torch.zeros_like(low)
    high[..., spill] = w[..., word[spill] + 1] << (_WORD - offset[spill])
    return ((low | high) & ((1 << bits) - 1)).reshape(rows, -1).to(torch.uint8)


def pack_gptq_kmajor(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Weight codes ``(N, K)`` -> GPTQ ``qweight int32 (K·bits/32, N)``."""
    return pack_gptq_bitstream(codes, bits).T.contiguous()


def unpack_gptq_kmajor(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ ``qweight int32 (K·bits/32, N)`` -> codes ``uint8 (N, K)``."""
    return unpack_gptq_bitstream(qweight.T, bits)
