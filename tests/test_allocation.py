"""Bit allocation: exact storage accounting and the DP against brute force."""

import itertools
import json

import numpy as np
import pytest
import torch

from hf_signround.allocation import Allocation, allocate, check_budget, layer_bits, solve
from hf_signround.qfunc import QuantSpec, quantize_rtn
from hf_signround.qlinear import QuantLinear


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 48, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("n, k", [(64, 96), (40, 70)])
def test_layer_bits_equal_the_packed_bytes(bits, group_size, sym, n, k):
    spec = QuantSpec(bits, group_size, sym)
    codes, scales, zeros = quantize_rtn(torch.randn(n, k), spec)
    layer = QuantLinear.from_codes(codes, scales, zeros, bits=bits, group_size=group_size, sym=sym, bias=None)
    assert layer_bits(n, k, spec, scale_bits=16) == 8 * layer.packed_nbytes()


def brute_force(costs, scores, budget):
    best = None
    for choice in itertools.product(range(costs.shape[1]), repeat=costs.shape[0]):
        cost = sum(costs[u, c] for u, c in enumerate(choice))
        loss = sum(scores[u, c] for u, c in enumerate(choice))
        if cost <= budget and (best is None or loss < best):
            best = loss
    return best


@pytest.mark.parametrize("seed", range(40))
def test_dp_is_optimal_and_within_budget(seed):
    rng = np.random.default_rng(seed)
    units, opts = rng.integers(1, 7), rng.integers(1, 4)
    costs = rng.integers(1, 50, size=(units, opts))
    scores = rng.random((units, opts)) * 10
    low, high = costs.min(1).sum(), costs.max(1).sum()
    budget = int(rng.integers(low, high + 1))
    choice = solve(costs, scores, budget)
    assert sum(costs[u, c] for u, c in enumerate(choice)) <= budget
    assert sum(scores[u, c] for u, c in enumerate(choice)) == pytest.approx(brute_force(costs, scores, budget), abs=1e-9)


def test_dp_infeasible_budget_raises():
    with pytest.raises(ValueError, match="no allocation fits 5 bits: the cheapest needs 6"):
        solve(np.array([[3, 4], [3, 9]]), np.ones((2, 2)), budget=5)


def dense_knapsack_optimum(costs: np.ndarray, scores: np.ndarray, budget: int) -> float:
    """The lowest total score within ``budget`` by the textbook DP over every total (costs in
    units of their gcd): an independent reference, fine for a budget of some 10^5 units."""
    unit = int(np.gcd.reduce(costs.ravel()))
    c, cap = costs // unit, budget // unit
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    for u in range(len(c)):
        nxt = np.full(cap + 1, np.inf)
        for o in range(c.shape[1]):
            nxt[c[u, o]:] = np.minimum(nxt[c[u, o]:], best[: cap + 1 - c[u, o]] + scores[u, o])
        best = nxt
    return float(best.min())


def test_dp_is_optimal_on_many_units():
    # 200 units x 4 options with realistic, repeated layer sizes (the Pareto front stays small)
    rng = np.random.default_rng(0)
    sizes = rng.choice([1, 3, 8], size=200)
    per_weight = np.array([2.28, 3.16, 4.16, 8.16])
    costs = np.round(sizes[:, None] * per_weight[None, :] * 1000).astype(np.int64)
    scores = sizes[:, None] * np.array([8.0, 3.0, 1.0, 0.1])[None, :] * rng.random((200, 1))
    budget = int(3.0 * 1000 * sizes.sum())
    choice = solve(costs, scores, budget)
    assert costs[np.arange(200), choice].sum() <= budget
    assert scores[np.arange(200), choice].sum() == pytest.approx(dense_knapsack_optimum(costs, scores, budget),
                                                                 rel=1e-12)


def shapes_and_scores():
    shapes = {f"l{i}.{kind}": shape for i in range(3) for kind, shape in
              (("q", (64, 64)), ("k", (32, 64)), ("v", (32, 64)), ("up", (128, 64)), ("down", (64, 128)))}
    # Monotone scores: more bits, less loss; deeper and bigger layers more sensitive.
    scores = {n: [float(s) * (1 + int(n[1])) * np.prod(shapes[n]) / 4096 for s in (9.0, 2.0, 1.0)] for n in shapes}
    return shapes, scores


OPTIONS = [QuantSpec(2, 32, True), QuantSpec(4, 32, True), QuantSpec(8, 32, True)]


@pytest.mark.parametrize("target", [2.6, 3.0, 3.7, 5.0])
def test_allocate_realises_the_target_from_below(target):
    shapes, scores = shapes_and_scores()
    units = [[n] for n in shapes]
    alloc = allocate(shapes, scores, units, OPTIONS, target, scale_bits=16)
    params = sum(n * k for n, k in shapes.values())
    total = sum(layer_bits(*shapes[n], s, 16) for n, s in alloc.specs.items())
    assert alloc.realized == pytest.approx(total / params)
    assert alloc.realized <= target
    # Within one layer's granularity: scores fall with bits, so no layer's next option fits in the slack.
    slack = int(np.floor(target * params)) - total
    for name, spec in alloc.specs.items():
        i = OPTIONS.index(spec)
        if i + 1 < len(OPTIONS):
            assert layer_bits(*shapes[name], OPTIONS[i + 1], 16) - layer_bits(*shapes[name], spec, 16) > slack, name


def test_tied_units_share_one_option_and_pinned_layers_count():
    shapes, scores = shapes_and_scores()
    pinned = {"l0.down": QuantSpec(8, -1, False)}
    units = [[f"l{i}.q", f"l{i}.k", f"l{i}.v"] for i in range(3)] + [[n] for n in shapes if n.endswith(("up", "down"))
                                                                   and n not in pinned]
    alloc = allocate(shapes, scores, units, OPTIONS, 3.5, scale_bits=16, pinned=pinned)
    for unit in units:
        assert len({alloc.specs[n] for n in unit}) == 1, unit
    assert alloc.specs["l0.down"] == pinned["l0.down"]
    assert list(alloc.specs) == list(shapes)
    params = sum(n * k for n, k in shapes.values())
    assert alloc.realized == pytest.approx(sum(layer_bits(*shapes[n], s, 16) for n, s in alloc.specs.items()) / params)
    assert alloc.realized <= 3.5


def test_target_outside_the_options_names_both_numbers():
    shapes, _ = shapes_and_scores()
    units = [[n] for n in shapes]
    with pytest.raises(ValueError, match=r"avg_bits=2.0 is below 2\.5000, the average with the cheapest .*"
                                         r"raise avg_bits to at least 2\.5000"):
        check_budget(shapes, units, OPTIONS, 2.0, 16, {})
    with pytest.raises(ValueError, match=r"avg_bits=9.0 is above 8\.5000.*lower avg_bits to at most 8\.5000"):
        check_budget(shapes, units, OPTIONS, 9.0, 16, {})


def test_report_table_json_and_plot(tmp_path):
    shapes, scores = shapes_and_scores()
    shapes = {f"model.layers.{n[1]}.{n[3:]}": s for n, s in shapes.items()}
    scores = {f"model.layers.{n[1]}.{n[3:]}": s for n, s in scores.items()}
    alloc = allocate(shapes, scores, [[n] for n in shapes], OPTIONS, 3.0, scale_bits=16)
    assert isinstance(alloc, Allocation)
    table = alloc.table()
    assert "W2G32" in table and "W8G32" in table and f"realised {alloc.realized:.4f}" in table
    assert len(table.splitlines()) == len(shapes) + 2
    alloc.to_json(tmp_path / "s.json")
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["realized_avg_bits"] == alloc.realized
    assert {n: v["bits"] for n, v in data["layers"].items()} == {n: s.bits for n, s in alloc.specs.items()}
    pytest.importorskip("matplotlib", reason="the plot needs the optional matplotlib")
    alloc.plot(tmp_path / "bits.png")
    assert (tmp_path / "bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
