"""``quantize_model``: the SignRoundV2 pipeline as one readable function.

Spec: ``shared/SIGNROUNDV2.md``, "Pipeline". Every layer is planned and validated before
the model is touched, so a bad setting never leaves a half-quantized model behind.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import (
    block_on,
    capture_block_inputs,
    find_blocks,
    nonfinite_counts,
    quantizable_layers,
    set_module,
    to_device,
    warn_other_block_lists,
)
from .config import SignRoundV2Config
from .qfunc import QuantSpec, quantize_rtn
from .qlinear import QuantLinear, set_backend
from .allocation import allocate, check_budget, unit_costs
from .scale_search import search_factors
from .sensitivity import delta_loss_scores, shared_input_groups, taylor_scores, weight_error_scores
from .tuning import BlockCall, TunableLinear, TuneSettings, fast_bf16, mse_and_outputs, tune_block

logger = logging.getLogger(__name__)


def plan_layers(model: nn.Module, config: SignRoundV2Config, skip: list[str] | tuple[str, ...] = ()) -> dict[str, QuantSpec]:
    """The QuantSpec of every layer to quantize; raises before anything changes."""
    skip = list(skip) + list(config.modules_to_not_convert or [])
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
) -> dict[str, BlockReport]:
    """Quantize every eligible Linear of ``model``'s decoder blocks in place.

    Args:
        model: a causal LM made of repeated decoder blocks.
        config: the validated config; its ``layer_config`` is rewritten to list every
            quantized layer, so a saved checkpoint says exactly what it holds.
        calibration: token windows (nsamples, seqlen); needed when ``config.iters > 0``.
        skip: module names kept in full precision besides ``config.modules_to_not_convert``.
        scoring: token windows for the DeltaLoss scoring when ``config.avg_bits`` is set;
            None takes the first ``sensitivity_nsamples`` calibration windows, cut to
            ``sensitivity_seqlen`` tokens.

    A layer whose weight holds NaN or inf raises before anything changes, naming it, unless
    ``config.skip_nonfinite`` keeps it in full precision (``keep_finite``).

    With ``config.avg_bits`` the layers not pinned by ``layer_config`` get their bits from
    the allocation first (spec §1-2); ``config.realized_avg_bits`` and ``config.allocation``
    (the per-layer report) are set.

    Returns a report per block (its layers' specs and, when tuned, the reconstruction
    loss before and after tuning).
    """
    plan = plan_layers(model, config, skip)
    prefix, blocks = find_blocks(model)
    warn_other_block_lists(model, prefix)
    found = {f"{prefix}.{index}.{rel}": counts for index, specs in group_by_block(plan, prefix).items()
             for rel, counts in nonfinite_counts(blocks[index], specs).items()}
    plan = keep_finite(plan, found, config)
    if not plan:
        raise ValueError("every layer to quantize has NaN or inf weights: nothing is left to quantize")
    if config.tunes and calibration is None:
        raise ValueError(f"iters={config.iters} tunes on calibration data: pass dataset= (and tokenizer=) in the config")
    if config.avg_bits is not None:
        plan = _allocate(model, plan, config, scoring if scoring is not None else _scoring_from(calibration, config))
    per_block = group_by_block(plan, prefix)

    if config.tunes:
        reports = _tune_blocks(model, blocks, per_block, config, calibration)
    else:
        reports = _round_blocks(blocks, per_block, config)
    config.layer_config = {
        name: {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym} for name, spec in plan.items()
    }
    set_backend(model, config.backend)
    logger.info("quantized %d layers in %d blocks", len(plan), len(blocks))
    return {f"{prefix}.{i}": report for i, report in reports.items()}


def _scoring_from(calibration: torch.Tensor | None, config: SignRoundV2Config) -> torch.Tensor | None:
    if calibration is None:
        return None
    return calibration[: config.sensitivity_nsamples, : config.sensitivity_seqlen]


def _allocate(model: nn.Module, plan: dict[str, QuantSpec], config: SignRoundV2Config,
              scoring: torch.Tensor | None) -> dict[str, QuantSpec]:
    """Spec §1-2: score the layers the user did not pin, then choose their options by DP."""
    pinned = {name: spec for name, spec in plan.items()
              if {"bits", "group_size"} & set(config.layer_config.get(name, {}))}
    layers = {name: model.get_submodule(name) for name in plan if name not in pinned}
    if not layers:
        raise ValueError("avg_bits is set but layer_config pins every layer: nothing is left to allocate")
    shapes = {name: _shape(model.get_submodule(name)) for name in plan}
    options = [QuantSpec(bits, group, config.sym) for bits, group in config.options]
    scale_dtype = getattr(torch, config.scale_dtype)
    scale_bits = torch.finfo(scale_dtype).bits
    units = ([[n for n in group if n in layers] for group in shared_input_groups(model, layers)]
             if config.tie_fused else [[n] for n in layers])
    units = [u for u in units if u]
    # Costs depend on shapes only: an impossible target fails before any scoring work.
    check_budget(shapes, units, options, config.avg_bits, scale_bits, pinned)
    if config.sensitivity_method == "weight_error":
        scores = weight_error_scores(layers, options, scale_dtype)
    else:
        if scoring is None:
            raise ValueError(
                f"avg_bits with sensitivity_method={config.sensitivity_method!r} scores layers on calibration data: pass dataset= "
                "(and tokenizer=) in the config, or sensitivity_method='weight_error' for a data-free allocation"
            )
        if config.sensitivity_method == "deltaloss_fisher":
            scores = taylor_scores(model, layers, options, scoring, batch_size=config.batch_size,
                                   scale_dtype=scale_dtype, device=config.compute_device,
                                   scale_search=config.scale_search)
        else:
            anchor = None
            if config.sensitivity_method == "deltaloss_anchored":  # the dearest option: nearest full precision
                anchor = options[int(unit_costs(shapes, units, options, scale_bits).sum(0).argmax())]
            scores = delta_loss_scores(model, layers, options, scoring, batch_size=config.batch_size,
                                       scale_dtype=scale_dtype, device=config.compute_device, anchor=anchor)
    alloc = allocate(shapes, scores, units, options, config.avg_bits, scale_bits, pinned, config.sensitivity_method)
    logger.info("sensitivity and chosen bits:\n%s", alloc.table())
    config.realized_avg_bits = round(alloc.realized, 6)
    config.allocation = alloc
    return alloc.specs


def _shape(layer: nn.Module) -> tuple[int, int]:
    return layer.out_features, layer.in_features


@dataclass
class BlockReport:
    specs: dict[str, QuantSpec]
    loss_before: float | None = None  # tuning loss of the first step (the searched or min-max start)
    loss_after: float | None = None  # tuning loss of the kept (lowest) step
    mse_after: float | None = None  # plain MSE of the frozen block over all calibration windows


def _round_blocks(blocks: nn.ModuleList, per_block: dict[int, dict[str, QuantSpec]], config: SignRoundV2Config):
    scale_dtype = getattr(torch, config.scale_dtype)
    reports = {}
    for index in tqdm(range(len(blocks)), desc="round-to-nearest", unit="block", disable=not per_block):
        specs = per_block.get(index, {})
        if specs:
            with block_on(blocks[index], config.compute_device) as block:
                for rel, spec in specs.items():
                    set_module(block, rel, to_quant_linear(block.get_submodule(rel), spec, scale_dtype))
        reports[index] = BlockReport(specs)
    return reports


def _tune_blocks(model, blocks, per_block, config: SignRoundV2Config, calibration: torch.Tensor):
    """Spec §3 a-d, block after block, with a float chain and a quantized chain side by side."""
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    try:
        device = config.compute_device
        hidden, args, kwargs = capture_block_inputs(model, blocks, calibration)
        hidden, call = hidden.to(device), BlockCall(*to_device((args, kwargs), device))
        fp_in = q_in = hidden  # identical until the first quantized block
        reports = {}
        progress = tqdm(range(len(blocks)), desc="tuning blocks", unit="block")
        for index in progress:
            with block_on(blocks[index], device) as block:
                reports[index], fp_in, q_in = _tune_block(block, per_block.get(index, {}), call, fp_in, q_in,
                                                          config, index)
            if reports[index].loss_after is not None:
                before, after = reports[index].loss_before, reports[index].loss_after
                progress.set_postfix_str(f"loss {before:.3g} -> {after:.3g}")
                logger.info("block %d/%d: %d layers, loss %.4g (first step) -> %.4g (kept step); frozen block MSE %.4g",
                            index + 1, len(blocks), len(reports[index].specs), before, after, reports[index].mse_after)
        return reports
    finally:
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)


def _tune_block(block, specs, call: BlockCall, fp_in, q_in, config: SignRoundV2Config, index: int):
    """One block: reference outputs, scale search, tuning, freezing. Returns (report, fp_out, q_out)."""
    importance = _ImportanceHooks(block, specs) if config.scale_search and specs else None
    fp_out = call.batched(block, fp_in, config.batch_size)
    if not specs:
        q_out = fp_out if q_in is fp_in else call.batched(block, q_in, config.batch_size)
        return BlockReport(specs), fp_out, q_out
    importance = importance.finish() if importance is not None else None
    scale_dtype = getattr(torch, config.scale_dtype)
    tunables = {}
    for rel, spec in specs.items():
        layer = block.get_submodule(rel)
        factor = search_factors(layer.weight, spec, importance[rel], scale_dtype) if importance else None
        tunables[rel] = TunableLinear(layer, spec, factor, scale_dtype)
        set_module(block, rel, tunables[rel])
    topk = config.topk_exclusion if config.topk_exclusion is not None else min(s.bits for s in specs.values()) < 4
    amp = config.amp and q_in.dtype == torch.float32 and fast_bf16(q_in.device)
    settings = TuneSettings(config.iters, config.effective_lr, config.batch_size,
                            config.topk_ratio if topk else None, config.topk_mode, config.seed + index, amp)
    history = tune_block(block, tunables, call, q_in, fp_out, settings)
    for rel, tunable in tunables.items():
        frozen = {k: v.detach() for k, v in tunable.quant_args().items()}
        set_module(block, rel, to_quant_linear(tunable.layer, tunable.spec, scale_dtype, **frozen))
    mse, q_out = mse_and_outputs(block, call, q_in, fp_out, config.batch_size)
    return BlockReport(specs, history[0], min(history), mse), fp_out, q_out


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
