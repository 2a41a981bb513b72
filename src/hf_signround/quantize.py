"""``quantize_model``: the SignRoundV2 pipeline as one readable function.

Spec: ``shared/SIGNROUNDV2.md``, "Pipeline". Every layer is planned and validated before
the model is touched, so a bad setting never leaves a half-quantized model behind.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import find_blocks, quantizable_layers, set_module
from .config import SignRoundV2Config
from .qfunc import QuantSpec, quantize_rtn
from .qlinear import QuantLinear

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


def to_quant_linear(layer: nn.Linear, spec: QuantSpec, scale_dtype: torch.dtype, **tuned: torch.Tensor) -> QuantLinear:
    """Freeze a Linear (with optional tuned ``v``/``alpha``/``beta``) into a packed QuantLinear."""
    codes, scales, zeros = quantize_rtn(layer.weight.detach(), spec, scale_dtype=scale_dtype, **tuned)
    bias = None if layer.bias is None else layer.bias.detach()
    return QuantLinear.from_codes(
        codes, scales, zeros, bits=spec.bits, group_size=spec.group_size, sym=spec.sym, bias=bias, scale_dtype=scale_dtype
    )


def quantize_model(
    model: nn.Module,
    config: SignRoundV2Config,
    calibration: torch.Tensor | None = None,
    skip: list[str] | tuple[str, ...] = (),
) -> dict[str, QuantSpec]:
    """Quantize every eligible Linear of ``model``'s decoder blocks in place.

    Args:
        model: a causal LM made of repeated decoder blocks.
        config: the validated config; its ``layer_config`` is rewritten to list every
            quantized layer, so a saved checkpoint says exactly what it holds.
        calibration: token windows (nsamples, seqlen); needed when ``config.iters > 0``.
        skip: module names kept in full precision besides ``config.modules_to_not_convert``.

    Returns the plan: layer name -> QuantSpec.
    """
    plan = plan_layers(model, config, skip)
    if config.needs_calibration and calibration is None:
        raise ValueError(f"iters={config.iters} tunes on calibration data: pass dataset= (and tokenizer=) in the config")
    scale_dtype = getattr(torch, config.scale_dtype)
    prefix, blocks = find_blocks(model)
    per_block: dict[int, list[str]] = defaultdict(list)
    for name in plan:
        per_block[int(name[len(prefix) + 1 :].split(".", 1)[0])].append(name)

    progress = tqdm(range(len(blocks)), desc="quantizing blocks", unit="block", disable=not per_block)
    for index in progress:
        for name in per_block.get(index, []):
            set_module(model, name, to_quant_linear(model.get_submodule(name), plan[name], scale_dtype))
        logger.debug("block %d/%d: %d layers round-to-nearest", index + 1, len(blocks), len(per_block.get(index, [])))

    config.layer_config = {
        name: {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym} for name, spec in plan.items()
    }
    logger.info("quantized %d layers in %d blocks", len(plan), len(blocks))
    return plan


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
        )
        set_module(model, name, new)
