"""The transformers adapter: registration and load hooks; the work happens in ``quantize_model``.

Two ways through ``from_pretrained``:
- a float checkpoint with ``quantization_config=SignRoundV2Config(...)``: the weights load as
  usual, then ``_process_model_after_weight_loading`` calibrates and quantizes;
- a saved hf_signround checkpoint (``quant_method: signround_v2`` in config.json): the Linears
  it lists become empty ``QuantLinear`` skeletons before the packed tensors load.

Either way the checkpoint's safetensors headers are checked against the skeleton before any
weight loads (``checkpoint.check_checkpoint``), and saving writes the layout fingerprint
those checks compare into every file.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer

from .blocks import find_blocks
from .calibration import calibration_windows, is_token_ids
from .checkpoint import LAYOUT_KEY, check_checkpoint, config_fingerprint, without_merges_into_split_experts
from .config import QUANT_METHOD, SignRoundV2Config
from .fusion import fuse_siblings
from .qlinear import prepare_model
from .quantize import quantize_model, replace_with_empty_quant_linears

logger = logging.getLogger(__name__)


class SignRoundV2HfQuantizer(HfQuantizer):
    """Quantizes a model with SignRoundV2 while it loads, and reloads saved checkpoints."""

    requires_calibration = False  # True would mean "can only load pre-quantized checkpoints"

    def __init__(self, quantization_config: SignRoundV2Config, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.result = None  # quantize_model's QuantizationResult, once this quantizer has quantized a model

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        # Fail before the weights load, so a missing input costs no waiting.
        config = self.quantization_config
        if self.pre_quantized:
            if not config.layer_config:
                raise ValueError(
                    "this checkpoint's quantization_config (signround_v2) lists no quantized layers in layer_config: "
                    "config.json is corrupt or was edited; restore it from the original save"
                )
            return
        if config.needs_calibration:
            if config.dataset is None:
                raise ValueError(config.calibration_error())
            if config.tokenizer is None and not is_token_ids(config.dataset):
                raise ValueError(
                    "a tokenizer is needed to tokenize the calibration texts: pass "
                    "tokenizer=AutoTokenizer.from_pretrained(...) to SignRoundV2Config"
                )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        if self.pre_quantized:
            replace_with_empty_quant_linears(model, self.quantization_config)
        else:
            find_blocks(model)  # an architecture we cannot quantize fails before the weights load
        if checkpoint_files:
            check_checkpoint(model, checkpoint_files, self.quantization_config if self.pre_quantized else None)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if self.pre_quantized:
            fuse_siblings(model)  # q/k/v and gate/up run as one product each
            prepare_model(model)  # choose kernels and convert weights now, not in the first forward
            return model
        config = self.quantization_config
        skip = self.get_modules_to_not_convert(
            model, config.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None), add_default_skips=True
        )
        calibration, scoring = calibration_windows(config)
        self.result = quantize_model(model, config, calibration, skip=skip, scoring=scoring)
        config.record(self.result)  # the keys save_pretrained writes into config.json
        fuse_siblings(model)
        return model

    def update_weight_conversions(self, weight_conversions, model):
        # A saved checkpoint stores experts one by one (convert.py): nothing may merge them on reload.
        conversions = super().update_weight_conversions(weight_conversions, model)
        return without_merges_into_split_experts(conversions, model) if self.pre_quantized else conversions

    def get_state_dict_and_metadata(self, model) -> tuple[None, dict[str, str]]:
        # Every safetensors file carries the layout its packed tensors were written with.
        return None, {LAYOUT_KEY: config_fingerprint(self.quantization_config)}

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        # QuantLinear compiles without graph breaks (the Triton path is a torch custom op), so
        # generate() may auto-compile decoding with a static cache.
        return True


def register() -> None:
    """Register the config and quantizer with transformers under ``signround_v2`` (idempotent)."""
    from transformers.quantizers.auto import register_quantization_config, register_quantizer

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SignRoundV2Config)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SignRoundV2HfQuantizer)
