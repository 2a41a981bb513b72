"""Block-wise sign-gradient tuning with top-k loss exclusion (spec §3c, §3c').

For one decoder block: every quantized Linear gets rounding offsets ``v`` (per weight,
start 0, kept in [-0.5, 0.5]) and clipping factors ``alpha``/``beta`` (per group, start 1,
kept in [0, 1], or [0, 2] on top of a searched scale). The block, fed the *quantized*
chain's inputs, is trained to reproduce the *float* block's outputs on the float chain's
inputs: fp32 MSE, scaled by 1000, signed gradient descent without momentum, learning
rate decaying linearly to 0, and the parameters with the lowest mini-batch loss are kept
(``quantize.quantize_block`` then checks them against the start by the same objective on all
windows and keeps the start where they do worse: over few large steps the mini-batch choice is noisy).

Two choices of ours beyond the spec (the SmolLM2-135M W2G64 rows behind them are in
docs/BENCHMARKS.md): mini-batches are dealt from a reshuffled permutation, so every
window is used equally often; and the largest 0.1 % of errors are, by default, counted
linearly (a Huber loss) rather than dropped, so tuning cannot pile error onto them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
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
    topk_mode: str  # "drop" or "huber": how the excluded errors count (see block_loss)
    seed: int
    amp: bool = False


# bfloat16 must beat float32 by this much before tuning autocasts to it on a CPU: a clear
# margin keeps the choice (and so the packed result) the same from run to run on one machine.
CPU_BF16_MIN_SPEEDUP = 1.25


def cpu_has_bf16_instructions() -> bool:
    """Whether the CPU has AVX512-BF16 or AMX (without them bfloat16 products are emulated)."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def cpu_bf16_speedup(size: int = 1024, repeats: int = 5) -> float:
    """float32 over bfloat16 time of a ``size``-cubed matrix product on this CPU, with torch's
    current threads (best of ``repeats`` each).

    The instruction flags alone do not tell: on an AVX512-BF16 Xeon used for this project's
    benchmarks, bfloat16 products ran at about half the float32 rate.
    """
    gen = torch.Generator().manual_seed(0)
    a32, b32 = (torch.randn(size, size, generator=gen) for _ in range(2))
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def best(a: torch.Tensor, b: torch.Tensor) -> float:
        a @ b  # warm-up: first call allocates and picks the kernel
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a32, b32) / best(a16, b16)


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products beat float32 on ``device`` (worth autocasting to).

    CUDA: when the GPU supports bfloat16. CPU: when it has bfloat16 instructions *and* a
    bfloat16 product measures at least ``CPU_BF16_MIN_SPEEDUP`` times faster than float32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not cpu_has_bf16_instructions():
        return False
    return _cpu_bf16_choice(torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _cpu_bf16_choice(threads: int) -> bool:
    """:func:`fast_bf16`'s CPU verdict, measured and logged once per thread count."""
    speedup = cpu_bf16_speedup()
    use = speedup >= CPU_BF16_MIN_SPEEDUP
    logger.info("tuning steps in %s: a bfloat16 matrix product runs at %.2fx float32's speed on this CPU "
                "(%d threads; autocast needs %.2fx)", "bfloat16" if use else "float32", speedup, threads,
                CPU_BF16_MIN_SPEEDUP)
    return use


def block_loss(pred: torch.Tensor, ref: torch.Tensor, topk_ratio: float | None, mode: str = "drop") -> torch.Tensor:
    """fp32 MSE; with ``topk_ratio`` the largest ``k = max(1, ratio·numel)`` element-wise errors
    are treated apart (spec §3c'), the denominator staying ``numel``:

    * ``"drop"`` (the spec): they are left out of the sum;
    * ``"huber"``: past the k-th largest error ``t`` an error ``e`` counts ``2t|e| − t²``
      rather than ``e²`` (a Huber loss with its threshold at that error). Their pull on the
      gradient is capped as with dropping, but it is not zero, so tuning cannot park error on
      the outliers it no longer sees (with "drop", a SmolLM2 block with massive activations
      ended W2 tuning at 9x its starting plain MSE; with "huber" at 0.24x).
    """
    err = pred.float() - ref.float()
    sq = err.square()
    if topk_ratio is None:
        return sq.mean()
    k = max(1, int(sq.numel() * topk_ratio))
    if mode == "drop":
        return (sq.sum() - largest(sq.flatten(), k).sum()) / sq.numel()
    t2 = largest(sq.detach().flatten(), k).min()
    return torch.where(sq > t2, 2 * t2.sqrt() * err.abs() - t2, sq).sum() / sq.numel()


SAMPLE_STRIDE = 61  # prime, so a strided sample does not keep hitting the same hidden channels


def largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest values of a 1-D tensor (unordered; differentiable like ``torch.topk``).

    Exact, and cheaper than one ``topk`` over everything: a strided sample gives a threshold
    that about ``2k`` elements pass, and the top-k runs on those only (on 8 x 256 x 576
    errors, a quarter of the time). Where fewer than ``k`` pass, it falls back to the full top-k.
    """
    n = flat.numel()
    if n < 16 * SAMPLE_STRIDE or k * SAMPLE_STRIDE > n // 4:
        return torch.topk(flat, k, sorted=False).values
    sample = flat.detach()[::SAMPLE_STRIDE]
    threshold = torch.topk(sample, min(sample.numel(), 2 * k // SAMPLE_STRIDE + 8), sorted=False).values.min()
    candidates = flat[flat.detach() >= threshold]
    if candidates.numel() < k:
        return torch.topk(flat, k, sorted=False).values
    return torch.topk(candidates, k, sorted=False).values


@dataclass
class BlockCall:
    """How the model calls its blocks, besides the hidden states (see ``blocks.capture_block_inputs``)."""

    args: tuple
    kwargs: dict[str, Any]

    def raw(self, block: nn.Module, hidden: torch.Tensor):
        """The block's own output for the windows ``hidden`` (per-window arguments repeated to match)."""
        from .blocks import per_batch

        args, kwargs = per_batch((self.args, self.kwargs), len(hidden))
        return block(hidden, *args, **kwargs)

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = self.raw(block, hidden)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def batched(self, block: nn.Module, hidden: torch.Tensor, batch_size: int) -> torch.Tensor:
        return torch.cat([self(block, hidden[i : i + batch_size]) for i in range(0, len(hidden), batch_size)])


def epoch_batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless mini-batches of sample indices: a seeded shuffle is dealt out in batches, and
    reshuffled when fewer than ``batch_size`` samples are left, so every window is seen
    equally often (independent draws would leave some unseen for many steps)."""
    gen = torch.Generator().manual_seed(seed)
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]


@torch.no_grad()
def frozen_losses(block: nn.Module, call: BlockCall, inputs: torch.Tensor, target: torch.Tensor, batch_size: int,
                  topk_ratio: float | None = None, topk_mode: str = "huber") -> tuple[float, float, torch.Tensor]:
    """The block's plain MSE against ``target`` over all samples, its tuning objective there
    (``block_loss`` with the tuning's top-k treatment; the MSE itself without top-k), and the outputs."""
    out = call.batched(block, inputs, batch_size)
    mse = (out.float() - target.float()).square().mean().item()
    objective = mse if topk_ratio is None else block_loss(out, target, topk_ratio, topk_mode).item()
    return mse, objective, out


def tune_block(
    block: nn.Module,
    tunables: dict[str, TunableLinear],
    call: BlockCall,
    q_inputs: torch.Tensor,
    fp_outputs: torch.Tensor,
    settings: TuneSettings,
) -> list[float]:
    """Tune ``tunables`` (already installed in ``block``) in place, leaving the best values seen.

    Returns the mini-batch losses (unscaled) of every step, then of the parameters the last
    step produced (evaluated on the last step's batch; with lr decaying to 0 they are often
    the best); the parameters left in place are those with the lowest loss.
    """
    params = [p for t in tunables.values() for p in (t.v, t.alpha, t.beta)]
    batches = epoch_batches(len(q_inputs), settings.batch_size, settings.seed)
    best_loss, history = float("inf"), []
    best = [p.detach().clone() for p in params]
    device = q_inputs.device

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        """The batch's loss, recorded, with the parameters kept when it is the lowest so far."""
        nonlocal best_loss
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.amp):
            pred = call(block, q_inputs[idx])
        loss = block_loss(pred, fp_outputs[idx], settings.topk_ratio, settings.topk_mode)
        history.append(loss.item())
        if history[-1] < best_loss:
            best_loss = history[-1]
            for b, p in zip(best, params):
                b.copy_(p.detach())
        return loss

    idx = None
    for step in range(settings.iters):
        idx = next(batches)
        # allow_unused: an expert no token of the batch is routed to gets no gradient and stays put
        grads = torch.autograd.grad(loss_on(idx) * LOSS_SCALE, params, allow_unused=True)
        lr = settings.lr * (1.0 - step / settings.iters)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.add_(g.sign_(), alpha=-lr)
        for t in tunables.values():
            t.clamp_()
    if idx is not None:  # the last update's result, on the last batch
        with torch.no_grad():
            loss_on(idx)
    with torch.no_grad():
        for b, p in zip(best, params):
            p.copy_(b)
    return history
