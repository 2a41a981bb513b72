"""Cost of the DeltaLoss scoring against one plain forward+backward of the model.

On SmolLM2-135M-Instruct with 16 x 256 scoring windows from Python's `library/` docs: the
time of one ordinary training-style forward+backward (weight gradients of every parameter)
over the windows, then the time each scoring takes (block by block, the only way it runs):
spec DeltaLoss for one option (it costs that per option), and for the two options W2G64 +
W4G128 the anchored DeltaLoss and the second-order DeltaLoss (`deltaloss_fisher`), which take
one gradient for every option. All are measured in the same run, interleaved, so the ratios
hold on a noisy machine.

    python benchmarks/sensitivity_cost.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_signround.assets import calibration_texts, smollm2_path
from hf_signround.blocks import ResidentBlocks, quantizable_layers
from hf_signround.calibration import build_calibration
from hf_signround.qfunc import QuantSpec
from hf_signround.sensitivity import delta_loss_scores, taylor_scores

NSAMPLES, SEQLEN, BATCH, SEED = 16, 256, 8, 42


def plain_forward_backward(model, ids) -> float:
    model.requires_grad_(True)
    start = time.perf_counter()
    for i in range(0, len(ids), BATCH):
        batch = ids[i : i + BATCH]
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sensitivity_cost.json"))
    args = parser.parse_args()
    model_dir = smollm2_path()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = build_calibration(calibration_texts(), tok, NSAMPLES, SEQLEN, SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    layers = quantizable_layers(model, ["lm_head"])
    one, two = [QuantSpec(2, 64, True)], [QuantSpec(2, 64, True), QuantSpec(4, 128, True)]
    kw = dict(batch_size=BATCH, scale_dtype=torch.float16, device=torch.device("cpu"))
    source = ResidentBlocks(model)
    passes = {
        "deltaloss_1_option": lambda: delta_loss_scores(source, layers, one, ids, **kw),
        "deltaloss_anchored_2_options": lambda: delta_loss_scores(source, layers, two, ids, anchor=two[1], **kw),
        "deltaloss_fisher_2_options": lambda: taylor_scores(source, layers, two, ids, **kw),
    }
    rows = {"plain_forward_backward": [], **{k: [] for k in passes}}
    for _ in range(args.repeats):  # interleaved, so drifting load hits every row alike
        rows["plain_forward_backward"].append(plain_forward_backward(model, ids))
        for key, run in passes.items():
            start = time.perf_counter()
            run()
            rows[key].append(time.perf_counter() - start)
    base = min(rows["plain_forward_backward"])
    result = {k: {"seconds_min": round(min(v), 2), "ratio_to_plain_fwd_bwd": round(min(v) / base, 3)}
              for k, v in rows.items()}
    result["protocol"] = (f"SmolLM2-135M, {NSAMPLES} x {SEQLEN} tokens, batch {BATCH}, options as named, min of "
                          f"{args.repeats}, torch threads {torch.get_num_threads()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'pass':<42} {'seconds':>8} {'vs plain F+B':>13}")
    for k, v in rows.items():
        print(f"{k:<42} {min(v):>8.2f} {min(v) / base:>13.3f}")


if __name__ == "__main__":
    main()
