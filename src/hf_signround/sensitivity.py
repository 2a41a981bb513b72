"""DeltaLoss: how much quantizing each layer at each option would raise the LM loss (spec §1).

``score(layer, option) = Σ_batches Σ | ∂L/∂Q(W) ⊙ (W − Q(W)) |`` where every eligible layer
is quantized by round-to-nearest at the option, ``L`` is the causal-LM cross-entropy of the
scoring windows (``labels = input_ids``) and ``Q(W)`` is the dequantized weight the forward
pass actually uses. One forward and one backward per option; or, anchored, one in all: the
gradient is taken once with every layer at one option and prices every option's ``W − Q(W)``.

Two ways to run it, with the same numbers:

* whole model (``_score_whole_model``): one forward+backward per batch with every ``Q(W)`` a
  leaf tensor; each leaf's gradient is turned into its score and dropped as soon as it is
  accumulated, so the model's weight gradients are never all held at once;
* block by block (``_score_by_blocks``), for models offloaded with accelerate or bigger than
  the compute device: a forward through the blocks (one block resident at a time) keeps each
  block's input, the head (final norm, lm_head, loss) gives the gradient of the last hidden
  state, and a backward sweep recomputes one block at a time from its saved input and
  passes the input gradient down. Peak memory: one block plus the saved hidden states.

A weight-only proxy ``‖W − Q(W)‖²`` (no data) is here too, as the baseline allocator the
benchmark compares against.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import block_on, capture_block_inputs, find_blocks, to_device
from .qfunc import QuantSpec, fake_quantize
from .tuning import BlockCall

logger = logging.getLogger(__name__)

Scores = dict[str, list[float]]  # layer name -> one score per option


def weight_error_scores(layers: dict[str, nn.Linear], options: list[QuantSpec], scale_dtype: torch.dtype) -> Scores:
    """The data-free proxy: ``‖W − Q(W)‖²`` per layer and option (round-to-nearest)."""
    scores: Scores = {}
    for name, layer in layers.items():
        w = layer.weight.detach().float()
        scores[name] = [float((w - fake_quantize(w, spec, scale_dtype=scale_dtype)).square().sum()) for spec in options]
    return scores


def delta_loss_scores(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    options: list[QuantSpec],
    input_ids: torch.Tensor,
    *,
    batch_size: int,
    scale_dtype: torch.dtype,
    device: torch.device,
    by_blocks: bool | None = None,
    anchor: QuantSpec | None = None,
) -> Scores:
    """DeltaLoss of every layer in ``layers`` (full names in ``model``) at every option.

    Args:
        input_ids: scoring windows (n, seqlen); batches of ``batch_size`` windows.
        by_blocks: force the block-by-block path (True) or the whole-model path (False);
            None picks the whole model when it already sits on ``device`` un-offloaded.
        anchor: None (spec §1): one forward+backward per option, the gradient taken with
            every layer at that option. An option: one forward+backward in all, with every
            layer at ``anchor``; each option scores ``Σ|g ⊙ (W − Q_option(W))|`` with that
            one gradient, so no option is judged inside a model broken by quantizing every
            layer to its lowest bit-width at once.
    """
    if by_blocks is None:
        by_blocks = not _resident_on(model, device)
    scores: Scores = {name: [0.0] * len(options) for name in layers}
    batches = [input_ids[i : i + batch_size] for i in range(0, len(input_ids), batch_size)]
    score = _score_by_blocks if by_blocks else _score_whole_model
    passes = [(anchor, _all_options(scores, options, scale_dtype))] if anchor is not None else [
        (spec, _one_option(scores, o)) for o, spec in enumerate(options)]
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    try:
        with torch.enable_grad():
            for spec, on_grad in tqdm(passes, desc="DeltaLoss", unit="pass"):
                score(model, layers, spec, batches, scale_dtype, device, on_grad)
    finally:
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
    for o, spec in enumerate(options):
        logger.info("DeltaLoss W%dG%d: total %.4g", spec.bits, spec.group_size, sum(s[o] for s in scores.values()))
    return scores


OnGrad = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]  # (name, W, Q(W), ∂L/∂Q(W))


def _one_option(scores: Scores, o: int) -> OnGrad:
    def on_grad(name: str, w: torch.Tensor, q: torch.Tensor, g: torch.Tensor) -> None:
        scores[name][o] += float((g.float() * (w.float() - q.float())).abs().sum())
    return on_grad


def _all_options(scores: Scores, options: list[QuantSpec], scale_dtype: torch.dtype) -> OnGrad:
    def on_grad(name: str, w: torch.Tensor, q: torch.Tensor, g: torch.Tensor) -> None:
        g, w = g.float(), w.float()
        for o, spec in enumerate(options):
            scores[name][o] += float((g * (w - fake_quantize(w, spec, scale_dtype=scale_dtype))).abs().sum())
    return on_grad


def _resident_on(model: nn.Module, device: torch.device) -> bool:
    from accelerate.utils import has_offloaded_params

    if any(has_offloaded_params(m) for m in model.modules()):
        return False
    return all(_same_device(p.device, device) for p in model.parameters())


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


@contextmanager
def _quantized_leaves(layers: dict[str, nn.Linear], spec: QuantSpec, scale_dtype: torch.dtype,
                      on_grad: OnGrad | None) -> Iterator[None]:
    """Swap each layer's weight for ``Q(W)`` as a leaf that needs a gradient; every time a
    gradient lands on it, hand it to ``on_grad`` (which scores it) and drop it."""
    originals = {}
    try:
        for name, layer in layers.items():
            w = layer.weight
            originals[name] = w
            q = nn.Parameter(fake_quantize(w.detach(), spec, scale_dtype=scale_dtype).to(w.dtype), requires_grad=True)
            if on_grad is not None:
                q.register_post_accumulate_grad_hook(_scorer(name, w, on_grad))
            layer.weight = q
        yield
    finally:
        for name, w in originals.items():
            layers[name].weight = w


def _scorer(name: str, w: torch.Tensor, on_grad: OnGrad):
    def hook(q: torch.Tensor) -> None:
        on_grad(name, w.detach(), q.detach(), q.grad)
        q.grad = None
    return hook


def _score_whole_model(model, layers, spec, batches, scale_dtype, device, on_grad) -> None:
    with _quantized_leaves(layers, spec, scale_dtype, on_grad):
        for batch in batches:
            batch = batch.to(device)
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()


def _score_by_blocks(model, layers, spec, batches, scale_dtype, device, on_grad) -> None:
    prefix, blocks = find_blocks(model)
    per_block: dict[int, dict[str, nn.Linear]] = {}
    for name, layer in layers.items():
        per_block.setdefault(int(name[len(prefix) + 1 :].split(".", 1)[0]), {})[name] = layer
    ids = torch.cat(batches)
    sizes = [len(b) for b in batches]
    hidden, args, kwargs = capture_block_inputs(model, blocks, ids)
    call = BlockCall(*to_device((args, kwargs), device))
    hidden = hidden.to(device)

    # Forward: keep every block's input; quantized weights, no graph.
    inputs, tuple_out = [], False
    with torch.no_grad():
        for index, block in enumerate(blocks):
            inputs.append(hidden)
            with block_on(block, device), _quantized_leaves(per_block.get(index, {}), spec, scale_dtype, None):
                if index == len(blocks) - 1:
                    tuple_out = isinstance(block(hidden[:1], *call.args, **call.kwargs), (tuple, list))
                hidden = torch.cat([call(block, h) for h in hidden.split(sizes)])

    # Head: the loss of each batch and its gradient w.r.t. the last block's output.
    grads = [_head_grad(model, blocks, h, batch, tuple_out) for h, batch in zip(hidden.split(sizes), batches)]
    del hidden

    # Backward, last block first: recompute the block from its saved input, score, pass the gradient down.
    for index in reversed(range(len(blocks))):
        with block_on(blocks[index], device) as block, _quantized_leaves(per_block.get(index, {}), spec, scale_dtype, on_grad):
            new_grads = []
            for h, g in zip(inputs[index].split(sizes), grads):
                x = h.detach().requires_grad_(index > 0)
                call(block, x).backward(g)
                new_grads.append(x.grad)
            grads = new_grads
        inputs[index] = None


def _head_grad(model: nn.Module, blocks: nn.ModuleList, last: torch.Tensor, batch: torch.Tensor, tuple_out: bool):
    """Run the model with every block replaced by one that emits ``last`` (the real last
    block's output), so only the embeddings and the head compute; return ∂loss/∂last."""
    leaf = last.detach().to(_home(model.get_output_embeddings(), last.device)).requires_grad_()
    saved = list(blocks)
    emit = _Emit(leaf, tuple_out)
    try:
        for i in range(len(blocks)):
            blocks[i] = emit
        model(input_ids=batch.to(_home(model.get_input_embeddings(), leaf.device)), labels=batch,
              use_cache=False).loss.backward()
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block
    return leaf.grad.to(last.device)


def _home(module: nn.Module | None, fallback: torch.device) -> torch.device:
    """Where a (possibly offloaded) module's weight lives, else ``fallback``."""
    weight = getattr(module, "weight", None)
    return fallback if weight is None or weight.device.type == "meta" else weight.device


class _Emit(nn.Module):
    """Stands in for a decoder block and returns a fixed hidden state."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


@torch.no_grad()
def shared_input_groups(model: nn.Module, layers: dict[str, nn.Linear]) -> list[list[str]]:
    """Layers that read the very same input tensor, in forward order: what serving engines
    fuse into one matrix (q/k/v of one attention, gate/up of one MLP). Found from one short
    forward pass of a few token ids, so it holds for any architecture and needs no data."""
    watcher = _SharedInputs(list(layers))
    device = model.get_input_embeddings().weight.device
    ids = torch.zeros(1, 4, dtype=torch.long, device="cpu" if device.type == "meta" else device)
    with watcher.watch(layers):
        model(input_ids=ids, use_cache=False)
    return watcher.groups


class _SharedInputs:
    """Groups consecutive layers that receive the very same input tensor object, the first
    time each layer runs while watched (q/k/v read one normed hidden state, gate/up another)."""

    def __init__(self, names: list[str]):
        self.names = names
        self.seen: set[str] = set()
        self.found: list[list[str]] = []

    @property
    def groups(self) -> list[list[str]]:
        # Layers that never ran while watched stay on their own.
        return self.found + [[n] for n in self.names if n not in self.seen]

    @contextmanager
    def watch(self, layers: dict[str, nn.Linear]) -> Iterator[None]:
        last: list = [None, None]  # the previous call's input tensor and layer name

        def hook(name: str):
            def pre(module, args):
                x = args[0] if args else None
                if name not in self.seen:
                    self.seen.add(name)
                    joins = x is not None and x is last[0] and self.found and self.found[-1][-1] == last[1]
                    if joins:
                        self.found[-1].append(name)
                    else:
                        self.found.append([name])
                last[0], last[1] = x, name
            return pre

        handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
