"""Bit allocation by dynamic programming under an average-bit budget (spec §2).

Every unit (one layer, or layers a serving engine fuses, priced and scored together) takes
one option ``(bits, group_size)``. We minimise the summed sensitivity score subject to the
total storage bits ``≤ avg_bits × quantized parameters``. Storage bits are exact: what the
packed tensors of :class:`~hf_signround.qlinear.QuantLinear` occupy (``qweight`` padded to
whole 32-value blocks, one scale per group, and for asymmetric layers the packed zero
points), so the realised average is the average the saved checkpoint really has.

The solver (:func:`solve`) is an exact knapsack over integer totals kept as a Pareto
front: after each unit, for every reachable total only the lowest loss survives, and a
state survives only if no cheaper state has a loss as low. States that can no longer fit
the budget (even with the cheapest options for every unit left) are dropped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .packing import num_groups, packed_rows
from .qfunc import QuantSpec

logger = logging.getLogger(__name__)

STATE_WARNING = 2_000_000  # a front this wide means the costs share almost no common factor


def layer_bits(out_features: int, in_features: int, spec: QuantSpec, scale_bits: int) -> int:
    """Storage bits of one packed layer: qweight + scales + (asymmetric) qzeros; bias excluded."""
    groups = num_groups(in_features, spec.group_size)
    bits = 32 * packed_rows(in_features, spec.bits) * out_features + scale_bits * groups * out_features
    if not spec.sym:
        bits += 32 * groups * packed_rows(out_features, spec.bits)
    return bits


def unit_costs(shapes: dict[str, tuple[int, int]], units: list[list[str]], options: list[QuantSpec],
               scale_bits: int) -> np.ndarray:
    """int64 (units, options): the storage bits of every unit at every option."""
    return np.array([[sum(layer_bits(*shapes[m], o, scale_bits) for m in unit) for o in options] for unit in units],
                    dtype=np.int64).reshape(len(units), len(options))


def _pinned_bits(shapes: dict[str, tuple[int, int]], pinned: dict[str, QuantSpec], scale_bits: int) -> int:
    return sum(layer_bits(*shapes[m], s, scale_bits) for m, s in pinned.items())


def solve(costs: np.ndarray, scores: np.ndarray, budget: int) -> list[int]:
    """The option per unit minimising ``Σ scores`` with ``Σ costs ≤ budget`` (exact).

    Args:
        costs: int (units, options), the bits each unit costs at each option.
        scores: float (units, options), the loss each unit adds at each option.
        budget: the most bits allowed in total.

    Raises ``ValueError`` when even the cheapest choice does not fit.
    """
    costs = np.asarray(costs, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    n_units, n_opts = costs.shape
    rest = np.concatenate([np.cumsum(costs.min(1)[::-1])[::-1], [0]])  # cheapest cost of units u..end
    if rest[0] > budget:
        raise ValueError(f"no allocation fits {budget} bits: the cheapest needs {int(rest[0])}")
    total, loss = np.zeros(1, np.int64), np.zeros(1)
    parents, picks = [], []
    for u in range(n_units):
        cand_total = (total[:, None] + costs[u]).ravel()
        cand_loss = (loss[:, None] + scores[u]).ravel()
        index = np.flatnonzero(cand_total + rest[u + 1] <= budget)
        order = np.lexsort((cand_loss[index], cand_total[index]))  # by total, then loss
        index = index[order]
        cand_total, cand_loss = cand_total[index], cand_loss[index]
        # Pareto front: keep a state only if its loss is below every cheaper (or equal) state's.
        keep = np.ones(len(index), bool)
        keep[1:] = cand_loss[1:] < np.minimum.accumulate(cand_loss)[:-1]
        index, total, loss = index[keep], cand_total[keep], cand_loss[keep]
        parents.append(index // n_opts)
        picks.append(index % n_opts)
        if len(total) > STATE_WARNING:
            logger.warning("bit allocation: %d states after unit %d of %d", len(total), u + 1, n_units)
    state = int(np.argmin(loss))
    choice = []
    for u in reversed(range(n_units)):
        choice.append(int(picks[u][state]))
        state = int(parents[u][state])
    return choice[::-1]


@dataclass
class Allocation:
    """The chosen option of every layer, with the scores and the budget it was chosen under."""

    options: list[QuantSpec]
    shapes: dict[str, tuple[int, int]]  # layer -> (out_features, in_features), every quantized layer
    scores: dict[str, list[float]]  # allocated layer -> score per option
    specs: dict[str, QuantSpec]  # every quantized layer -> its spec (allocated and pinned)
    units: list[list[str]]  # allocated layers, grouped as priced together
    target: float
    realized: float
    scale_bits: int
    method: str = "deltaloss"
    bits: dict[str, int] = field(default_factory=dict)  # layer -> storage bits

    def options_label(self) -> str:
        return "/".join(f"W{o.bits}G{o.group_size}" for o in self.options)

    def table(self) -> str:
        """Per-layer scores and chosen option as aligned text (pinned layers marked)."""
        heads = self.options_label().split("/")
        width = max(len(n) for n in self.specs)
        lines = [f"{'layer':<{width}} {'params':>10} " + " ".join(f"{h:>10}" for h in heads) + "   chosen"]
        for name, spec in self.specs.items():
            n, k = self.shapes[name]
            cells = ([f"{s:>10.4g}" for s in self.scores[name]] if name in self.scores
                     else [f"{'-':>10}"] * len(heads))
            chosen = f"W{spec.bits}G{spec.group_size}" + ("" if name in self.scores else " (pinned)")
            lines.append(f"{name:<{width}} {n * k:>10} " + " ".join(cells) + f"   {chosen}")
        lines.append(f"score: {self.method}; target {self.target:.4f} bits/weight, realised {self.realized:.4f} "
                     f"(weights + {self.scale_bits}-bit scales + zero points)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "target_avg_bits": self.target,
            "realized_avg_bits": self.realized,
            "scale_bits": self.scale_bits,
            "options": [{"bits": o.bits, "group_size": o.group_size, "sym": o.sym} for o in self.options],
            "units": self.units,
            "layers": {
                name: {"params": self.shapes[name][0] * self.shapes[name][1], "storage_bits": self.bits[name],
                       "scores": self.scores.get(name), "bits": spec.bits, "group_size": spec.group_size,
                       "sym": spec.sym, "pinned": name not in self.scores}
                for name, spec in self.specs.items()
            },
        }

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def plot(self, path: str | Path) -> None:
        """PNG of the chosen bits by block depth, one line per layer type (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ImportError("the sensitivity plot needs matplotlib: pip install 'hf-signround[plot]'") from err
        by_type: dict[str, tuple[list[int], list[float]]] = {}
        for name, spec in self.specs.items():
            depth, kind = _depth_and_kind(name)
            xs, ys = by_type.setdefault(kind, ([], []))
            xs.append(depth)
            ys.append(spec.bits + 0.02 * len(by_type))  # tiny offset so overlapping lines stay visible
        fig, ax = plt.subplots(figsize=(10, 4))
        for kind, (xs, ys) in by_type.items():
            ax.plot(xs, ys, marker="o", linewidth=1, markersize=3, label=kind)
        ax.set_xlabel("block")
        ax.set_ylabel("bits")
        ax.set_yticks(sorted({o.bits for o in self.options} | {s.bits for s in self.specs.values()}))
        ax.set_title(f"bits by layer: target {self.target:g}, realised {self.realized:.3f} ({self.method})")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _depth_and_kind(name: str) -> tuple[int, str]:
    """``model.layers.12.self_attn.q_proj`` -> (12, ``self_attn.q_proj``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1 :])
    return 0, name


def allocate(
    shapes: dict[str, tuple[int, int]],
    scores: dict[str, list[float]],
    units: list[list[str]],
    options: list[QuantSpec],
    avg_bits: float,
    scale_bits: int,
    pinned: dict[str, QuantSpec] | None = None,
    method: str = "deltaloss",
) -> Allocation:
    """Choose an option for every unit so the average stays ≤ ``avg_bits`` at the least total score.

    Args:
        shapes: (out_features, in_features) of every quantized layer, pinned ones included.
        scores: score per option of every layer to allocate.
        units: the layers to allocate, grouped as they must share an option.
        pinned: layers whose spec the user fixed; their bits count against the budget.
    """
    pinned = pinned or {}
    costs = unit_costs(shapes, units, options, scale_bits)
    fixed = _pinned_bits(shapes, pinned, scale_bits)
    _check_range(costs, fixed, shapes, options, avg_bits)
    params = sum(n * k for n, k in shapes.values())
    budget = int(np.floor(avg_bits * params)) - fixed
    unit_scores = np.array([[sum(scores[m][i] for m in unit) for i in range(len(options))] for unit in units])
    choice = solve(costs, unit_scores, budget)
    specs = dict(pinned)
    for unit, c in zip(units, choice):
        for m in unit:
            specs[m] = options[c]
    specs = {name: specs[name] for name in shapes}  # model order
    bits = {name: layer_bits(*shapes[name], spec, scale_bits) for name, spec in specs.items()}
    realized = sum(bits.values()) / params
    alloc = Allocation(options, dict(shapes), {m: scores[m] for u in units for m in u}, specs, units,
                       avg_bits, realized, scale_bits, method, bits)
    logger.info("bit allocation (%s): target %.4f, realised %.4f bits/weight over %d layers in %d units",
                method, avg_bits, realized, len(specs), len(units))
    # The cheapest move to a dearer option any unit could still make: a slack wider than it
    # means the scores, not the budget, stopped the allocation.
    chosen = costs[np.arange(len(units)), choice]
    dearer = np.where(costs > chosen[:, None], costs - chosen[:, None], np.iinfo(np.int64).max)
    slack = budget - int(chosen.sum())
    if dearer.size and slack >= dearer.min():
        logger.info("%d bits of the budget are left although a unit could move to a dearer option within them: "
                    "dearer options would not lower the summed score", slack)
    return alloc


def check_budget(shapes, units, options, avg_bits, scale_bits, pinned) -> None:
    """Raise unless ``avg_bits`` lies between the cheapest and the dearest realisable average."""
    _check_range(unit_costs(shapes, units, options, scale_bits), _pinned_bits(shapes, pinned, scale_bits), shapes,
                 options, avg_bits)


def _check_range(costs: np.ndarray, fixed: int, shapes, options, avg_bits) -> None:
    params = sum(n * k for n, k in shapes.values())
    low = (fixed + int(costs.min(1).sum())) / params
    high = (fixed + int(costs.max(1).sum())) / params
    names = ", ".join(f"({o.bits}, {o.group_size})" for o in options)
    if avg_bits < low:
        raise ValueError(
            f"avg_bits={avg_bits} is below {low:.4f}, the average with the cheapest of bit_options [{names}] on "
            f"every layer (counting scales and zero points); raise avg_bits to at least {low:.4f} or add a cheaper option"
        )
    if avg_bits > high:
        raise ValueError(
            f"avg_bits={avg_bits} is above {high:.4f}, the average with the dearest of bit_options [{names}] on "
            f"every layer; lower avg_bits to at most {high:.4f} or add a dearer option"
        )
