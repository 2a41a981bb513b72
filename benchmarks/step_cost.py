"""What one tuning step costs, against the CPU's arithmetic floor (the tuning-time target).

On one decoder block of SmolLM2-135M-Instruct (default block 15) at W2G64 symmetric, with
the quality benchmark's calibration (32 x 256 tokens from Python's `library/` docs, seed
42) and batch 8, this measures in one run:

* the floating-point work of one step (forward, loss, backward), counted by
  `torch.utils.flop_counter.FlopCounterMode`;
* the machine's fp32 matrix-product rate, on products of the block's own shapes;
* where an eager step's time goes, by `torch.profiler` (self CPU time of matrix products,
  attention, and everything else), which bounds what removing overhead alone can save;
* the wall time per step of `tune_block` as the library runs it (eager; its one evaluation
  without gradients after the last step is counted in, which overstates a step by under
  2 % at 20 steps), and of the same
  `tune_block` with the block's forward compiled by `torch.compile` (inductor), plus the
  one-off compile time.

The floor is the step's work at the measured rate. Ratios hold on a noisy machine because
every figure comes from the same run.

    python benchmarks/step_cost.py [--block 15] [--iters 20]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_signround.assets import calibration_texts, smollm2_path
from hf_signround.blocks import capture_block_inputs, find_blocks, set_module
from hf_signround.calibration import build_calibration
from hf_signround.qfunc import QuantSpec
from hf_signround.tuning import LOSS_SCALE, BlockCall, TunableLinear, TuneSettings, block_loss, tune_block

NSAMPLES, SEQLEN, BATCH, SEED = 32, 256, 8, 42


class CompiledCall(BlockCall):
    """``BlockCall`` whose block forward goes through one ``torch.compile``d function."""

    def __init__(self, call: BlockCall):
        super().__init__(call.args, call.kwargs)
        self.forward = torch.compile(lambda block, hidden: BlockCall.__call__(self, block, hidden), dynamic=False)

    def __call__(self, block, hidden):
        return self.forward(block, hidden)


def tunable_copy(block, spec: QuantSpec):
    block = copy.deepcopy(block)
    tunables = {}
    for name, module in list(block.named_modules()):
        if isinstance(module, torch.nn.Linear):
            tunables[name] = TunableLinear(module, spec, None, torch.float16)
            set_module(block, name, tunables[name])
    return block, tunables


STEP_SPEC = QuantSpec(2, 64, True)  # the W2G64 symmetric rows, where the time target was measured


def step_settings(iters: int) -> TuneSettings:
    """The quality benchmark's tuning settings (lr 1/50, batch 8, Huber top-k 0.1 %), for ``iters`` steps."""
    return TuneSettings(iters, 1.0 / 50, BATCH, 0.001, "huber", SEED)


def block_arguments(doc: str, out: str) -> argparse.ArgumentParser:
    """The options of the one-block benchmarks: which block, how many steps, where the JSON goes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", type=int, default=15)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser


def prepare_block(index: int):
    """SmolLM2's block ``index`` with its float-chain calibration inputs and float outputs."""
    model_dir = smollm2_path()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.requires_grad_(False)
    ids = build_calibration(calibration_texts(), tok, NSAMPLES, SEQLEN, SEED)
    _, blocks = find_blocks(model)
    hidden, call_args, call_kwargs = capture_block_inputs(model, blocks, ids)
    call = BlockCall(call_args, call_kwargs)
    with torch.no_grad():
        for earlier in blocks[:index]:
            hidden = call.batched(earlier, hidden, BATCH)
    target = call.batched(blocks[index], hidden, BATCH)
    return blocks[index], call, hidden, target


def timed_steps(block, spec: QuantSpec, call: BlockCall, hidden, target, settings: TuneSettings):
    """Seconds of 2 warm-up steps (a compiled call compiles there), then seconds per step and the
    loss history of ``settings.iters`` steps, each run on a fresh tunable copy of ``block``.

    The per-step figure counts in tune_block's one no-grad evaluation after the last step.
    """
    qblock, tunables = tunable_copy(block, spec)
    start = time.perf_counter()
    tune_block(qblock, tunables, call, hidden, target, dataclasses.replace(settings, iters=2))
    first_2 = time.perf_counter() - start
    qblock, tunables = tunable_copy(block, spec)
    start = time.perf_counter()
    history = tune_block(qblock, tunables, call, hidden, target, settings)
    return first_2, (time.perf_counter() - start) / settings.iters, history


def matmul_rate(block, tokens: int, repeats: int = 5) -> float:
    """fp32 GFLOP/s of ``x @ W.T`` over the block's Linear shapes (best of ``repeats``)."""
    shapes = [m.weight.shape for m in block.modules() if isinstance(m, torch.nn.Linear)]
    pairs = [(torch.randn(tokens, k), torch.randn(n, k)) for n, k in shapes]
    flops = sum(2 * tokens * n * k for n, k in shapes)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for x, w in pairs:
            x @ w.T
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def time_shares(run) -> dict[str, float]:
    """Self CPU seconds of ``run()`` under the profiler: matrix products, attention, the rest."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    shares = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        kind = ("matmul" if event.key in MATMUL_OPS
                else "attention" if "scaled_dot_product" in event.key else "other")
        shares[kind] += event.self_cpu_time_total / 1e6
    return shares


def main() -> None:
    args = block_arguments(__doc__, "benchmarks/results/step_cost.json").parse_args()
    block, call, hidden, target = prepare_block(args.block)
    spec, settings = STEP_SPEC, step_settings(args.iters)

    qblock, tunables = tunable_copy(block, spec)
    params = [p for t in tunables.values() for p in (t.v, t.alpha, t.beta)]
    with FlopCounterMode(display=False) as counter:
        loss = block_loss(call(qblock, hidden[:BATCH]), target[:BATCH], settings.topk_ratio, settings.topk_mode)
        torch.autograd.grad(loss * LOSS_SCALE, params)
    step_gflop = counter.get_total_flops() / 1e9
    rate = matmul_rate(block, BATCH * SEQLEN)

    results = {"block": args.block, "iters": args.iters, "tokens_per_step": BATCH * SEQLEN,
               "torch_threads": torch.get_num_threads(), "step_gflop": step_gflop,
               "matmul_gflop_per_s": rate, "floor_s_per_step": step_gflop / rate}
    for name, make_call in (("eager", lambda: call), ("compiled", lambda: CompiledCall(call))):
        first_2, per_step, history = timed_steps(block, spec, make_call(), hidden, target, settings)
        results[f"{name}_first_2_steps_s"], results[f"{name}_s_per_step"] = first_2, per_step
        results[f"{name}_best_loss"] = min(history)
    qblock, tunables = tunable_copy(block, spec)
    shares = time_shares(lambda: tune_block(qblock, tunables, call, hidden, target, settings))
    total = sum(shares.values())
    results.update({f"profiled_{kind}_s_per_step": seconds / args.iters for kind, seconds in shares.items()})
    results["profiled_matmul_plus_attention_share"] = (shares["matmul"] + shares["attention"]) / total
    results["compiled_over_eager"] = results["compiled_s_per_step"] / results["eager_s_per_step"]
    results["eager_over_floor"] = results["eager_s_per_step"] / results["floor_s_per_step"]

    print(f"block {args.block}, W2G64 sym, {BATCH} x {SEQLEN} tokens per step, {results['torch_threads']} threads")
    print(f"work per step           {step_gflop:8.1f} GFLOP")
    print(f"fp32 matmul rate        {rate:8.1f} GFLOP/s  -> floor {results['floor_s_per_step']:.3f} s/step")
    for name in ("eager", "compiled"):
        print(f"{name:9s} s/step        {results[f'{name}_s_per_step']:8.3f}   "
              f"(first 2 steps {results[f'{name}_first_2_steps_s']:.1f} s, best loss {results[f'{name}_best_loss']:.5f})")
    print("eager step by the profiler (self CPU s/step): matmul {:.3f}, attention {:.3f}, other {:.3f}; "
          "matmul + attention {:.0%} of the step".format(
              results["profiled_matmul_s_per_step"], results["profiled_attention_s_per_step"],
              results["profiled_other_s_per_step"], results["profiled_matmul_plus_attention_share"]))
    print(f"compiled / eager        {results['compiled_over_eager']:8.3f}")
    print(f"eager / floor           {results['eager_over_floor']:8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
