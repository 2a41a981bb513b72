"""``QuantLinear``: a drop-in ``nn.Linear`` replacement holding packed low-bit weights.

Parameters (``N = out_features``, ``K = in_features``, ``G`` groups along ``K``):

* ``qweight`` -- ``int32 (ceil(K/32)*bits, N)``, packed codes (see :mod:`hf_signround.packing`).
* ``scales``  -- ``scale_dtype (G, N)``.
* ``qzeros``  -- ``int32 (G, ceil(N/32)*bits)``; only for asymmetric quantization
  (symmetric uses the implicit zero point ``2**(bits-1)``).
* ``bias``    -- ``bias_dtype (N,)`` or ``None``.

They are ``nn.Parameter(requires_grad=False)`` rather than buffers because
accelerate's offloading hooks only manage parameters.

``forward`` runs the kernel :func:`hf_signround.kernels.backend.choose` picks for the
``backend`` setting, chosen on the first call for a device and activation dtype and kept
(:meth:`QuantLinear.prepare` makes that choice ahead of time; :func:`set_backend`, a move
with ``.to()`` and a state-dict load undo it). A kernel that keeps the weights in its own
packed form (auto-round-lib's CPU kernels) replaces ``qweight`` in memory by a placeholder
on the meta device with the same shape; ``state_dict()``, ``save_pretrained`` and
:meth:`QuantLinear.stored_qweight` give the stored codes back, bit for bit. A layer linked
into a sibling group (:mod:`hf_signround.fusion`: q/k/v, gate/up) runs its share of the
group's one fused product instead, with the same guarantees.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from hf_signround.kernels import reference
from hf_signround.kernels.backend import Plan, check_backend, choose
from hf_signround.memory import drop_file_pages, return_freed_memory
from hf_signround.packing import (
    check_bits,
    num_groups,
    pack_qweight_kmajor,
    pack_qzeros_nmajor,
    packed_rows,
)

logger = logging.getLogger(__name__)

__all__ = ["QuantLinear", "prepare_model", "set_backend"]


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class QuantLinear(nn.Module):
    """Weight-only quantized linear layer (2/3/4/8-bit, per-group scales/zeros)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool,
        bias: bool,
        scale_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_bits(bits)
        self.backend = check_backend(backend)
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"in_features={in_features} and out_features={out_features} must be positive"
            )
        groups = num_groups(in_features, group_size)

        self._in_features = int(in_features)
        self._out_features = int(out_features)
        self._bits = int(bits)
        self._group_size = int(group_size)
        self._num_groups = groups
        self._sym = bool(sym)
        self.scale_dtype = scale_dtype
        self.bias_dtype = scale_dtype if bias_dtype is None else bias_dtype
        self._plan: Plan | None = None  # the kernel chosen for the last device and dtype (see prepare)
        self._siblings = None  # a fusion.Siblings group this layer runs in (fusion.fuse_siblings links it)
        self._probing = False  # while fusion.sibling_groups probes: answer zeros, choose no kernel

        # Registration order fixes the state-dict key order: qweight, scales, qzeros, bias.
        self.qweight = _frozen(
            torch.empty(
                packed_rows(in_features, bits), out_features, dtype=torch.int32, device=device
            )
        )
        self.scales = _frozen(
            torch.empty(groups, out_features, dtype=scale_dtype, device=device)
        )
        if self._sym:
            self.register_parameter("qzeros", None)
        else:
            self.qzeros = _frozen(
                torch.empty(
                    groups, packed_rows(out_features, bits), dtype=torch.int32, device=device
                )
            )
        if bias:
            self.bias = _frozen(torch.empty(out_features, dtype=self.bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        *,
        bits: int,
        group_size: int,
        sym: bool,
        bias: torch.Tensor | None,
        scale_dtype: torch.dtype = torch.float16,
        bias_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> QuantLinear:
        """Build a packed module from codes ``uint8 (N, K)``, scales ``(N, G)`` and zeros ``(N, G)``.

        ``zeros`` must be ``None`` iff ``sym``; symmetric codes must already include the
        ``2**(bits-1)`` offset. ``scales`` are stored as given, cast to ``scale_dtype``.
        """
        check_bits(bits)
        if codes.ndim != 2:
            raise ValueError(f"codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
        n, k = codes.shape
        if sym and zeros is not None:
            raise ValueError("zeros must be None for symmetric quantization (sym=True)")
        if not sym and zeros is None:
            raise ValueError("zeros are required for asymmetric quantization (sym=False)")
        g = num_groups(k, group_size)
        if tuple(scales.shape) != (n, g):
            raise ValueError(f"scales shape {tuple(scales.shape)} != expected {(n, g)}")
        if zeros is not None and tuple(zeros.shape) != (n, g):
            raise ValueError(f"zeros shape {tuple(zeros.shape)} != expected {(n, g)}")
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != expected {(n,)}")

        module = cls(
            k,
            n,
            bits,
            group_size,
            sym,
            bias is not None,
            scale_dtype=scale_dtype,
            device=codes.device,
            bias_dtype=bias_dtype,
            backend=backend,
        )
        with torch.no_grad():
            module.qweight.data = pack_qweight_kmajor(codes, bits)
            module.scales.data = scales.detach().to(codes.device, scale_dtype).T.contiguous()
            if zeros is not None:
                module.qzeros.data = pack_qzeros_nmajor(zeros.detach().to(codes.device), bits)
            if bias is not None:
                module.bias.data = bias.detach().to(codes.device, module.bias_dtype).clone()
        return module

    # ------------------------------------------------------------------ properties
    @property
    def in_features(self) -> int:
        return self._in_features

    @property
    def out_features(self) -> int:
        return self._out_features

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def group_size(self) -> int:
        """The configured group size (``-1`` means one group per output row)."""
        return self._group_size

    @property
    def num_groups(self) -> int:
        return self._num_groups

    @property
    def sym(self) -> bool:
        return self._sym

    # ------------------------------------------------------------------ compute
    def stored_qweight(self) -> torch.Tensor:
        """The packed codes as stored (``int32 (ceil(K/32)*bits, N)``), also while a kernel holds its own copy."""
        if self.qweight.device.type == "meta" and self._plan is not None:
            return self._plan.prepared.stored_qweight(self)
        return self.qweight

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``(out_features, in_features)`` weight; ``dtype`` defaults to the scales' dtype."""
        return reference.dequantize_packed(
            self.stored_qweight(),
            self.scales,
            self.qzeros,
            bits=self._bits,
            group_size=self._group_size,
            in_features=self._in_features,
            out_dtype=self.scales.dtype if dtype is None else dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._plan
        if plan is None or plan.device != x.device or plan.dtype != x.dtype:
            if self._probing:
                return x.new_zeros(*x.shape[:-1], self._out_features)
            plan = self.prepare(x.device, x.dtype)
        return plan.run(self, x, plan.prepared)

    @torch.compiler.disable
    def prepare(self, device: torch.device | str, dtype: torch.dtype) -> Plan:
        """Choose the kernel for ``dtype`` activations on ``device`` now and convert the weights for it.

        Called by the first forward for a device and dtype; calling it ahead (the loader does)
        keeps that work out of the first forward and out of ``torch.compile``'s trace.
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self._siblings is not None and not self._siblings.can_fuse():
            logger.debug("%s: its sibling layers were parted (device, backend, offloading): they run apart",
                         self.extra_repr())
            self._siblings.unlink()
        if self._siblings is not None:  # the group prepares one fused layer and every member's share of it
            plan = self._plan
            if plan is None or plan.device != device or plan.dtype != dtype:
                self._siblings.prepare(device, dtype)
            return self._plan
        self.release()
        kernel = choose(self.backend, self, device, dtype)
        if kernel.name != "torch" and _offloaded(self):
            kernel = choose("torch", self, device, dtype)  # accelerate swaps the weights in on every call
        with torch.no_grad():
            prepared = kernel.prepare(self, device, dtype)
        self._plan = Plan(kernel, device, dtype, prepared, kernel.runner())
        if getattr(prepared, "holds_codes", False):  # keep one copy: stored_qweight() rebuilds the codes from it
            drop_file_pages(self.qweight)  # when it was read from a memory-mapped checkpoint
            self.qweight = _frozen(torch.empty(self.qweight.shape, dtype=torch.int32, device="meta"))
        logger.debug("%s: %s kernel for %s activations on %s", self.extra_repr(), kernel.name, dtype, device)
        return self._plan

    def release(self) -> None:
        """Drop the chosen kernel and its prepared weights, restoring the stored ``qweight`` (of every
        member of this layer's sibling group, when it runs fused)."""
        if self._siblings is not None:
            self._siblings.release()
        if self._plan is not None and self.qweight.device.type == "meta":
            self.qweight = _frozen(self._plan.prepared.stored_qweight(self))
        self._plan = None

    @property
    def kernel(self) -> str | None:
        """The name of the kernel chosen for the last device and dtype, or None before the first call."""
        return None if self._plan is None else self._plan.kernel.name

    def _apply(self, fn, recurse=True):
        self.release()  # .to(), .cuda(), ...: move the stored tensors, choose again on the next call
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight.device.type == "meta" and self._plan is not None:
            destination[prefix + "qweight"] = self.stored_qweight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.release()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def packed_nbytes(self) -> int:
        """Total bytes of the stored tensors (qweight, scales, qzeros, bias)."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.qweight, self.scales, self.qzeros, self.bias)
            if t is not None
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self._in_features}, out_features={self._out_features}, "
            f"bits={self._bits}, group_size={self._group_size}, sym={self._sym}, "
            f"bias={self.bias is not None}"
        )


def _offloaded(module: nn.Module) -> bool:
    hook = getattr(module, "_hf_hook", None)
    return bool(getattr(hook, "offload", False))


def set_backend(model: nn.Module, backend: str) -> int:
    """Set ``backend`` (one of ``kernels.backend.BACKENDS``) on every QuantLinear of ``model``; returns their count.

    Each layer chooses its kernel again on its next call.
    """
    check_backend(backend)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.release()
        layer.backend = backend
    return len(layers)


def prepare_model(model: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> int:
    """Choose every QuantLinear's kernel and convert its weights now, for ``dtype`` activations on ``device``
    (default: where each layer's scales are, and the model's dtype). Returns the number of layers."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    dtype = dtype or getattr(model, "dtype", None) or torch.float32
    for layer in layers:
        if layer.scales.device.type != "meta":
            layer.prepare(device or layer.scales.device, dtype)
            return_freed_memory()  # a conversion's temporaries: glibc would keep them, layer after layer
    return len(layers)
