"""Sibling layers run as one product: q/k/v of one attention, gate/up of one MLP.

Layers that read the very same input tensor (found by a 4-token probe through the model, as
the allocation finds them: ``sensitivity._SharedInputs``) and share their quantization
layout are linked into :class:`Siblings`. When the first of them is called for a device and
activation dtype, the group concatenates the members' stored tensors along the output
dimension into one ``QuantLinear`` (kept outside the module tree) and prepares its kernel; each
member's ``qweight`` then gives way to a meta placeholder, so the packed weights stay one copy.

A forward pass calls the members one by one, as the model's code does. The first call runs
the fused product on its input and keeps the result; a sibling called with the same tensor
(same object, unchanged since: its version counter) takes its columns of that result (a
view, no copy); once every member has taken its share the result is let go. A call with any
other input, or a second call of a member, runs the fused product afresh, so the outputs are
those of the members run alone whatever the calling order. (Under ``torch.inference_mode``
and ``torch.compile`` there is no version to read: an input changed in place between two
siblings' calls, which no model does, would go unseen there.) Two threads sharing one model stay
correct (each call's state is one tuple swapped whole) but each may recompute.

Why: on a GPU a decode step is launch-bound (about 224 linear calls a token for a 32-layer
Llama, each with its Python and launch cost); fusion turns seven calls a layer into four and
hands the kernel one wider matrix. On CPU (auto-round-lib's kernel) q/k/v of SmolLM2 take
0.66x the time of three calls. ``save_pretrained``, ``state_dict`` and ``stored_qweight``
give each member's stored codes back bit for bit; ``.to()``, a state-dict load and
``set_backend`` undo the fusion's prepared form, and the next call builds it again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .kernels.backend import Plan
from .memory import drop_file_pages
from .packing import pack_qzeros_nmajor, unpack_qzeros_nmajor
from .qlinear import QuantLinear, _frozen, _offloaded

logger = logging.getLogger(__name__)

__all__ = ["Siblings", "fuse_siblings", "sibling_groups"]


def _layout(layer: QuantLinear) -> tuple:
    """What members must share to be one matrix."""
    return (layer.in_features, layer.bits, layer.group_size, layer.sym, layer.scales.dtype,
            None if layer.bias is None else layer.bias.dtype, layer.backend, layer.scales.device)


def _fusable(members: list[QuantLinear]) -> bool:
    """One layout and device, none offloaded (accelerate swaps offloaded weights in call by call)."""
    return len({_layout(m) for m in members}) == 1 and not any(_offloaded(m) for m in members)


@dataclass(frozen=True)
class _Share:
    """A member's prepared form: its columns ``[start, stop)`` of the group's fused product."""

    group: Siblings
    index: int
    start: int
    stop: int
    holds_codes = True  # the member's qweight is a placeholder (QuantLinear.prepare)

    def stored_qweight(self, layer: QuantLinear) -> torch.Tensor:
        return self.group.fused.stored_qweight()[:, self.start:self.stop].contiguous()


def _run_member(layer: QuantLinear, x: torch.Tensor, share: _Share) -> torch.Tensor:
    return share.group.output(share, x)


class Siblings:
    """QuantLinears that read one input, run as one fused ``QuantLinear`` (see the module docstring)."""

    def __init__(self, members: list[QuantLinear]):
        if len(members) < 2:
            raise ValueError(f"a sibling group needs at least two layers, got {len(members)}")
        if len({_layout(m) for m in members}) != 1:
            raise ValueError("sibling layers must share in_features, bits, group_size, sym, the scales' and bias' "
                             f"dtypes, the backend and the device: {[m.extra_repr() for m in members]}")
        self.members = list(members)
        self.fused: QuantLinear | None = None
        self._state: tuple | None = None  # (input, its version, fused output, members served)

    # ------------------------------------------------------------------ preparing
    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """Build the fused layer from the members' stored tensors and choose its kernel for ``dtype`` on ``device``."""
        for member in self.members:
            member.release()  # the group's fused layer, and any kernel a member chose alone
        first = self.members[0]
        with torch.no_grad():
            fused = QuantLinear(first.in_features, sum(m.out_features for m in self.members), first.bits,
                                first.group_size, first.sym, first.bias is not None, scale_dtype=first.scales.dtype,
                                device="meta", bias_dtype=None if first.bias is None else first.bias.dtype,
                                backend=first.backend)
            fused.qweight = _frozen(torch.cat([m.stored_qweight() for m in self.members], dim=1))
            fused.scales = _frozen(torch.cat([m.scales for m in self.members], dim=1))
            if not first.sym:  # zero points are packed along N: unpack, join, pack again
                zeros = [unpack_qzeros_nmajor(m.qzeros, m.bits, m.out_features) for m in self.members]
                fused.qzeros = _frozen(pack_qzeros_nmajor(torch.cat(zeros), first.bits))
            if first.bias is not None:
                fused.bias = _frozen(torch.cat([m.bias for m in self.members]))
        plan = fused.prepare(device, dtype)
        self.fused = fused
        start = 0
        for index, member in enumerate(self.members):
            stop = start + member.out_features
            member._plan = Plan(plan.kernel, plan.device, plan.dtype, _Share(self, index, start, stop), _run_member)
            drop_file_pages(member.qweight)  # when it was read from a memory-mapped checkpoint
            member.qweight = _frozen(torch.empty(member.qweight.shape, dtype=torch.int32, device="meta"))
            start = stop

    def release(self) -> None:
        """Give every member its stored ``qweight`` back and drop the fused layer."""
        if self.fused is None:
            return
        codes = self.fused.stored_qweight()
        for member in self.members:
            share = member._plan.prepared if member._plan is not None else None
            if isinstance(share, _Share) and share.group is self:
                member.qweight = _frozen(codes[:, share.start:share.stop].contiguous())
                member._plan = None
        self.fused.release()
        self.fused, self._state = None, None

    @classmethod
    def link(cls, members: list[QuantLinear]) -> Siblings:
        """Group ``members``: each drops any kernel it chose alone, and its next call prepares the group."""
        group = cls(members)
        for member in group.members:
            member.release()
            member._siblings = group
        return group

    def can_fuse(self) -> bool:
        """Whether the members still share one layout and device, none offloaded (a move, ``set_backend`` on
        one member or accelerate's offloading can part them)."""
        return _fusable(self.members)

    def unlink(self) -> None:
        self.release()
        for member in self.members:
            member._siblings = None

    # ------------------------------------------------------------------ running
    def output(self, share: _Share, x: torch.Tensor) -> torch.Tensor:
        """Member ``share.index``'s output for ``x``: its columns of the fused product."""
        # A traced graph orders its ops, and versions are not traceable; inference tensors keep none.
        version = 0 if torch.compiler.is_compiling() or x.is_inference() else x._version
        state = self._state
        if state is None or state[0] is not x or state[1] != version or share.index in state[3]:
            plan = self.fused._plan
            state = (x, version, plan.run(self.fused, x, plan.prepared), set())
            self._state = state
        served = state[3]
        served.add(share.index)
        if len(served) == len(self.members):
            self._state = None  # nothing held between forward passes
        return state[2][..., share.start:share.stop]


# ---------------------------------------------------------------------- finding and linking
@torch.no_grad()
def sibling_groups(model: nn.Module) -> list[list[str]]:
    """Names of the QuantLinears that read the very same input, in forward order (groups of two or more).

    Runs 4 token ids through ``model`` with every QuantLinear answering zeros (no kernel is
    chosen, nothing is converted); experts no probe token was routed to are paired by
    structure (gate with up), as the allocation pairs them.
    """
    from .convert import expert_pairs
    from .sensitivity import _SharedInputs

    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        return []
    watcher = _SharedInputs(list(layers))
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    device = weight.device if weight is not None and weight.device.type != "meta" else torch.device("cpu")
    try:
        for layer in layers.values():  # with no kernel chosen, a probing layer answers zeros (QuantLinear.forward)
            layer.release()
            layer._probing = True
        with watcher.watch(layers):  # the base model: an output head's weights (mapped, maybe large) stay on disk
            getattr(model, "base_model", model)(input_ids=torch.zeros(1, 4, dtype=torch.long, device=device))
    finally:
        for layer in layers.values():
            layer._probing = False
    groups = [g for g in watcher.found if len(g) > 1]
    return groups + expert_pairs(model, [n for n in layers if n not in watcher.seen])


def fuse_siblings(model: nn.Module, enable: bool = True) -> int:
    """Link ``model``'s sibling QuantLinears (q/k/v, gate/up) so each group runs as one product
    (see the module docstring); ``enable=False`` unlinks them. Returns the number of groups linked.

    The loader calls it for every signround_v2 model. A model the 4-token probe cannot run
    (one that needs more than ``input_ids``) keeps its layers apart, with a warning; so do
    groups whose members differ in layout (bits, group size, ...) and offloaded layers.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        if layer._siblings is not None:
            layer._siblings.unlink()
    if not enable or not layers:
        return 0
    try:
        groups = sibling_groups(model)
    except Exception as err:  # noqa: BLE001 -- any model code may fail on a bare 4-token input; fusion is optional
        logger.warning("hf_signround: the 4-token probe that finds layers reading one input failed (%s: %s); "
                       "every quantized layer runs on its own", type(err).__name__, err)
        return 0
    modules = dict(model.named_modules())
    linked = 0
    for names in groups:
        members = [modules[n] for n in names]
        if not _fusable(members):
            logger.debug("hf_signround: %s stay apart (their layouts differ, or they are offloaded)", names)
            continue
        Siblings.link(members)
        linked += 1
    calls = len(layers) - sum(len(g) for g in groups if modules[g[0]]._siblings is not None) + linked
    logger.info("hf_signround: %d groups of quantized layers read one input and run fused: %d products a forward "
                "instead of %d", linked, calls, len(layers))
    return linked
