"""benchmarks/time_to_quality.py: which step count first reaches the peer's 200-step perplexity, and at what time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def row(ppl, seconds):
    return {"ppl": ppl, "quantize_seconds": seconds}


RESULTS = {
    "ours-W4G128-sym-i0": row(15.0, 40.0), "ours-W4G128-sym-i25": row(14.2, 300.0), "ours-W4G128-sym": row(13.9, 600.0),
    "ours-W4G128-sym-i100": row(13.8, 1200.0), "arv2-W4G128-sym": row(14.1, 650.0),
    "arv2-W4G128-sym-i200": row(14.0, 2400.0), "fp": row(12.6, None), "ours-W4G128-sym@s43": row(1.0, 1.0),
    "ours-W2G64-sym-i25": row(40.0, 300.0), "arv2-W2G64-sym-i200": row(30.0, 2400.0),
}


def test_curves_and_verdicts(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import time_to_quality as ttq

    curves = ttq.curves(RESULTS)
    assert curves["W4G128-sym"]["ours"] == [(0, 15.0, 40.0), (25, 14.2, 300.0), (50, 13.9, 600.0), (100, 13.8, 1200.0)]
    w4 = ttq.verdicts(curves["W4G128-sym"])
    # 25 steps (14.2) does not reach 14.0; 50 steps does, in a quarter of V2's 200-step time
    assert w4["ours_reaches_v2_200"] == {"iters": 50, "ppl": 13.9, "seconds": 600.0, "time_ratio": 0.25}
    assert w4["ours25_vs_v2_50"] == {"ours_ppl": 14.2, "v2_ppl": 14.1, "ppl_ratio": pytest.approx(14.2 / 14.1, abs=1e-4),
                                     "time_ratio": pytest.approx(300 / 650, abs=1e-3)}
    w2 = ttq.verdicts(curves["W2G64-sym"])
    assert w2["ours_reaches_v2_200"] is None and "ours25_vs_v2_50" not in w2


def test_command_writes_the_report_and_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "q.json"
    results.write_text(json.dumps(RESULTS))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "time_to_quality.py"), "--results", str(results),
                           "--out", str(tmp_path / "t.json"), "--png", str(tmp_path / "t.png")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ours reaches V2's 200-step perplexity 14.0 at 50 steps (13.9), in 0.25x" in done.stdout
    assert "ours does not reach V2's 200-step perplexity 30.0" in done.stdout
    assert json.loads((tmp_path / "t.json").read_text())["W4G128-sym"]["ours_reaches_v2_200"]["iters"] == 50
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
