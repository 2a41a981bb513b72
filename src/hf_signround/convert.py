"""Weight layouts other than ``nn.Linear``, turned into ``nn.Linear`` modules computing the same
function, so that one pipeline (planning, scale search, tuning, DeltaLoss, packing, export)
serves them all:

* **fused experts** of mixture-of-experts models. transformers 5 stores a layer's experts as
  3-D parameters in one module decorated with ``use_experts_implementation`` (``gate_up_proj``
  (E, 2I, H) and ``down_proj`` (E, H, I), or transposed, with optional biases; the decorator's
  flags ``has_gate``, ``has_bias``, ``is_transposed``, ``is_concatenated`` and
  ``has_post_expert_norm`` say which). :class:`LinearExperts` holds one :class:`Expert` per
  expert with its gate, up and down ``nn.Linear`` and computes only the routed experts, as
  transformers' eager forward does. The per-expert names are the checkpoint's own, read from
  transformers' conversion mapping (``checkpoint.expert_checkpoint_names``: Mixtral's ``w1``/``w3``/``w2``, Qwen-MoE and DeepSeek's
  ``gate_proj``/``up_proj``/``down_proj``), so a quantized checkpoint and its GPTQ export use
  the per-expert naming serving engines read (``mlp.experts.{e}.gate_proj``).
* **routers** (``mlp.gate``, ``mlp.router``, a shared expert's one-output gate) are found beside
  the experts and stay in full precision, as in auto-round.
* **GPT-2's** ``Conv1D`` (weight stored (in, out)) becomes an ``nn.Linear`` with the weight
  transposed.

Found by structure (3-D parameters and the decorator's flags, a ``weight`` of ``num_experts``
rows), not by model names. Tested on Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3,
GPT-OSS, PhiMoE, GraniteMoE, MiniMax, ERNIE-4.5-MoE, GLM-4-MoE, HunYuan-MoE and GPT-2
(``tests/test_zoo.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import expert_checkpoint_names

logger = logging.getLogger(__name__)

__all__ = ["Expert", "LinearExperts", "convert_layers", "convertible", "expert_pairs", "fill_unrouted_scores", "routers"]

_DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """An experts module of transformers' ``use_experts_implementation`` kind."""
    return (hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "num_experts")
            and any(p.dim() == 3 for p in module.parameters(recurse=False)))


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def convertible(module: nn.Module) -> bool:
    """Whether :func:`convert_layers` turns ``module`` into Linears."""
    return is_fused_experts(module) or _is_conv1d(module)


def routers(model: nn.Module, prefix: str) -> set[str]:
    """Names of the routing modules under ``prefix``: a module beside an experts module holding a
    weight matrix (its own or a child's: HunYuan's ``gate.wg``) of ``num_experts`` rows, or of a
    single row (a shared expert's gate), and little else."""
    found = set()
    for name, module in model.named_modules():
        if not name.startswith(prefix + ".") or not (is_fused_experts(module) or isinstance(module, LinearExperts)):
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name)
        for child_name, child in parent.named_children():
            if child is module:
                continue
            params = list(child.parameters())
            rows = [p for p in params if p.dim() == 2 and p.shape[0] in (module.num_experts, 1)]
            # small besides that matrix (ERNIE's score-correction statistics), unlike a shared expert
            if rows and sum(p.numel() for p in params) <= 2 * max(p.numel() for p in rows) + module.num_experts:
                found.add(f"{parent_name}.{child_name}")
    return found


class Expert(nn.Module):
    """One expert's projections, each an ``nn.Linear`` (or, once quantized, a QuantLinear); the
    owning :class:`LinearExperts` runs them."""

    def __init__(self, names: tuple[str, str, str], gate: nn.Module | None, up: nn.Module, down: nn.Module):
        super().__init__()
        self.names = names
        if gate is not None:
            setattr(self, names[0], gate)
        setattr(self, names[1], up)
        setattr(self, names[2], down)

    def projections(self) -> tuple[nn.Module | None, nn.Module, nn.Module]:
        gate_name, up_name, down_name = self.names
        return getattr(self, gate_name, None), getattr(self, up_name), getattr(self, down_name)


class LinearExperts(nn.Module):
    """A fused experts module as :class:`Expert` children ``"0"`` ... ``"E-1"`` (see the module
    docstring); called as the fused one is, with the hidden states (tokens, H), each token's
    top-k expert indices and their weights. Only experts that receive a token run."""

    def __init__(self, experts: list[Expert], fused: nn.Module, layout: ExpertsLayout):
        super().__init__()
        self.layout = layout  # the fused layout: gating, and how a checkpoint may store them (streaming)
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.num_experts = len(experts)
        self.act_fn = getattr(fused, "act_fn", None)
        self.post_expert_norm = fused.post_expert_norm if getattr(fused, "has_post_expert_norm", False) else None
        # The fused class's gating (e.g. GPT-OSS's clamped SwiGLU) runs unchanged on a shell that
        # holds its plain attributes (alpha, limit, ...) and the activation.
        self._gate_fn = type(fused)._apply_gate if layout.has_gate else None
        self._gate_shell = _GateShell(act_fn=self.act_fn, **{
            k: v for k, v in vars(fused).items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))})

    def expert(self, e: int) -> Expert:
        return self._modules[str(e)]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if top_k_index is None:  # GPT-OSS passes them by these names
            top_k_index, top_k_weights = kwargs["router_indices"], kwargs["routing_weights"]
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()
        for e in hit:
            if not 0 <= e < self.num_experts:  # expert-parallel sentinels
                continue
            token_idx, slot = torch.where(top_k_index == e)
            h = self.expert_forward(e, hidden_states[token_idx])
            out.index_add_(0, token_idx, (h * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.expert(e).projections()
        if self.layout.has_gate:
            g, u = gate(x), up(x)
            joined = torch.cat([g, u], -1) if self.layout.is_concatenated else torch.stack([g, u], -1).flatten(-2)
            h = self._gate_fn(self._gate_shell, joined)
        else:
            h = self.act_fn(up(x))
        h = down(h)
        return self.post_expert_norm(h) if self.post_expert_norm is not None else h


class _GateShell:
    def __init__(self, **attrs):
        self.__dict__.update(attrs)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def _unfuse(fused: nn.Module, names: tuple[str, str, str]) -> LinearExperts:
    from accelerate.utils import has_offloaded_params

    if has_offloaded_params(fused):
        raise ValueError(
            f"{type(fused).__name__} is offloaded by accelerate (device_map with CPU or disk offload), and its fused "
            "expert weights cannot be split into per-expert layers there: load the model without offloading, or "
            "quantize it block by block with hf-signround quantize --low-memory"
        )
    layout = ExpertsLayout.of(fused, names)
    params = dict(fused.named_parameters(recurse=False))
    missing = [k for k in layout.fused_names() if k not in params]
    if missing:
        raise ValueError(f"{type(fused).__name__} has experts parameters {sorted(params)}, not {missing}: hf_signround "
                         "knows transformers' use_experts_implementation layout")
    experts = []
    for e in range(fused.num_experts):
        tensors = layout.split({k: params[k] for k in layout.fused_names()}, e)
        linear = {role: _linear(tensors[f"{role}.weight"], tensors.get(f"{role}.bias"))
                  for role in {k.rpartition(".")[0] for k in tensors}}
        experts.append(Expert(names, linear.get(names[0]), linear[names[1]], linear[names[2]]))
    return LinearExperts(experts, fused, layout)


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused experts module stores its experts (the ``use_experts_implementation`` flags)
    and the per-expert names they are split into."""

    names: tuple[str, str, str]  # gate, up, down
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    is_concatenated: bool

    @classmethod
    def of(cls, fused: nn.Module, names: tuple[str, str, str]) -> ExpertsLayout:
        return cls(names, bool(fused.has_gate), bool(fused.has_bias), bool(fused.is_transposed),
                   bool(getattr(fused, "is_concatenated", True)))

    def fused_names(self) -> list[str]:
        first = "gate_up_proj" if self.has_gate else "up_proj"
        mats = [first, "down_proj"]
        return mats + ([f"{m}_bias" for m in mats] if self.has_bias else [])

    def split(self, fused: dict[str, torch.Tensor], e: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s tensors (``"{name}.weight"`` (out, in), ``"{name}.bias"``) from the fused ones."""
        gate_name, up_name, down_name = self.names

        def take(t: torch.Tensor) -> torch.Tensor:
            return t if t.device.type == "meta" else t.detach().clone(memory_format=torch.contiguous_format)

        def matrix(key: str) -> torch.Tensor:
            w = fused[key][e]
            return w.t() if self.is_transposed else w

        out = {}
        first = matrix("gate_up_proj" if self.has_gate else "up_proj")
        first_bias = fused.get(("gate_up_proj" if self.has_gate else "up_proj") + "_bias") if self.has_bias else None
        first_bias = None if first_bias is None else first_bias[e]
        if self.has_gate:
            half = first.shape[0] // 2
            picks = ((slice(0, half), slice(half, None)) if self.is_concatenated
                     else (slice(0, None, 2), slice(1, None, 2)))
            for name, pick in zip((gate_name, up_name), picks):
                out[f"{name}.weight"] = take(first[pick])
                if first_bias is not None:
                    out[f"{name}.bias"] = take(first_bias[pick])
        else:
            out[f"{up_name}.weight"] = take(first)
            if first_bias is not None:
                out[f"{up_name}.bias"] = take(first_bias)
        out[f"{down_name}.weight"] = take(matrix("down_proj"))
        if self.has_bias:
            out[f"{down_name}.bias"] = take(fused["down_proj_bias"][e])
        return out


def _conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    weight = conv.weight.t() if conv.weight.device.type == "meta" else conv.weight.detach().t().contiguous()
    bias = conv.bias if conv.bias is None or conv.bias.device.type == "meta" else conv.bias.detach()
    layer = _linear(weight, bias)
    layer.from_conv1d = True  # its checkpoint tensor is the transpose; restore_conv1d turns it back
    return layer


def was_conv1d(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and getattr(module, "from_conv1d", False)


def restore_conv1d(block: nn.Module) -> list[str]:
    """Turn the Linears made from ``Conv1D`` that stay in full precision (not quantized) back into
    ``Conv1D``, so the checkpoint stores them as the model expects; returns their names."""
    from transformers.pytorch_utils import Conv1D

    from .blocks import set_module

    restored = []
    for name, module in list(block.named_modules()):
        if was_conv1d(module):
            conv = Conv1D(module.out_features, module.in_features).to(module.weight.device, module.weight.dtype)
            conv.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
            conv.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
            set_module(block, name, conv)
            restored.append(name)
    return restored


def convert_layers(model: nn.Module, prefix: str, wanted=lambda name: True) -> list[str]:
    """Replace every fused experts module and ``Conv1D`` under ``prefix`` for which ``wanted(name)``
    holds by its Linear form (see the module docstring), in place; returns the names replaced
    (none once converted: converted modules are Linears).

    The model computes the same function after (up to float summation order). Parameters on
    the meta device stay on meta (a model about to load a checkpoint).
    """
    from .blocks import set_module

    names = expert_checkpoint_names(model) or _DEFAULT_NAMES
    # By name, so each fused module is released once replaced: one module's copy at a time
    converted = [n for n, m in model.named_modules() if n.startswith(prefix + ".") and convertible(m) and wanted(n)]
    for name in converted:
        module = model.get_submodule(name)
        set_module(model, name, _unfuse(module, names) if is_fused_experts(module) else _conv1d_as_linear(module))
        del module
    if converted:
        logger.info("%d experts or Conv1D modules computed by Linear layers (%s, ...)", len(converted), converted[0])
    return converted


def expert_pairs(model: nn.Module, names: Iterable[str]) -> list[list[str]]:
    """``[gate, up]`` of every expert among ``names`` whose two projections are both listed: they
    read the same input and share one option in the allocation (serving engines fuse them)."""
    listed, pairs = set(names), []
    for name, module in model.named_modules():
        if isinstance(module, Expert) and module.names[0] in module._modules:
            pair = [f"{name}.{module.names[0]}", f"{name}.{module.names[1]}"]
            if all(p in listed for p in pair):
                pairs.append(pair)
    return pairs


def fill_unrouted_scores(model: nn.Module, scores: dict[str, list[float]]) -> list[str]:
    """Give expert layers whose scores are all zero (no scoring token was routed to their expert)
    the mean scores of the same projection of their layer's other experts, so an expert idle on
    the scoring text is not starved of bits; returns the names filled."""
    filled = []
    for name, module in model.named_modules():
        if not isinstance(module, LinearExperts):
            continue
        for role in module.expert(0).names:
            rows = {f"{name}.{e}.{role}": scores.get(f"{name}.{e}.{role}") for e in range(module.num_experts)}
            rows = {k: v for k, v in rows.items() if v is not None}
            idle = [k for k, v in rows.items() if not any(v)]
            seen = [v for k, v in rows.items() if k not in idle]
            if idle and seen:
                mean = [sum(col) / len(seen) for col in zip(*seen)]
                for k in idle:
                    scores[k] = list(mean)
                filled += idle
    return filled
