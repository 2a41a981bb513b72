"""Checkpoint tensor names and checks: the one module that uses transformers' private loading API
(its renaming rules, ``conversion_mapping``, ``core_model_loading`` and the tied-weight pruning
of ``modeling_utils``; re-check them when transformers changes).

Check a checkpoint's safetensors against the model they are about to load into, from the headers alone.

transformers fills a tensor the checkpoint lacks with fresh initialisation, casts a tensor
stored in another dtype and skips one the model does not expect, then only reports it.
For a damaged or hand-edited quantized checkpoint that means different values loaded
without an error. So before any weight loads, the adapter (``hf_quantizer.py``) checks:

* every file's header (``shards.read_header``): a truncated or damaged file fails naming it;
* every parameter the model skeleton expects, packed or not, is stored; every stored tensor
  the model expects has its shape, packed ones (``qweight``, ``qzeros``, ``scales``) their
  exact dtype, the others a float dtype where the model's is float (a float stored as
  another float is cast, as transformers always does);
* no packed tensor is stored that the config does not account for (``qzeros`` of a layer
  the config calls symmetric would be skipped: the values would differ);
* the layout fingerprint that save wrote into every file's ``__metadata__`` matches
  config.json's quantization_config: a ``group_size`` edited from 32 to 48 keeps every
  shape of a 64-wide layer (two groups either way) and no shape check can see it.

Names are compared after transformers' renaming rules (e.g. GPT-NeoX's ``embed_out`` is
the model's ``lm_head``); tied weights need only one of the pair stored.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from torch import nn

from .shards import TORCH_DTYPES, CheckpointError, Header, TensorInfo, read_header

__all__ = ["LAYOUT_KEY", "check_checkpoint", "checkpoint_module_names", "checkpoint_renamer", "expert_checkpoint_names",
           "layout_fingerprint", "stored_names", "untied_state_dict", "without_merges_into_split_experts"]

LAYOUT_KEY = "hf_signround_layout"  # in every safetensors file's __metadata__
PACKED = ("qweight", "qzeros", "scales")
_SHOWN = 5  # problems listed in one error
_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def checkpoint_renamer(model: nn.Module) -> Callable[[str], tuple[str, bool]]:
    """Checkpoint tensor name -> (the model's name, whether a converter merges or splits it),
    by the rules ``from_pretrained`` applies to ``model`` (``SignRoundV2HfQuantizer`` drops the
    converters that would merge the per-expert tensors of experts ``convert`` split)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = model.state_dict()

    def rename(key: str) -> tuple[str, bool]:
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if converted is not None:  # per-expert tensors of experts convert.py split load as they are
            plain, _ = rename_source_key(key, renamings, [], model.base_model_prefix, meta_state)
            if plain in meta_state:
                return plain, False
        return name, converted is not None

    return rename


def stored_names(model: nn.Module, tensors: dict) -> dict:
    """``tensors`` under the checkpoint's names, the model's turned back as ``save_pretrained`` does."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


def checkpoint_module_names(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """The model's module name -> the checkpoint's (``stored_names`` on a module's tensor)."""
    import torch

    probe = torch.empty(0)
    return {name: next(iter(stored_names(model, {f"{name}.qweight": probe})))[: -len(".qweight")] for name in names}


def expert_checkpoint_names(model: nn.Module) -> tuple[str, str, str] | None:
    """The checkpoint's per-expert names of the gate, up and down projections (``("w1", "w3", "w2")``
    for Mixtral): the sources ``model``'s conversion mapping merges into ``experts.gate_up_proj``
    and ``experts.down_proj``. None when it merges no experts."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    def leaf(pattern: str) -> str | None:  # ".experts.*.w1.weight" -> "w1"
        parts = pattern.strip(".").split(".")
        rest = parts[parts.index("*") + 1 :] if "*" in parts else []
        return rest[0] if len(rest) == 2 and rest[1] == "weight" else None

    gate = up = down = None
    for t in get_model_conversion_mapping(model):
        if not isinstance(t, WeightConverter):
            continue
        targets = [p.rstrip("$") for p in t.target_patterns]
        leaves = [leaf(p) for p in t.source_patterns]
        if any(p.endswith("experts.gate_up_proj") for p in targets) and len(leaves) == 2 and all(leaves):
            gate, up = leaves
        elif any(p.endswith("experts.down_proj") for p in targets) and len(leaves) == 1 and leaves[0]:
            down = leaves[0]
    return (gate, up, down) if gate and up and down and len({gate, up, down}) == 3 else None


def without_merges_into_split_experts(conversions: list, model: nn.Module) -> list:
    """``conversions`` less the converters whose target ``model`` does not have because ``convert``
    split it (``experts.gate_up_proj``): the per-expert tensors they would merge load as they are."""
    from transformers.core_model_loading import WeightConverter

    params = "\n".join(name for name, _ in model.named_parameters())

    def split_target(t) -> bool:
        targets = getattr(t, "_original_target_patterns", t.target_patterns)
        return isinstance(t, WeightConverter) and all(
            re.search(r"experts\.(gate_up_proj|up_proj|down_proj)$", p) and not re.search(f"{p}$", params, re.M)
            for p in targets)

    return [t for t in conversions if not split_target(t)]


def untied_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` less the tied copies ``save_pretrained`` leaves out."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return remove_tied_weights_from_state_dict(model.state_dict(), model)


def layout_fingerprint(layers: Mapping[str, Mapping], scale_dtype: str, format_version: int) -> str:
    """A digest of what decoding the packed tensors depends on: every layer's bits, group size
    and symmetry, the scales' dtype and the format version."""
    layout = {"format_version": format_version, "scale_dtype": scale_dtype,
              "layers": {name: [s["bits"], s["group_size"], s["sym"]] for name, s in sorted(layers.items())}}
    return hashlib.sha256(json.dumps(layout, separators=(",", ":")).encode()).hexdigest()


def config_fingerprint(config) -> str:
    """``layout_fingerprint`` of a quantized model's ``SignRoundV2Config`` (its layer_config lists every layer)."""
    return layout_fingerprint({name: config.layer_spec(name) for name in config.layer_config},
                              config.scale_dtype, config.format_version)


def check_checkpoint(model: nn.Module, files: Iterable[str | Path], config=None) -> None:
    """Raise ``CheckpointError`` unless ``files`` hold exactly the tensors ``model`` expects (see the module doc).

    ``config``: the ``SignRoundV2Config`` of a pre-quantized checkpoint (packed dtypes, stray
    packed tensors and the layout fingerprint are checked); None for a float checkpoint.
    Checkpoints that are not all safetensors are left to transformers.
    """
    paths = [Path(f) for f in files]
    if not paths or any(p.suffix != ".safetensors" for p in paths):
        return
    headers = {path: read_header(path) for path in paths}
    stored = _stored(model, headers)
    problems = _missing(model, stored) + _mismatched(model, stored)
    if config is not None:
        problems += _stray_packed(model, stored)
    if problems:
        more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise CheckpointError(
            f"the checkpoint in {paths[0].parent} does not match the model its config.json describes: "
            f"{'; '.join(problems[:_SHOWN])}{more}. Loading it would leave weights uninitialised or decode them "
            "wrongly: re-download or re-save the checkpoint, or restore the config.json saved with it"
        )
    if config is not None:  # last: the checks above name the layer when shapes tell
        _check_layout(headers, config_fingerprint(config))


def _check_layout(headers: dict[Path, Header], expected: str) -> None:
    for path, header in headers.items():
        found = header.metadata.get(LAYOUT_KEY)
        if found is not None and found != expected:  # absent: written before fingerprints existed
            raise CheckpointError(
                f"{path} was written for another quantization layout than config.json's quantization_config "
                "describes (a layer's bits, group_size or sym, scale_dtype or format_version differ): config.json "
                "was edited or belongs to other weights, or this file's header is damaged; restore the config.json "
                "saved with these weights, or re-download the checkpoint"
            )


def _stored(model: nn.Module, headers: dict[Path, Header]) -> dict[str, tuple[Path, TensorInfo | None]]:
    """The model's name -> (file, header entry) of every stored tensor; the entry is None when a
    converter merges or splits it (its shape is not the model's)."""
    rename = checkpoint_renamer(model)
    stored: dict[str, tuple[Path, TensorInfo | None]] = {}
    for path, header in headers.items():
        for key, info in header.tensors.items():
            name, converted = rename(key)
            stored[name] = (path, None if converted else info)
    return stored


def _missing(model: nn.Module, stored: dict) -> list[str]:
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    partner = {**tied, **{source: target for target, source in tied.items()}}  # tied either way round
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
    # Parameters only: a persistent buffer left out of a checkpoint is recomputed when the model
    # is built, while a missing parameter (packed tensors are parameters too) stays uninitialised.
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    return [f"{name} is missing" for name in names
            if name not in stored and partner.get(name) not in stored and not any(p.search(name) for p in ignored)]


def _mismatched(model: nn.Module, stored: dict) -> list[str]:
    problems = []
    for name, tensor in model.state_dict().items():
        path, info = stored.get(name, (None, None))
        if info is None:
            continue
        dtype = TORCH_DTYPES[info.dtype]
        if info.shape != tuple(tensor.shape):
            problems.append(f"{name} in {path.name} has shape {list(info.shape)}, expected {list(tensor.shape)}")
        elif _is_packed(model, name) and dtype != tensor.dtype:
            problems.append(f"{name} in {path.name} is {info.dtype}, expected {_NAMES.get(tensor.dtype, tensor.dtype)}")
        elif dtype.is_floating_point != tensor.dtype.is_floating_point:
            kind = "a float" if tensor.dtype.is_floating_point else _NAMES.get(tensor.dtype, str(tensor.dtype))
            problems.append(f"{name} in {path.name} is {info.dtype}, expected {kind}")
    return problems


def _stray_packed(model: nn.Module, stored: dict) -> list[str]:
    expected = model.state_dict()
    return [f"{name} in {path.name} is not expected (the config does not quantize it this way)"
            for name, (path, _) in stored.items() if name.rpartition(".")[2] in PACKED and name not in expected]


def _is_packed(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in PACKED and hasattr(model.get_submodule(owner), "qweight")

