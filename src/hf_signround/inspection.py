"""What a quantized checkpoint holds, read from its config.json and safetensors headers alone.

:func:`inspect_checkpoint` gives every quantized layer's bits, group size, symmetry and stored
bytes, and the realised average bits per weight (codes, scales and zero points, as
``allocation.layer_bits`` prices them), for hf_signround checkpoints and GPTQ exports. No
weight is loaded. Errors raise ``FileNotFoundError`` (a missing file), ``CheckpointError`` (a
damaged one) or ``ValueError`` (a checkpoint of another kind), naming the file and the fix.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from .shards import CheckpointError, read_header

logger = logging.getLogger(__name__)

__all__ = ["inspect_checkpoint", "quant_method", "read_config"]


def read_config(folder: Path) -> dict:
    """A checkpoint folder's config.json; errors name the file and the fix."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: give the folder a quantized checkpoint was saved to")
    try:
        config = json.loads(path.read_bytes())
    except ValueError as err:  # JSON or UTF-8
        raise CheckpointError(f"{path} is not valid JSON ({err}): the file is damaged; re-download or re-save the "
                              "checkpoint") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object: the file is damaged; re-download or re-save the "
                              "checkpoint")
    return config


def quant_method(folder: str | Path) -> str | None:
    """The ``quant_method`` of a folder's config.json; None for a float model or a folder without one."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        return None
    return (read_config(path).get("quantization_config") or {}).get("quant_method")


def _tensor_headers(folder: Path) -> tuple[dict[str, tuple[tuple[int, ...], int]], dict[str, str]]:
    """name -> (shape, bytes) of every tensor in the folder's safetensors, and their metadata, read from
    the headers only."""
    tensors, metadata = {}, {}
    for path in sorted(folder.glob("*.safetensors")):
        header = read_header(path)
        tensors.update({name: (info.shape, info.end - info.start) for name, info in header.tensors.items()})
        metadata.update(header.metadata)
    return tensors, metadata


def _natural(name: str) -> list[str | int]:
    """Sort key putting model.layers.2 before model.layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def inspect_checkpoint(folder: Path) -> dict[str, Any]:
    """Per-layer bits, group size, bytes and the realised average bits of a quantized checkpoint.

    Reads config.json and the safetensors headers only (no weights are loaded); works for
    hf_signround checkpoints and GPTQ exports.
    """
    folder = Path(folder)
    qc = read_config(folder).get("quantization_config")
    if not qc:
        raise ValueError(f"{folder} holds an unquantized model (config.json has no quantization_config); "
                         "quantize it with `hf-signround quantize`")
    method = qc.get("quant_method")
    if method not in ("signround_v2", "gptq"):
        raise ValueError(f"{folder} is quantized with {method!r}; inspect reads signround_v2 and gptq checkpoints")
    headers, metadata = _tensor_headers(folder)
    if not headers:
        raise FileNotFoundError(f"{folder} holds no .safetensors files")
    layers = sorted({k.rpartition(".")[0] for k in headers if k.endswith(".qweight")}, key=_natural)
    shapes = _linear_shapes(folder)
    per_layer = {}
    for name in layers:
        n, k = shapes[name]
        if method == "signround_v2":
            spec = {**{key: qc[key] for key in ("bits", "group_size", "sym")}, **qc["layer_config"].get(name, {})}
        else:
            rows, groups = headers[f"{name}.qweight"][0][0], headers[f"{name}.scales"][0][0]
            spec = _gptq_spec(qc, name, bits=rows * 32 // k, groups=groups, in_features=k)
        size = sum(headers[f"{name}.{t}"][1] for t in ("qweight", "scales", "qzeros") if f"{name}.{t}" in headers)
        per_layer[name] = {**spec, "out_features": n, "in_features": k, "bytes": size, "avg_bits": 8 * size / (n * k)}
    params = sum(r["out_features"] * r["in_features"] for r in per_layer.values())
    quantized = sum(r["bytes"] for r in per_layer.values())
    schemes: dict[str, int] = {}
    for r in per_layer.values():
        label = f"W{r['bits']}G{r['group_size']} {'sym' if r['sym'] else 'asym'}"
        schemes[label] = schemes.get(label, 0) + 1
    return {
        "format": "hf_signround" if method == "signround_v2" else "gptq",
        "layers": len(per_layer), "params": params,
        "schemes": dict(sorted(schemes.items(), key=lambda item: -item[1])),  # the most common first
        "avg_bits": 8 * quantized / params if params else 0.0,
        "config_realized_avg_bits": qc.get("realized_avg_bits"), "target_avg_bits": qc.get("avg_bits"),
        "quantized_bytes": quantized, "checkpoint_bytes": sum(b for _, b in headers.values()),
        "regrouped": _regrouped(metadata) if method == "gptq" else {},
        "per_layer": per_layer,
    }


def _regrouped(metadata: dict[str, str]) -> dict[str, list[int]]:
    """A GPTQ export's layers written with a smaller group size: layer -> [our group size, written one]."""
    from .export.gptq import REGROUPED_KEY

    try:
        return json.loads(metadata.get(REGROUPED_KEY, "{}"))
    except ValueError:  # written by someone else, or damaged: the tensors themselves are what counts
        logger.warning("ignoring an unreadable %s entry in the safetensors metadata", REGROUPED_KEY)
        return {}


def _linear_shapes(folder: Path) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every Linear under the checkpoint's names, from the architecture
    built on the meta device (fused experts and Conv1D split into Linears as quantizing does)."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from .blocks import find_blocks
    from .checkpoint import checkpoint_module_names
    from .convert import convert_layers

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    convert_layers(model, find_blocks(model)[0])
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    stored = checkpoint_module_names(model, linears)
    return {stored[name]: (m.out_features, m.in_features) for name, m in linears.items()}


def _gptq_spec(qc: dict, name: str, bits: int, groups: int, in_features: int) -> dict:
    """A GPTQ layer's scheme: sym and group size from the first matching rule (else the global ones),
    bits from its tensors. The tensors hold ``groups`` groups, which cannot tell a group as wide as
    the layer from one group per channel; a rule the tensors contradict gives way to them."""
    spec = {"sym": qc.get("sym", True), "group_size": qc.get("group_size", -1)}
    for pattern, override in (qc.get("dynamic") or {}).items():
        if pattern.startswith("+:") and re.match(pattern[2:], name):
            spec.update({key: override[key] for key in spec if key in override})
            break
    group = spec["group_size"]
    if groups != (1 if group == -1 else -(-in_features // group)):
        spec["group_size"] = -1 if groups == 1 else in_features // groups
    return {"bits": bits, **spec}
