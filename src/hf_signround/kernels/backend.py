"""Which kernel runs a ``QuantLinear``, chosen once per layer, device and activation dtype.

Backends (the ``backend`` setting; ``HF_SIGNROUND_BACKEND`` overrides it, read when a choice is made):

============  ==========================================================================
``"auto"``    the fastest that can run (measured, docs/BENCHMARKS.md): ``triton`` for CUDA
              inputs in float16/bfloat16; on CPU, float32 activations: ``ark`` when
              auto-round-lib is installed, or ``aten_int4`` computing in bfloat16 first
              when ``torch.set_float32_matmul_precision("medium")`` allows bfloat16;
              bfloat16: ``aten_int4`` for the layers it takes, else ``ark``; float16:
              ``ark``, else ``aten_int4``; else ``torch``
``"triton"``  the fused Triton kernels (``triton_kernels.py``), reading the stored tensors
``"ark"``     auto-round-lib's CPU kernels (``ark.py``), float32 compute, every bit width
``"aten_int4"`` torch's CPU int4 kernel (``aten_int4.py``), 2-4 bits; float32 activations
              compute in bfloat16 when the float32 matmul precision is ``"medium"``
``"torch"``   the reference (``reference.py``): dequantize, then ``F.linear``; runs anywhere
============  ==========================================================================

A :class:`Kernel` says why it cannot run a layer (``problem``, with the fix), turns the
stored tensors into its own form once (``prepare``) and runs (the function ``runner`` gives). A prepared form with
``holds_codes`` true and a ``stored_qweight(layer)`` method replaces the stored ``qweight`` in
memory (see ``QuantLinear.prepare``). ``QuantLinear`` asks
:func:`choose` on its first call for a device and dtype and keeps the answer, so a forward
pass costs one comparison before the kernel call. This module is the one place that looks
for the optional Triton and auto-round-lib packages; their kernel modules are imported only
when chosen. The Triton and ARK calls are ``torch.library`` custom ops with shape-only fake
implementations, so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BACKENDS", "ENV_VAR", "Kernel", "Plan", "bf16_allowed_for_float32", "check_backend", "choose",
           "int4_compute_dtype", "triton_installed", "triton_interpret", "ark_installed"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "ark", "aten_int4", "torch")
ENV_VAR = "HF_SIGNROUND_BACKEND"
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_ARK_INSTALLED = importlib.util.find_spec("auto_round_kernel") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def ark_installed() -> bool:
    return _ARK_INSTALLED


def triton_interpret() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(name: str, where: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}={name!r} is not a backend: choose one of {', '.join(map(repr, BACKENDS))}")
    return name


@dataclass(frozen=True)
class Kernel:
    """One backend, as ``QuantLinear`` uses it. ``layer`` is the QuantLinear (its stored tensors and shape)."""

    name: str
    problem: Callable[[Any, torch.device, torch.dtype], str | None]  # why it cannot run, with the fix
    prepare: Callable[[Any, torch.device, torch.dtype], Any]  # its own form of the weights (None: the stored ones)
    runner: Callable[[], Callable[[Any, torch.Tensor, Any], torch.Tensor]]  # imports it, gives (layer, x, prepared) -> y


@dataclass
class Plan:
    """A layer's chosen kernel for one device and activation dtype, with its prepared weights."""

    kernel: Kernel
    device: torch.device
    dtype: torch.dtype
    prepared: Any = None
    run: Callable[[Any, torch.Tensor, Any], torch.Tensor] | None = None  # kernel.runner(), resolved once


# ----------------------------------------------------------------------------- torch (reference)
def _torch_runner():
    from hf_signround.kernels.reference import linear_reference

    def run(layer, x, prepared):
        return linear_reference(x, layer.qweight, layer.scales, layer.qzeros, layer.bias, bits=layer.bits,
                                group_size=layer.group_size, in_features=layer.in_features)

    return run


# ----------------------------------------------------------------------------- triton
def _triton_problem(layer, device: torch.device, dtype: torch.dtype) -> str | None:
    if not _TRITON_INSTALLED:
        return "Triton is not installed: `pip install triton` (or hf-signround[triton]), or use backend='torch'"
    if device.type != "cuda" and not triton_interpret():
        return (
            f"the input is on {device.type}, and the Triton kernels need a CUDA tensor: move the model to a GPU, "
            "use backend='torch', or set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) CPU interpreter"
        )
    from hf_signround.kernels.triton_launch import unsupported_reason

    return unsupported_reason(dtype, layer.bits, layer.group_size)


def _triton_prepare(layer, device, dtype):
    from hf_signround.kernels.triton_launch import LayerLauncher

    return LayerLauncher(layer.qweight, layer.scales, layer.qzeros, layer.bias, layer.bits, layer.group_size,
                         layer.in_features, dtype, device)


def _triton_runner():
    def run(layer, x, prepared):
        # Eager calls skip the custom op's dispatch and the per-call checks (28 -> 8.4 us of Python a call on
        # our CPU, benchmarks/call_overhead.py); torch.compile traces the op; autograd through x keeps it.
        if torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()):
            return quant_linear_op(x, layer.qweight, layer.scales, layer.qzeros, layer.bias, layer.bits,
                                   layer.group_size, layer.in_features)
        return prepared(x, layer.qweight, layer.scales, layer.qzeros, layer.bias)

    return run


# ----------------------------------------------------------------------------- ark (auto-round-lib, CPU)
def _ark_problem(layer, device: torch.device, dtype: torch.dtype) -> str | None:
    if not _ARK_INSTALLED:
        return ("auto-round-lib is not installed: `pip install 'hf-signround[cpu]'` (x86-64 Linux), or use "
                "backend='torch'")
    if device.type != "cpu":
        return f"auto-round-lib's kernels run on CPU, and the input is on {device.type}"
    return None


def _ark_prepare(layer, device, dtype):
    from hf_signround.kernels import ark

    return ark.prepare(layer.qweight, layer.scales, layer.qzeros, layer.bias, bits=layer.bits,
                       group_size=layer.group_size, in_features=layer.in_features)


def _ark_runner():
    from hf_signround.kernels.ark import ark_linear

    def run(layer, x, prepared):
        return ark_linear(x, prepared, layer.out_features)

    return run


# ----------------------------------------------------------------------------- aten_int4 (torch's CPU kernel)
def _int4_problem(layer, device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return f"torch's int4 CPU kernel runs on CPU, and the input is on {device.type}"
    from hf_signround.kernels.aten_int4 import unsupported_reason

    return unsupported_reason(layer.bits, layer.group_size, layer.in_features, layer.out_features)


def bf16_allowed_for_float32() -> bool:
    """Whether float32 products on CPU may compute in bfloat16: PyTorch's own setting for that,
    ``torch.set_float32_matmul_precision("medium")`` (oneDNN's ``fp32_precision`` becomes ``"bf16"``)."""
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "bf16"
    return torch.get_float32_matmul_precision() == "medium"  # pragma: no cover - torch without the oneDNN knob


def int4_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What torch's int4 kernel computes in for ``dtype`` activations: bfloat16 for float32 ones when
    :func:`bf16_allowed_for_float32`, else the activations' own dtype."""
    return torch.bfloat16 if dtype == torch.float32 and bf16_allowed_for_float32() else dtype


def _int4_prepare(layer, device, dtype):
    from hf_signround.kernels import aten_int4

    return aten_int4.prepare(layer.qweight, layer.scales, layer.qzeros, layer.bias, bits=layer.bits,
                             group_size=layer.group_size, in_features=layer.in_features,
                             dtype=int4_compute_dtype(dtype), bias_dtype=dtype)


def _int4_runner():
    from hf_signround.kernels.aten_int4 import int4_linear

    def run(layer, x, prepared):
        return int4_linear(x, prepared, layer.out_features)

    return run


def _nothing(layer, device, dtype) -> None:
    return None  # the kernel reads the stored tensors


KERNELS: dict[str, Kernel] = {
    "torch": Kernel("torch", lambda layer, device, dtype: None, _nothing, _torch_runner),
    "triton": Kernel("triton", _triton_problem, _triton_prepare, _triton_runner),
    "ark": Kernel("ark", _ark_problem, _ark_prepare, _ark_runner),
    "aten_int4": Kernel("aten_int4", _int4_problem, _int4_prepare, _int4_runner),
}


def _auto_order(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """Candidates of ``"auto"``, fastest first (measured: docs/BENCHMARKS.md, "CPU inference")."""
    if device.type == "cuda":
        return ("triton", "torch")
    if device.type == "cpu":
        # torch's int4 kernel is fast in bfloat16 only (benchmarks/cpu_kernels.py, one token: 2.5-5.2x a
        # dense bfloat16 product; float32 0.07-0.22x a dense float32 one; float16 55x slower than bfloat16).
        # ARK computes in float32: 1.2-3.5x a dense float32 product, exact.
        if dtype == torch.bfloat16 or int4_compute_dtype(dtype) == torch.bfloat16:
            return ("aten_int4", "ark", "torch")
        return ("ark", "aten_int4", "torch") if dtype == torch.float16 else ("ark", "torch")
    return ("torch",)


_SLOW_WARNED: set[tuple[str, str]] = set()


def choose(requested: str, layer, device: torch.device, dtype: torch.dtype) -> Kernel:
    """The kernel that runs ``layer`` on ``device`` for ``dtype`` activations.

    ``HF_SIGNROUND_BACKEND``, when set, overrides ``requested``. An explicit backend that
    cannot run raises ``RuntimeError`` naming the problem and the fix.
    """
    env = os.environ.get(ENV_VAR)
    name = check_backend(env, ENV_VAR) if env else requested
    if name != "auto":
        kernel = KERNELS[name]
        problem = kernel.problem(layer, device, dtype)
        if problem is not None:
            source = f"{ENV_VAR}={name}" if env else f"backend={name!r}"
            raise RuntimeError(f"hf_signround: {source} was requested, but {problem}")
        return kernel
    problems = {}
    for candidate in _auto_order(device, dtype):
        problems[candidate] = KERNELS[candidate].problem(layer, device, dtype)
        if problems[candidate] is None:
            if candidate == "torch" and len(problems) > 1:
                _warn_slow(device, dtype, problems)
            return KERNELS[candidate]
    raise AssertionError("the torch reference runs anywhere")  # pragma: no cover


def _warn_slow(device: torch.device, dtype: torch.dtype, problems: dict[str, str | None]) -> None:
    key = (device.type, str(dtype))
    if key in _SLOW_WARNED:
        return
    _SLOW_WARNED.add(key)
    reasons = "; ".join(f"{name}: {why}" for name, why in problems.items() if why)
    logger.warning("hf_signround: quantized layers run the slow reference path on %s for %s activations, which "
                   "rebuilds every dense weight on each call (%s)", device.type, str(dtype).replace("torch.", ""),
                   reasons)


# ----------------------------------------------------------------------------- the Triton custom op
@torch.library.custom_op("hf_signround::quant_linear", mutates_args=())
def quant_linear_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``F.linear(x, dequantize(qweight, scales, qzeros), bias)`` by the fused Triton kernels."""
    from hf_signround.kernels.triton_launch import quant_linear

    return quant_linear(x, qweight, scales, qzeros, bias, bits, group_size, in_features)


@quant_linear_op.register_fake
def _(x, qweight, scales, qzeros, bias, bits, group_size, in_features):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))
