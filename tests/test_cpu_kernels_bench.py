"""benchmarks/cpu_kernels.py: every candidate computes the same product, and a row says how fast and how exact."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("auto_round_kernel", reason="the benchmark's main rows run auto-round-lib's ARK kernel")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "SHAPES", {"tiny 384x256": (384, 256)})
    return cpu_kernels


def test_random_codes_dequantize_as_our_layers_do(bench):
    codes, scales, zeros, weight = bench.random_codes(384, 256, 3)
    layer = bench._ours(codes, scales, zeros, 3, "torch")
    assert int(codes.max()) < 8 and int(zeros.max()) < 8
    assert torch.equal(layer.dequantize_weight(torch.float32), weight)


def test_rows_time_every_candidate_against_the_dense_product(bench):
    rows = bench.bench(torch.float32, [1, 3], ["tiny 384x256"], repeats=1, only=["ours", "int8pack"])
    names = {r["name"] for r in rows}
    assert names == {"dense", "ours ark W2", "ours ark W3", "ours ark W4", "ours ark W8", "ours torch W4",
                     "ours aten_int4 W4", "aten int8pack W8/ch"}
    assert {(r["rows"]) for r in rows} == {1, 3}
    for r in rows:
        assert r["us"] > 0
        if r["name"] == "dense":
            assert r["speedup"] == 1.0 and r["rel_err"] == 0.0
        elif r["name"].startswith("ours"):  # our kernels compute the product of the dequantized weight
            assert r["rel_err"] < 1e-5, r
        else:  # per-channel int8 of that weight: a quantization error of its own, below 1 %
            assert 1e-4 < r["rel_err"] < 2e-2, r


def test_a_candidate_that_cannot_run_is_named_and_left_out(bench, monkeypatch, caplog):
    def broken(n, k, x):
        raise ValueError("no kernel for this shape")

    real = bench.candidates
    monkeypatch.setattr(bench, "candidates", lambda dtype: {**real(dtype), "broken": broken})
    with caplog.at_level(logging.WARNING, logger="cpu_kernels"):
        rows = bench.bench(torch.float32, [1], ["tiny 384x256"], repeats=1, only=["ours torch", "broken"])
    assert [r["name"] for r in rows] == ["dense", "ours torch W4"]
    assert "tiny 384x256 M=1 broken: ValueError: no kernel for this shape" in caplog.text


def test_inductor_candidate_is_the_dequantized_product(bench):
    codes, scales, zeros, weight = bench.random_codes(384, 256, 4)
    module = bench._DequantLinear(codes, scales, zeros, torch.float32)
    x = torch.randn(2, 256)
    assert torch.allclose(module(x), F.linear(x, weight), rtol=0, atol=1e-6)
