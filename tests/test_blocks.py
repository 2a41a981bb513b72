import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from tests.tiny import tiny_llama, tiny_neox
from hf_signround import SignRoundV2Config, quantize_model
from hf_signround.blocks import find_blocks, matches, quantizable_layers


def test_find_blocks_is_generic():
    assert find_blocks(tiny_llama())[0] == "model.layers"
    assert find_blocks(tiny_neox())[0] == "gpt_neox.layers"


def test_find_blocks_without_blocks():
    with pytest.raises(ValueError, match="no list of repeated blocks"):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize(
    "name, patterns, expected",
    [
        ("lm_head", ["lm_head"], True),
        ("model.layers.0.mlp.down_proj", ["mlp.down_proj"], True),
        ("model.layers.10.mlp.down_proj", ["layers.1"], False),
        ("model.layers.1.mlp.down_proj", ["layers.1"], True),
        ("model.layers.0.mlp.down_proj", ["down"], False),
    ],
)
def test_matches(name, patterns, expected):
    assert matches(name, patterns) is expected


def test_unsupported_layer_type_is_named():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match=r"layer transformer\.h\.0\.attn\.c_attn is a Conv1D, which hf_signround cannot "
                                         r"quantize .* add 'attn\.c_attn' to modules_to_not_convert"):
        quantizable_layers(model, [])


def test_failed_validation_leaves_the_model_untouched():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SignRoundV2Config(iters=0, group_size=32, layer_config={"model.layers.1.mlp.nope": {"bits": 2}})
    with pytest.raises(ValueError, match=r"layer_config names \['model.layers.1.mlp.nope'\]"):
        quantize_model(model, cfg)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_nothing_left_to_quantize():
    with pytest.raises(ValueError, match="no torch.nn.Linear layer is left to quantize"):
        quantize_model(tiny_llama(), SignRoundV2Config(iters=0, group_size=32), skip=["layers"])


def test_encoder_decoder_models_are_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    with pytest.raises(ValueError, match=r"T5ForConditionalGeneration is an encoder-decoder model "
                                         r"\(config.is_encoder_decoder=True\): hf_signround quantizes decoder-only"):
        quantize_model(t5, SignRoundV2Config(iters=0, group_size=32))
    assert not any(hasattr(m, "qweight") for m in t5.modules())


def test_other_block_lists_are_named_as_left_in_full_precision(caplog):
    model = tiny_llama()
    # a smaller stack beside the language model's, as a vision tower would be (with a nested list of its own)
    tower = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ModuleList([nn.Linear(8, 8)])) for _ in range(2)])
    model.vision_layers = tower
    with caplog.at_level("WARNING", logger="hf_signround.blocks"):
        quantize_model(model, SignRoundV2Config(iters=0, group_size=32))
    assert ("vision_layers also holds repeated blocks; hf_signround quantizes model.layers only and leaves "
            "vision_layers in full precision") in caplog.text
    assert "vision_layers.0" not in caplog.text  # the nested list goes with its stack
    assert all(type(m) is nn.Linear for m in tower.modules() if isinstance(m, nn.Linear))
