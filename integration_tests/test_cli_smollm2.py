"""`hf-signround` on the bundled GGUF file: convert, quantize, export to GPTQ and inspect, as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hf_signround.assets import smollm2_gguf_path

pytestmark = pytest.mark.slow  # GGUF conversion plus quantization: about two minutes on 2 CPU cores


def test_quantize_a_gguf_file_to_gptq(tmp_path):
    out = tmp_path / "smollm2-gptq"
    cli = [sys.executable, "-m", "hf_signround.cli", "-q"]
    done = subprocess.run([*cli, "quantize", str(smollm2_gguf_path()), str(out), "--iters", "0", "--bits", "4",
                           "--group-size", "64", "--sym", "--format", "gptq"],
                          capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr
    assert "quantized 210 layers (210 W4G64 sym)" in done.stdout
    assert (out / "tokenizer.json").is_file()
    shown = subprocess.run([*cli, "inspect", str(out), "--json"], capture_output=True, text=True, timeout=600,
                           check=False)
    summary = json.loads(shown.stdout)
    assert summary["format"] == "gptq" and summary["layers"] == 210
    # GPTQ stores zero points even when symmetric: 4 + (16 + 4) / 64 bits per weight
    assert summary["avg_bits"] == 4 + 20 / 64
