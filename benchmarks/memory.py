"""Peak memory (RSS) of quantizing random Llama-shaped models of growing size, on CPU.

For each size a random bfloat16 checkpoint is written (built tensor by tensor, never whole
in memory), then quantized in fresh processes, each reporting its own peak RSS:

* ``from_pretrained``: ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=...)``
  then ``save_pretrained`` (the plug-in path: the whole float model is loaded first);
* ``streaming``: ``hf_signround.streaming.quantize_checkpoint`` (one block at a time, packed
  blocks written out as they finish);
* ``import``: a process that only imports torch, transformers and hf_signround (the floor).

    python benchmarks/memory.py                         # 0.1B 0.5B 1B, W4G128 round-to-nearest
    python benchmarks/memory.py --sizes 0.1B --iters 2  # with tuning: calibration activations count too
    python benchmarks/memory.py --sizes test-2 test-12 --dtype float32 --modes streaming \
        --max-shard-size 8MB --json                    # what tests/test_streaming.py runs

Results are merged into ``benchmarks/results/memory.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> (hidden, intermediate, layers, heads, kv_heads, vocab)
SHAPES = {
    "test-2": (512, 1536, 2, 8, 8, 4096),  # 13.6 MB fp32 blocks, for tests/test_streaming.py
    "test-12": (512, 1536, 12, 8, 8, 4096),
    "0.1B": (768, 2048, 12, 12, 4, 32000),
    "0.5B": (1536, 4096, 16, 12, 4, 32000),
    "1B": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B's shape
}
MODES = ("import", "from_pretrained", "streaming")
RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"


def llama_config(name: str, dtype: str):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv, vocab = SHAPES[name]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                       max_position_embeddings=2048, tie_word_embeddings=False, dtype=dtype)


def write_random_checkpoint(name: str, folder: Path, dtype: str = "bfloat16") -> int:
    """A random Llama checkpoint of shape ``name`` in ``folder``, one tensor in memory at a time; returns params."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from hf_signround.shards import ShardWriter

    config = llama_config(name, dtype)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    writer = ShardWriter(folder, "500MB")
    gen = torch.Generator().manual_seed(0)
    params = 0
    for key, p in meta.state_dict().items():
        t = torch.ones(p.shape) if key.endswith("norm.weight") else torch.randn(p.shape, generator=gen) * 0.02
        writer.add(key, t.to(getattr(torch, dtype)))
        params += p.numel()
    writer.close()
    config.save_pretrained(folder)
    return params


def child(mode: str, model: str, out: str, bits: int, group: int, iters: int, shard: str) -> None:
    """Runs in a fresh process: one quantization, then print its peak RSS and wall time as JSON."""
    start = time.perf_counter()
    import torch
    import transformers  # noqa: F401

    import hf_signround
    from hf_signround.streaming import quantize_checkpoint

    if mode != "import":
        kw = {"bits": bits, "group_size": group, "sym": True, "iters": iters}
        if iters:
            kw.update(nsamples=8, seqlen=256, batch_size=4, dataset=torch.randint(0, 4096, (8, 256)))
        config = hf_signround.SignRoundV2Config(**kw)
        if mode == "streaming":
            quantize_checkpoint(model, out, config, max_shard_size=shard)
        else:
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_pretrained(model, quantization_config=config).save_pretrained(
                out, max_shard_size=shard)
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "seconds": round(time.perf_counter() - start, 1)}))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that over from the
    parent across fork and exec, so a child would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS is measured on Linux only")


def measure(mode: str, model: Path, work: Path, bits: int, group: int, iters: int, shard: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(model), str(work / f"out-{mode}"),
           str(bits), str(group), str(iters), shard]
    env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{mode} on {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.1B", "0.5B", "1B"], choices=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=0, help="tuning steps (8 x 256 random-token windows)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the random checkpoint")
    parser.add_argument("--max-shard-size", default="200MB",
                        help="shard size of the quantized output")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--child", nargs=7, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, model, out, bits, group, iters, shard = args.child
        child(mode, model, out, int(bits), int(group), int(iters), shard)
        return

    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix=f"memory-{size}-") as tmp:
            work = Path(tmp)
            params = write_random_checkpoint(size, work / "float", args.dtype)
            row = {"size": size, "params_m": round(params / 1e6, 1), "checkpoint_mb": round(folder_mb(work / "float"), 1),
                   "dtype": args.dtype, "scheme": f"W{args.bits}G{args.group_size} sym iters={args.iters}",
                   "max_shard_size": args.max_shard_size}
            for mode in args.modes:
                result = measure(mode, work / "float", work, args.bits, args.group_size, args.iters,
                                 args.max_shard_size)
                row[f"{mode}_peak_mb"], row[f"{mode}_s"] = result["peak_rss_mb"], result["seconds"]
            if "streaming" in args.modes:
                row["quantized_mb"] = round(folder_mb(work / "out-streaming"), 1)
            rows.append(row)
            print(json.dumps(row) if args.json else row, flush=True)
    if not args.json:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        saved = json.loads(args.out.read_text()) if args.out.is_file() else {}
        saved.update({f"{r['size']} {r['scheme']}": r for r in rows})
        args.out.write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    main()
