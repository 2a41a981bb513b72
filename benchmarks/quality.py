"""Quality and cost of SignRoundV2 on SmolLM2-135M-Instruct, side by side with the reference.

Protocol: calibration 32 x 256 tokens drawn with a fixed seed from Python's
`library/` docs; perplexity over 40 non-overlapping 512-token windows of the held-out
`tutorial/` + `howto/` + `faq/` docs; iters 50, batch 8. Every row quantizes a fresh copy
of the float model with the same calibration windows, and the tuning wall time is
measured in this run, so ratios between rows are meaningful on a noisy shared machine.

    python benchmarks/quality.py                      # every row (takes hours on 2 cores)
    python benchmarks/quality.py --rows fp ours-W4G128-sym ar-W4G128-sym
    python benchmarks/quality.py --list

Rows: `fp`; `rtn-<scheme>` (round-to-nearest); `ours-<scheme>` (tuned); ablations
`ours-<scheme>-noscale` (no pre-tuning scale search), `ours-<scheme>-notopk` (no top-k
exclusion) and `ours-<scheme>-droptopk` (the spec's top-k exclusion, which drops the largest
errors, instead of our default that counts them linearly); `ar-<scheme>` and `arv2-<scheme>` (auto-round's SignRound and its
SignRoundV2 `enable_alg_ext`, when `auto-round` is installed); `arv2-A<avg>-<options>-<sym|asym>`
is auto-round's own mixed precision: its AutoScheme (DeltaLoss scoring on 16 x 256 windows and
allocation) over the same options, then SignRoundV2 tuning. Mixed rows record
`stored_bits_per_weight`: the bytes of every packed layer's qweight, qzeros and scales (ours
from the tensors save_pretrained writes, auto-round's read back from its saved checkpoint) over
the weights those layers hold. A scheme is
`W<bits>G<group>-<sym|asym>`. Mixed precision: `ours-A<avg>-<options>-<sym|asym>`
with options such as `W2G64+W4G128` allocates bits by DeltaLoss (16 x 256 scoring windows
from the calibration text) and dynamic programming under the `avg` budget, then tunes;
the `-proxy` ablation allocates by the weight-only proxy ||W - Q(W)||^2 instead, and
`-anchor` by DeltaLoss with one gradient taken at the dearest option (`deltaloss_anchored`), and
`-fisher` by second-order DeltaLoss (signed first-order plus empirical-Fisher term, float-model
gradient, W - Q(W) from the pre-tuning scale search; `deltaloss_fisher`). A trailing `-untied`
lets every Linear of a mixed row take its own option (`tie_fused=False`; by default q/k/v and
gate/up share one). A trailing `-i<iters>` sets the tuning steps of a tuned row (default 50;
`ours-<scheme>-i0` is the scale search alone, on the same calibration windows).
`--seeds` runs every row once per calibration seed (other windows of the same sizes; the
seed also seeds the tuning); rows of seeds other than 42 are stored as `row@s<seed>`, and
`--summary` prints each row's mean and standard deviation over its seeds. Results are merged
into the JSON file row by row, so an interrupted run keeps what it finished.
Every row also records the CPU it ran on: its model name, whether it has bfloat16
instructions, and a bfloat16 matrix product's speed against float32 there (our `amp` uses
bfloat16 only at >= 1.25x; auto-round casts to bfloat16 wherever the instructions exist).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_signround import SignRoundV2Config, quantize_model
from hf_signround.assets import calibration_texts, heldout_texts, smollm2_path
from hf_signround.calibration import build_calibration
from hf_signround.evaluation import heldout_windows, perplexity
from hf_signround.tuning import cpu_bf16_speedup, cpu_has_bf16_instructions

SCHEMES = ["W4G128-sym", "W3G128-sym", "W2G64-sym", "W4G128-asym", "W3G128-asym", "W2G64-asym"]
DEFAULT_ROWS = (
    ["fp"]
    + [f"rtn-{s}" for s in ("W4G128-sym", "W3G128-sym", "W2G64-sym")]
    + [f"ours-{s}" for s in SCHEMES]
    + ["ours-W4G128-sym-noscale", "ours-W2G64-sym-noscale", "ours-W2G64-sym-notopk", "ours-W2G64-sym-droptopk"]
    + [f"{peer}-{s}" for peer in ("ar", "arv2") for s in ("W4G128-sym", "W3G128-sym", "W2G64-sym")]
    + [f"ours-A{avg}-{opts}-sym{abl}" for avg in ("3.0", "2.5") for opts, abl in
       (("W2G64+W4G128", ""), ("W2G64+W4G128", "-anchor"), ("W2G64+W4G128", "-proxy"), ("W2G64+W4G128", "-fisher"),
        ("W2G64+W3G128+W4G128", ""), ("W2G64+W3G128+W4G128", "-fisher"))]
    # the three options within uniform W3G128's cost on SmolLM2 (3.1354 bits: 5 scales per 576-wide row, 12 per 1536)
    + ["ours-A3.135-W2G64+W3G128+W4G128-sym-fisher"]
)
ROW = re.compile(r"^(fp|rtn|ours|ar|arv2)(?:-A(\d+(?:\.\d+)?))?(?:-(W\dG-?\d+(?:\+W\dG-?\d+)*)-(sym|asym))?"
                 r"(?:-(noscale|notopk|droptopk|proxy|anchor|fisher))?(-untied)?(?:-i(\d+))?$")
OPTION = re.compile(r"W(\d)G(-?\d+)")
ITERS, NSAMPLES, SEQLEN, BATCH, SEED = 50, 32, 256, 8, 42
SCORING_NSAMPLES, SCORING_SEQLEN = 16, 256


def parse(row: str) -> dict:
    m = ROW.match(row)
    if not m or (m.group(1) != "fp" and m.group(3) is None):
        raise SystemExit(f"unknown row {row!r}; see --list")
    kind, avg, options, sym, ablation, untied, iters = m.groups()
    options = [(int(b), int(g)) for b, g in OPTION.findall(options)] if options else [(16, 0)]
    if (avg is None) != (len(options) == 1) or (avg is not None and kind not in ("ours", "arv2")):
        raise SystemExit(f"row {row!r}: one scheme without A<avg>, or ours-A<avg> / arv2-A<avg> with several options")
    if avg is not None and kind == "arv2" and (ablation or untied):
        raise SystemExit(f"row {row!r}: arv2-A<avg> rows take no ablation")
    if untied and avg is None:
        raise SystemExit(f"row {row!r}: -untied is for mixed rows (ours-A<avg>-...) only")
    if iters is not None and kind not in ("ours", "ar", "arv2"):
        raise SystemExit(f"row {row!r}: -i<iters> is for tuned rows (ours, ar, arv2)")
    return {"kind": kind, "bits": options[0][0], "group_size": options[0][1], "sym": sym == "sym",
            "ablation": ablation, "avg_bits": None if avg is None else float(avg), "options": options,
            "tie_fused": not untied, "iters": ITERS if iters is None else int(iters)}


def run_ours(model, spec: dict, calib: torch.Tensor, scoring: torch.Tensor, seed: int):
    cfg = SignRoundV2Config(
        bits=spec["bits"], group_size=spec["group_size"], sym=spec["sym"],
        iters=0 if spec["kind"] == "rtn" else spec["iters"], nsamples=NSAMPLES, seqlen=SEQLEN, batch_size=BATCH,
        seed=seed,
        scale_search=spec["ablation"] != "noscale", topk_exclusion=False if spec["ablation"] == "notopk" else None,
        topk_mode="drop" if spec["ablation"] == "droptopk" else "huber",
        avg_bits=spec["avg_bits"], bit_options=spec["options"] if spec["avg_bits"] else None,
        sensitivity_method={"proxy": "weight_error", "anchor": "deltaloss_anchored", "fisher": "deltaloss_fisher"}.get(spec["ablation"], "deltaloss"),
        sensitivity_nsamples=SCORING_NSAMPLES, sensitivity_seqlen=SCORING_SEQLEN, tie_fused=spec["tie_fused"],
    )
    start = time.perf_counter()
    # rtn rows see no data; ours-...-i0 is the scale search alone on the calibration windows
    result = quantize_model(model, cfg, calib if spec["kind"] == "ours" else None, skip=["lm_head"], scoring=scoring)
    return time.perf_counter() - start, result


def run_autoround(model, tok, spec: dict, calib: torch.Tensor, seed: int, workdir: Path):
    """auto-round's SignRound (``ar``) or SignRoundV2 (``arv2``) on the same windows; ``arv2-A<avg>``
    lets its AutoScheme (DeltaLoss scoring and allocation, 16 x 256 scoring windows like ours)
    choose among the options first. Returns the model, the seconds, and for AutoScheme the
    realised bits read back from its saved checkpoint."""
    from auto_round import AutoRound

    scheme: dict = {"bits": spec["bits"], "group_size": spec["group_size"], "sym": spec["sym"]}
    dataset: object = [row[None] for row in calib]
    if spec["avg_bits"] is not None:
        from auto_round import AutoScheme
        from auto_round.schemes import QuantizationScheme

        # AutoScheme reads a dataset by name or path only: our calibration windows as text,
        # which SmolLM2's tokenizer maps back to the same 256 tokens (checked here).
        texts = [tok.decode(row) for row in calib]
        if any(tok(t)["input_ids"][:SEQLEN] != row.tolist() for t, row in zip(texts, calib)):
            raise SystemExit("the calibration windows do not survive decode/encode: AutoScheme would read other tokens")
        path = workdir / "calibration.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        dataset = str(path)
        options = [QuantizationScheme(bits=b, group_size=g, sym=spec["sym"], data_type="int", act_bits=16)
                   for b, g in spec["options"]]
        scheme = {"scheme": AutoScheme(avg_bits=spec["avg_bits"], options=options, nsamples=SCORING_NSAMPLES,
                                       seqlen=SCORING_SEQLEN, batch_size=BATCH, low_cpu_mem_usage=False)}
    ar = AutoRound(model, tok, **scheme, iters=spec["iters"], nsamples=NSAMPLES, seqlen=SEQLEN, batch_size=BATCH,
                   seed=seed, dataset=dataset, enable_alg_ext=spec["kind"] == "arv2", device_map="cpu")
    start = time.perf_counter()
    qmodel, _ = ar.quantize()
    seconds = time.perf_counter() - start
    realized = None
    if spec["avg_bits"] is not None:
        shapes = model_shapes(qmodel)
        evaluated = copy.deepcopy(qmodel)  # saving packs qmodel's layers in place
        out = workdir / "autoscheme-checkpoint"
        ar.save_quantized(str(out), format="auto_round")
        realized = stored_bits_per_weight(out, shapes)
        qmodel = evaluated
    return qmodel.float(), seconds, realized


def model_shapes(model) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear inside the decoder blocks, by name."""
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if ".layers." in name and hasattr(m, "out_features") and hasattr(m, "in_features")}


def stored_bits_per_weight(folder: Path, shapes: dict[str, tuple[int, int]]) -> float:
    """Bits per quantized weight a saved checkpoint spends on its packed layers: the bytes of
    every layer's ``qweight``, ``qzeros`` and ``scales`` (from the safetensors headers) over the
    weights those layers hold."""
    from hf_signround.checkpoint import PACKED
    from hf_signround.shards import read_header

    stored: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        for key, info in read_header(file).tensors.items():
            layer, _, leaf = key.rpartition(".")
            if leaf in PACKED:
                stored[layer] = stored.get(layer, 0) + 8 * (info.end - info.start)
    weights = sum(shapes[name][0] * shapes[name][1] for name in stored)
    return round(sum(stored.values()) / weights, 6)


def packed_bits_per_weight(model) -> float:
    """The same count for our model: the bytes of the packed tensors save_pretrained writes
    (``QuantLinear.packed_nbytes``) over the weights of those layers."""
    from hf_signround import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return round(sum(8 * m.packed_nbytes() for m in layers) / sum(m.out_features * m.in_features for m in layers), 6)


def _histogram(result) -> dict[str, int]:
    """How many weights each option got."""
    out: dict[str, int] = {}
    for name, spec in result.allocation.specs.items():
        n, k = result.allocation.shapes[name]
        key = f"W{spec.bits}G{spec.group_size}"
        out[key] = out.get(key, 0) + n * k
    return out


def machine() -> dict[str, object]:
    """The CPU a run's rows come from, and how fast bfloat16 products are on it against float32
    (our `amp` autocasts only at >= 1.25x; auto-round goes by the instruction flags)."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    has_bf16 = cpu_has_bf16_instructions()
    return {"cpu": cpu, "cpu_bf16_instructions": has_bf16,
            "cpu_bf16_speedup": round(cpu_bf16_speedup(), 2) if has_bf16 else None}


def key_of(row: str, seed: int) -> str:
    """Results key: the row alone for the default seed (the older files), ``row@s<seed>`` otherwise."""
    return row if seed == SEED else f"{row}@s{seed}"


def summary(results: dict) -> dict[str, dict]:
    """Mean and sample standard deviation of perplexity and seconds per row over the seeds it ran with."""
    groups: dict[str, list[dict]] = {}
    for key, r in results.items():
        groups.setdefault(key.split("@", 1)[0], []).append(r)
    out = {}
    for row, rs in groups.items():
        ppl = torch.tensor([r["ppl"] for r in rs], dtype=torch.float64)
        secs = [r["quantize_seconds"] for r in rs if r.get("quantize_seconds") is not None]
        out[row] = {"seeds": len(rs), "ppl_mean": round(ppl.mean().item(), 3),
                    "ppl_sd": round(ppl.std().item(), 3) if len(rs) > 1 else None,
                    "seconds_mean": round(sum(secs) / len(secs), 1) if secs else None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[SEED],
                        help="calibration seeds: each picks other windows of the same sizes (and seeds the tuning)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--list", action="store_true", help="print the default rows and exit")
    parser.add_argument("--summary", action="store_true", help="print mean +- sd over seeds of --out's rows and exit")
    parser.add_argument("--resume", action="store_true", help="skip rows (and seeds) --out already holds")
    args = parser.parse_args()
    if args.list:
        print("\n".join(DEFAULT_ROWS))
        return
    if args.summary:
        for row, r in summary(json.loads(args.out.read_text())).items():
            sd = "" if r["ppl_sd"] is None else f" +- {r['ppl_sd']:.3f}"
            print(f"{row:<34} {r['seeds']} seeds  ppl {r['ppl_mean']:.3f}{sd}  seconds {r['seconds_mean']}")
        return
    specs = {row: parse(row) for row in args.rows}
    logging.basicConfig(level=logging.WARNING)

    model_dir = smollm2_path()
    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = heldout_windows(tok, heldout_texts(), n_windows=args.eval_windows, seqlen=512)

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    where = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        calib = build_calibration(calibration_texts(), tok, NSAMPLES, SEQLEN, seed)
        scoring = build_calibration(calibration_texts(), tok, SCORING_NSAMPLES, SCORING_SEQLEN, seed)
        for row, spec in specs.items():
            if spec["kind"] in ("ar", "arv2"):
                try:
                    import auto_round  # noqa: F401
                except ImportError:
                    print(f"{row}: skipped (pip install auto-round to run the reference)")
                    continue
            if spec["kind"] == "fp" and seed != args.seeds[0]:
                continue  # no calibration: one row is enough
            if args.resume and key_of(row, seed) in results:
                continue
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
            seconds, result, realized = None, None, None
            if spec["kind"] in ("rtn", "ours"):
                seconds, result = run_ours(model, spec, calib, scoring, seed)
            elif spec["kind"] in ("ar", "arv2"):
                with tempfile.TemporaryDirectory() as workdir:
                    model, seconds, realized = run_autoround(model, tok, spec, calib, seed, Path(workdir))
            ppl = perplexity(model, windows)
            key = key_of(row, seed)
            results[key] = {"ppl": round(ppl, 3), "quantize_seconds": None if seconds is None else round(seconds, 1),
                            "iters": spec["iters"] if spec["kind"] not in ("fp", "rtn") else 0, "seed": seed,
                            "nsamples": NSAMPLES, "seqlen": SEQLEN, "batch_size": BATCH,
                            "eval_windows": args.eval_windows, "torch_threads": torch.get_num_threads(), **where}
            if realized is not None:
                results[key]["stored_bits_per_weight"] = realized
            if result is not None and result.allocation is not None:
                results[key]["realized_avg_bits"] = result.realized_avg_bits
                results[key]["stored_bits_per_weight"] = packed_bits_per_weight(model)
                results[key]["bits_histogram"] = _histogram(result)
                result.allocation.to_json(args.out.parent / f"{args.out.stem}-allocation-{key}.json")
            args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            print(f"{key:<34} ppl {ppl:9.3f}   seconds {seconds if seconds is None else round(seconds, 1)}", flush=True)
            del model

    print(f"\n{'row':<34} {'ppl':>9} {'vs fp':>7} {'seconds':>8}")
    fp = results.get("fp", {}).get("ppl")
    for row, r in results.items():
        ratio = f"{r['ppl'] / fp:.3f}" if fp else "-"
        secs = "-" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.0f}"
        print(f"{row:<34} {r['ppl']:>9.3f} {ratio:>7} {secs:>8}")


if __name__ == "__main__":
    main()
