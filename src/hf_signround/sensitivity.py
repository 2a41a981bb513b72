"""DeltaLoss: how much quantizing each layer at each option would raise the LM loss (spec §1).

``score(layer, option) = Σ_batches Σ | ∂L/∂Q(W) ⊙ (W − Q(W)) |`` where every eligible layer
is quantized by round-to-nearest at the option, ``L`` is the causal-LM cross-entropy of the
scoring windows (``labels = input_ids``) and ``Q(W)`` is the dequantized weight the forward
pass actually uses. One forward and one backward per option; or, anchored, one in all: the
gradient is taken once with every layer at one option and prices every option's ``W − Q(W)``.

It runs block by block over a block source (``blocks``; the same sources the quantization
walk uses, so a loaded model, an offloaded one and a checkpoint streamed from disk are scored
alike, with the same numbers): a forward through the blocks (one block on the compute device
at a time) keeps each block's input, the head (final norm, lm_head, loss) gives the gradient
of the last hidden state, and a backward sweep recomputes one block at a time from its saved
input and passes the input gradient down. Each ``Q(W)`` is a leaf whose gradient is turned
into its score and dropped as soon as it is accumulated. Peak memory: one block plus the
saved hidden states. (It measured 0.79 of a plain forward+backward per option on SmolLM2 at
two options, cheaper than one pass over the whole model, which holds every activation.)

A weight-only proxy ``‖W − Q(W)‖²`` (no data) is here too, as the baseline allocator the
benchmark compares against.

Second-order DeltaLoss (``taylor_scores``, ``sensitivity_method="deltaloss_fisher"``): one
forward+backward at the float model for every option, with hooks on each layer's input ``x``
and output gradient ``δ``. With ``ΔW = W − Q(W)`` and ``Δy_t = ΔW x_t`` per token ``t`` of a
batch whose loss is the mean over ``n`` predicted tokens, the loss change of moving ``W`` to
``Q(W)`` is estimated by a second-order Taylor expansion with the empirical Fisher (per token)
standing in for the Hessian::

    ΔL ≈ −Σ_t δ_t·Δy_t  +  ½ n Σ_t (δ_t·Δy_t)²

(signed first-order term, no absolute value; the Fisher term is the mean of the squared
per-token directional derivatives ``n δ_t·Δy_t``). ``Q`` is the quantizer tuning starts from:
the pre-tuning scale search of spec §3b, its importance ``Σ x²`` gathered on the scoring
windows, rather than plain round-to-nearest (round-to-nearest 2-bit is far worse than what
tuning reaches and would misrank the layers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import frozen
from .convert import expert_pairs
from .qfunc import QuantSpec, fake_quantize
from .scale_search import search_factors

logger = logging.getLogger(__name__)

Scores = dict[str, list[float]]  # layer name -> one score per option


def weight_error_scores(source, layers: dict[str, nn.Linear], options: list[QuantSpec], scale_dtype: torch.dtype,
                       device: torch.device) -> Scores:
    """The data-free proxy: ``‖W − Q(W)‖²`` per layer and option (round-to-nearest)."""
    scores: Scores = {}
    for index, group in _per_block(source, layers).items():
        with source.open(index, device):
            for name, layer in group.items():
                w = layer.weight.detach().float()
                scores[name] = [float((w - fake_quantize(w, spec, scale_dtype=scale_dtype)).square().sum())
                                for spec in options]
    return scores


def delta_loss_scores(
    source,
    layers: dict[str, nn.Linear],
    options: list[QuantSpec],
    input_ids: torch.Tensor,
    *,
    batch_size: int,
    scale_dtype: torch.dtype,
    device: torch.device,
    anchor: QuantSpec | None = None,
) -> Scores:
    """DeltaLoss of every layer in ``layers`` (full names in ``source.model``) at every option.

    Args:
        input_ids: scoring windows (n, seqlen); batches of ``batch_size`` windows.
        anchor: None (spec §1): one forward+backward per option, the gradient taken with
            every layer at that option. An option: one forward+backward in all, with every
            layer at ``anchor``; each option scores ``Σ|g ⊙ (W − Q_option(W))|`` with that
            one gradient, so no option is judged inside a model broken by quantizing every
            layer to its lowest bit-width at once.
    """
    scores: Scores = {name: [0.0] * len(options) for name in layers}
    batches = [input_ids[i : i + batch_size] for i in range(0, len(input_ids), batch_size)]
    passes = [(anchor, _all_options(scores, options, scale_dtype))] if anchor is not None else [
        (spec, _one_option(scores, o)) for o, spec in enumerate(options)]
    with frozen(source.model), torch.enable_grad():
        for spec, on_grad in tqdm(passes, desc="DeltaLoss", unit="pass"):
            _score_by_blocks(source, layers, spec, batches, scale_dtype, device, on_grad)
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


def taylor_scores(
    source,
    layers: dict[str, nn.Linear],
    options: list[QuantSpec],
    input_ids: torch.Tensor,
    *,
    batch_size: int,
    scale_dtype: torch.dtype,
    device: torch.device,
    scale_search: bool = True,
) -> Scores:
    """Second-order DeltaLoss of every layer at every option (see the module docstring).

    One forward+backward of the float model per batch serves every option, and it computes
    no weight gradient: the hooks need only each layer's input and output gradient, so the
    graph starts at each block's input. The forward sweep (no graph) gathers the scale-search
    importance. Scores are summed over batches, like :func:`delta_loss_scores`, and may be
    negative (a first-order gain).

    Args:
        scale_search: price ``W − Q(W)`` with the searched scales tuning starts from (spec
            §3b); False uses plain round-to-nearest.
    """
    batches = [input_ids[i : i + batch_size] for i in range(0, len(input_ids), batch_size)]
    taylor = _Taylor(layers, options, scale_dtype, scale_search)
    with frozen(source.model), taylor.hooks(), torch.enable_grad():
        _score_by_blocks(source, layers, None, batches, scale_dtype, device, None)
    for o, spec in enumerate(options):
        logger.info("second-order DeltaLoss W%dG%d: total %.4g", spec.bits, spec.group_size,
                    sum(s[o] for s in taylor.scores.values()))
    return taylor.scores


class _Taylor:
    """Hooks on every scored layer: without gradients (a forward that builds no graph) they sum
    ``x²`` per input channel, the scale-search importance; in a pass that builds a graph they keep
    ``x`` and, when ``δ = ∂L/∂y`` arrives, add ``−Σ_t δ_t·Δy_t + ½ n Σ_t (δ_t·Δy_t)²`` per option."""

    def __init__(self, layers: dict[str, nn.Linear], options: list[QuantSpec], scale_dtype: torch.dtype,
                 scale_search: bool):
        self.layers, self.options, self.scale_dtype, self.scale_search = layers, options, scale_dtype, scale_search
        self.scores: Scores = {name: [0.0] * len(options) for name in layers}
        self.importance: dict[str, torch.Tensor] = {}
        self.factors: dict[tuple[str, int], torch.Tensor] = {}  # searched once per layer and option
        self.inputs: dict[str, torch.Tensor] = {}

    @contextmanager
    def hooks(self) -> Iterator[None]:
        handles = [layer.register_forward_hook(self._forward(name)) for name, layer in self.layers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.inputs.clear()

    def _forward(self, name: str):
        def hook(module, args, out):
            x = args[0].detach()
            if out.requires_grad:
                self.inputs[name] = x
                out.register_hook(lambda g: self._score(name, module.weight.detach(), g))
            elif self.scale_search:
                sq = x.float().reshape(-1, x.shape[-1]).square().sum(0)
                self.importance[name] = self.importance[name] + sq if name in self.importance else sq
        return hook

    def quantized(self, name: str, w: torch.Tensor, o: int) -> torch.Tensor:
        spec = self.options[o]
        if not self.scale_search:
            return fake_quantize(w, spec, scale_dtype=self.scale_dtype)
        if (name, o) not in self.factors:
            self.factors[name, o] = search_factors(w, spec, self.importance[name], self.scale_dtype)
        f = self.factors[name, o].to(w.device)
        return fake_quantize(w, spec, alpha=f, beta=f, scale_dtype=self.scale_dtype)

    def _score(self, name: str, w: torch.Tensor, g: torch.Tensor) -> None:
        x = self.inputs.pop(name).float()
        g, w = g.detach().float(), w.float()
        # The causal-LM loss is the mean over every window's tokens but the first.
        n = x[..., 0].numel() - (x.shape[0] if x.dim() > 2 else 1)
        for o in range(len(self.options)):
            dy = x @ (w - self.quantized(name, w, o)).T
            s = (g * dy).sum(-1)
            self.scores[name][o] += float(-s.sum() + 0.5 * n * s.square().sum())


@contextmanager
def _quantized_leaves(layers: dict[str, nn.Linear], spec: QuantSpec | None, scale_dtype: torch.dtype,
                      on_grad: OnGrad | None) -> Iterator[None]:
    """Swap each layer's weight for ``Q(W)`` (``spec`` None: ``W`` itself, same storage) as a
    leaf that needs a gradient; every time a gradient lands on it, hand it to ``on_grad``
    (which scores it) and drop it."""
    originals = {}
    try:
        for name, layer in layers.items():
            w = layer.weight
            originals[name] = w
            q = nn.Parameter(w.detach() if spec is None else
                             fake_quantize(w.detach(), spec, scale_dtype=scale_dtype).to(w.dtype), requires_grad=True)
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


def _per_block(source, layers: dict[str, nn.Linear]) -> dict[int, dict[str, nn.Linear]]:
    """``layers`` grouped by the index of the block holding them, in block order."""
    per_block: dict[int, dict[str, nn.Linear]] = {}
    for name, layer in layers.items():
        per_block.setdefault(int(name[len(source.prefix) + 1 :].split(".", 1)[0]), {})[name] = layer
    return dict(sorted(per_block.items()))


def _score_by_blocks(source, layers, spec, batches, scale_dtype, device, on_grad) -> None:
    """One forward and one backward sweep over the blocks (module docstring). ``on_grad`` None:
    no weight leaves (the weights need no gradient), every block's input needs one, so the
    backward computes activation gradients only (the second-order hooks read them)."""
    per_block = _per_block(source, layers)
    sizes = [len(b) for b in batches]
    hidden, call = source.capture(torch.cat(batches), device)

    # Forward: keep every block's input; quantized weights, no graph.
    inputs, tuple_out = [], False
    with torch.no_grad():
        for index in range(len(source)):
            inputs.append(hidden)
            with source.open(index, device) as block, _quantized_leaves(per_block.get(index, {}), spec, scale_dtype,
                                                                        None):
                outs = []
                for h in hidden.split(sizes):
                    out = call.raw(block, h)
                    tuple_out = isinstance(out, (tuple, list))  # what the head must be handed
                    outs.append(out[0] if tuple_out else out)
                hidden = torch.cat(outs)

    # Head: the loss of each batch and its gradient w.r.t. the last block's output.
    with source.whole():
        grads = [_head_grad(source, h, batch, tuple_out) for h, batch in zip(hidden.split(sizes), batches)]
    del hidden

    # Backward, last block first: recompute the block from its saved input, score, pass the gradient down.
    for index in reversed(range(len(source))):
        leaves = (_quantized_leaves(per_block.get(index, {}), spec, scale_dtype, on_grad) if on_grad is not None
                  else nullcontext())
        with source.open(index, device) as block, leaves:
            new_grads = []
            for h, g in zip(inputs[index].split(sizes), grads):
                x = h.detach().requires_grad_(index > 0 or on_grad is None)
                call(block, x).backward(g)
                new_grads.append(x.grad)
            grads = new_grads
        inputs[index] = None


def _head_grad(source, last: torch.Tensor, batch: torch.Tensor, tuple_out: bool):
    """Run the model with every block replaced by one that emits ``last`` (the real last
    block's output), so only the embeddings and the head compute; return ∂loss/∂last."""
    model, blocks = source.model, source.model.get_submodule(source.prefix)
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
def shared_input_groups(source, layers: dict[str, nn.Linear], device: torch.device) -> list[list[str]]:
    """Layers that read the very same input tensor, in forward order: what serving engines
    fuse into one matrix (q/k/v of one attention, gate/up of one MLP). Found by running a few
    token ids through the blocks that hold ``layers``, so it holds for any architecture and
    needs no data."""
    watcher = _SharedInputs(list(layers))
    per_block = _per_block(source, layers)
    hidden, call = source.capture(torch.zeros(1, 4, dtype=torch.long), device)
    for index in range(max(per_block, default=-1) + 1):
        with source.open(index, device) as block, watcher.watch(per_block.get(index, {})):
            hidden = call(block, hidden)
    # Experts the probe tokens were not routed to never ran: their gate and up read one input all the same
    pairs = expert_pairs(source.model, [n for n in layers if n not in watcher.seen])
    paired = {n for pair in pairs for n in pair}
    return [group for group in watcher.groups if group[0] not in paired] + pairs


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
