"""The weight quantizer as plain functions (spec: "Quantizer").

Shapes: a weight ``w`` is (N, K) = (out_features, in_features); it is quantized in groups
of ``group_size`` consecutive input elements per output row (``group_size == -1``: one
group per row; when ``group_size`` does not divide K the last group is shorter, as with
GPTQ's ``g_idx = k // group_size``). Scales ``s`` and zero points ``z`` are (N, G). Integer codes are unsigned
in ``[0, 2**bits - 1]`` and dequantize as ``s * (q - z)``; the symmetric quantizer uses the
implicit zero point ``z = 2**(bits - 1)`` and a signed scale, so its largest-magnitude
element lands on code 0 ("full range", ``-maxq``).

Tuning goes through :func:`fake_quantize` / :func:`fake_quantize_grouped`, whose rounding
passes gradients straight through to ``v``, ``alpha`` and ``beta``; freezing goes through
:func:`quantize_rtn`, which computes the same codes without gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import num_groups

# Smallest scale magnitude (spec: 1e-5 for half-precision storage, 1e-8 in fp32).
SCALE_EPS = {torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float32: 1e-8}


@dataclass(frozen=True)
class QuantSpec:
    """How one layer is quantized."""

    bits: int
    group_size: int
    sym: bool

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return num_groups(in_features, self.group_size)

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(N, K) as (N, G, group_len), zero padding a shorter last group.

    Zero padding leaves every group statistic used here unchanged: the quantization
    range always contains 0, and padded columns are sliced off by :func:`ungrouped`.
    """
    n, k = w.shape
    g, length = spec.groups(k), spec.group_len(k)
    if g * length != k:
        w = torch.nn.functional.pad(w, (0, g * length - k))
    return w.reshape(n, g, length)


def ungrouped(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`grouped`: (N, G, group_len) back to (N, K)."""
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


def scale_zero(
    w: torch.Tensor,
    spec: QuantSpec,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point per group, shrunk by clipping factors ``alpha``/``beta``.

    ``alpha`` scales the group minimum and ``beta`` the maximum (each (N, G), default 1).
    Returns ``s`` rounded to ``scale_dtype`` (kept in float32, so dequantization with the
    stored scale is exact) and ``z`` (float32 holding integers; symmetric: ``2**(bits-1)``).
    """
    return scale_zero_grouped(grouped(w.float(), spec), spec, alpha, beta, scale_dtype)


def scale_zero_grouped(
    wg: torch.Tensor,
    spec: QuantSpec,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`scale_zero` on an already grouped float32 weight (N, G, group_len)."""
    return scale_zero_from_range(*group_range(wg), spec, alpha, beta, scale_dtype)


def group_range(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``min(W, 0)`` and ``max(W, 0)`` of a grouped weight, each (N, G)."""
    return wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)


def scale_zero_from_range(
    wmin: torch.Tensor,
    wmax: torch.Tensor,
    spec: QuantSpec,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from the group range (spec "Quantizer"); see :func:`scale_zero`."""
    if alpha is not None:
        wmin = wmin * alpha
    if beta is not None:
        wmax = wmax * beta
    eps = SCALE_EPS[scale_dtype]
    if spec.sym:
        half = 2 ** (spec.bits - 1)
        # The larger side maps onto -half: a negative scale when the maximum dominates.
        pos = wmax >= -wmin
        s = torch.where(pos, -wmax, -wmin) / half
        s = torch.where(s.abs() < eps, torch.full_like(s, eps), s)
        s = _through_dtype(s, scale_dtype)
        z = torch.full_like(s, float(half))
    else:
        s = ((wmax - wmin) / spec.maxq).clamp(min=eps)
        s = _through_dtype(s, scale_dtype)
        z = torch.clamp(torch.round(-wmin / s), 0, spec.maxq).detach()
    return s, z


def _through_dtype(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round ``s`` to ``dtype`` in the forward pass, keeping the gradient (STE)."""
    if dtype == torch.float32:
        return s
    return s + (s.to(dtype).float() - s).detach()


def quantize_codes(
    w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QuantSpec, v: torch.Tensor | None = None
) -> torch.Tensor:
    """Integer codes ``clamp(round(w/s + v) + z, 0, maxq)`` as float32, shape (N, K)."""
    wg = grouped(w.float(), spec)
    x = wg / s.unsqueeze(-1)
    if v is not None:
        x = x + grouped(v, spec)
    q = torch.clamp(torch.round(x) + z.unsqueeze(-1), 0, spec.maxq)
    return ungrouped(q, w.shape[1])


class _FakeQuantSTE(torch.autograd.Function):
    """``s · (clamp(round(w/s + v) + z, 0, maxq) − z)`` on grouped tensors, with the
    straight-through gradient written out by hand: the autograd graph of the same
    expression keeps about three times as many full-size temporaries, and this runs in
    every forward of block tuning. ``z`` carries no gradient (it is rounded)."""

    @staticmethod
    def forward(ctx, wg, v, s, z, maxq):
        x = wg / s
        if v is not None:
            x += v
        r = torch.round_(x).add_(z)
        q = r.clamp(0, maxq)
        inside = q == r  # where clamp passes the gradient through
        out = q.sub_(z).mul_(s)
        ctx.save_for_backward(wg, s, inside, out)
        ctx.v_given = v is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        wg, s, inside, out = ctx.saved_tensors
        grad_v = grad * inside * s if ctx.v_given and ctx.needs_input_grad[1] else None
        grad_s = None
        if ctx.needs_input_grad[2]:
            # d out / d s = (q − z) − inside · w / s = (out − inside · w) / s
            grad_s = (grad * (out - wg * inside)).sum(-1, keepdim=True) / s
        return None, grad_v, grad_s, None, None


def fake_quantize_grouped(
    wg: torch.Tensor, spec: QuantSpec, s: torch.Tensor, z: torch.Tensor, vg: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize a grouped float32 weight (N, G, L) with scales/zeros (N, G)."""
    return _FakeQuantSTE.apply(wg, vg, s.unsqueeze(-1), z.unsqueeze(-1), spec.maxq)


def fake_quantize(
    w: torch.Tensor,
    spec: QuantSpec,
    v: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Quantize-dequantize ``w`` (differentiable in ``v``, ``alpha``, ``beta`` via STE), float32."""
    wg = grouped(w.float(), spec)
    s, z = scale_zero_grouped(wg, spec, alpha, beta, scale_dtype)
    vg = None if v is None else grouped(v, spec)
    return ungrouped(fake_quantize_grouped(wg, spec, s, z, vg), w.shape[1])


def quantize_rtn(
    w: torch.Tensor,
    spec: QuantSpec,
    v: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Freeze a layer: uint8 codes (N, K), scales (N, G) in ``scale_dtype``, zeros (N, G) int32 or None.

    Dequantizing the result with the stored scales reproduces ``fake_quantize`` exactly.
    """
    with torch.no_grad():
        s, z = scale_zero(w, spec, alpha, beta, scale_dtype)
        q = quantize_codes(w, s, z, spec, v)
    zeros = None if spec.sym else z.to(torch.int32)
    return q.to(torch.uint8), s.to(scale_dtype), zeros
