"""Which CPU kernel should run a quantized layer: every candidate the fast-inference issue names, in one run.

One layer call (``y = x @ W.T``), interleaved, best of ``--repeats`` rounds, at the shapes of a
1B Llama (TinyLlama-1.1B: attention 2048 x 2048, MLP 5632 x 2048 and 2048 x 5632) and of a 7-8B
one (4096 x 4096), for one token (decode) and 512 (prefill). Speed is the dense product's time
divided by the candidate's, with the dense product on the float weight in the same activation
dtype as the baseline. Every candidate is built from the same weight: random codes at the row's
bit width with group 128 (asymmetric), dequantized; candidates that quantize for themselves
(torchao, ``_weight_int8pack_mm``) quantize that dequantized weight.

float32 activations
  ``ours ark``          ``QuantLinear(backend="ark")``: auto-round-lib's kernel, what ``auto`` picks
  ``ours torch``        the reference: the whole weight dequantized each call, then ``F.linear``
  ``ours aten_int4``    torch's int4 kernel (``_weight_int4pack_mm_for_cpu``), 2-4 bits
  ``aten int8pack``     ``aten._weight_int8pack_mm`` (int8, one scale per output channel only)
  ``torchao int8wo``    torchao's ``Int8WeightOnlyConfig`` (per channel), eager and compiled
  ``torchao intx4``     torchao's ``IntxWeightOnlyConfig(int4, PerGroup(128))``, eager and compiled
  ``inductor w4``       ``torch.compile`` of the dequantize-then-``F.linear`` expression on int8 codes
  ``inductor w4 frozen``  the same with ``freezing=True`` and ``max-autotune`` (inductor's
                        weight-only path); freezing folds the dequantized weight into a constant
  ``inductor w8 frozen``  the weight-only int8 pattern ``F.linear(x, w8.to(x.dtype)) * scale``,
                        frozen, max-autotune
bfloat16 activations: ``ours aten_int4``, ``ours ark``, ``aten int8pack``, ``torchao int8wo`` (eager
and compiled) and ``inductor w4 frozen``, against the dense bfloat16 product.

``--memory`` also measures, in a fresh process per candidate, what a candidate holds once built
(RSS after one call minus RSS before building it, 5632 x 2048, one token, after a 256 x 256
layer of the same kind has loaded what the kind needs): the float32 weight is
46.1 MB, its 4-bit codes 5.8 MB. This column shows which "weight-only" paths keep a dense weight.

    pip install torchao==0.18.0     # optional: its rows are skipped without it
    python benchmarks/cpu_kernels.py --memory      # writes benchmarks/results/cpu_kernels.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
from benchmarks.cpu_inference import machine, rss_mb  # noqa: E402

from hf_signround.memory import return_freed_memory  # noqa: E402

RESULTS = ROOT / "results" / "cpu_kernels.json"
SHAPES = {"attn 2048x2048": (2048, 2048), "mlp up 5632x2048": (5632, 2048), "mlp down 2048x5632": (2048, 5632),
          "8B attn 4096x4096": (4096, 4096)}
MEMORY_SHAPE = "mlp up 5632x2048"
GROUP = 128

log = logging.getLogger("cpu_kernels")


def _torchao():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as tq  # noqa: F401  (its optional CUDA extensions log at import)
        return tq
    except ImportError:
        return None


def random_codes(n: int, k: int, bits: int, seed: int = 0):
    """Codes, scales and zero points of a random asymmetric G128 layer, and its dequantized float32 weight."""
    gen = torch.Generator().manual_seed(seed)
    g = k // GROUP
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, g, generator=gen) * 0.02 + 1e-3).half().float()  # as stored: float16
    zeros = torch.randint(0, 2**bits, (n, g), generator=gen)
    weight = ((codes.float().view(n, g, GROUP) - zeros[..., None]) * scales[..., None]).view(n, k)
    return codes, scales, zeros, weight


def _ours(codes, scales, zeros, bits, backend):
    from hf_signround.qlinear import QuantLinear

    layer = QuantLinear.from_codes(codes, scales, zeros, bits=bits, group_size=GROUP, sym=False, bias=None,
                                   backend=backend).eval()
    return layer


def _per_channel_int8(weight: torch.Tensor, dtype: torch.dtype):
    scale = weight.abs().amax(dim=1).clamp_min(1e-8) / 127
    w8 = torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return w8, scale.to(dtype)


class _DequantLinear(torch.nn.Module):
    """``F.linear`` on the weight dequantized from int8 codes: the expression inductor is given."""

    def __init__(self, codes, scales, zeros, dtype):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8) if codes.max() < 128 else codes)
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("zeros", zeros.to(dtype))

    def forward(self, x):
        n, k = self.codes.shape
        w = (self.codes.to(x.dtype).view(n, k // GROUP, GROUP) - self.zeros[..., None]) * self.scales[..., None]
        return F.linear(x, w.view(n, k))


class _WoqInt8(torch.nn.Module):
    """Inductor's weight-only int8 pattern: ``F.linear(x, w8.to(x.dtype)) * scale``."""

    def __init__(self, w8, scale):
        super().__init__()
        self.register_buffer("w8", w8)
        self.register_buffer("scale", scale)

    def forward(self, x):
        return F.linear(x, self.w8.to(x.dtype)) * self.scale


def _compiled(module, x, *, frozen: bool):
    """``module`` compiled for ``x``'s shape (compiled here, on the first call)."""
    torch._dynamo.reset()
    from torch._inductor import config

    patch = config.patch(freezing=True) if frozen else contextlib.nullcontext()
    fn = torch.compile(module, mode="max-autotune-no-cudagraphs" if frozen else None, dynamic=False)
    with patch, torch.no_grad():
        fn(x)
    return fn


def candidates(dtype: torch.dtype) -> dict[str, Callable]:
    """Name -> builder ``(n, k, x) -> (call, reference weight)``; ``dense`` first (the baseline)."""
    tq = _torchao()
    out: dict[str, Callable] = {}

    def dense(n, k, x):
        w = random_codes(n, k, 4)[3].to(dtype)
        return (lambda x: F.linear(x, w)), w

    out["dense"] = dense

    def ours(bits, backend):
        def build(n, k, x):
            codes, scales, zeros, w = random_codes(n, k, bits)
            layer = _ours(codes, scales, zeros, bits, backend)
            return layer, w
        return build

    if dtype == torch.float32:
        for bits in (2, 3, 4, 8):
            out[f"ours ark W{bits}"] = ours(bits, "ark")
        out["ours torch W4"] = ours(4, "torch")
        out["ours aten_int4 W4"] = ours(4, "aten_int4")
    else:
        out["ours aten_int4 W4"] = ours(4, "aten_int4")
        out["ours aten_int4 W2"] = ours(2, "aten_int4")
        out["ours ark W4"] = ours(4, "ark")

    def int8pack(n, k, x):
        w = random_codes(n, k, 8)[3]
        w8, scale = _per_channel_int8(w, dtype)
        return (lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, scale)), w

    out["aten int8pack W8/ch"] = int8pack

    if tq is not None:
        from torchao.quantization.granularity import PerGroup

        def torchao(config, bits, compiled):
            def build(n, k, x):
                w = random_codes(n, k, bits)[3]
                lin = torch.nn.Linear(k, n, bias=False, dtype=dtype)
                with torch.no_grad():
                    lin.weight.copy_(w)
                tq.quantize_(lin, config())
                return (_compiled(lin, x, frozen=False) if compiled else lin), w
            return build

        for compiled in (False, True):
            tag = " compiled" if compiled else ""
            out[f"torchao int8wo W8/ch{tag}"] = torchao(tq.Int8WeightOnlyConfig, 8, compiled)
            if dtype == torch.float32:
                out[f"torchao intx4 W4{tag}"] = torchao(
                    lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP)), 4, compiled)

    def inductor_w4(frozen):
        def build(n, k, x):
            codes, scales, zeros, w = random_codes(n, k, 4)
            return _compiled(_DequantLinear(codes, scales, zeros, dtype).eval(), x, frozen=frozen), w
        return build

    if dtype == torch.float32:
        out["inductor W4"] = inductor_w4(False)
    out["inductor W4 frozen"] = inductor_w4(True)

    if dtype == torch.float32:
        def inductor_w8(n, k, x):
            w = random_codes(n, k, 8)[3]
            w8, scale = _per_channel_int8(w, dtype)
            return _compiled(_WoqInt8(w8, scale).eval(), x, frozen=True), w
        out["inductor W8/ch frozen"] = inductor_w8
    return out


def _time(call, x, seconds: float = 0.25) -> tuple[int, float]:
    """(calls a round, seconds of one call measured once) so a round lasts about ``seconds``."""
    start = time.perf_counter()
    call(x)
    once = max(time.perf_counter() - start, 1e-6)
    return max(1, min(200, int(seconds / once))), once


def bench(dtype: torch.dtype, rows: list[int], shapes: list[str], repeats: int, only: list[str] | None) -> list[dict]:
    builders = candidates(dtype)
    if only:
        builders = {k: v for k, v in builders.items() if k == "dense" or any(o in k for o in only)}
    results = []
    for shape in shapes:
        n, k = SHAPES[shape]
        for m in rows:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
            calls, errors = {}, {}
            with torch.no_grad():
                for name, build in builders.items():
                    try:
                        call, w = build(n, k, x)
                        y = call(x).float()
                        ref = F.linear(x.float(), w.float())
                        errors[name] = ((y - ref).norm() / ref.norm()).item()
                        calls[name] = call
                    except Exception as exc:  # a candidate that cannot run this shape or dtype: say why
                        log.warning("%s %s M=%d %s: %s: %s", str(dtype)[6:], shape, m, name,
                                    type(exc).__name__, str(exc).splitlines()[0][:160])
                best = {name: float("inf") for name in calls}
                sizes = {name: _time(call, x)[0] for name, call in calls.items()}
                for _ in range(repeats):
                    for name, call in calls.items():
                        start = time.perf_counter()
                        for _ in range(sizes[name]):
                            call(x)
                        best[name] = min(best[name], (time.perf_counter() - start) / sizes[name])
            for name in calls:
                results.append({"dtype": str(dtype)[6:], "shape": shape, "rows": m, "name": name,
                                "us": round(best[name] * 1e6, 1),
                                "speedup": round(best["dense"] / best[name], 3),
                                "rel_err": float(f"{errors[name]:.3g}")})
            del calls
            gc.collect()
            torch._dynamo.reset()
    return results


# ------------------------------------------------------------------ memory: one process per candidate


def _trim() -> None:
    gc.collect()
    return_freed_memory()


def child_memory(dtype_name: str, name: str) -> None:
    dtype = getattr(torch, dtype_name)
    builders = candidates(dtype)
    n, k = SHAPES[MEMORY_SHAPE]
    x = torch.randn(1, k).to(dtype)
    # A small layer of the same kind first: the libraries, kernels and compiler it loads are not the layer's.
    with torch.no_grad():
        warm, _ = builders[name](256, 256, x[:, :256])
        warm(x[:, :256])
    _trim()
    floor = rss_mb("VmRSS")
    with torch.no_grad():
        call, w = builders[name](n, k, x)
        del w
        call(x)
        _trim()
        call(x)
    _trim()
    print(json.dumps({"held_mb": round(rss_mb("VmRSS") - floor, 1)}))


def measure_memory(dtype: torch.dtype, names: list[str]) -> dict[str, float]:
    held = {}
    for name in names:
        proc = subprocess.run([sys.executable, __file__, "--child", str(dtype)[6:], name],
                              capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode:
            log.warning("memory of %s failed: %s", name, proc.stderr.strip().splitlines()[-1:])
            continue
        held[name] = json.loads(proc.stdout.strip().splitlines()[-1])["held_mb"]
    return held


def print_table(rows: list[dict], memory: dict) -> None:
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sub = [r for r in rows if r["dtype"] == dtype]
        cols = list(dict.fromkeys((r["shape"], r["rows"]) for r in sub))
        names = list(dict.fromkeys(r["name"] for r in sub))
        print(f"\n{dtype} activations, speed x dense {dtype} (rel. error against the dense product)")
        header = f"{'candidate':<28}" + "".join(f"{s.split()[-1] + ' M=' + str(m):>22}" for s, m in cols)
        print(header + (f"{'held MB':>9}" if memory.get(dtype) else ""))
        for name in names:
            line = f"{name:<28}"
            for shape, m in cols:
                r = next((r for r in sub if r["name"] == name and r["shape"] == shape and r["rows"] == m), None)
                line += f"{r['speedup']:>12.2f} ({r['rel_err']:.1e})" if r else f"{'-':>22}"
            if memory.get(dtype):
                held = memory[dtype].get(name)
                line += f"{held:>9.1f}" if held is not None else f"{'-':>9}"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 512])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", help="candidates whose name contains one of these (dense always runs)")
    parser.add_argument("--memory", action="store_true", help=f"also the memory each holds ({MEMORY_SHAPE}, fresh processes)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for noisy in ("torch", "torchao"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.child:
        child_memory(*args.child)
        return
    if _torchao() is None:
        log.warning("torchao is not installed: its rows are skipped (pip install torchao==0.18.0)")
    rows, memory = [], {}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        rows += bench(dtype, args.rows, args.shapes, args.repeats, args.only)
        if args.memory:
            names = list(dict.fromkeys(r["name"] for r in rows if r["dtype"] == dtype_name))
            memory[dtype_name] = measure_memory(dtype, names)
        print_table([r for r in rows if r["dtype"] == dtype_name], memory)
    tq = _torchao()
    result = {"machine": {**machine(), "torchao": getattr(sys.modules.get("torchao"), "__version__", None) if tq else None},
              "memory_shape": MEMORY_SHAPE, "repeats": args.repeats, "rows": rows, "held_mb": memory}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
