"""hf-signround: SignRoundV2 weight-only quantization as a transformers quantizer plug-in.

Importing the package registers ``quant_method="signround_v2"`` with transformers: at once
when transformers' quantizer registry is already loaded, else the moment it loads. The
installed ``hf_signround_autoload.pth`` does the same at interpreter start, so saved
checkpoints reload even without ``import hf_signround``.

The import itself is light (no torch, no transformers): the public names below load their
modules on first use, so ``hf-signround --help`` answers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import hf_signround_autoload

if TYPE_CHECKING:
    from .config import SignRoundV2Config
    from .hf_quantizer import SignRoundV2HfQuantizer, register
    from .qlinear import QuantLinear
    from .quantize import quantize_model

# public name -> the module defining it
_EXPORTS = {
    "QuantLinear": "qlinear",
    "SignRoundV2Config": "config",
    "SignRoundV2HfQuantizer": "hf_quantizer",
    "quantize_model": "quantize",
    "register": "hf_quantizer",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Load a public name's module on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


hf_signround_autoload.install()
