"""Tests for hf_signround.packing: round trips, exact bit layout, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_signround.packing import (
    pack_int32_lastdim,
    pack_qweight_kmajor,
    pack_qzeros_nmajor,
    unpack_int32_lastdim,
    unpack_qweight_kmajor,
    unpack_qzeros_nmajor,
)

BITS = [2, 3, 4, 8]


def _to_signed32(u: int) -> int:
    return u - (1 << 32) if u >= (1 << 31) else u


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    rows=st.integers(1, 9),
    cols=st.integers(1, 200),
    seed=st.integers(0, 2**31 - 1),
)
def test_roundtrip_property(bits: int, rows: int, cols: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=gen, dtype=torch.int64).to(torch.uint8)
    words = pack_int32_lastdim(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (rows, -(-cols // 32) * bits)
    out = unpack_int32_lastdim(words, bits, cols)
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes)


def test_layout_4bit_by_hand() -> None:
    vals = [i % 16 for i in range(32)]
    codes = torch.tensor([vals], dtype=torch.uint8)
    expected = []
    for j in range(4):
        w = 0
        for i in range(8):
            w |= vals[j * 8 + i] << (4 * i)
        expected.append(_to_signed32(w))
    # 0x76543210 and 0xFEDCBA98 written out explicitly as a sanity anchor.
    assert expected == [0x76543210, _to_signed32(0xFEDCBA98), 0x76543210, _to_signed32(0xFEDCBA98)]
    words = pack_int32_lastdim(codes, 4)
    assert words.tolist() == [expected]


def test_layout_3bit_by_hand() -> None:
    vals = [i % 8 for i in range(32)]  # 0..7 repeated four times
    codes = torch.tensor([vals], dtype=torch.uint8)
    # Low 2 bits of 0..7 repeat as 0,1,2,3,0,1,2,3 -> each 4-value run is 0b11_10_01_00 = 0xE4.
    w0 = 0xE4E4E4E4
    w1 = 0xE4E4E4E4
    # High bit is set for values 4..7 of every run of 8 -> 0xF0 per byte.
    w2 = 0xF0F0F0F0
    words = pack_int32_lastdim(codes, 3)
    assert words.tolist() == [[_to_signed32(w0), _to_signed32(w1), _to_signed32(w2)]]
    # Kernel-style decoding formula from the module docstring.
    w = [x & 0xFFFFFFFF for x in words[0].tolist()]
    decoded = [((w[k // 16] >> (2 * (k % 16))) & 3) | (((w[2] >> k) & 1) << 2) for k in range(32)]
    assert decoded == vals


def test_layout_3bit_partial_block() -> None:
    codes = torch.tensor([[7, 0, 5]], dtype=torch.uint8)
    lo = 0b11 | (0b00 << 2) | (0b01 << 4)
    hi = 1 | (0 << 1) | (1 << 2)
    assert pack_int32_lastdim(codes, 3).tolist() == [[lo, 0, hi]]


def test_layout_2bit_and_8bit() -> None:
    codes = torch.tensor([[3] * 16 + [0] * 16], dtype=torch.uint8)
    assert pack_int32_lastdim(codes, 2).tolist() == [[-1, 0]]
    codes8 = torch.tensor([[1, 2, 3, 0xAB] + [0] * 28], dtype=torch.uint8)
    words = pack_int32_lastdim(codes8, 8)
    assert words[0, 0].item() == _to_signed32(0xAB030201)
    assert words[0, 1:].tolist() == [0] * 7


@pytest.mark.parametrize("bits", BITS)
def test_negative_words(bits: int) -> None:
    qmax = 2**bits - 1
    codes = torch.full((3, 40), qmax, dtype=torch.uint8)
    words = pack_int32_lastdim(codes, bits)
    # Every full block has bit 31 set in all its words -> all -1.
    assert (words[:, :bits] == -1).all()
    assert (words < 0).any()
    assert torch.equal(unpack_int32_lastdim(words, bits, 40), codes)


@pytest.mark.parametrize("bits", BITS)
def test_qweight_qzeros_shapes_and_roundtrip(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    n, k, g = 70, 100, 4
    codes = torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8)
    qweight = pack_qweight_kmajor(codes, bits)
    assert qweight.shape == (4 * bits, n)
    assert qweight.dtype == torch.int32
    assert qweight.is_contiguous()
    assert torch.equal(qweight, pack_int32_lastdim(codes, bits).T)
    assert torch.equal(unpack_qweight_kmajor(qweight, bits, k), codes)

    zeros = torch.randint(0, 2**bits, (n, g), generator=gen)  # int64 accepted
    qzeros = pack_qzeros_nmajor(zeros, bits)
    assert qzeros.shape == (g, 3 * bits)
    assert qzeros.dtype == torch.int32
    assert torch.equal(qzeros, pack_int32_lastdim(zeros.T.to(torch.uint8), bits))
    out = unpack_qzeros_nmajor(qzeros, bits, n)
    assert out.dtype == torch.uint8
    assert torch.equal(out, zeros.to(torch.uint8))


def test_errors() -> None:
    codes = torch.zeros(2, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"bits=5 is not supported: choose one of 2, 3, 4, 8"):
        pack_int32_lastdim(codes, 5)
    with pytest.raises(ValueError, match=r"bits=5"):
        unpack_int32_lastdim(torch.zeros(2, 5, dtype=torch.int32), 5, 32)
    with pytest.raises(ValueError, match=r"out of range for bits=3.*\[0, 8\].*\[0, 7\]"):
        pack_int32_lastdim(torch.tensor([[0, 8]], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        pack_int32_lastdim(codes.to(torch.int32), 4)
    with pytest.raises(ValueError, match="2-D"):
        pack_int32_lastdim(torch.zeros(32, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="int32"):
        unpack_int32_lastdim(torch.zeros(2, 4, dtype=torch.int64), 4, 32)
    with pytest.raises(ValueError, match="columns"):
        unpack_int32_lastdim(torch.zeros(2, 4, dtype=torch.int32), 4, 33)
    with pytest.raises(ValueError, match="out of range"):
        pack_qzeros_nmajor(torch.tensor([[-1, 2]]), 2)
    with pytest.raises(ValueError, match="out of range"):
        pack_qzeros_nmajor(torch.tensor([[256]]), 8)
    with pytest.raises(ValueError, match="integer dtype"):
        pack_qzeros_nmajor(torch.zeros(2, 2), 4)


def test_meta_tensors_shape_only() -> None:
    codes = torch.empty(5, 70, dtype=torch.uint8, device="meta")
    qweight = pack_qweight_kmajor(codes, 3)
    assert qweight.device.type == "meta"
    assert qweight.shape == (9, 5)
    assert unpack_qweight_kmajor(qweight, 3, 70).shape == (5, 70)
