"""Quantize a checkpoint folder block by block, reading and writing one block at a time.

``from_pretrained(..., quantization_config=...)`` loads the whole float model before the
first block is quantized (transformers has no load-one-block hook), so its peak memory is
the model's size. ``quantize_checkpoint`` reads the safetensors itself instead: the
architecture is built on the meta device, and :class:`StreamedBlocks` serves the pipeline
(``quantize.quantize_source``, the same walk ``quantize_model`` runs) one block at a time,
read onto ``config.compute_device`` when opened and returned to meta when closed; quantized
blocks are written out as they finish (``shards.ShardWriter`` streams them to disk). The
tensors outside the blocks (embeddings, final norm, lm_head) are copied to the output
unchanged, and read into memory only while the calibration or scoring windows run through
them.

Same result as ``from_pretrained`` followed by ``save_pretrained``, bit for bit, also with
``avg_bits``: the DeltaLoss scoring walks the same blocks the same way. It then reads every
block three more times (a pass to find which layers share an input, and the scoring's
forward and backward sweeps).

Peak memory ≈ one float block and its quantization temporaries + the calibration
activations (and the embeddings and head while windows run through them). The output is an
ordinary hf_signround checkpoint: ``from_pretrained(out)`` reloads it.

Checkpoint tensor names are mapped to the model's by transformers' renaming rules. Experts
stored one by one (``experts.{e}.w1``, ``experts.{e}.gate_proj``: what transformers merges into
fused 3-D tensors while loading) are read one by one into the per-expert layers ``convert``
makes; experts stored fused (GPT-OSS's ``experts.gate_up_proj``) are split as they are read,
as ``convert`` splits them, and GPT-2's ``Conv1D`` weights are transposed as they are read.
Other checkpoints whose tensors transformers merges or splits while loading are refused, with
``from_pretrained(..., device_map="auto")`` as the way out.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .blocks import capture, find_blocks, warn_other_block_lists
from .calibration import calibration_windows
from .checkpoint import LAYOUT_KEY, checkpoint_renamer, config_fingerprint, stored_names
from .config import SignRoundV2Config
from .memory import return_freed_memory
from .outputs import check_output, staged_output
from .convert import LinearExperts, was_conv1d
from .quantize import QuantizationResult, plan_layers, quantize_source
from .shards import SafetensorsFolder, ShardWriter

logger = logging.getLogger(__name__)

__all__ = ["StreamedBlocks", "quantize_checkpoint"]


class StreamedBlocks:
    """A block source (``blocks``) over a safetensors checkpoint: each block read when opened, its
    quantized tensors written by ``store``, and dropped back to meta when closed."""

    def __init__(self, model: nn.Module, folder: SafetensorsFolder, writer: ShardWriter | None = None):
        self.model, self.folder, self.writer = model, folder, writer
        self.prefix, self.blocks = find_blocks(model)
        rename = checkpoint_renamer(model)  # per-expert tensors map onto the experts convert.py split
        self.dtypes = {k: t.dtype for k, t in model.state_dict().items()}
        self.files: dict[str, str] = {}  # the model's tensor name -> the checkpoint's
        for key in folder.files:
            name, converted = rename(key)
            if converted:
                raise ValueError(
                    f"checkpoint tensor {key} is converted (merged or split) when {type(model).__name__} loads, "
                    "which the streaming quantizer does not do: quantize with from_pretrained(..., "
                    "device_map='auto') instead"
                )
            self.files[name] = key
        # Linears made from GPT-2's Conv1D: the checkpoint holds their weight transposed
        self.transposed = {f"{n}.weight" for n, m in model.named_modules() if was_conv1d(m)}
        self.outside = [k for k in self.dtypes if not k.startswith(self.prefix + ".")]

    def __len__(self) -> int:
        return len(self.blocks)

    def read(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Tensors by the model's names, each in the dtype the model holds it in, on ``device``."""
        tensors = self.folder.read([self.files[n] for n in names])
        for n in self.transposed.intersection(names):
            tensors[self.files[n]] = tensors[self.files[n]].t().contiguous()
        return {n: tensors[self.files[n]].to(device, self.dtypes[n] if tensors[self.files[n]].is_floating_point() else None)
                for n in names}

    def capture(self, input_ids: torch.Tensor, device: torch.device):
        with self.whole():
            return capture(self.model, self.blocks, input_ids, device)

    @contextmanager
    def open(self, index: int, device: torch.device):
        block, name = self.blocks[index], f"{self.prefix}.{index}"
        keys = [f"{name}.{k}" for k in block.state_dict()]
        tensors = self._fused_experts(block, name, device)  # experts the checkpoint stores fused (GPT-OSS)
        missing = [k for k in keys if k not in self.files and k[len(name) + 1 :] not in tensors]
        if missing:
            raise ValueError(f"{self.folder.folder} lacks {missing[:3]}: the streaming quantizer needs checkpoint "
                             "tensor names that match the model's; quantize with from_pretrained(..., "
                             "device_map='auto') instead")
        tensors.update({k[len(name) + 1 :]: t for k, t in self.read([k for k in keys if k in self.files], device).items()})
        _assign(block, tensors)
        try:
            yield block
        finally:
            block.to("meta")  # frees the block
            return_freed_memory()

    def _fused_experts(self, block: nn.Module, name: str, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-expert tensors (names inside the block) of the split experts whose checkpoint holds them
        fused as the original module did (``experts.gate_up_proj``), split as ``convert`` splits them."""
        out = {}
        for rel, module in block.named_modules():
            if not isinstance(module, LinearExperts):
                continue
            fused = {k: f"{name}.{rel}.{k}" for k in module.layout.fused_names()}
            if not all(key in self.files for key in fused.values()):
                continue  # stored one by one
            dtype = next(iter(module.parameters())).dtype
            read = self.folder.read([self.files[key] for key in fused.values()])
            tensors = {k: read[self.files[key]].to(device, dtype) for k, key in fused.items()}
            for e in range(module.num_experts):
                out.update({f"{rel}.{e}.{k}": t for k, t in module.layout.split(tensors, e).items()})
        return out

    def store(self, index: int, block: nn.Module) -> None:
        name = f"{self.prefix}.{index}"
        for key, tensor in stored_names(self.model, {f"{name}.{k}": t for k, t in block.state_dict().items()}).items():
            self.writer.add(key, tensor)

    @contextmanager
    def whole(self):
        """The tensors outside the blocks in memory (on CPU; a tied output embedding tied)."""
        _assign(self.model, self.read([k for k in self.outside if k in self.files], torch.device("cpu")))
        self.model.tie_weights()
        absent = [k for k, v in self.model.state_dict().items() if k in self.outside and v.device.type == "meta"]
        if absent:
            raise ValueError(f"the checkpoint lacks {absent[:3]} (and nothing ties them): it does not match its "
                             "config.json")
        try:
            yield self.model
        finally:
            for key in self.outside:
                owner, _, leaf = key.rpartition(".")
                module = self.model.get_submodule(owner) if owner else self.model
                _assign(module, {leaf: getattr(module, leaf).to("meta")})


def _assign(root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put tensors into ``root``'s parameters and buffers, each in the dtype it has there."""
    for key, value in tensors.items():
        owner, _, name = key.rpartition(".")
        module = root.get_submodule(owner) if owner else root
        old = module._parameters.get(name, module._buffers.get(name))
        if old is not None and old.is_floating_point() and value.is_floating_point():
            value = value.to(old.dtype)
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
) -> QuantizationResult:
    """Quantize the float checkpoint in ``model_dir`` into ``save_directory`` with bounded memory.

    Same result as ``AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config)``
    followed by ``save_pretrained(save_directory)``, bit for bit, without ever holding the
    float model: see the module docstring for what is in memory at once. The tokenizer is
    not copied. Returns what ``quantize_model`` returns.

    ``save_directory`` is written whole (``outputs.staged_output``): the checkpoint goes into a
    temporary folder beside it and replaces it only once complete, so an interrupted run
    leaves it as it was. It may not be, hold or lie inside ``model_dir``; ``overwrite=False``
    refuses one that is not empty. Each block's weights are checked for NaN and inf as they
    are read (``config.skip_nonfinite``).
    """
    model_dir, out = Path(model_dir), Path(save_directory)
    check_output(out, sources=(model_dir,), overwrite=overwrite)
    model, hf_config = _meta_model(model_dir, dtype)
    folder = SafetensorsFolder(model_dir)
    plan = plan_layers(model, config)  # splits experts and Conv1D; lm_head and embeddings live outside the blocks
    calibration, scoring = calibration_windows(config)
    with staged_output(out, overwrite=overwrite) as stage:
        writer = ShardWriter(stage, max_shard_size)
        source = StreamedBlocks(model, folder, writer)
        warn_other_block_lists(model, source.prefix)
        # Unchanged by quantization: copied one tensor at a time, under the checkpoint's own names
        # (an output embedding tied to the input one is absent there and stays absent).
        for key in (k for k in source.outside if k in source.files):
            writer.add(source.files[key], source.read([key], torch.device("cpu"))[key])
            return_freed_memory()
        result = quantize_source(source, plan, config, calibration, scoring, check_finite=True)
        saved = result.checkpoint_config(config)
        files = writer.close({LAYOUT_KEY: config_fingerprint(saved)})
        hf_config.quantization_config = saved
        hf_config.save_pretrained(stage)
        _copy_generation_config(model_dir, stage)
    logger.info("quantized %d layers in %d blocks into %s (%s)", len(result.plan), len(source), out, ", ".join(files))
    return result


def _copy_generation_config(source: Path, out: Path) -> None:
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_pretrained(source).save_pretrained(out)
    except OSError:
        logger.debug("no generation_config.json in %s", source)
