"""Tuning on the real SmolLM2-135M-Instruct: it must beat round-to-nearest on held-out text."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from hf_signround import SignRoundV2Config, quantize_model
from hf_signround.assets import calibration_texts
from hf_signround.calibration import build_calibration
from hf_signround.evaluation import perplexity


def quantized_ppl(model_dir, heldout, calib, **kw) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = SignRoundV2Config(**{"group_size": 128, "sym": True, "batch_size": 8, **kw})
    result = quantize_model(model, cfg, calib if cfg.needs_calibration else None, skip=["lm_head"])
    if cfg.needs_calibration:
        # the kept step is never worse than the first, and the typical block gains clearly; a single
        # block may stall at 8 steps (block 16 did on a Xeon: 13.8 -> 13.8), so no per-block margin
        gains = sorted(1 - r.loss_after / r.loss_before for r in result.reports.values())
        assert gains[0] >= 0, gains
        assert gains[len(gains) // 2] > 0.05, gains
    return perplexity(model, heldout)


@pytest.fixture(scope="module")
def calib(smollm2_tokenizer):
    return build_calibration(calibration_texts(), smollm2_tokenizer, nsamples=16, seqlen=128, seed=42)


def test_short_w3_tuning_beats_round_to_nearest(smollm2_dir, heldout, calib):
    # 8 steps per block keep this under two minutes on 2 cores; the benchmark runs 50
    rtn = quantized_ppl(smollm2_dir, heldout, None, bits=3, iters=0)
    tuned = quantized_ppl(smollm2_dir, heldout, calib, bits=3, iters=8)
    assert tuned < 0.9 * rtn, (rtn, tuned)


@pytest.mark.slow
def test_w2_tuning_with_the_benchmark_recipe(smollm2_dir, heldout, calib):
    rtn = quantized_ppl(smollm2_dir, heldout, None, bits=2, group_size=64, iters=0)
    tuned = quantized_ppl(smollm2_dir, heldout, calib, bits=2, group_size=64, iters=50)
    assert tuned < 0.2 * rtn, (rtn, tuned)
