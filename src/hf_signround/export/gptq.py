"""Export a quantized model as a GPTQ v1 checkpoint that serving engines load.

``export_gptq(model, out_dir)`` writes ``config.json`` with ``quant_method: "gptq"`` and
safetensors shards holding, per quantized layer, GPTQ's ``qweight`` / ``qzeros`` / ``scales``
/ ``g_idx`` (layout: :mod:`.gptq_pack`). The conversion is exact, the dequantized weights
are bit-identical to ours:

* codes are repacked from our layout into GPTQ's bit stream (they differ only at 3 bits);
* v1 stores ``zero − 1`` and so cannot hold a zero point of 0 (asymmetric groups whose
  minimum rounds to 0). Such a group is written mirrored: ``s·(q − 0) = (−s)·((maxq − q) − maxq)``;
* a group size that does not divide ``in_features`` (our shorter last group) is written with
  ``gcd(group_size, in_features)``, repeating each scale/zero, since GPTQ loaders (vLLM,
  ExLlama, Marlin) need equal groups;
* layers whose (bits, group_size, sym) differ from the most common one get per-module
  overrides in ``quantization_config["dynamic"]`` (``"+:regex": {...}``), and Linears left in
  full precision inside the blocks get ``"-:regex": {}``: GPTQModel's convention, read by vLLM
  and auto-round. A rule also names vLLM's fused module (``qkv_proj``, ``gate_up_proj``),
  which vLLM matches instead of the separate projections.

What each engine serves is in ``docs/FORMAT.md`` ("GPTQ export").
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..blocks import find_blocks
from ..checkpoint import checkpoint_module_names, stored_names, untied_state_dict
from ..outputs import check_output, staged_output
from ..packing import unpack_qweight_kmajor, unpack_qzeros_nmajor
from ..qlinear import QuantLinear
from ..shards import ShardWriter, format_size
from .gptq_pack import pack_gptq_bitstream, pack_gptq_kmajor

logger = logging.getLogger(__name__)

__all__ = ["REGROUPED_KEY", "GPTQExport", "describe_regrouping", "export_gptq", "gptq_layer_tensors",
           "gptq_quantization_config"]

# In every exported safetensors file's __metadata__: JSON {layer: [our group size, written group size]}
# for the layers written with a smaller group; GPTQ's config only knows the written one.
REGROUPED_KEY = "hf_signround_regrouped"

# vLLM fuses these projections into one module and needs one scheme for all of them.
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class GPTQExport:
    """What :func:`export_gptq` wrote."""

    path: Path
    quantization_config: dict
    files: list[str]
    regrouped: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (our group, written group)
    mirrored_groups: int = 0  # asymmetric groups with zero point 0, written with a negated scale


def gptq_layer_tensors(layer: QuantLinear) -> tuple[dict[str, torch.Tensor], dict]:
    """GPTQ v1 tensors of one packed layer and the (bits, group_size, sym) they are written with.

    Returns ``({"qweight", "qzeros", "scales", "g_idx"[, "bias"]}, spec)``; the spec also
    holds ``"mirrored"``, the number of groups written with a negated scale.
    """
    k, n, bits, maxq = layer.in_features, layer.out_features, layer.bits, 2**layer.bits - 1
    _check_shape(layer)
    scales = layer.scales.float()  # (G, N)
    if layer.sym:
        zeros = torch.full_like(scales, float(2 ** (bits - 1)))
    else:
        zeros = unpack_qzeros_nmajor(layer.qzeros, bits, n).T.float()  # (G, N)

    group = layer.group_size
    if group != -1 and k % group:
        # Our last group is shorter; split every group into gcd-sized ones sharing its scale.
        written = math.gcd(group, k)
        source = torch.arange(k // written, device=scales.device) * written // group
        scales, zeros, group = scales[source], zeros[source], written
    g_idx = torch.zeros(k, dtype=torch.int32) if group == -1 else torch.arange(k, dtype=torch.int32) // group

    mirror = zeros == 0  # (G, N); only possible when asymmetric
    stored = layer.stored_qweight()  # also while a CPU kernel holds the weights in its own form
    if bits != 3 and not mirror.any():
        qweight = stored.detach().clone()  # 2/4/8 bits, K % 32 == 0: GPTQ's words are ours
    else:
        codes = unpack_qweight_kmajor(stored, bits, k)  # (N, K)
        if mirror.any():
            scales = torch.where(mirror, -scales, scales)
            zeros = torch.where(mirror, float(maxq), zeros)
            codes = torch.where(mirror[g_idx.long()].T, maxq - codes, codes)
        qweight = pack_gptq_kmajor(codes, bits)

    half = scales.to(torch.float16)
    if not torch.equal(half.float(), scales):
        logger.warning("scales are stored as %s; GPTQ keeps float16, so they are rounded (outputs change slightly)",
                       layer.scales.dtype)
    tensors = {
        "qweight": qweight,
        "qzeros": pack_gptq_bitstream((zeros - 1).to(torch.int64), bits),  # (G, N·bits/32), v1: zero − 1
        "scales": half.contiguous(),
        "g_idx": g_idx,
    }
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach().clone()
    spec = {"bits": bits, "group_size": group, "sym": layer.sym, "mirrored": int(mirror.sum())}
    return tensors, spec


def _check_shape(layer: QuantLinear) -> None:
    k, n = layer.in_features, layer.out_features
    if k % 32 or n % 32:
        raise ValueError(
            f"GPTQ needs in_features and out_features divisible by 32, this layer is {k} -> {n}: keep it in full "
            "precision (modules_to_not_convert) to export it, or save in the hf_signround format"
        )


def _unit(name: str, names: set[str]) -> tuple[list[str], str]:
    """The layers vLLM serves as one module with ``name``, and a regex matching all their names."""
    parent, _, leaf = name.rpartition(".")
    for fused, shards in FUSED_MODULES.items():
        members = [f"{parent}.{s}" for s in shards]
        if leaf in shards and all(m in names for m in members):
            return members, rf"{re.escape(parent)}\.({'|'.join((*shards, fused))})$"
    return [name], rf"{re.escape(name)}$"


def gptq_quantization_config(
    specs: dict[str, dict], float_layers: list[str], numels: dict[str, int], block_prefix: str
) -> dict:
    """The ``quantization_config`` of a GPTQ checkpoint holding ``specs`` (layer -> bits/group_size/sym).

    The global scheme is the one covering the most weights; the other layers, and the
    ``float_layers`` inside the blocks, become ``dynamic`` rules.
    """
    weight = Counter()
    for name, spec in specs.items():
        weight[(spec["bits"], spec["group_size"], spec["sym"])] += numels[name]
    bits, group_size, sym = weight.most_common(1)[0][0]
    default = {"bits": bits, "group_size": group_size, "sym": sym}

    names = set(specs) | set(float_layers)
    dynamic: dict[str, dict] = {}
    done: set[str] = set()
    for name in [*specs, *float_layers]:
        if name in done:
            continue
        members, pattern = _unit(name, names)
        done.update(members)
        schemes = {json.dumps(specs.get(m)) for m in members}
        if len(schemes) > 1:
            logger.warning(
                "%s are quantized differently (%s); vLLM fuses them into one module and will refuse this "
                "checkpoint (other GPTQ loaders are fine). Quantize them alike (tie_fused=True) to serve with vLLM",
                ", ".join(members), "; ".join(sorted(schemes)))
            pairs = [(m, rf"{re.escape(m)}$") for m in members]
        else:
            pairs = [(members[0], pattern)]
        for member, regex in pairs:
            spec = specs.get(member)
            if spec is None:
                dynamic[f"-:{regex}"] = {}
            elif spec != default:
                dynamic[f"+:{regex}"] = dict(spec)

    relative = sorted({n[len(block_prefix) + 1 :].split(".", 1)[1] for n in specs})
    from .. import __version__

    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        **default,
        "desc_act": False,
        "static_groups": False,
        "true_sequential": True,
        "lm_head": False,
        "damp_percent": 0.01,
        "modules_in_block_to_quantize": [relative],
        "dynamic": dynamic,
        # Not GPTQModel's "meta" key: transformers takes a "meta" to mean the v2 zero-point format.
        "provider": "hf-signround",
        "provider_version": __version__,
    }


def _tensors(model: nn.Module, qlayers: dict[str, QuantLinear], keep: set[str]):
    """(name, CPU tensor) for every tensor to write, module by module: a QuantLinear's GPTQ
    tensors with its spec, other modules' kept parameters and buffers (offloaded ones brought in)."""
    from accelerate.utils import align_module_device, has_offloaded_params

    for prefix, module in model.named_modules():
        if prefix in qlayers:
            yield prefix, *gptq_layer_tensors_on_cpu(module, prefix)
            continue
        own = [k for k, t in [*module._parameters.items(), *module._buffers.items()]
               if t is not None and (f"{prefix}.{k}" if prefix else k) in keep]
        if not own:
            continue
        with align_module_device(module, torch.device("cpu")) if has_offloaded_params(module) else nullcontext():
            tensors = {(f"{prefix}.{k}" if prefix else k): getattr(module, k).detach().to("cpu") for k in own}
        yield prefix, tensors, None


def export_gptq(model: nn.Module, save_directory: str | Path, max_shard_size: int | str = "5GB",
                overwrite: bool = True) -> GPTQExport:
    """Write ``model`` (quantized by hf_signround) as a GPTQ v1 checkpoint in ``save_directory``.

    Weights are converted and written one layer at a time (offloaded layers are brought in
    one by one), so the export needs about one shard of extra memory. The tokenizer is not
    written: save it next to the weights yourself (the CLI does).

    ``save_directory`` is written whole (``outputs.staged_output``): into a temporary folder
    beside it that replaces it once complete. It may not be, hold or lie inside the folder
    the model was loaded from; ``overwrite=False`` refuses one that is not empty.
    """
    out = check_output(save_directory, sources=(_loaded_from(model),), overwrite=overwrite)
    qlayers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not qlayers:
        raise ValueError(
            f"{type(model).__name__} has no QuantLinear layers: quantize it first (quantization_config="
            "SignRoundV2Config(...)) or load a saved hf_signround checkpoint"
        )
    for name, layer in qlayers.items():  # fail before writing anything
        try:
            _check_shape(layer)
        except ValueError as err:
            raise ValueError(f"cannot export {name} to GPTQ: {err}") from err
    with staged_output(out, overwrite=overwrite) as stage:
        result = _write_gptq(model, qlayers, stage, max_shard_size)
    result.path = out
    return result


def _loaded_from(model: nn.Module) -> Path | None:
    """The local folder ``model`` was loaded from, if any (an export must not overwrite it)."""
    config = getattr(model, "config", None)
    for where in (getattr(model, "name_or_path", None), getattr(config, "_name_or_path", None)):
        if where and Path(where).expanduser().is_dir():
            return Path(where).expanduser()
    return None


def _write_gptq(model: nn.Module, qlayers: dict[str, QuantLinear], out: Path, max_shard_size: int | str) -> GPTQExport:
    writer = ShardWriter(out, max_shard_size)
    prefix, _ = find_blocks(model)
    # The checkpoint's own names, as save_pretrained writes them (Mixtral's block_sparse_moe.experts.{e}.w1)
    named = checkpoint_module_names(model, [prefix, *qlayers])
    float_layers = [named.get(n, n) for n, m in model.named_modules()
                    if isinstance(m, nn.Linear) and n.startswith(prefix + ".")]

    keep = set(untied_state_dict(model))
    specs: dict[str, dict] = {}
    result = GPTQExport(out, {}, [])
    progress = tqdm(total=len(qlayers), desc="GPTQ export", unit="layer")
    for owner, tensors, spec in _tensors(model, qlayers, keep):
        if spec is not None:
            progress.update()
            result.mirrored_groups += spec.pop("mirrored")
            if spec["group_size"] != qlayers[owner].group_size:
                result.regrouped[named[owner]] = (qlayers[owner].group_size, spec["group_size"])
            specs[named[owner]] = spec
            tensors = {f"{owner}.{k}": t for k, t in tensors.items()}
        for key, t in stored_names(model, tensors).items():
            writer.add(key, t)
    progress.close()
    result.files = writer.close({REGROUPED_KEY: json.dumps(result.regrouped)} if result.regrouped else None)
    total = writer.total_bytes

    numels = {named[n]: m.in_features * m.out_features for n, m in qlayers.items()}
    result.quantization_config = gptq_quantization_config(specs, float_layers, numels, named[prefix])
    config = copy.deepcopy(model.config)
    config.quantization_config = result.quantization_config
    config.save_pretrained(out)
    # AutoGPTQ-era loaders (and vLLM's fallback) read this file.
    (out / "quantize_config.json").write_text(json.dumps(result.quantization_config, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    result.files += ["config.json", "quantize_config.json"]
    if result.regrouped:
        in_features = {named[name]: layer.in_features for name, layer in qlayers.items() if named[name] in result.regrouped}
        logger.info("GPTQ export: %s", describe_regrouping(result.regrouped, in_features))
    logger.info("GPTQ export: %d layers, %s", len(specs), format_size(total))
    return result


def describe_regrouping(regrouped: dict[str, tuple[int, int]], in_features: dict[str, int]) -> str:
    """``"180 layers written with group size 64 (G128 does not divide in_features 576; GPTQ kernels need equal
    groups)"``, one clause per (our group size, written group size); ``regrouped``: layer -> that pair."""
    widths: dict[tuple[int, int], list[int]] = {}
    for name, pair in regrouped.items():
        widths.setdefault(tuple(pair), []).append(in_features[name])
    return "; ".join(
        f"{len(ks)} layers written with group size {written} (G{ours} does not divide in_features "
        f"{', '.join(map(str, sorted(set(ks))))}; GPTQ kernels need equal groups)"
        for (ours, written), ks in widths.items())


def gptq_layer_tensors_on_cpu(layer: QuantLinear, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`gptq_layer_tensors` for a layer anywhere (GPU, CPU, offloaded); errors name the layer."""
    from accelerate.utils import align_module_device, has_offloaded_params

    try:
        if has_offloaded_params(layer):
            with align_module_device(layer, torch.device("cpu")):
                return gptq_layer_tensors(_on_cpu(layer))
        return gptq_layer_tensors(_on_cpu(layer))
    except ValueError as err:
        raise ValueError(f"cannot export {name} to GPTQ: {err}") from err


def _on_cpu(layer: QuantLinear) -> QuantLinear:
    if all(p.device.type == "cpu" for p in layer.parameters()):
        return layer
    return copy.deepcopy(layer).to("cpu")
