"""Pre-tuning scale search (spec §3b), for symmetric and asymmetric quantizers.

For every group, pick the factor ``c`` that minimises the activation-weighted error
``Σ_j imp_j · (Q_c(W_gj) − W_gj)²`` with ``imp_j = Σ_tokens x_j² + 1e-5`` over a grid of
candidates. ``c`` multiplies the min-max range (both ends, so the zero point follows);
for the symmetric quantizer this is exactly the spec's grid of inverse scales
``−(maxq − step·k) / gmax``, i.e. ``c = maxq / (maxq − step·k)``. The asymmetric quantizer
uses the same grid with its own ``maxq = 2**bits − 1``.

The grid is searched coarse-to-fine: every ``stride``-th candidate first, then every
candidate within ``stride`` of each group's coarse winner, which costs about
``3 · stride`` evaluations instead of the full grid's ~200. ``c = 1`` (min-max) is on the
coarse grid, so the search never does worse than min-max on its own objective.

The searched ``c`` enters the quantizer as the starting clipping factors
(``alpha = beta = c``) that tuning then refines.
"""

from __future__ import annotations

import torch

from .qfunc import QuantSpec, group_range, grouped, scale_zero_from_range

IMPORTANCE_EPS = 1e-5


def candidate_factors(spec: QuantSpec) -> torch.Tensor:
    """The grid of range factors ``c`` for ``spec`` (float32, ascending k; 1.0 in the middle)."""
    maxq = 2 ** (spec.bits - 1) if spec.sym else spec.maxq
    if spec.bits == 2:
        step, ks = 0.01, torch.arange(-90, 91)
    else:
        step, ks = 2 * 0.75 * maxq / 200, torch.arange(-100, 101)
    return (maxq / (maxq - step * ks.float())).float()


def weighted_error(
    wg: torch.Tensor,
    imp: torch.Tensor,
    spec: QuantSpec,
    factor: torch.Tensor,
    scale_dtype: torch.dtype,
    wrange: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_j imp_j (Q(W_gj) − W_gj)²`` per group (N, G) for range factors ``factor`` (N, G).

    The float operations of :func:`fake_quantize_grouped`, in the same order, done in place on
    one buffer (``out``, shaped like ``wg``, reused across candidates when given); ``wrange``
    is :func:`group_range` of ``wg``, which no candidate changes; ``imp`` broadcasts to ``wg``.
    """
    wmin, wmax = group_range(wg) if wrange is None else wrange
    s, z = scale_zero_from_range(wmin, wmax, spec, factor, factor, scale_dtype)
    s, z = s.unsqueeze(-1), z.unsqueeze(-1)
    err = torch.div(wg, s, out=out)
    err.round_().add_(z).clamp_(0, spec.maxq).sub_(z).mul_(s).sub_(wg)
    return err.square_().mul_(imp).sum(-1)


@torch.no_grad()
def search_factors(
    w: torch.Tensor,
    spec: QuantSpec,
    importance: torch.Tensor,
    scale_dtype: torch.dtype = torch.float32,
    stride: int = 10,
) -> torch.Tensor:
    """The best range factor per group, (N, G) float32.

    Args:
        w: weight (N, K).
        importance: per input channel ``Σ x_j²`` (K,); ``1e-5`` is added here.
        stride: coarse-grid spacing; 1 searches the whole grid exhaustively.
    """
    wg = grouped(w.detach().float(), spec)
    n, g, length = wg.shape
    imp = grouped((importance.float().to(wg.device) + IMPORTANCE_EPS).unsqueeze(0), spec)  # (1, G, L)
    wrange, buffer = group_range(wg), torch.empty_like(wg)
    grid = candidate_factors(spec).to(wg.device)
    middle = len(grid) // 2
    coarse = [i for i in range(middle % stride, len(grid), stride)]

    best_err = torch.full((n, g), float("inf"), device=wg.device)
    best_idx = torch.full((n, g), middle, dtype=torch.long, device=wg.device)

    def consider(idx: torch.Tensor) -> None:
        nonlocal best_err, best_idx
        err = weighted_error(wg, imp, spec, grid[idx], scale_dtype, wrange, buffer)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_idx = torch.where(better, idx, best_idx)

    for i in coarse:
        consider(torch.full((n, g), i, dtype=torch.long, device=wg.device))
    centre = best_idx.clone()
    for d in range(-stride + 1, stride):
        if d:
            consider((centre + d).clamp(0, len(grid) - 1))
    return grid[best_idx]
