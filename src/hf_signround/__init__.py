"""hf-signround: SignRoundV2 weight-only quantization as a transformers quantizer plug-in.

Importing the package registers ``quant_method="signround_v2"`` with transformers; the
installed ``hf_signround_autoload.pth`` does the same whenever transformers' quantizer
registry is imported, so saved checkpoints reload even without ``import hf_signround``.
"""

from .config import SignRoundV2Config
from .hf_quantizer import SignRoundV2HfQuantizer, register
from .qlinear import QuantLinear
from .quantize import quantize_model

register()

__all__ = ["QuantLinear", "SignRoundV2Config", "SignRoundV2HfQuantizer", "quantize_model"]
__version__ = "0.1.0"
