"""Host time of one quantized layer call on the Triton path, eager, against the custom-op route.

A decode step on a GPU is launch-bound: a 32-layer Llama makes about 224 linear calls a token,
and each pays Python and a kernel launch on the host while the GPU waits. This measures a
``QuantLinear`` call (W4G128, 4096 x 4096, one float16 token) three ways, interleaved, best of
``--repeats`` loops of ``--calls`` calls:

* ``eager`` -- ``layer(x)`` as a model calls it: the layer's ``LayerLauncher`` (stored tensors
  checked once, each row count's launch kept);
* ``custom op`` -- ``torch.ops.hf_signround.quant_linear`` on the same tensors: the route every
  eager call took before, and the one ``torch.compile`` still calls;
* ``F.linear`` (GPU only) -- cuBLAS on the dequantized float16 weight, the float model's call.

On CPU the Triton kernels are replaced by a no-op (the interpreter would time itself), so the
figures are the Python before the launch; on a GPU they are host time a call, launches included
(the loop ends with a synchronisation, and the kernel is shorter than its launch at this size).

    python benchmarks/call_overhead.py            # CPU: writes benchmarks/results/call_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
RESULTS = ROOT / "results" / "call_overhead.json"


class _NoLaunch:
    """Stands in for a Triton kernel on CPU: indexing by a grid gives a call that does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _w4_layer(n: int, k: int, device, gen):
    """A random W4G128 asymmetric QuantLinear on the Triton backend."""
    import torch

    from hf_signround.qlinear import QuantLinear

    g = k // 128
    return QuantLinear.from_codes(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
                                  torch.rand(n, g, generator=gen) * 0.01 + 1e-3,
                                  torch.randint(0, 16, (n, g), generator=gen), bits=4, group_size=128, sym=False,
                                  bias=None, backend="triton").to(device)


def _interleaved_us(ways: dict, device, calls: int, repeats: int) -> dict[str, float]:
    """Best over ``repeats`` rounds of each way's time a call (µs), the ways taking turns in each round."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    best = {name: float("inf") for name in ways}
    with torch.no_grad():
        for run in ways.values():  # warm-up: the kernel is chosen, its launch resolved and compiled
            for _ in range(10):
                run()
        for _ in range(repeats):
            for name, run in ways.items():
                sync()
                start = time.perf_counter()
                for _ in range(calls):
                    run()
                sync()
                best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
    return best


def measure(device, calls: int = 2000, repeats: int = 7, n: int = 4096, k: int = 4096) -> dict:
    import torch
    import torch.nn.functional as F

    from hf_signround.kernels import triton_launch

    if device.type == "cpu":
        triton_launch.gemv_kernel = triton_launch.gemm_kernel = _NoLaunch()
    layer = _w4_layer(n, k, device, torch.Generator().manual_seed(0))
    x = torch.randn(1, 1, k, dtype=torch.float16, device=device)
    op = torch.ops.hf_signround.quant_linear
    ways = {"eager": lambda: layer(x),
            "custom op": lambda: op(x, layer.qweight, layer.scales, layer.qzeros, None, 4, 128, k)}
    if device.type == "cuda":
        w = layer.dequantize_weight(torch.float16)
        ways["F.linear"] = lambda: F.linear(x, w)
    best = _interleaved_us(ways, device, calls, repeats)
    return {"device": str(device), "what": "host time a call" if device.type == "cuda" else
            "Python before the launch (kernels stubbed)", "us_per_call": {k: round(v, 2) for k, v in best.items()},
            "custom_op_over_eager": round(best["custom op"] / best["eager"], 3),
            **({"eager_over_f_linear": round(best["eager"] / best["F.linear"], 3)} if "F.linear" in best else {})}


def measure_layer(device, calls: int = 500, repeats: int = 7, hidden: int = 1024, inter: int = 2816,
                  kv: int = 256) -> dict:
    """Host time of one Llama layer's seven projections called as the model calls them, W4G128, one
    float16 token: q/k/v and gate/up fused (as a loaded model runs them) against run apart."""
    import torch
    from torch import nn

    from hf_signround.fusion import Siblings

    gen = torch.Generator().manual_seed(0)

    class Projections(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (_w4_layer(n, hidden, device, gen) for n in (hidden, kv, kv, hidden))
            self.gate, self.up = (_w4_layer(inter, hidden, device, gen) for _ in range(2))
            self.down = _w4_layer(hidden, inter, device, gen)

        def forward(self, x):
            q, k, v = self.q(x), self.k(x), self.v(x)
            h = self.o(q)
            return self.down(self.gate(h) * self.up(h)), k, v

    apart, fused = Projections(), Projections()
    Siblings.link([fused.q, fused.k, fused.v])
    Siblings.link([fused.gate, fused.up])
    x = torch.randn(1, 1, hidden, dtype=torch.float16, device=device)
    us = _interleaved_us({"apart": lambda: apart(x), "fused": lambda: fused(x)}, device, calls, repeats)
    return {"layer_us": {k: round(v, 2) for k, v in us.items()},
            "layer_fused_over_apart": round(us["fused"] / us["apart"], 3),
            "layer_shape": {"hidden": hidden, "intermediate": inter, "kv": kv}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-layer", action="store_true",
                        help="skip the layer figures (code from before fusion.py, for a before/after row)")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend must be choosable on CPU
    device = torch.device("cuda" if cuda else "cpu")
    result = measure(device, args.calls, args.repeats)
    if not args.no_layer:
        result.update(measure_layer(device, max(1, args.calls // 4), args.repeats))
    print(f"{'way':<10} {'us a call':>10}   ({result['what']}, {result['device']})")
    for name, us in result["us_per_call"].items():
        print(f"{name:<10} {us:>10.2f}")
    print(f"custom op / eager: {result['custom_op_over_eager']}x")
    if "layer_us" in result:
        print(f"a Llama layer's seven projections ({result['layer_shape']}): apart {result['layer_us']['apart']} us, "
              f"q/k/v and gate/up fused {result['layer_us']['fused']} us ({result['layer_fused_over_apart']}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
