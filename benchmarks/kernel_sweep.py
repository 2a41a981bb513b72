"""Config sweep behind ``triton_kernels.CONFIGS`` (GPU): every candidate block shape, timed alone.

Compiles the grid in 14 worker processes (Triton's on-disk cache), then times each config
from a CUDA graph over weight copies that defeat L2, on the shapes where the lists matter.
The H200 run that chose the current lists is summarised in docs/BENCHMARKS.md and
``benchmarks/results/kernels.json`` (``sweep_top5``); it also compared two since-removed
variants (a per-field GEMV walk, one weight-word load per k in the GEMM kernels).

    PYTHONPATH=src python benchmarks/kernel_sweep.py --out sweep.json
"""

from __future__ import annotations

import argparse
import collections
import copy
import itertools
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

ROWS = {"gemv": 1, "decode": 16, "prefill": 2048}
SHAPES = {"gemv": [(4096, 14336), (28672, 8192), (14336, 4096)], "decode": [(4096, 14336), (28672, 8192)],
          "prefill": [(4096, 14336)]}


def _cfg(num_warps: int, num_stages: int, **meta: int) -> dict:
    return {**meta, "num_warps": num_warps, "num_stages": num_stages}


def grid() -> list[tuple[str, int, dict]]:
    jobs = []
    for bits in (4, 2):
        for bn, bk, w, st in itertools.product((32, 64, 128), (64, 128), (1, 2, 4), (3, 5)):
            jobs.append(("gemv", bits, _cfg(w, st, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=0)))
    for bn, bk, w, st in itertools.product((32, 64, 128), (64, 128), (2, 4, 8), (2, 4)):
        jobs.append(("decode", 4, _cfg(w, st, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=0, GROUP_M=1)))
    for bm, bn, bk, w, st in ((256, 128, 64, 8, 3), (256, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 64, 64, 8, 3),
                              (128, 128, 64, 4, 3), (256, 128, 32, 8, 4), (128, 256, 32, 8, 4), (128, 128, 128, 8, 3),
                              (256, 128, 64, 4, 3), (64, 256, 64, 4, 3)):
        jobs.append(("prefill", 4, _cfg(w, st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, GROUP_M=8)))
    return jobs


def _compile(job) -> str:
    import torch
    from kernel_bench import make_layer

    from hf_signround.kernels import triton_launch

    kind, bits, cfg = job
    layer = make_layer(4096, 1024, bits, seed=0)
    x = torch.randn(min(ROWS[kind], 256), 1024, device="cuda", dtype=torch.float16)
    try:
        triton_launch.quant_linear(x, layer.qweight, layer.scales, layer.qzeros, None, bits, 128, 1024, kernel=kind,
                                   config=cfg)
        torch.cuda.synchronize()
        return "ok"
    except Exception as err:  # noqa: BLE001 -- a config that does not fit is a result, not a failure
        return f"{type(err).__name__}: {str(err)[:200]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("sweep.json"))
    args = p.parse_args(argv)
    jobs = grid()
    start = time.time()
    with mp.get_context("spawn").Pool(14) as pool:
        status = pool.map(_compile, jobs, chunksize=2)
    print(f"compiled {len(jobs)} configs in {time.time() - start:.0f} s; {sum(s != 'ok' for s in status)} failed")

    import torch
    from kernel_bench import graph_time_ms, make_layer

    from hf_signround.kernels import triton_launch

    layers, results = {}, []
    for (kind, bits, cfg), ok in zip(jobs, status):
        if ok != "ok":
            results.append({"kind": kind, "bits": bits, "cfg": cfg, "error": ok})
            continue
        for n, k in SHAPES[kind]:
            if (n, k, bits) not in layers:
                base = make_layer(n, k, bits, seed=1)
                copies = max(1, min(8, 512 * 2**20 // base.packed_nbytes()))
                layers[n, k, bits] = [base] + [copy.deepcopy(base) for _ in range(copies - 1)]
            x = torch.randn(ROWS[kind], k, device="cuda", dtype=torch.float16)
            calls = [(lambda lay=lay, x=x, k=k, cfg=cfg, kind=kind, bits=bits: triton_launch.quant_linear(
                x, lay.qweight, lay.scales, lay.qzeros, None, bits, 128, k, kernel=kind, config=cfg))
                for lay in layers[n, k, bits]]
            results.append({"kind": kind, "bits": bits, "N": n, "K": k, "cfg": cfg,
                            "us": round(graph_time_ms(calls, reps=15) * 1e3, 2)})
    args.out.write_text(json.dumps(results, indent=0))
    best = collections.defaultdict(list)
    for r in results:
        if "us" in r:
            best[r["kind"], r["bits"], r["N"], r["K"]].append((r["us"], r["cfg"]))
    for key, rows in sorted(best.items()):
        print(key, sorted(rows, key=lambda t: t[0])[:4])
    return 0


if __name__ == "__main__":
    sys.exit(main())
