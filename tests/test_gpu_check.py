"""benchmarks/gpu_check.py, the one-call GPU check, run at toy sizes on CPU: every key it promises is written;
and benchmarks/call_overhead.py, which it runs on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the smoke run takes Triton's kernels through its CPU interpreter")
ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, out: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_smoke_run_writes_every_key(tmp_path):
    result = run_benchmark("gpu_check.py", tmp_path / "gpu.json", "--smoke", "--stages", "kernels", "e2e", "tuning")
    assert set(result) >= {"device", "m1_w4_speedup", "m16_w4_speedup", "prefill2048_w4_ratio", "e2e_decode_w4_speedup",
                           "eager_decode_w4_speedup", "eager_decode_w4_unfused_speedup", "tune_speed_vs_autoround",
                           "dequant_min_rows", "details"}
    assert not [stage for stage, details in result["details"].items() if "error" in details], result["details"]
    assert result["tune_speed_vs_autoround"] > 0  # auto-round is a test dependency
    assert result["m1_w4_speedup"] > 0 and result["prefill2048_w4_ratio"] > 0 and result["eager_decode_w4_speedup"] > 0
    assert result["eager_decode_w4_unfused_speedup"] > 0
    assert result["e2e_decode_w4_speedup"] is None  # compiled decode needs CUDA graphs


def test_call_overhead_runs_and_writes_its_figures(tmp_path):
    result = run_benchmark("call_overhead.py", tmp_path / "call_overhead.json", "--calls", "20", "--repeats", "1")
    assert set(result["us_per_call"]) == {"eager", "custom op"} and set(result["layer_us"]) == {"apart", "fused"}
    assert all(v > 0 for v in [*result["us_per_call"].values(), *result["layer_us"].values()])
