"""``quantize_model``: the SignRoundV2 pipeline (spec: ``shared/SIGNROUNDV2.md``, "Pipeline").

One walk over the decoder blocks serves every way of holding a model (``blocks`` explains
block sources): a loaded model (``quantize_model``) or a checkpoint read and written block by
block (``streaming.quantize_checkpoint``). Computing stays apart from changing the model:
:func:`quantize_block` returns a block's packed layers, its report and its outputs, and the
walk swaps the layers in and hands the block back to its source.

Every layer is planned and validated before the model is touched, so a bad setting never
leaves a half-quantized model behind.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import Allocation, allocate, check_budget, layer_bits, unit_costs
from .blocks import (ResidentBlocks, find_blocks, frozen, matches, nonfinite_counts, quantizable_layers, set_module,
                     warn_other_block_lists)
from .convert import convert_layers, fill_unrouted_scores, restore_conv1d
from .config import SignRoundV2Config
from .qfunc import QuantSpec, quantize_rtn
from .qlinear import QuantLinear, set_backend
from .scale_search import search_factors
from .sensitivity import delta_loss_scores, shared_input_groups, taylor_scores, weight_error_scores
from .tuning import BlockCall, TunableLinear, TuneSettings, fast_bf16, frozen_losses, tune_block

logger = logging.getLogger(__name__)


@dataclass
class BlockReport:
    """One block: its layers' specs and, when tuned, the reconstruction losses."""

    specs: dict[str, QuantSpec]
    loss_before: float | None = None  # tuning loss of the first step (the searched or min-max start)
    loss_after: float | None = None  # tuning loss of the kept (lowest) step
    mse_after: float | None = None  # plain MSE of the frozen block over all calibration windows
    mse_start: float | None = None  # the same for the tuning's start (scale search or min-max), when tuned
    kept_start: bool = False  # the tuned parameters did worse than the start on all windows: the start was kept
    unrouted: list[str] = field(default_factory=list)  # expert layers no calibration token reached
    # the tuning objective (MSE, or with top-k its Huber/drop treatment) over all windows: kept block and start;
    # kept_start compares these, the quantity tuning lowers (plain MSE disagreed at 2-3 bits, see BENCHMARKS.md)
    objective_after: float | None = None
    objective_start: float | None = None


@dataclass
class QuantizationResult:
    """What a quantization produced: the plan, the allocation (``avg_bits``), the block reports."""

    plan: dict[str, QuantSpec]  # every quantized layer (full name) and its spec
    realized_avg_bits: float  # storage bits per quantized weight, scales and zero points counted
    reports: dict[str, BlockReport] = field(default_factory=dict)  # block name -> report
    allocation: Allocation | None = None  # the per-layer scores and choices, with avg_bits

    @property
    def layer_config(self) -> dict[str, dict]:
        """``layer_config`` as a checkpoint stores it: every quantized layer's bits, group size, sym."""
        return {name: {"bits": s.bits, "group_size": s.group_size, "sym": s.sym} for name, s in self.plan.items()}

    def checkpoint_config(self, config: SignRoundV2Config) -> SignRoundV2Config:
        """A copy of ``config`` holding what a saved checkpoint of this result needs (``config.record``):
        set it as ``model.config.quantization_config`` before ``save_pretrained``."""
        saved = copy.deepcopy(config)
        saved.record(self)
        return saved


def plan_layers(model: nn.Module, config: SignRoundV2Config, skip: list[str] | tuple[str, ...] = ()) -> dict[str, QuantSpec]:
    """The QuantSpec of every layer to quantize; raises before anything changes but the form of
    fused experts and Conv1D layers, which become Linears computing the same (``convert``)."""
    skip = list(skip) + list(config.modules_to_not_convert or [])
    convert_layers(model, find_blocks(model)[0], wanted=lambda name: not matches(name, skip))
    layers = quantizable_layers(model, skip)
    if not layers:
        raise ValueError(
            f"no torch.nn.Linear layer is left to quantize in {type(model).__name__}'s decoder blocks "
            f"(modules_to_not_convert={config.modules_to_not_convert})"
        )
    stray = sorted(set(config.layer_config) - set(layers))
    if stray:
        raise ValueError(
            f"layer_config names {stray[:3]}{' ...' if len(stray) > 3 else ''}, which are not quantizable Linear "
            "layers of the decoder blocks (or are listed in modules_to_not_convert); use full module names such as "
            f"{next(iter(layers))!r}"
        )
    # Any group size works: when it does not divide in_features the last group is shorter.
    return {name: QuantSpec(**config.layer_spec(name)) for name in layers}


def group_by_block(plan: dict[str, QuantSpec], prefix: str) -> dict[int, dict[str, QuantSpec]]:
    """``{block index: {name inside the block: spec}}`` of a plan over the blocks under ``prefix``."""
    per_block: dict[int, dict[str, QuantSpec]] = defaultdict(dict)
    for name, spec in plan.items():
        index, _, rel = name[len(prefix) + 1 :].partition(".")
        per_block[int(index)][rel] = spec
    return per_block


def keep_finite(plan: dict[str, QuantSpec], found: dict[str, tuple[int, int]],
                config: SignRoundV2Config) -> dict[str, QuantSpec]:
    """``plan`` less the layers ``found`` with NaN or inf weights (name -> counts) when
    ``config.skip_nonfinite``, which then stay in full precision; otherwise raise naming them.

    Rounding cannot represent NaN or inf: symmetric scales would come out NaN and
    asymmetric zero points out of range, so such a layer must not be quantized silently.
    """
    if not found:
        return plan
    shown = ", ".join(f"{name} ({nan} NaN, {inf} inf)" for name, (nan, inf) in list(found.items())[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    layers = f"{len(found)} layers" if len(found) > 1 else "1 layer"
    if not config.skip_nonfinite:
        raise ValueError(
            f"{layers} {'have' if len(found) > 1 else 'has'} NaN or inf weights, which cannot be quantized: "
            f"{shown}{more}. Repair the checkpoint, or pass skip_nonfinite=True (hf-signround --skip-nonfinite) to "
            "keep such layers in full precision"
        )
    logger.warning("keeping %s with NaN or inf weights in full precision (skip_nonfinite=True): %s%s",
                   layers, shown, more)
    return {name: spec for name, spec in plan.items() if name not in found}


def to_quant_linear(layer: nn.Linear, spec: QuantSpec, scale_dtype: torch.dtype, **tuned: torch.Tensor) -> QuantLinear:
    """Freeze a Linear (with optional tuned ``v``/``alpha``/``beta``) into a packed QuantLinear.

    It runs the reference kernel while the pipeline uses it (the quantized chain's outputs do
    not depend on the machine's kernels); ``quantize_model`` sets the configured backend at the end.
    """
    codes, scales, zeros = quantize_rtn(layer.weight.detach(), spec, scale_dtype=scale_dtype, **tuned)
    bias = None if layer.bias is None else layer.bias.detach()
    return QuantLinear.from_codes(
        codes, scales, zeros, bits=spec.bits, group_size=spec.group_size, sym=spec.sym, bias=bias,
        scale_dtype=scale_dtype, backend="torch",
    )


def quantize_model(
    model: nn.Module,
    config: SignRoundV2Config,
    calibration: torch.Tensor | None = None,
    skip: list[str] | tuple[str, ...] = (),
    scoring: torch.Tensor | None = None,
) -> QuantizationResult:
    """Quantize every eligible Linear of ``model``'s decoder blocks in place.

    Args:
        model: a causal LM made of repeated decoder blocks (resident, or offloaded by accelerate).
        config: the validated config; it is read, never changed.
        calibration: token windows (nsamples, seqlen); needed when ``config.iters > 0``. At ``iters=0``
            the scale search runs on them (unless ``scale_search=False``); without them it is round-to-nearest.
        skip: module names kept in full precision besides ``config.modules_to_not_convert``.
        scoring: token windows for the DeltaLoss scoring when ``config.avg_bits`` is set;
            None takes the first ``sensitivity_nsamples`` calibration windows, cut to
            ``sensitivity_seqlen`` tokens.

    A layer whose weight holds NaN or inf raises before anything changes, naming it, unless
    ``config.skip_nonfinite`` keeps it in full precision (``keep_finite``). With
    ``config.avg_bits`` the layers not pinned by ``layer_config`` get their bits from the
    allocation first (spec §1-2).
    """
    source = ResidentBlocks(model)
    plan = plan_layers(model, config, skip)
    warn_other_block_lists(model, source.prefix)
    found = {f"{source.prefix}.{index}.{rel}": counts for index, specs in group_by_block(plan, source.prefix).items()
             for rel, counts in nonfinite_counts(source.blocks[index], specs).items()}
    result = quantize_source(source, keep_finite(plan, found, config), config, calibration, scoring)
    set_backend(model, config.backend)
    return result


def quantize_source(source, plan: dict[str, QuantSpec], config: SignRoundV2Config,
                    calibration: torch.Tensor | None = None, scoring: torch.Tensor | None = None, *,
                    check_finite: bool = False) -> QuantizationResult:
    """The pipeline over a block source (``blocks``): allocation (``avg_bits``), then the walk.

    ``check_finite``: check each block's weights for NaN and inf as the walk opens it (a
    streamed source, whose weights are read only then); layers kept in full precision leave
    the plan.
    """
    if not plan:
        raise ValueError("every layer to quantize has NaN or inf weights: nothing is left to quantize")
    if config.tunes and calibration is None:
        raise ValueError(config.calibration_error())
    allocation = None
    if config.avg_bits is not None:
        if scoring is None and calibration is not None:
            scoring = calibration[: config.sensitivity_nsamples, : config.sensitivity_seqlen]
        allocation = _allocate(source, plan, config, scoring)
        plan = dict(allocation.specs)
    with frozen(source.model):
        reports = quantize_blocks(source, plan, config, calibration, check_finite=check_finite)
    if not plan:
        raise ValueError("every layer to quantize has NaN or inf weights: nothing is left to quantize")
    logger.info("quantized %d layers in %d blocks", len(plan), len(source))
    return QuantizationResult(plan, realized_avg_bits(source.model, plan, config), reports, allocation)


def realized_avg_bits(model: nn.Module, plan: dict[str, QuantSpec], config: SignRoundV2Config) -> float:
    """Storage bits per quantized weight the packed layers of ``plan`` take (``allocation.layer_bits``)."""
    scale_bits = torch.finfo(getattr(torch, config.scale_dtype)).bits
    shapes = {name: _shape(model.get_submodule(name)) for name in plan}
    total = sum(layer_bits(*shapes[name], spec, scale_bits) for name, spec in plan.items())
    return round(total / sum(n * k for n, k in shapes.values()), 6)


def _allocate(source, plan: dict[str, QuantSpec], config: SignRoundV2Config,
              scoring: torch.Tensor | None) -> Allocation:
    """Spec §1-2: score the layers the user did not pin, then choose their options by DP."""
    model = source.model
    pinned = {name: spec for name, spec in plan.items()
              if {"bits", "group_size"} & set(config.layer_config.get(name, {}))}
    layers = {name: model.get_submodule(name) for name in plan if name not in pinned}
    if not layers:
        raise ValueError("avg_bits is set but layer_config pins every layer: nothing is left to allocate")
    shapes = {name: _shape(model.get_submodule(name)) for name in plan}
    options = [QuantSpec(bits, group, config.sym) for bits, group in config.options]
    scale_dtype = getattr(torch, config.scale_dtype)
    scale_bits = torch.finfo(scale_dtype).bits
    # Costs depend on shapes only: an impossible target fails before any pass over the blocks
    # (the range of totals does not depend on how layers are tied into units).
    check_budget(shapes, [[n] for n in layers], options, config.avg_bits, scale_bits, pinned)
    units = ([[n for n in group if n in layers] for group in shared_input_groups(source, layers, config.compute_device)]
             if config.tie_fused else [[n] for n in layers])
    units = [u for u in units if u]
    method = config.sensitivity_method
    if method == "weight_error":
        scores = weight_error_scores(source, layers, options, scale_dtype, config.compute_device)
    elif scoring is None:
        raise ValueError(
            f"avg_bits with sensitivity_method={method!r} scores layers on calibration data: pass dataset= "
            "(and tokenizer=) in the config, or sensitivity_method='weight_error' for a data-free allocation"
        )
    elif method == "deltaloss_fisher":
        scores = taylor_scores(source, layers, options, scoring, batch_size=config.batch_size, scale_dtype=scale_dtype,
                               device=config.compute_device, scale_search=config.scale_search)
    else:
        anchor = None
        if method == "deltaloss_anchored":  # the dearest option: nearest full precision
            anchor = options[int(unit_costs(shapes, units, options, scale_bits).sum(0).argmax())]
        scores = delta_loss_scores(source, layers, options, scoring, batch_size=config.batch_size,
                                   scale_dtype=scale_dtype, device=config.compute_device, anchor=anchor)
    idle = fill_unrouted_scores(model, scores)
    if idle:
        logger.info("%d expert layers received no scoring token; they take their experts' mean scores", len(idle))
    alloc = allocate(shapes, scores, units, options, config.avg_bits, scale_bits, pinned, method)
    logger.info("sensitivity and chosen bits:\n%s", alloc.table())
    return alloc


def _shape(layer: nn.Module) -> tuple[int, int]:
    return layer.out_features, layer.in_features


def quantize_blocks(source, plan: dict[str, QuantSpec], config: SignRoundV2Config,
                    calibration: torch.Tensor | None, *, check_finite: bool = False) -> dict[str, BlockReport]:
    """The walk: every block in order is opened, quantized (:func:`quantize_block`), given its
    packed layers and stored. With tuning (spec §3 a-d) a float chain and a quantized chain of
    block inputs run side by side. ``plan`` loses the layers ``check_finite`` keeps in float."""
    per_block = group_by_block(plan, source.prefix)
    device = config.compute_device
    call = fp_in = q_in = None
    if calibration is not None and (config.tunes or config.scale_search):
        fp_in, call = source.capture(calibration, device)
        q_in = fp_in  # identical until the first quantized block
    reports = {}
    desc = "tuning blocks" if config.tunes else "scale search" if call is not None else "round-to-nearest"
    progress = tqdm(range(len(source)), desc=desc, unit="block")
    for index in progress:
        name = f"{source.prefix}.{index}"
        with source.open(index, device) as block:
            specs = per_block.get(index, {})
            if check_finite and specs:
                kept = keep_finite({f"{name}.{rel}": s for rel, s in specs.items()},
                                   {f"{name}.{rel}": c for rel, c in nonfinite_counts(block, specs).items()}, config)
                for rel in [rel for rel in specs if f"{name}.{rel}" not in kept]:
                    del specs[rel], plan[f"{name}.{rel}"]
            packed, reports[name], fp_in, q_in = quantize_block(block, specs, config, index, call, fp_in, q_in)
            for rel, layer in packed.items():
                set_module(block, rel, layer)
            restore_conv1d(block)  # a Conv1D kept in full precision is saved as one
            source.store(index, block)
        report = reports[name]
        if report.loss_after is not None:
            progress.set_postfix_str(f"loss {report.loss_before:.3g} -> {report.loss_after:.3g}")
            logger.info("block %d/%d: %d layers (%d experts' layers without a routed token), loss %.4g (first step) "
                        "-> %.4g (kept step); on all windows objective %.4g (start %.4g%s), MSE %.4g (start %.4g)",
                        index + 1, len(source), len(specs), len(report.unrouted), report.loss_before, report.loss_after,
                        report.objective_after, report.objective_start,
                        ": tuning did worse, the start is kept" if report.kept_start else "",
                        report.mse_after, report.mse_start)
        elif report.mse_after is not None:
            logger.info("block %d/%d: %d layers, scale search only; frozen block MSE %.4g", index + 1, len(source),
                        len(specs), report.mse_after)
    if config.tunes and (reverted := sum(r.kept_start for r in reports.values())):
        logger.info("%d of %d blocks kept their start: the tuned parameters did worse on all calibration windows "
                    "(more steps usually help)", reverted, len(reports))
    return reports


def quantize_block(block: nn.Module, specs: dict[str, QuantSpec], config: SignRoundV2Config, index: int,
                   call: BlockCall | None = None, fp_in: torch.Tensor | None = None,
                   q_in: torch.Tensor | None = None):
    """Quantize the layers ``specs`` names in ``block``, leaving the block as it was.

    Without calibration (no ``call``): round-to-nearest. With the chains' inputs given:
    reference outputs, scale search, sign-gradient tuning (``iters > 0``), freezing (spec §3 a-d).

    Returns ``(packed layers by name inside the block, report, fp_out, q_out)``; the outputs
    are the block's on the float chain and, with its packed layers, on the quantized chain
    (``None`` without calibration).
    """
    scale_dtype = getattr(torch, config.scale_dtype)
    if call is None:
        packed = {rel: to_quant_linear(block.get_submodule(rel), spec, scale_dtype) for rel, spec in specs.items()}
        return packed, BlockReport(specs), None, None
    importance = _ImportanceHooks(block, specs) if config.scale_search and specs else None
    fp_out = call.batched(block, fp_in, config.batch_size)
    if not specs:
        q_out = fp_out if q_in is fp_in else call.batched(block, q_in, config.batch_size)
        return {}, BlockReport(specs), fp_out, q_out
    importance = importance.finish() if importance is not None else None
    # An expert no calibration token is routed to sees no input: its scale search weighs every
    # input channel alike, and tuning leaves it at that start (it gets no gradient).
    idle = sorted(rel for rel in specs if importance is not None and rel not in importance)
    if idle:
        logger.info("block %d: %d expert layers received no calibration token (%s, ...): scale search "
                    "without input weights, no tuning", index, len(idle), idle[0])
    tunables = {}
    for rel, spec in specs.items():
        layer = block.get_submodule(rel)
        factor = None
        if importance is not None:
            weights = importance[rel] if rel in importance else torch.ones(layer.in_features, device=layer.weight.device)
            factor = search_factors(layer.weight, spec, weights, scale_dtype)
        tunables[rel] = TunableLinear(layer, spec, factor, scale_dtype)
    loss_before = loss_kept = start = None  # iters=0: the scale search's start is kept as it is
    if config.tunes:
        start = pack(tunables, scale_dtype)
        topk = config.topk_exclusion if config.topk_exclusion is not None else min(s.bits for s in specs.values()) < 4
        amp = config.amp and q_in.dtype == torch.float32 and fast_bf16(q_in.device)
        settings = TuneSettings(config.iters, config.effective_lr, config.batch_size,
                                config.topk_ratio if topk else None, config.topk_mode, config.seed + index, amp)
        with _swapped(block, tunables):
            history = tune_block(block, tunables, call, q_in, fp_out, settings)
        loss_before, loss_kept = history[0], min(history)
    packed = pack(tunables, scale_dtype)
    objective_of = functools.partial(frozen_losses, call=call, inputs=q_in, target=fp_out, batch_size=config.batch_size,
                                     topk_ratio=settings.topk_ratio if config.tunes else None,
                                     topk_mode=config.topk_mode)
    with _swapped(block, packed):
        mse, objective, q_out = objective_of(block)
    mse_start = objective_start = None
    kept_start = False
    if start is not None:
        # The kept step is the lowest *mini-batch* loss, each step's on a different batch; over few
        # large steps that choice can be worse than the start on all windows. Never keep worse, by
        # the objective tuning lowers (by plain MSE, reverted 2-bit blocks made the model worse).
        with _swapped(block, start):
            mse_start, objective_start, start_out = objective_of(block)
        if objective_start < objective:
            kept_start, packed, mse, objective, q_out = True, start, mse_start, objective_start, start_out
        del start_out
    report = BlockReport(specs, loss_before, loss_kept, mse, mse_start, kept_start, idle,
                         objective_after=objective, objective_start=objective_start)
    return packed, report, fp_out, q_out


def pack(tunables: dict[str, TunableLinear], scale_dtype: torch.dtype) -> dict[str, QuantLinear]:
    """Each tunable layer packed with its current rounding offsets and range factors."""
    return {rel: to_quant_linear(t.layer, t.spec, scale_dtype, **{k: v.detach() for k, v in t.quant_args().items()})
            for rel, t in tunables.items()}


@contextmanager
def _swapped(block: nn.Module, modules: dict[str, nn.Module]):
    """``block`` with ``modules`` in place of its own (by name inside the block) while inside."""
    originals = {rel: block.get_submodule(rel) for rel in modules}
    try:
        for rel, module in modules.items():
            set_module(block, rel, module)
        yield block
    finally:
        for rel, module in originals.items():
            set_module(block, rel, module)


class _ImportanceHooks:
    """Σ x_j² over all tokens of each listed Linear's input (spec §3b), gathered by forward hooks."""

    def __init__(self, block: nn.Module, specs: dict[str, QuantSpec]):
        self.sums: dict[str, torch.Tensor] = {}
        self.handles = [block.get_submodule(rel).register_forward_hook(self._hook(rel)) for rel in specs]

    def _hook(self, rel: str):
        def hook(module, args, output):
            x = args[0].detach().float()
            sq = x.reshape(-1, x.shape[-1]).square().sum(0)
            self.sums[rel] = self.sums[rel] + sq if rel in self.sums else sq
        return hook

    def finish(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return self.sums


def replace_with_empty_quant_linears(model: nn.Module, config: SignRoundV2Config) -> None:
    """Swap the Linears a checkpoint lists in ``layer_config`` for empty QuantLinears (pre-quantized load)."""
    scale_dtype = getattr(torch, config.scale_dtype)
    listed = list(config.layer_config)
    convert_layers(model, find_blocks(model)[0], wanted=lambda name: any(n.startswith(name + ".") or n == name
                                                                          for n in listed))
    for name in config.layer_config:
        spec = QuantSpec(**config.layer_spec(name))
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(
                f"the checkpoint's quantization_config lists layer {name}, which this model does not have; "
                "the checkpoint's config.json and weights do not belong together"
            ) from err
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"the checkpoint quantized {name}, but the model has a {type(layer).__name__} there")
        new = QuantLinear(
            layer.in_features,
            layer.out_features,
            bits=spec.bits,
            group_size=spec.group_size,
            sym=spec.sym,
            bias=layer.bias is not None,
            scale_dtype=scale_dtype,
            bias_dtype=layer.weight.dtype,
            device="meta",
            backend=config.backend,
        )
        set_module(model, name, new)
        # The packed tensors load from the checkpoint (check_checkpoint made sure of it): the parent's
        # own weight init must not run, as it may reach for the Linear's weight (GPT-2's c_proj).
        model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = True
