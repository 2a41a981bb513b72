"""Block-wise sign-gradient tuning with top-k loss exclusion (spec §3c, §3c').

For one decoder block: every quantized Linear gets rounding offsets ``v`` (per weight,
start 0, kept in [-0.5, 0.5]) and clipping factors ``alpha``/``beta`` (per group, start 1,
kept in [0, 1], or [0, 2] on top of a searched scale). The block, fed the *quantized*
chain's inputs, is trained to reproduce the *float* block's outputs on the float chain's
inputs: fp32 MSE, scaled by 1000, signed gradient descent without momentum, learning
rate decaying linearly to 0, and the parameters of the lowest-loss step are kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .qfunc import QuantSpec, fake_quantize_grouped, group_range, grouped, scale_zero_from_range, ungrouped

logger = logging.getLogger(__name__)

LOSS_SCALE = 1000.0  # numerics only (spec §3c)


class TunableLinear(nn.Module):
    """A Linear whose weight passes through the differentiable quantizer.

    The weight is kept grouped (and zero padded for a short last group) once, with its
    per-group range, so a tuning step only runs the quantizer itself.
    """

    def __init__(self, layer: nn.Linear, spec: QuantSpec, init_factor: torch.Tensor | None, scale_dtype: torch.dtype):
        super().__init__()
        self.layer, self.spec, self.scale_dtype = layer, spec, scale_dtype
        wg = grouped(layer.weight.detach().float(), spec)
        wmin, wmax = group_range(wg)
        self.register_buffer("wg", wg, persistent=False)
        self.register_buffer("wmin", wmin, persistent=False)
        self.register_buffer("wmax", wmax, persistent=False)
        self.register_buffer("init_factor", torch.ones_like(wmin) if init_factor is None
                             else init_factor.float().to(wg.device), persistent=False)
        self.v = nn.Parameter(torch.zeros_like(wg))
        self.alpha = nn.Parameter(torch.ones_like(wmin))
        self.beta = nn.Parameter(torch.ones_like(wmin))
        self.factor_max = 1.0 if init_factor is None else 2.0

    def quant_args(self) -> dict[str, torch.Tensor]:
        """Arguments of ``qfunc.quantize_rtn`` that reproduce this layer's current quantizer."""
        return {"v": ungrouped(self.v, self.layer.in_features),
                "alpha": self.init_factor * self.alpha, "beta": self.init_factor * self.beta}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = scale_zero_from_range(self.wmin, self.wmax, self.spec, self.init_factor * self.alpha,
                                     self.init_factor * self.beta, self.scale_dtype)
        w = ungrouped(fake_quantize_grouped(self.wg, self.spec, s, z, self.v), self.layer.in_features)
        bias = None if self.layer.bias is None else self.layer.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(0.0, self.factor_max)
        self.beta.clamp_(0.0, self.factor_max)


@dataclass
class TuneSettings:
    iters: int
    lr: float
    batch_size: int
    topk_ratio: float | None  # None: no exclusion
    seed: int
    amp: bool = False


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products beat float32 on ``device`` (worth autocasting to)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def block_loss(pred: torch.Tensor, ref: torch.Tensor, topk_ratio: float | None) -> torch.Tensor:
    """fp32 MSE; with ``topk_ratio`` the largest ``max(1, ratio·numel)`` errors are left out
    of the sum while the denominator stays ``numel`` (spec §3c')."""
    sq = (pred.float() - ref.float()).square()
    if topk_ratio is None:
        return sq.mean()
    k = max(1, int(sq.numel() * topk_ratio))
    dropped = torch.topk(sq.flatten(), k, sorted=False).values
    return (sq.sum() - dropped.sum()) / sq.numel()


@dataclass
class BlockCall:
    """How the model calls its blocks, besides the hidden states (see ``blocks.capture_block_inputs``)."""

    args: tuple
    kwargs: dict[str, Any]

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def batched(self, block: nn.Module, hidden: torch.Tensor, batch_size: int) -> torch.Tensor:
        return torch.cat([self(block, hidden[i : i + batch_size]) for i in range(0, len(hidden), batch_size)])


@torch.no_grad()
def mse_and_outputs(block: nn.Module, call: BlockCall, inputs: torch.Tensor, target: torch.Tensor, batch_size: int):
    """Plain MSE of the block's outputs against ``target`` over all samples, and the outputs."""
    out = call.batched(block, inputs, batch_size)
    return (out.float() - target.float()).square().mean().item(), out


def tune_block(
    block: nn.Module,
    tunables: dict[str, TunableLinear],
    call: BlockCall,
    q_inputs: torch.Tensor,
    fp_outputs: torch.Tensor,
    settings: TuneSettings,
) -> list[float]:
    """Tune ``tunables`` (already installed in ``block``) in place, leaving the best step's values.

    Returns every step's mini-batch loss (unscaled); the parameters left in place are
    those of the step with the lowest one.
    """
    params = [p for t in tunables.values() for p in (t.v, t.alpha, t.beta)]
    gen = torch.Generator().manual_seed(settings.seed)
    n = len(q_inputs)
    best_loss, history = float("inf"), []
    best = [p.detach().clone() for p in params]
    device = q_inputs.device
    for step in range(settings.iters):
        idx = torch.randperm(n, generator=gen)[: settings.batch_size]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.amp):
            pred = call(block, q_inputs[idx])
        loss = block_loss(pred, fp_outputs[idx], settings.topk_ratio)
        value = loss.item()
        history.append(value)
        if value < best_loss:
            best_loss = value
            for b, p in zip(best, params):
                b.copy_(p.detach())
        grads = torch.autograd.grad(loss * LOSS_SCALE, params)
        lr = settings.lr * (1.0 - step / settings.iters)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * torch.sign(g))
        for t in tunables.values():
            t.clamp_()
    with torch.no_grad():
        for b, p in zip(best, params):
            p.copy_(b)
    return history
