"""Time to quality: perplexity against tuning time, ours over 0-200 steps and auto-round V2 at 50 and 200.

Reads rows written by `quality.py` (one calibration seed, the same windows for every row):

    python benchmarks/quality.py --out benchmarks/results/quality-time.json --rows \\
        ours-W4G128-sym-i0 ours-W4G128-sym-i10 ours-W4G128-sym-i25 ours-W4G128-sym ours-W4G128-sym-i100 \\
        arv2-W4G128-sym arv2-W4G128-sym-i200        # and the same for W2G64-sym
    python benchmarks/time_to_quality.py           # table, JSON and docs/time_to_quality.png

A row without `-i<iters>` ran 50 steps; `ours-<scheme>-i0` is the scale search alone. Seconds are
each row's whole quantization (calibration capture, scale search, tuning, packing), measured on
one thread with one other one-thread job beside it. For every scheme it reports the fewest steps
at which ours reaches V2's 200-step perplexity, with the time ratio against that V2 run, and
ours at 25 steps against V2 at 50.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROW = re.compile(r"^(ours|arv2)-(W\dG\d+-(?:sym|asym))(?:-i(\d+))?$")


def curves(results: dict) -> dict[str, dict[str, list[tuple[int, float, float]]]]:
    """scheme -> method -> [(iters, ppl, seconds)] sorted by iters, from the seed-42 rows."""
    out: dict[str, dict[str, list]] = {}
    for key, r in results.items():
        m = ROW.match(key)
        if not m or r.get("quantize_seconds") is None:
            continue
        method, scheme, iters = m.group(1), m.group(2), int(m.group(3) or 50)
        out.setdefault(scheme, {}).setdefault(method, []).append((iters, r["ppl"], r["quantize_seconds"]))
    for methods in out.values():
        for points in methods.values():
            points.sort()
    return out


def verdicts(scheme_curves: dict[str, list[tuple[int, float, float]]]) -> dict[str, object]:
    ours = {i: (p, s) for i, p, s in scheme_curves.get("ours", [])}
    peer = {i: (p, s) for i, p, s in scheme_curves.get("arv2", [])}
    out: dict[str, object] = {}
    if 200 in peer:
        target, peer_s = peer[200]
        reached = [(i, p, s) for i, (p, s) in sorted(ours.items()) if p <= target]
        out["v2_200"] = {"ppl": target, "seconds": peer_s}
        if reached:
            i, p, s = reached[0]
            out["ours_reaches_v2_200"] = {"iters": i, "ppl": p, "seconds": s, "time_ratio": round(s / peer_s, 3)}
        else:
            out["ours_reaches_v2_200"] = None
    if 25 in ours and 50 in peer:
        out["ours25_vs_v2_50"] = {"ours_ppl": ours[25][0], "v2_ppl": peer[50][0],
                                  "ppl_ratio": round(ours[25][0] / peer[50][0], 4),
                                  "time_ratio": round(ours[25][1] / peer[50][1], 3)}
    return out


def plot(all_curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_curves), figsize=(5.5 * len(all_curves), 4.2), squeeze=False)
    for ax, (scheme, methods) in zip(axes[0], sorted(all_curves.items(), reverse=True)):
        # points far above the rest (W2's 0 steps) are drawn at the top edge, their value written out
        top = 3.0 * min(p for points in methods.values() for _, p, _ in points)
        for method, style, label in (("ours", "o-", "hf-signround"), ("arv2", "s--", "auto-round V2")):
            points = methods.get(method, [])
            if not points:
                continue
            ax.plot([s / 60 for _, _, s in points], [min(p, top) for _, p, _ in points], style, label=label)
            for i, p, s in points:
                text = str(i) if p <= top else f"{i} (ppl {p:.0f}, off scale)"
                ax.annotate(text, (s / 60, min(p, top)), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(f"SmolLM2-135M {scheme} (labels: steps)")
        ax.set_xlabel("quantization time, minutes (1 CPU thread)")
        ax.set_ylabel("held-out perplexity")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/quality-time.json"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/time_to_quality.json"))
    parser.add_argument("--png", type=Path, default=Path("docs/time_to_quality.png"))
    args = parser.parse_args()
    all_curves = curves(json.loads(args.results.read_text()))
    report = {}
    for scheme, methods in sorted(all_curves.items(), reverse=True):
        print(f"\n{scheme}\n{'method':<14} {'steps':>5} {'ppl':>8} {'seconds':>8}")
        for method, points in methods.items():
            for i, p, s in points:
                print(f"{method:<14} {i:>5} {p:>8.3f} {s:>8.0f}")
        report[scheme] = {"curves": methods, **verdicts(methods)}
        reach = report[scheme].get("ours_reaches_v2_200", "missing")
        if reach == "missing":
            print("no V2 200-step row")
        elif reach is None:
            print(f"ours does not reach V2's 200-step perplexity {report[scheme]['v2_200']['ppl']} at any step count run")
        else:
            print(f"ours reaches V2's 200-step perplexity {report[scheme]['v2_200']['ppl']} at {reach['iters']} steps "
                  f"({reach['ppl']}), in {reach['time_ratio']}x V2's 200-step time")
        if "ours25_vs_v2_50" in report[scheme]:
            h = report[scheme]["ours25_vs_v2_50"]
            print(f"ours at 25 steps {h['ours_ppl']} against V2 at 50 {h['v2_ppl']} (x{h['ppl_ratio']} perplexity, "
                  f"x{h['time_ratio']} time)")
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(all_curves, args.png)
    print(f"\nwrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
