"""Backend choice for ``QuantLinear`` and the ``hf_signround::quant_linear`` custom op.

Backends: ``"torch"`` (``reference.linear_reference``, runs anywhere), ``"triton"`` (the fused
kernels of ``triton_kernels.py``) and ``"auto"``: Triton for CUDA inputs the kernels support
when Triton is installed, else torch. The environment variable ``HF_SIGNROUND_BACKEND``
overrides every layer's setting. This module is the one place that looks for Triton; the
kernel modules are imported only when a Triton forward actually runs.

The Triton path is registered as a ``torch.library.custom_op`` with a fake (shape-only)
implementation, so ``torch.compile`` treats it as one opaque node instead of breaking the
graph on the kernel launch.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["BACKENDS", "ENV_VAR", "check_backend", "select_backend", "triton_installed", "triton_interpret"]

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "HF_SIGNROUND_BACKEND"
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_interpret() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(name: str, where: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}={name!r} is not a backend: choose one of {', '.join(map(repr, BACKENDS))}")
    return name


def _triton_problem(x: torch.Tensor, bits: int, group_size: int) -> str | None:
    """Why the Triton kernels cannot run on ``x`` for this layer, with the fix; ``None`` if they can."""
    if not _TRITON_INSTALLED:
        return "Triton is not installed: `pip install triton` (or hf-signround[triton]), or use backend='torch'"
    if x.device.type != "cuda" and not triton_interpret():
        return (
            f"the input is on {x.device.type}, and the Triton kernels need a CUDA tensor: move the model to a GPU, "
            "use backend='torch', or set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) CPU interpreter"
        )
    from hf_signround.kernels.triton_launch import unsupported_reason

    return unsupported_reason(x.dtype, bits, group_size)


def select_backend(requested: str, x: torch.Tensor, bits: int, group_size: int) -> str:
    """The backend (``"torch"`` or ``"triton"``) that runs this forward.

    ``HF_SIGNROUND_BACKEND``, when set, overrides ``requested``. An explicit ``"triton"``
    that cannot run raises ``RuntimeError`` naming the problem and the fix.
    """
    env = os.environ.get(ENV_VAR)
    name = check_backend(env, ENV_VAR) if env else requested
    if name == "torch":
        return "torch"
    problem = _triton_problem(x, bits, group_size)
    if problem is None:
        return "triton"
    if name == "auto":
        return "torch"
    source = f"{ENV_VAR}=triton" if env else "backend='triton'"
    raise RuntimeError(f"hf_signround: {source} was requested, but {problem}")


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
