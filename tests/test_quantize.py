"""The pipeline's checks before anything changes: NaN and inf weights."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from hf_signround import QuantLinear, SignRoundV2Config, quantize_model
from tests.tiny import tiny_llama

IDS = torch.tensor([[1, 4, 5, 6, 7, 8, 9, 10]])
BAD = "model.layers.1.mlp.up_proj"


def with_nonfinite(model: nn.Module) -> nn.Module:
    weight = model.get_submodule(BAD).weight
    with torch.no_grad():
        weight[0, :3] = float("nan")
        weight[5, 7] = float("inf")
        weight[6, 7] = -float("inf")
    return model


@pytest.fixture(scope="module")
def nan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("nan")
    with_nonfinite(tiny_llama()).save_pretrained(path)
    return path


def message(count: str = "1 layer has") -> str:
    return (f"{count} NaN or inf weights, which cannot be quantized: {BAD} (3 NaN, 2 inf). Repair the checkpoint, or "
            "pass skip_nonfinite=True (hf-signround --skip-nonfinite) to keep such layers in full precision")


@pytest.mark.parametrize("sym", [True, False])
def test_nonfinite_weights_stop_before_anything_changes(sym):
    model = with_nonfinite(tiny_llama())
    with pytest.raises(ValueError, match=re.escape(message())):
        quantize_model(model, SignRoundV2Config(bits=4, group_size=32, sym=sym, iters=0))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_every_layer_is_counted(tmp_path):
    model = with_nonfinite(tiny_llama())
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[2, 2] = float("nan")
    with pytest.raises(ValueError, match=re.escape(
            "2 layers have NaN or inf weights, which cannot be quantized: model.layers.0.self_attn.q_proj "
            f"(1 NaN, 0 inf), {BAD} (3 NaN, 2 inf). Repair")):
        quantize_model(model, SignRoundV2Config(bits=4, group_size=32, iters=0))


def test_offloaded_weights_are_checked_too(nan_dir, tmp_path):
    # block 1 offloaded to disk by accelerate: its weights are meta tensors until brought in
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    with pytest.raises(ValueError, match=re.escape(message())):
        AutoModelForCausalLM.from_pretrained(nan_dir, device_map=device_map, offload_folder=tmp_path / "offload",
                                             quantization_config=SignRoundV2Config(bits=4, group_size=32, iters=0))


def test_skip_nonfinite_keeps_those_layers_in_full_precision(nan_dir, tmp_path, caplog):
    cfg = SignRoundV2Config(bits=4, group_size=32, iters=0, skip_nonfinite=True)
    with caplog.at_level(logging.WARNING, logger="hf_signround.quantize"):
        model = AutoModelForCausalLM.from_pretrained(nan_dir, quantization_config=cfg)
    assert f"keeping 1 layer with NaN or inf weights in full precision (skip_nonfinite=True): {BAD} (3 NaN, 2 inf)" \
        in caplog.text
    layer = model.get_submodule(BAD)
    assert type(layer) is nn.Linear and torch.isnan(layer.weight).sum() == 3  # as loaded
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 13 and BAD not in quantized
    saved = model.config.quantization_config
    assert BAD not in saved.layer_config and saved.to_dict()["skip_nonfinite"] is True

    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, rtol=0, atol=0, equal_nan=True, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=0,
                                   equal_nan=True)


def test_skip_nonfinite_is_validated():
    with pytest.raises(TypeError, match="skip_nonfinite must be True or False, got 'yes'"):
        SignRoundV2Config(skip_nonfinite="yes")
