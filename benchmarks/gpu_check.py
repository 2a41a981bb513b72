"""Every GPU check in one call (at most about 8 minutes on an H200), for a session lent a GPU.

Stages, in order of what the results file needs most; each stage has a time budget, records
what it finished, and the file is rewritten after every stage, so a run cut short keeps its figures:

1. ``kernels`` -- W4G128 against cuBLAS float16 on Llama-3-8B's layer shapes (q/o 4096x4096,
   k/v 1024x4096, gate/up 14336x4096, down 4096x14336) at M = 1, 16 and 2048 rows, each timed
   from CUDA-graph replays over weight copies larger than L2 (``benchmarks/kernel_bench.py``);
   and the fused prefill kernel against dequantize-then-cuBLAS at M = 32..512, which sets
   ``triton_launch.DEQUANT_MIN_ROWS``;
2. ``e2e`` -- greedy decode tokens/s of a random Llama-3-8B-shaped model (8 layers), W4G128
   against float16, ``generate`` compiled (static cache, CUDA graphs) and eager, with q/k/v and
   gate/up fused as a loaded model runs them, and eager with them apart (what fusion buys); and
   the host time of one layer call and of one layer's seven projections
   (``benchmarks/call_overhead.py``);
3. ``tuning`` -- quantizing a 2-block Llama-3-8B-shaped model with tuning (W4G128 sym, 50
   steps, 32 x 512 tokens, batch 8), ours against auto-round's at the same settings (needs
   ``auto-round``; carry its wheel);
4. ``tests`` -- the GPU tests (``tests/test_triton_kernels.py``, ``tests/test_backend.py``,
   ``tests/test_cpu_kernels.py``, ``tests/test_fusion.py``) under pytest-xdist.

Writes ``benchmarks/results/gpu.json``: a flat object with ``device``, ``m1_w4_speedup`` (the
minimum over the shapes), ``m16_w4_speedup``, ``prefill2048_w4_ratio``, ``e2e_decode_w4_speedup``
(compiled), ``eager_decode_w4_speedup``, ``eager_decode_w4_unfused_speedup``,
``tune_speed_vs_autoround`` (auto-round's time over ours), ``dequant_min_rows`` and ``tests``,
plus a ``details`` object.

    python benchmarks/gpu_check.py                 # on the GPU machine
    python benchmarks/gpu_check.py --smoke         # every stage at toy sizes on CPU (Triton's interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
RESULTS = ROOT / "results" / "gpu.json"
SHAPES_8B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
CROSSOVER_ROWS = [32, 64, 128, 256, 512]


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ratio(num: float, den: float) -> float:
    """``num / den`` to four significant figures: a ratio far below 1 (the CPU interpreter) must not round to 0."""
    return float(f"{num / den:.4g}")


def time_ms(calls: list, device) -> float:
    """One call's time: CUDA-graph replays on a GPU (benchmarks/kernel_bench.py), a plain timer elsewhere."""
    if device.type == "cuda":
        from benchmarks.kernel_bench import graph_time_ms

        return graph_time_ms(calls)
    for c in calls:
        c()
    start = time.perf_counter()
    for c in calls:
        c()
    return (time.perf_counter() - start) * 1e3 / len(calls)


def random_layer(n: int, k: int, bits: int, device, seed: int):
    import torch

    from hf_signround.qlinear import QuantLinear

    gen = torch.Generator(device=device).manual_seed(seed)
    g = -(-k // 128)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, device=device, dtype=torch.uint8)
    scales = torch.rand(n, g, generator=gen, device=device) * 0.01 + 1e-3
    zeros = torch.randint(0, 2**bits, (n, g), generator=gen, device=device)
    return QuantLinear.from_codes(codes, scales, zeros, bits=4, group_size=128, sym=False, bias=None)


def stage_kernels(args, device) -> dict:
    """Speedups against cuBLAS float16 per shape and M, and the dequantize-then-cuBLAS crossover."""
    import torch
    import torch.nn.functional as F

    from benchmarks.kernel_bench import copies_for
    from hf_signround.kernels.triton_launch import quant_linear

    out: dict = {"rows": []}
    for n, k in args.shapes:
        layer = random_layer(n, k, 4, device, seed=n + k)
        layers = [layer] + [random_layer(n, k, 4, device, seed=n + k + i) for i in range(1, copies_for(
            layer.packed_nbytes()) if device.type == "cuda" else 1)]
        w16 = [lay.dequantize_weight(torch.float16) for lay in layers[: copies_for(2 * n * k)]]

        def ours(lay, x, kernel=None):
            return lambda: quant_linear(x, lay.qweight, lay.scales, lay.qzeros, None, 4, 128, k, kernel=kernel)

        for m in args.rows + [r for r in args.crossover if r not in args.rows]:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            row = {"N": n, "K": k, "M": m}
            if m in args.rows:
                t_ours = time_ms([ours(lay, x) for lay in layers], device)
                t_fp16 = time_ms([(lambda w=w: F.linear(x, w)) for w in w16], device)
                row.update(ours_us=round(t_ours * 1e3, 2), fp16_us=round(t_fp16 * 1e3, 2),
                           speedup=ratio(t_fp16, t_ours))
            if m in args.crossover:
                t_fused = time_ms([ours(lay, x, "prefill") for lay in layers], device)
                t_deq = time_ms([ours(lay, x, "dequant") for lay in layers], device)
                row.update(fused_prefill_us=round(t_fused * 1e3, 2), dequant_cublas_us=round(t_deq * 1e3, 2))
            out["rows"].append(row)
            log(f"kernels {row}")
        del layers, w16
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = out["rows"]

    def worst(m: int) -> float | None:
        speedups = [r["speedup"] for r in rows if r["M"] == m and "speedup" in r]
        return min(speedups) if speedups else None

    out["m1_w4_speedup"], out["m16_w4_speedup"] = worst(1), worst(16)
    out["prefill2048_w4_ratio"] = worst(max(args.rows))
    wins = [m for m in args.crossover
            if all(r["dequant_cublas_us"] <= r["fused_prefill_us"] for r in rows if r["M"] == m and "dequant_cublas_us" in r)]
    # The smallest M from which dequantize-then-cuBLAS wins at every larger M too.
    out["dequant_min_rows"] = next((m for m in args.crossover if all(w in wins for w in args.crossover if w >= m)), None)
    return out


def stage_e2e(args, device) -> dict:
    """Decode tokens/s, W4G128 against float16, generate() compiled and eager."""
    import copy

    import torch

    from hf_signround import SignRoundV2Config, quantize_model
    from hf_signround.fusion import fuse_siblings

    model = random_llama(args.e2e_shape, args.e2e_layers, torch.float16, device)
    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, SignRoundV2Config(bits=4, group_size=128, iters=0, device=str(device)))
    fuse_siblings(qmodel)  # as from_pretrained leaves a loaded model: q/k/v and gate/up one product each
    out: dict = {"layers": args.e2e_layers, "shape": args.e2e_shape}
    if device.type == "cuda":  # host time a call and a layer (on CPU it stubs the kernels: call_overhead.py)
        from benchmarks.call_overhead import measure, measure_layer

        out["call_overhead"] = {**measure(device), **measure_layer(device)}
        log(f"call overhead: {out['call_overhead']}")
    modes = ("compiled", "eager") if device.type == "cuda" else ("eager",)
    runs = [("fp16", model, modes), ("w4g128", qmodel, modes), ("w4g128_unfused", qmodel, ("eager",))]
    for name, m, these in runs:
        if name == "w4g128_unfused":
            fuse_siblings(qmodel, enable=False)
        for mode in these:
            try:
                out[f"{name}_{mode}"] = decode_tokens_per_s(m, args.e2e_tokens, mode == "compiled", device)
            except Exception as err:  # noqa: BLE001 - recorded; the other figures still count
                out[f"{name}_{mode}"] = {"error": f"{type(err).__name__}: {err}"[:400]}
            log(f"e2e {name} {mode}: {out[f'{name}_{mode}']}")
    for name, mode, key in (("w4g128", "compiled", "e2e_decode_w4_speedup"),
                            ("w4g128", "eager", "eager_decode_w4_speedup"),
                            ("w4g128_unfused", "eager", "eager_decode_w4_unfused_speedup")):
        a, b = out.get(f"{name}_{mode}", {}), out.get(f"fp16_{mode}", {})
        out[key] = ratio(a["tokens_per_s"], b["tokens_per_s"]) if "tokens_per_s" in a and "tokens_per_s" in b \
            else None
    return out


def random_llama(shape, layers: int, dtype, device):
    """A random Llama of ``shape`` (hidden, intermediate, heads, kv heads, vocab) on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv, vocab = shape
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def decode_tokens_per_s(model, new_tokens: int, compiled: bool, device) -> dict:
    import torch
    from transformers import CompileConfig, GenerationConfig

    ids = torch.randint(100, model.config.vocab_size - 1, (1, 16), device=device)
    gen = GenerationConfig(do_sample=False, cache_implementation="static", disable_compile=not compiled,
                           compile_config=CompileConfig(fullgraph=True), pad_token_id=0, eos_token_id=None)

    def run(tokens: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, generation_config=gen, max_new_tokens=tokens, min_new_tokens=tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(new_tokens)  # compiles (first time), tunes the kernels, warms up
    full = min(run(new_tokens) for _ in range(3))
    first = min(run(1) for _ in range(3))
    return {"tokens_per_s": float(f"{(new_tokens - 1) / max(full - first, 1e-9):.4g}"), "generate_s": round(full, 4)}


def stage_tuning(args, device) -> dict:
    """Seconds to quantize with tuning, ours against auto-round's, same model, settings and windows."""
    import copy

    import torch

    from hf_signround import SignRoundV2Config, quantize_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_llama(args.e2e_shape, args.tune_layers, dtype, device)
    n, seqlen, iters = args.tune_windows
    vocab = args.e2e_shape[4]
    windows = torch.randint(100, vocab - 1, (n, seqlen), generator=torch.Generator().manual_seed(0))
    out: dict = {"blocks": args.tune_layers, "iters": iters, "nsamples": n, "seqlen": seqlen, "batch_size": 8,
                 "scheme": "W4G128 sym"}
    ours = copy.deepcopy(model)
    cfg = SignRoundV2Config(bits=4, group_size=128, sym=True, iters=iters, nsamples=n, seqlen=seqlen, batch_size=8,
                            device=str(device))
    sync(device)
    start = time.perf_counter()
    quantize_model(ours, cfg, windows)
    sync(device)
    out["ours_s"] = round(time.perf_counter() - start, 2)
    del ours
    log(f"tuning: ours {out['ours_s']} s")
    try:
        from auto_round import AutoRound

        from tests.tiny import make_tokenizer
    except ImportError as err:
        out["auto_round"] = f"not installed: {err}"
        out["tune_speed_vs_autoround"] = None
        return out
    theirs = copy.deepcopy(model)
    ar = AutoRound(theirs, make_tokenizer(), bits=4, group_size=128, sym=True, iters=iters, nsamples=n,
                   seqlen=seqlen, batch_size=8, seed=42, dataset=[row[None] for row in windows],
                   device_map=str(device))
    sync(device)
    start = time.perf_counter()
    ar.quantize()
    sync(device)
    out["auto_round_s"] = round(time.perf_counter() - start, 2)
    out["tune_speed_vs_autoround"] = ratio(out["auto_round_s"], out["ours_s"])
    log(f"tuning: auto-round {out['auto_round_s']} s")
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def stage_tests(args, device) -> dict:
    cmd = [sys.executable, "-m", "pytest", "tests/test_triton_kernels.py", "tests/test_backend.py",
           "tests/test_cpu_kernels.py", "tests/test_fusion.py", "-q", "-p", "no:cacheprovider", "-x"]
    if args.test_workers > 1:
        cmd += ["-n", str(args.test_workers)]
    if args.smoke:
        cmd += ["-k", "odd_shapes or dequantize_writes"]
    done = subprocess.run(cmd, cwd=ROOT.parent, capture_output=True, text=True, timeout=args.tests_timeout,
                          check=False)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    log(f"tests: {tail}")
    return {"returncode": done.returncode, "summary": tail, "tests": tail}


STAGES = {"kernels": stage_kernels, "e2e": stage_e2e, "tuning": stage_tuning, "tests": stage_tests}
KEYS = {"kernels": ("m1_w4_speedup", "m16_w4_speedup", "prefill2048_w4_ratio", "dequant_min_rows"),
        "e2e": ("e2e_decode_w4_speedup", "eager_decode_w4_speedup", "eager_decode_w4_unfused_speedup"), "tuning": ("tune_speed_vs_autoround",),
        "tests": ("tests",)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU, Triton's interpreter; writes --out only")
    p.add_argument("--out", type=Path, default=None, help=f"results file (default {RESULTS}; smoke: a temp file)")
    p.add_argument("--test-workers", type=int, default=8)
    p.add_argument("--tests-timeout", type=int, default=240)
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.rows, args.crossover = [(96, 64)], [1, 16, 40], [24, 40]
        args.e2e_shape, args.e2e_layers, args.e2e_tokens = (64, 128, 4, 2, 128), 2, 4
        args.tune_layers, args.tune_windows = 1, (4, 16, 2)
        args.test_workers = 1
        args.out = args.out or Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check_smoke.json"
    else:
        args.shapes, args.rows, args.crossover = SHAPES_8B, [1, 16, 2048], CROSSOVER_ROWS
        args.e2e_shape, args.e2e_layers, args.e2e_tokens = (4096, 14336, 32, 8, 128256), 8, 64
        args.tune_layers, args.tune_windows = 2, (32, 512, 50)
        args.out = args.out or RESULTS
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    if not args.smoke and not torch.cuda.is_available():
        log("no CUDA GPU: run with --smoke to check the script on CPU")
        return 1
    device = torch.device("cuda" if not args.smoke else "cpu")
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
                    "torch": torch.__version__, **{key: None for keys in KEYS.values() for key in keys},
                    "details": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.stages:
        start = time.perf_counter()
        log(f"stage {name}")
        try:
            details = STAGES[name](args, device)
        except Exception as err:  # noqa: BLE001 - the file keeps the other stages' figures
            details = {"error": f"{type(err).__name__}: {err}"[:1000]}
            log(f"stage {name} failed: {details['error']}")
        details["seconds"] = round(time.perf_counter() - start, 1)
        result["details"][name] = details
        result.update({key: details.get(key) for key in KEYS[name]})
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    log(json.dumps({k: v for k, v in result.items() if k != "details"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
