"""Would another BLAS make a tuning step faster on this CPU? (the tuning-time target)

torch's CPU wheel does its fp32 matrix products in its bundled oneMKL; numpy's wheel
bundles OpenBLAS. On an AMD CPU oneMKL may not take its fastest code path, so this
measures, in one run:

* the fp32 GFLOP/s of both libraries on the products of one SmolLM2 tuning step (per
  Linear shape: the forward ``x Wᵀ``, the input gradient ``δ W`` and the weight gradient
  ``δᵀ x``, over 8 x 256 tokens), the two libraries in turn on each product, best of
  5 x ``--repeats`` calls;
* the wall time per step of ``tune_block`` on one block (default 15) at W2G64 symmetric,
  as the library runs it and with every quantized Linear's three products done by numpy
  on the same memory (no copies), interleaved, best of ``--repeats``.

The two libraries keep separate thread pools (OpenMP for torch, pthreads for OpenBLAS),
and each spins for a while after its work, so the step time also depends on
``OMP_WAIT_POLICY`` and ``OPENBLAS_THREAD_TIMEOUT``; both are read once, when each library
starts, so they have to be set outside the process: run the script with and without them.

    OMP_NUM_THREADS=2 python benchmarks/blas_probe.py --out benchmarks/results/blas_probe.json
    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE OPENBLAS_THREAD_TIMEOUT=4 \\
        python benchmarks/blas_probe.py --out benchmarks/results/blas_probe-passive.json
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
from step_cost import BATCH, SEQLEN, STEP_SPEC, block_arguments, prepare_block, step_settings, timed_steps

import hf_signround.tuning as tuning


class NumpyLinear(torch.autograd.Function):
    """``F.linear`` without bias whose three products run in numpy's BLAS, on torch's memory."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        ctx.save_for_backward(x, w)
        out = np.matmul(x.reshape(-1, x.shape[-1]).numpy(), w.numpy().T)
        return torch.from_numpy(out).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).contiguous().numpy()
        gx = torch.from_numpy(g @ w.numpy()).reshape(x.shape) if ctx.needs_input_grad[0] else None
        gw = torch.from_numpy(g.T @ x.reshape(-1, x.shape[-1]).numpy()) if ctx.needs_input_grad[1] else None
        return gx, gw


def numpy_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if bias is not None:
        raise ValueError("the probe covers bias-free Linears only (SmolLM2 has no biases)")
    return NumpyLinear.apply(x, w)


@contextlib.contextmanager
def products_in_numpy():
    """Route ``TunableLinear``'s ``F.linear`` through :class:`NumpyLinear` for the duration."""
    shim = types.SimpleNamespace(**{name: getattr(F, name) for name in dir(F) if not name.startswith("_")})
    shim.linear = numpy_linear
    tuning.F = shim
    try:
        yield
    finally:
        tuning.F = F


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_rates(block, tokens: int, repeats: int) -> list[dict]:
    rows = []
    for name, module in block.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        n, k = module.weight.shape
        x, w, g = torch.randn(tokens, k), torch.randn(n, k), torch.randn(tokens, n)
        xn, wn, gn = x.numpy(), w.numpy(), g.numpy()
        products = {"forward": (lambda: x @ w.T, lambda: xn @ wn.T),
                    "input grad": (lambda: g @ w, lambda: gn @ wn),
                    "weight grad": (lambda: g.T @ x, lambda: gn.T @ xn)}
        for kind, (in_torch, in_numpy) in products.items():
            gflop = 2 * tokens * n * k / 1e9
            rows.append({"layer": name, "shape": [n, k], "product": kind,
                         "torch_gflop_s": gflop / seconds(in_torch, repeats),
                         "numpy_gflop_s": gflop / seconds(in_numpy, repeats)})
    return rows


def main() -> None:
    parser = block_arguments(__doc__, "benchmarks/results/blas_probe.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    block, call, hidden, target = prepare_block(args.block)
    spec, settings = STEP_SPEC, step_settings(args.iters)

    rates = gemm_rates(block, BATCH * SEQLEN, 5 * args.repeats)
    steps = {"torch": [], "numpy": []}
    for _ in range(args.repeats):
        for backend, context in (("torch", contextlib.nullcontext), ("numpy", products_in_numpy)):
            with context():
                steps[backend].append(timed_steps(block, spec, call, hidden, target, settings)[1])

    env = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")}
    results = {"block": args.block, "iters": args.iters, "torch_threads": torch.get_num_threads(), "env": env,
               "torch_blas": next((line.strip(" -") for line in torch.__config__.show().splitlines()
                                   if "Math Kernel Library" in line), "not oneMKL"),
               "numpy_blas": np.show_config(mode="dicts")["Build Dependencies"]["blas"].get("name", ""),
               "gemm": rates, "step_s": steps,
               "numpy_over_torch_step": min(steps["numpy"]) / min(steps["torch"])}
    print(f"block {args.block}, {BATCH} x {SEQLEN} tokens, {results['torch_threads']} threads, env {env}")
    print(f"torch: {results['torch_blas']}; numpy: {results['numpy_blas']}")
    print(f"{'layer':24s} {'shape':>10s} {'product':>12s} {'torch GF/s':>11s} {'numpy GF/s':>11s} {'ratio':>6s}")
    for row in rates:
        print(f"{row['layer']:24s} {'x'.join(map(str, row['shape'])):>10s} {row['product']:>12s} "
              f"{row['torch_gflop_s']:11.1f} {row['numpy_gflop_s']:11.1f} {row['numpy_gflop_s'] / row['torch_gflop_s']:6.2f}")
    for backend, times in steps.items():
        print(f"tune_block, products in {backend:5s}: " + ", ".join(f"{t:.3f}" for t in times) + " s/step")
    print(f"numpy / torch step (best of each): {results['numpy_over_torch_step']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
