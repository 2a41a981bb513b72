"""Quantize a checkpoint folder block by block, reading and writing one block at a time.

``from_pretrained(..., quantization_config=...)`` loads the whole float model before the
first block is quantized (transformers has no load-one-block hook), so its peak memory is
the model's size. ``quantize_checkpoint`` reads the safetensors itself instead:

1. the architecture is built on the meta device (no memory);
2. with tuning, the tensors outside the blocks (embeddings, final norm, lm_head) are read
   and the calibration windows run through the embeddings to the first block; then they
   are dropped. They are copied to the output one tensor at a time, unchanged;
3. for each block: its float tensors are read onto ``config.compute_device``, it is
   quantized exactly as ``quantize_model`` does (same functions, same results, bit for
   bit), its packed tensors are written out (``shards.ShardWriter`` streams them to disk)
   and the block returns to meta.

Peak memory ≈ one float block and its quantization temporaries + the calibration
activations (with tuning; the embeddings too while the windows go through them). The
output is an ordinary hf_signround checkpoint: ``from_pretrained(out)`` reloads it.

Limits: checkpoint tensor names are mapped to the model's by transformers' renaming rules,
but checkpoints whose tensors transformers merges or splits while loading (fused MoE
experts) are refused; ``avg_bits`` needs the whole-model sensitivity pass, so it is not
supported here yet. Both errors point to ``from_pretrained(..., device_map="auto")``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import capture_block_inputs, find_blocks, set_module, to_device
from .calibration import build_calibration
from .config import SignRoundV2Config
from .memory import return_freed_memory
from .quantize import BlockReport, _tune_block, plan_layers, to_quant_linear
from .shards import ShardWriter
from .tuning import BlockCall

logger = logging.getLogger(__name__)

__all__ = ["quantize_checkpoint"]


class _Checkpoint:
    """The safetensors of a folder, addressed by the model's tensor names; reads a few at a time.

    Checkpoint names are mapped to the model's with transformers' own renaming rules (e.g.
    GPT-NeoX's ``embed_out`` is the model's ``lm_head``); rules that merge or split tensors
    (fused MoE experts) are not supported.
    """

    def __init__(self, folder: Path, model: nn.Module):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            stored = {key: folder / name for key, name in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(str(folder / "model.safetensors"), "pt") as handle:
                stored = dict.fromkeys(handle.keys(), folder / "model.safetensors")
        else:
            raise FileNotFoundError(
                f"{folder} holds no model.safetensors or model.safetensors.index.json: the streaming quantizer reads "
                "safetensors checkpoints (re-save a .bin checkpoint with save_pretrained first)"
            )
        self.files: dict[str, tuple[Path, str]] = {}  # model name -> (file, checkpoint name)
        rename = _renamer(model)
        for key, path in stored.items():
            self.files[rename(key)] = (path, key)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.files[key][0]].append(key)
        out = {}
        for path, names in by_file.items():
            with open(path, "rb") as f:
                header = _header(f)
                out.update({name: _read_tensor(f, header, self.files[name][1]) for name in names})
        return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(f) -> dict:
    """A safetensors file's header, with each tensor's absolute byte offset under ``"start"``."""
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry:
            entry["start"] = 8 + size + entry["data_offsets"][0]
    return header


def _read_tensor(f, header: dict, name: str) -> torch.Tensor:
    """Read one tensor straight into fresh memory. Not safetensors' memory map: the pages it
    touches would stay resident (and counted) while any tensor from the file lives, and a
    copy out of it needs the memory twice."""
    entry = header[name]
    if entry["dtype"] not in _DTYPES:
        raise ValueError(f"{name} has dtype {entry['dtype']}, which the streaming quantizer does not read")
    begin, end = entry["data_offsets"]
    data = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(entry["start"])
    if f.readinto(memoryview(data.numpy())) != end - begin:
        raise ValueError(f"{name} is truncated in {f.name}: the checkpoint file is incomplete")
    return data.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _stored_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensor names turned back into the checkpoint's, as save_pretrained does."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


def _renamer(model: nn.Module):
    """Checkpoint tensor name -> the model's, by the renaming rules from_pretrained applies."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        rename_source_key,
    )

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = model.state_dict()

    def rename(key: str) -> str:
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if converted is not None:
            raise ValueError(
                f"checkpoint tensor {key} is converted (merged or split) when {type(model).__name__} loads, which the "
                "streaming quantizer does not do: quantize with from_pretrained(..., device_map='auto') instead"
            )
        return name

    return rename


def _assign(root: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put checkpoint tensors into ``root``'s (meta) parameters and buffers, in each one's dtype."""
    for key, value in tensors.items():
        owner, _, name = key.rpartition(".")
        module = root.get_submodule(owner) if owner else root
        old = module._parameters.get(name, module._buffers.get(name))
        value = value.to(device=device, dtype=old.dtype if old is not None and old.is_floating_point() else None)
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[name] = value


def _meta_model(folder: Path, dtype: str | torch.dtype):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(folder)
    if getattr(hf_config, "quantization_config", None):
        raise ValueError(f"{folder} is already quantized ({hf_config.quantization_config}); give a float checkpoint")
    if dtype == "auto":
        dtype = hf_config.dtype if isinstance(hf_config.dtype, torch.dtype) else getattr(torch, hf_config.dtype or "float32")
    with init_empty_weights():  # parameters on meta; buffers such as rotary frequencies are real
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model.eval().requires_grad_(False), hf_config


def quantize_checkpoint(
    model_dir: str | Path,
    save_directory: str | Path,
    config: SignRoundV2Config,
    max_shard_size: int | str = "500MB",
    dtype: str | torch.dtype = "auto",
) -> dict[str, BlockReport]:
    """Quantize the float checkpoint in ``model_dir`` into ``save_directory`` with bounded memory.

    Same result as ``AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config)``
    followed by ``save_pretrained(save_directory)``, bit for bit, without ever holding the
    float model: see the module docstring for what is in memory at once. The tokenizer is
    not copied. Returns the per-block report of ``quantize_model``.
    """
    model_dir, out = Path(model_dir), Path(save_directory)
    if config.avg_bits is not None:
        raise ValueError(
            "avg_bits needs the whole-model sensitivity pass, which the streaming quantizer does not run: load with "
            "from_pretrained(..., device_map='auto') to offload instead, or give per-layer bits in layer_config"
        )
    model, hf_config = _meta_model(model_dir, dtype)
    source = _Checkpoint(model_dir, model)
    prefix, blocks = find_blocks(model)
    plan = plan_layers(model, config)  # lm_head and embeddings live outside the blocks
    per_block: dict[int, dict] = defaultdict(dict)
    for name, spec in plan.items():
        index, _, rel = name[len(prefix) + 1 :].partition(".")
        per_block[int(index)][rel] = spec
    calibration = None
    if config.tunes:
        if config.dataset is None:
            raise ValueError(f"iters={config.iters} tunes on calibration data: pass dataset= and tokenizer= in the "
                             "config, or iters=0 for round-to-nearest")
        calibration = build_calibration(config.dataset, config.tokenizer, config.nsamples, config.seqlen, config.seed)

    writer = ShardWriter(out, max_shard_size)
    device = config.compute_device
    fp_in = q_in = call = None
    outside = [k for k in model.state_dict() if not k.startswith(prefix + ".")]
    if calibration is not None:  # the embeddings run the windows up to the first block, then go
        _read_outside(model, source, outside)
        hidden, args, kwargs = capture_block_inputs(model, blocks, calibration)
        fp_in = q_in = hidden.to(device)
        call = BlockCall(*to_device((args, kwargs), device))
        _to_meta(model, outside)
    # Unchanged by quantization: copied one tensor at a time, under the checkpoint's own names
    # (an output embedding tied to the input one is absent there and stays absent).
    state = model.state_dict()
    for key in (k for k in outside if k in source.files):
        tensor = source.read([key])[key]
        writer.add(source.files[key][1], tensor.to(state[key].dtype) if tensor.is_floating_point() else tensor)
        del tensor
        return_freed_memory()
    del state

    scale_dtype = getattr(torch, config.scale_dtype)
    reports = {}
    progress = tqdm(range(len(blocks)), desc="quantizing blocks (streaming)", unit="block")
    for i in progress:
        block, name = blocks[i], f"{prefix}.{i}"
        keys = [f"{name}.{k}" for k in block.state_dict()]
        missing = [k for k in keys if k not in source.files]
        if missing:
            raise ValueError(f"{model_dir} lacks {missing[:3]}: the streaming quantizer needs checkpoint tensor names "
                             "that match the model's; quantize with from_pretrained(..., device_map='auto') instead")
        _assign(block, {k[len(name) + 1 :]: t for k, t in source.read(keys).items()}, device)
        specs = per_block.get(i, {})
        if config.tunes:
            reports[i], fp_in, q_in = _tune_block(block, specs, call, fp_in, q_in, config, i)
            if reports[i].loss_after is not None:
                progress.set_postfix_str(f"loss {reports[i].loss_before:.3g} -> {reports[i].loss_after:.3g}")
        else:
            for rel, spec in specs.items():
                set_module(block, rel, to_quant_linear(block.get_submodule(rel), spec, scale_dtype))
            reports[i] = BlockReport(specs)
        for key, tensor in _stored_names(model, {f"{name}.{k}": t for k, t in block.state_dict().items()}).items():
            writer.add(key, tensor)
        block.to("meta")  # frees the block
        return_freed_memory()
    files = writer.close()

    config.layer_config = {n: {"bits": s.bits, "group_size": s.group_size, "sym": s.sym} for n, s in plan.items()}
    hf_config.quantization_config = config
    hf_config.save_pretrained(out)
    _copy_generation_config(model_dir, out)
    logger.info("quantized %d layers in %d blocks into %s (%s)", len(plan), len(blocks), out, ", ".join(files))
    return {f"{prefix}.{i}": report for i, report in reports.items()}


def _to_meta(root: nn.Module, keys: list[str]) -> None:
    for key in keys:
        owner, _, name = key.rpartition(".")
        module = root.get_submodule(owner) if owner else root
        if module._parameters.get(name) is not None:
            module._parameters[name] = nn.Parameter(module._parameters[name].to("meta"), requires_grad=False)
        elif module._buffers.get(name) is not None:
            module._buffers[name] = module._buffers[name].to("meta")


def _read_outside(model: nn.Module, source: _Checkpoint, keys: list[str]) -> None:
    """Load the tensors outside the blocks into the model (on CPU), tying a tied output embedding."""
    _assign(model, source.read([k for k in keys if k in source.files]), torch.device("cpu"))
    model.tie_weights()
    absent = [k for k, v in model.state_dict().items() if k in keys and v.device.type == "meta"]
    if absent:
        raise ValueError(f"the checkpoint lacks {absent[:3]} (and nothing ties them): it does not match its config.json")


def _copy_generation_config(source: Path, out: Path) -> None:
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_pretrained(source).save_pretrained(out)
    except OSError:
        logger.debug("no generation_config.json in %s", source)
