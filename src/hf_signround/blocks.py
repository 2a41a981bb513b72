"""Find a model's repeated decoder blocks and the layers in them that get quantized, and hand
the blocks out one at a time.

This, ``hf_quantizer.py`` and ``checkpoint.py`` are the only modules that know how transformers
models are shaped; everything here works on plain ``nn.Module`` trees, so any causal LM built
from a list of identical blocks (Llama, Qwen2, GPT-NeoX, Phi, Mistral, ...) is handled without
naming its classes.

Block sources: the pipeline (``quantize.quantize_source``) and the DeltaLoss scoring
(``sensitivity``) walk blocks through a source: :class:`ResidentBlocks` serves the blocks of a
loaded model (brought onto the compute device one at a time, also when accelerate offloaded
them); ``streaming.StreamedBlocks`` reads each block from a safetensors checkpoint and writes
the quantized block out. A source has ``prefix`` and ``model`` (whose blocks may be on the meta
device), ``len()``, and:

* ``capture(input_ids, device)`` -> the first block's inputs and a :class:`~tuning.BlockCall`;
* ``open(index, device)`` -> a context holding block ``index`` on ``device``;
* ``store(index, block)`` -> called once block ``index`` holds its quantized layers;
* ``whole()`` -> a context in which the layers outside the blocks (embeddings, head) can run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks: identical modules holding projection layers.

    When several lists qualify (a vision tower beside the language model), the one with the
    most parameters is taken: the language model's stack (``warn_other_block_lists`` names
    the rest, which stay in full precision). Encoder-decoder models are refused: quantizing one
    of their stacks would leave the other silently in full precision.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model (config.is_encoder_decoder=True): hf_signround "
            "quantizes decoder-only causal LMs (Llama, Qwen2, GPT-NeoX, ...); choose a decoder-only model"
        )
    lists = _block_lists(model)
    if not lists:
        raise ValueError(
            f"{type(model).__name__} has no list of repeated blocks containing projection layers; "
            "hf_signround quantizes causal LMs made of repeated decoder blocks"
        )
    name = max(lists, key=lists.get)
    return name, model.get_submodule(name)


def warn_other_block_lists(model: nn.Module, chosen: str) -> None:
    """Log a warning naming each qualifying block list besides ``chosen`` (``find_blocks``'s):
    they stay in full precision, which must not pass silently."""
    lists = _block_lists(model)
    # Lists nested inside another (experts inside a block) go with it.
    others = [name for name in lists if name != chosen and not any(name.startswith(outer + ".") for outer in lists)]
    if others:
        logger.warning("%s also %s repeated blocks; hf_signround quantizes %s only and leaves %s in full precision",
                       ", ".join(others), "holds" if len(others) == 1 else "hold", chosen, ", ".join(others))


def _block_lists(model: nn.Module) -> dict[str, int]:
    """Name -> parameter count of every non-empty ``nn.ModuleList`` of one block type holding projections."""
    lists = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if any(_is_projection(m) for m in module[0].modules()):
            lists[name] = sum(p.numel() for p in module.parameters())
    return lists


def _is_packed(module: nn.Module) -> bool:
    return hasattr(module, "qweight")


def matches(name: str, patterns: list[str]) -> bool:
    """Whether a module name is one of ``patterns``, lies under one, or ends with one as dotted suffix."""
    dotted = f".{name}."
    return any(f".{p.strip('.')}." in dotted for p in patterns if p)


def quantizable_layers(model: nn.Module, skip: list[str]) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder blocks whose name does not match ``skip``, in order.

    Raises for weight-bearing layers of other types (e.g. GPT-2's ``Conv1D``) that are not
    skipped, so nothing is silently left in full precision.
    """
    from .convert import convertible, routers

    prefix, _ = find_blocks(model)
    kept = routers(model, prefix)  # mixture-of-experts routing stays in full precision
    skip = [*skip, *kept]
    layers: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not name.startswith(prefix + ".") or matches(name, skip):
            continue
        if isinstance(module, nn.Linear):
            layers[name] = module
        elif _is_unsupported_weight_layer(module):
            short = name[len(prefix) + 1 :].split(".", 1)[-1]
            how = (" before convert.convert_layers splits it" if convertible(module)
                   else " (it quantizes torch.nn.Linear layers, fused experts and Conv1D)")
            raise ValueError(
                f"layer {name} is a {type(module).__name__}, which hf_signround cannot quantize{how}; add "
                f"{short!r} to modules_to_not_convert to keep it in full precision"
            )
    if kept:
        logger.info("keeping %d mixture-of-experts routers in full precision (%s, ...)", len(kept), min(kept))
    return layers


def _is_projection(module: nn.Module) -> bool:
    """A Linear, a packed QuantLinear, or any other module owning a weight matrix (e.g. Conv1D)."""
    if isinstance(module, nn.Linear) or _is_packed(module):
        return True
    return not isinstance(module, nn.Embedding) and any(p.dim() >= 2 for p in module.parameters(recurse=False))


def _is_unsupported_weight_layer(module: nn.Module) -> bool:
    # A leaf owning a matrix (or a fused 3-D expert tensor) that is not a Linear.
    return _is_projection(module) and not isinstance(module, nn.Linear) and not _is_packed(module)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
    """The first block's inputs for every calibration window: hidden states (n, seqlen, hidden),
    and the extra positional and keyword arguments the model passes to its blocks.

    Each window runs alone through the model up to the first block (only the embeddings
    compute), so the extra arguments (rotary embeddings, causal mask, positions) have batch
    size 1 and broadcast over any batch of windows of the same length. Those that do not
    broadcast (their dim 0 is batch × something, as Bloom's alibi) are found by one more run
    with two windows, and marked :class:`PerSample`; ``tuning.BlockCall`` repeats them.
    """
    hidden: list[torch.Tensor] = []
    extra: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        kwargs = dict(kwargs)
        h = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(h.detach())
        if not extra:
            extra["args"], extra["kwargs"] = tuple(args[1:]), kwargs
        raise _Captured

    device = model.get_input_embeddings().weight.device
    if device.type == "meta":
        device = torch.device("cpu")
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in input_ids:
            try:
                model(input_ids=row[None].to(device), use_cache=False)
            except _Captured:
                pass
        if len(input_ids) >= 2:  # which extra arguments grow with the batch (Bloom's alibi)?
            single, hidden_seen = extra.copy(), len(hidden)
            extra.clear()
            try:
                model(input_ids=input_ids[:2].to(device), use_cache=False)
            except _Captured:
                pass
            del hidden[hidden_seen:]
            extra["args"], extra["kwargs"] = _mark_per_sample((single["args"], single["kwargs"]),
                                                              (extra["args"], extra["kwargs"]))
    finally:
        handle.remove()
    return torch.cat(hidden), extra["args"], extra["kwargs"]


class PerSample:
    """A captured block argument with one slice per window along dim 0 (Bloom's alibi is
    (batch·heads, 1, seq)): captured for one window, repeated for a batch of them by
    :func:`per_batch`."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _mark_per_sample(one: Any, two: Any) -> Any:
    """``one`` (arguments captured for one window) with each tensor whose dim 0 doubles for two
    windows wrapped in :class:`PerSample`."""
    if isinstance(one, torch.Tensor):
        # dim 0 of size 1 broadcasts over any batch already (rotary tables, causal masks)
        grows = (isinstance(two, torch.Tensor) and one.dim() > 0 and one.shape[0] > 1 and two.dim() == one.dim()
                 and two.shape[0] == 2 * one.shape[0] and two.shape[1:] == one.shape[1:])
        return PerSample(one) if grows else one
    if isinstance(one, (tuple, list)) and isinstance(two, (tuple, list)) and len(one) == len(two):
        return type(one)(_mark_per_sample(a, b) for a, b in zip(one, two))
    if isinstance(one, dict) and isinstance(two, dict):
        return {k: _mark_per_sample(v, two.get(k)) for k, v in one.items()}
    return one


def per_batch(obj: Any, batch: int) -> Any:
    """``obj`` with each :class:`PerSample` tensor repeated for ``batch`` windows."""
    if isinstance(obj, PerSample):
        return obj.tensor.repeat(batch, *[1] * (obj.tensor.dim() - 1))
    if isinstance(obj, (tuple, list)):
        return type(obj)(per_batch(o, batch) for o in obj)
    if isinstance(obj, dict):
        return {k: per_batch(v, batch) for k, v in obj.items()}
    return obj


class ResidentBlocks:
    """The decoder blocks of a loaded model (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.prefix, self.blocks = find_blocks(model)

    def __len__(self) -> int:
        return len(self.blocks)

    def capture(self, input_ids: torch.Tensor, device: torch.device):
        return capture(self.model, self.blocks, input_ids, device)

    def open(self, index: int, device: torch.device):
        return block_on(self.blocks[index], device)

    def store(self, index: int, block: nn.Module) -> None:
        """Nothing to do: the quantized layers are already in the model."""

    def whole(self):
        return nullcontext()


@contextmanager
def frozen(model: nn.Module):
    """Inside, no parameter of ``model`` needs a gradient; each one's flag is restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def capture(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, device: torch.device):
    """:func:`capture_block_inputs` on ``device``: the first block's inputs and how the model calls its blocks."""
    from .tuning import BlockCall

    hidden, args, kwargs = capture_block_inputs(model, blocks, input_ids)
    return hidden.to(device), BlockCall(*to_device((args, kwargs), device))


def _home_device(block: nn.Module) -> torch.device:
    """Where a block's quantized layers should live: its weights' device, or for a block
    offloaded by accelerate, the device its hooks compute on."""
    for p in block.parameters():
        if p.device.type != "meta":
            return p.device
    for module in block.modules():
        hook = getattr(module, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    return torch.device("cpu")


@contextmanager
def block_on(block: nn.Module, device: torch.device):
    """Hold ``block``'s weights on ``device`` while inside, also when accelerate offloaded them.

    Offloaded leaves (meta weights behind an ``AlignDevicesHook``, after ``device_map`` with
    CPU or disk offload) are materialised with ``accelerate.utils.align_module_device``;
    on exit they are offloaded again and everything else, including the QuantLinears
    that replaced Linears inside, moves to the block's home device.
    """
    from accelerate.utils import align_module_device, has_offloaded_params

    home = _home_device(block)
    with ExitStack() as stack:
        for module in block.modules():
            if has_offloaded_params(module):
                stack.enter_context(align_module_device(module, device))
                # While we hold the block, forward passes must not offload the weights
                # again (the hook would after every call); restored before re-offloading.
                hook = module._hf_hook
                hook.offload = False
                stack.callback(setattr, hook, "offload", True)
        _move_resident(block, device)
        try:
            yield block
        finally:
            _move_resident(block, home)


def nonfinite_counts(block: nn.Module, rels: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``{rel: (NaN count, inf count)}`` of the listed Linears of ``block`` whose weight is not all
    finite; offloaded weights are brought in, where the block computes, to be counted."""
    found = {}
    with block_on(block, _home_device(block)):
        for rel in rels:
            weight = block.get_submodule(rel).weight
            if not torch.isfinite(weight).all():
                found[rel] = (int(torch.isnan(weight).sum()), int(torch.isinf(weight).sum()))
    return found


def _move_resident(block: nn.Module, device: torch.device) -> None:
    # Module.to() would fail on the meta tensors of leaves that stay offloaded.
    for module in block.modules():
        for key, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None and t.device.type != "meta" and t.device != device:
                moved = t.to(device)
                if key in module._parameters:
                    module._parameters[key] = nn.Parameter(moved, requires_grad=t.requires_grad)
                else:
                    module._buffers[key] = moved


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, PerSample):
        return PerSample(obj.tensor.to(device))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
