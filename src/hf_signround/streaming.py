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

from .blocks import capture_block_inputs, find_blocks, nonfinite_counts, set_module, to_device, warn_other_block_lists
from .calibration import build_calibration
from .checkpoint import LAYOUT_KEY, checkpoint_renamer, config_fingerprint
from .config import SignRoundV2Config
from .memory import return_freed_memory
from .outputs import check_output, staged_output
from .quantize import BlockReport, _tune_block, group_by_block, keep_finite, plan_layers, to_quant_linear
from .shards import TORCH_DTYPES, CheckpointError, ShardWriter, TensorInfo, read_header
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
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a valid shard index ({err!r}): re-download or re-save the "
                                      "checkpoint") from err
            stored = {key: folder / name for key, name in weight_map.items()}
        elif (folder / "model.safetensors").is_file():  # its header is read twice: it is small
            stored = dict.fromkeys(read_header(folder / "model.safetensors").tensors, folder / "model.safetensors")
        else:
            raise FileNotFoundError(
                f"{folder} holds no model.safetensors or model.safetensors.index.json: the streaming quantizer reads "
                "safetensors checkpoints (re-save a .bin checkpoint with save_pretrained first)"
            )
        # Every file's header is read (and checked) now: a damaged file fails before any work.
        self.headers = {path: read_header(path).tensors for path in sorted(set(stored.values()))}
        self.folder = folder
        self.files: dict[str, tuple[Path, str]] = {}  # model name -> (file, checkpoint name)
        rename = checkpoint_renamer(model)
        for key, path in stored.items():
            if key not in self.headers[path]:
                raise CheckpointError(f"{index} lists {key} in {path.name}, which does not hold it: re-download or "
                                      "re-save the checkpoint")
            name, converted = rename(key)
            if converted:
                raise ValueError(
                    f"checkpoint tensor {key} is converted (merged or split) when {type(model).__name__} loads, which "
                    "the streaming quantizer does not do: quantize with from_pretrained(..., device_map='auto') instead"
                )
            self.files[name] = (path, key)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.files[key][0]].append(key)
        out = {}
        for path, names in by_file.items():
            with open(path, "rb") as f:
                out.update({name: _read_tensor(f, self.headers[path][self.files[name][1]], name) for name in names})
        return out


def _read_tensor(f, info: TensorInfo, name: str) -> torch.Tensor:
    """Read one tensor straight into fresh memory. Not safetensors' memory map: the pages it
    touches would stay resident (and counted) while any tensor from the file lives, and a
    copy out of it needs the memory twice."""
    data = torch.empty(info.end - info.start, dtype=torch.uint8)
    f.seek(info.start)
    if f.readinto(memoryview(data.numpy())) != info.end - info.start:
        raise CheckpointError(f"{name} is truncated in {f.name}: the checkpoint file is incomplete; re-download or "
                              "re-save the checkpoint")
    return data.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)


def _stored_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensor names turned back into the checkpoint's, as save_pretrained does."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, tensors)


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
    overwrite: bool = True,
) -> dict[str, BlockReport]:
    """Quantize the float checkpoint in ``model_dir`` into ``save_directory`` with bounded memory.

    Same result as ``AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config)``
    followed by ``save_pretrained(save_directory)``, bit for bit, without ever holding the
    float model: see the module docstring for what is in memory at once. The tokenizer is
    not copied. Returns the per-block report of ``quantize_model``.

    ``save_directory`` is written whole (``outputs.staged_output``): the checkpoint goes into a
    temporary folder beside it and replaces it only once complete, so an interrupted run
    leaves it as it was. It may not be, hold or lie inside ``model_dir``; ``overwrite=False``
    refuses one that is not empty. Each block's weights are checked for NaN and inf as they
    are read (``config.skip_nonfinite``).
    """
    model_dir, out = Path(model_dir), Path(save_directory)
    check_output(out, sources=(model_dir,), overwrite=overwrite)
    if config.avg_bits is not None:
        raise ValueError(
            "avg_bits needs the whole-model sensitivity pass, which the streaming quantizer does not run: load with "
            "from_pretrained(..., device_map='auto') to offload instead, or give per-layer bits in layer_config"
        )
    model, hf_config = _meta_model(model_dir, dtype)
    source = _Checkpoint(model_dir, model)
    prefix, blocks = find_blocks(model)
    plan = plan_layers(model, config)  # lm_head and embeddings live outside the blocks
    warn_other_block_lists(model, prefix)
    calibration = None
    if config.tunes:
        if config.dataset is None:
            raise ValueError(f"iters={config.iters} tunes on calibration data: pass dataset= and tokenizer= in the "
                             "config, or iters=0 for round-to-nearest")
        calibration = build_calibration(config.dataset, config.tokenizer, config.nsamples, config.seqlen, config.seed)
    with staged_output(out, overwrite=overwrite) as stage:
        writer = ShardWriter(stage, max_shard_size)
        reports = _write_checkpoint(model, source, plan, calibration, config, writer)
        if not plan:
            raise ValueError("every layer to quantize has NaN or inf weights: nothing is left to quantize")
        config.layer_config = {n: {"bits": s.bits, "group_size": s.group_size, "sym": s.sym} for n, s in plan.items()}
        files = writer.close({LAYOUT_KEY: config_fingerprint(config)})
        hf_config.quantization_config = config
        hf_config.save_pretrained(stage)
        _copy_generation_config(model_dir, stage)
    logger.info("quantized %d layers in %d blocks into %s (%s)", len(plan), len(blocks), out, ", ".join(files))
    return {f"{prefix}.{i}": report for i, report in reports.items()}


def _write_checkpoint(model: nn.Module, source: _Checkpoint, plan: dict, calibration: torch.Tensor | None,
                      config: SignRoundV2Config, writer: ShardWriter) -> dict[int, BlockReport]:
    """Copy the tensors outside the blocks, then read, quantize and write the blocks one by one.
    Layers kept in full precision for NaN or inf weights are dropped from ``plan``."""
    prefix, blocks = find_blocks(model)
    per_block = group_by_block(plan, prefix)
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
            raise ValueError(f"{source.folder} lacks {missing[:3]}: the streaming quantizer needs checkpoint tensor "
                             "names that match the model's; quantize with from_pretrained(..., device_map='auto') "
                             "instead")
        _assign(block, {k[len(name) + 1 :]: t for k, t in source.read(keys).items()}, device)
        specs = _finite_specs(block, name, per_block.get(i, {}), plan, config)
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
    return reports


def _finite_specs(block: nn.Module, name: str, specs: dict, plan: dict, config: SignRoundV2Config) -> dict:
    """The block's specs less its layers with NaN or inf weights (``quantize.keep_finite`` raises
    unless ``config.skip_nonfinite``); those are dropped from ``plan`` too."""
    found = {f"{name}.{rel}": counts for rel, counts in nonfinite_counts(block, specs).items()}
    kept = keep_finite({f"{name}.{rel}": spec for rel, spec in specs.items()}, found, config)
    for layer in found:
        plan.pop(layer)
    return {rel: spec for rel, spec in specs.items() if f"{name}.{rel}" in kept}


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
