"""GPU benchmark of the fused Triton kernels against ``F.linear`` on the float16 weight (cuBLAS).

For every (N, K) shape, bit width and number of activation rows M it times our kernel and
cuBLAS on the same inputs, each replayed from a CUDA graph (no Python launch overhead in
either), over enough copies of the weights that they do not sit in L2 between calls. It
reports the time of each, their ratio, the bytes the quantized kernel must move over its
time (GB/s) and that as a fraction of the GPU's memory bandwidth (the datasheet figure and
a device-to-device copy measured in the same run). ``--e2e`` adds decode tokens/s of
``generate`` (static cache, auto-compiled with CUDA graphs) for a Llama-shaped random model
quantized to W4G128 against the same model in float16.

    python benchmarks/kernel_bench.py                       # everything, JSON to benchmarks/results/kernels.json
    python benchmarks/kernel_bench.py --bits 4 --rows 1 16 --shapes 4096x14336 --no-e2e
    python benchmarks/kernel_bench.py --e2e-only --out /tmp/e2e.json

Needs a CUDA GPU and Triton.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_signround import SignRoundV2Config, quantize_model
from hf_signround.kernels import triton_launch
from hf_signround.kernels.triton_kernels import CONFIGS
from hf_signround.qlinear import QuantLinear

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672)]
ROWS = [1, 16, 512, 2048]
BITS = [4, 2, 3, 8]
GROUP_SIZE = 128
# Datasheet HBM bandwidth per GPU (TB/s); the measured copy bandwidth is reported beside it.
DATASHEET_TBPS = {"H200": 4.8, "H100": 3.35, "A100": 2.0}
# Weights are cycled over copies until this many bytes, several times the L2 (60 MB on H200).
ROTATE_BYTES = 512 * 2**20


def log(msg: str) -> None:
    print(msg, flush=True)


def graph_time_ms(calls: list, reps: int = 30) -> float:
    """Median time of one call (ms), replaying all ``calls`` back to back from one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up (and tune) outside the capture
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def copy_bandwidth_tbps() -> float:
    """A 2 GiB copy by an elementwise kernel (SMs, not the copy engine), bytes read plus written per second."""
    src = torch.empty(2**30, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = graph_time_ms([lambda: torch.neg(src, out=dst)], reps=10)
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e12


def make_layer(n: int, k: int, bits: int, seed: int) -> QuantLinear:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    g = -(-k // GROUP_SIZE)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, device="cuda", dtype=torch.uint8)
    scales = torch.rand(n, g, generator=gen, device="cuda") * 0.01 + 1e-3
    zeros = torch.randint(0, 2**bits, (n, g), generator=gen, device="cuda")
    return QuantLinear.from_codes(codes, scales, zeros, bits=bits, group_size=GROUP_SIZE, sym=False, bias=None)


def copies_for(nbytes: int) -> int:
    return max(1, min(16, math.ceil(ROTATE_BYTES / nbytes)))


def check(layer: QuantLinear, x: torch.Tensor, y: torch.Tensor) -> float:
    """Normwise error against cuBLAS on the dequantized weight (a sanity check, not the test)."""
    ref = F.linear(x, layer.dequantize_weight(x.dtype))
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_kernels(args, bandwidth: dict) -> list[dict]:
    rows_out = []
    for n, k in args.shapes:
        weights16 = None
        for bits in args.bits:
            layer = make_layer(n, k, bits, seed=n + k + bits)
            qbytes = layer.packed_nbytes()
            layers = [layer] + [copy.deepcopy(layer) for _ in range(copies_for(qbytes) - 1)]
            if weights16 is None:
                w = layer.dequantize_weight(torch.float16)
                weights16 = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
            for m in args.rows:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                kind = triton_launch.kernel_for_rows(m)

                def ours(lay, x=x, bits=bits, k=k):
                    return lambda: triton_launch.quant_linear(x, lay.qweight, lay.scales, lay.qzeros, None, bits,
                                                              GROUP_SIZE, k)

                err = check(layer, x, ours(layer)())
                t_ours = graph_time_ms([ours(lay) for lay in layers])
                t_fp16 = graph_time_ms([(lambda w=w, x=x: F.linear(x, w)) for w in weights16])
                moved = qbytes + 2 * m * (k + n)
                key = next(key for key in triton_launch.TUNED if key[:6] == (kind, triton_launch._rows_bucket(kind, m),
                                                                               n, k, bits, GROUP_SIZE))
                row = {
                    "N": n, "K": k, "M": m, "bits": bits, "group_size": GROUP_SIZE, "sym": False, "kernel": kind,
                    "ours_us": round(t_ours * 1e3, 2), "fp16_us": round(t_fp16 * 1e3, 2),
                    "speedup": round(t_fp16 / t_ours, 3),
                    "ours_GBps": round(moved / (t_ours * 1e-3) / 1e9, 1),
                    "fp16_GBps": round((2 * n * k + 2 * m * (k + n)) / (t_fp16 * 1e-3) / 1e9, 1),
                    "ours_TFLOPs": round(2 * m * n * k / (t_ours * 1e-3) / 1e12, 1),
                    "fp16_TFLOPs": round(2 * m * n * k / (t_fp16 * 1e-3) / 1e12, 1),
                    "rel_err_vs_cublas": float(f"{err:.2e}"),
                    "config": triton_launch.TUNED[key],
                    "candidates_ms": [[c, round(ms, 5)] for c, ms in triton_launch.TIMINGS.get(key, [])],
                }
                row["ours_frac_datasheet_bw"] = round(row["ours_GBps"] / 1e3 / bandwidth["datasheet_TBps"], 3)
                row["ours_frac_copy_bw"] = round(row["ours_GBps"] / 1e3 / bandwidth["copy_TBps"], 3)
                rows_out.append(row)
                log(f"{n:>6}x{k:<6} M={m:<5} W{bits}  ours {row['ours_us']:>9.2f} us  fp16 {row['fp16_us']:>9.2f} us  "
                    f"x{row['speedup']:<6.2f} {row['ours_GBps']:>7.0f} GB/s ({row['ours_frac_datasheet_bw']:.0%})  "
                    f"err {err:.1e}  {kind} {row['config']}")
            del layers, layer
        del weights16
        torch.cuda.empty_cache()
    return rows_out


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                       tie_word_embeddings=False)


def decode_tokens_per_s(model, new_tokens: int, compile_: bool) -> dict:
    from transformers import CompileConfig, GenerationConfig

    ids = torch.randint(100, 30000, (1, 16), device="cuda")
    gen = GenerationConfig(do_sample=False, cache_implementation="static", disable_compile=not compile_,
                           compile_config=CompileConfig(fullgraph=True), pad_token_id=0, eos_token_id=None)

    def run(tokens: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, generation_config=gen, max_new_tokens=tokens, min_new_tokens=tokens)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    t0 = time.perf_counter()
    run(new_tokens)  # compiles (first time) and warms up
    run(new_tokens)
    warm = time.perf_counter() - t0
    full = min(run(new_tokens) for _ in range(3))
    prefill = min(run(1) for _ in range(3))
    return {"tokens_per_s": round((new_tokens - 1) / (full - prefill), 1), "new_tokens": new_tokens,
            "generate_s": round(full, 4), "prefill_only_s": round(prefill, 4), "warmup_s": round(warm, 1)}


def bench_e2e(args) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(args.e2e_layers)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    params = sum(p.numel() for p in model.parameters())
    out = {"model": f"Llama-shaped random, hidden 4096, MLP 14336, {args.e2e_layers} layers, GQA 32/8, vocab 32000",
           "params": params, "batch": 1, "prompt_tokens": 16}
    log(f"e2e: {params / 1e9:.2f} B parameters")
    qmodel = copy.deepcopy(model)
    t0 = time.perf_counter()
    quantize_model(qmodel, SignRoundV2Config(bits=4, group_size=128, sym=False, iters=0))
    out["quantize_s"] = round(time.perf_counter() - t0, 1)
    out["fp16_weights_GB"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 3)
    out["w4_weights_GB"] = round(sum(t.numel() * t.element_size() for t in list(qmodel.parameters())) / 1e9, 3)
    for name, m in (("fp16", model), ("w4g128", qmodel)):
        for mode in ("compiled", "eager"):
            try:
                with torch.no_grad():
                    out[f"{name}_{mode}"] = decode_tokens_per_s(m, args.e2e_tokens, compile_=mode == "compiled")
            except Exception as err:  # noqa: BLE001 -- record it and go on; the kernel table is written
                out[f"{name}_{mode}"] = {"error": f"{type(err).__name__}: {err}"[:500]}
            log(f"e2e {name} {mode}: {out[f'{name}_{mode}']}")
    for mode in ("compiled", "eager"):
        a, b = out.get(f"w4g128_{mode}", {}), out.get(f"fp16_{mode}", {})
        if "tokens_per_s" in a and "tokens_per_s" in b:
            out[f"speedup_{mode}"] = round(a["tokens_per_s"] / b["tokens_per_s"], 3)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| N x K | M | bits | kernel | ours µs | fp16 µs | speedup | ours GB/s | % of datasheet BW |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['bits']} | {r['kernel']} | {r['ours_us']:.1f} | "
                     f"{r['fp16_us']:.1f} | {r['speedup']:.2f}x | {r['ours_GBps']:.0f} | "
                     f"{100 * r['ours_frac_datasheet_bw']:.0f}% |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in SHAPES], help="NxK shapes")
    p.add_argument("--rows", nargs="+", type=int, default=ROWS)
    p.add_argument("--bits", nargs="+", type=int, default=BITS)
    p.add_argument("--no-e2e", dest="e2e", action="store_false")
    p.add_argument("--e2e-only", action="store_true")
    p.add_argument("--e2e-layers", type=int, default=8)
    p.add_argument("--e2e-tokens", type=int, default=128)
    p.add_argument("--extra-configs", type=Path, help="JSON {kind: [config, ...]} appended to the candidates")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    args = p.parse_args(argv)
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        log("benchmarks/kernel_bench.py needs a CUDA GPU")
        return 1
    if args.extra_configs:
        for kind, extra in json.loads(args.extra_configs.read_text()).items():
            CONFIGS[kind].extend(extra)
    name = torch.cuda.get_device_name()
    datasheet = next((v for key, v in DATASHEET_TBPS.items() if key in name), float("nan"))
    bandwidth = {"datasheet_TBps": datasheet, "copy_TBps": round(copy_bandwidth_tbps(), 3)}
    result = {"gpu": name, "torch": torch.__version__, "triton": __import__("triton").__version__,
              "bandwidth": bandwidth, "group_size": GROUP_SIZE, "sym": False, "timing": (
                  "median over 30 CUDA-graph replays; weights cycled over copies >= 512 MiB per graph")}
    log(f"{name}: copy bandwidth {bandwidth['copy_TBps']} TB/s (datasheet {datasheet} TB/s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.e2e_only:
        result["kernels"] = bench_kernels(args, bandwidth)
        args.out.write_text(json.dumps(result, indent=1))
    if args.e2e or args.e2e_only:
        result["e2e"] = bench_e2e(args)
        args.out.write_text(json.dumps(result, indent=1))
    if "kernels" in result:
        log(table(result["kernels"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
