import copy
import json

import pytest
import torch

from hf_signround import SignRoundV2Config


def test_defaults_and_round_trip(tokenizer, corpus):
    cfg = SignRoundV2Config(bits=3, group_size=64, dataset=corpus, tokenizer=tokenizer,
                            layer_config={"model.layers.0.mlp.down_proj": {"bits": 8}})
    d = cfg.to_dict()
    assert d["quant_method"] == "signround_v2"
    assert "dataset" not in d and "tokenizer" not in d
    json.dumps(d)  # serialisable
    again = SignRoundV2Config.from_dict(d)
    assert again.to_dict() == d
    assert again.layer_spec("model.layers.0.mlp.down_proj") == {"bits": 8, "group_size": 64, "sym": False}
    assert again.layer_spec("model.layers.0.mlp.up_proj") == {"bits": 3, "group_size": 64, "sym": False}
    assert "signround_v2" in repr(cfg)


def test_deepcopy_shares_runtime_objects(tokenizer):
    gen = (t for t in ["a", "b"])
    cfg = SignRoundV2Config(dataset=["text"], tokenizer=tokenizer)
    cfg.dataset = gen  # a generator cannot be pickled or deep-copied
    dup = copy.deepcopy(cfg)
    assert dup.dataset is gen and dup.tokenizer is tokenizer
    dup.layer_config["x"] = {"bits": 2}
    assert cfg.layer_config == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 5}, r"bits=5 is not supported: choose one of 2, 3, 4, 8"),
        ({"bits": True}, r"bits=True is not supported"),
        ({"group_size": 0}, r"group_size=0 is not valid"),
        ({"group_size": -2}, r"group_size=-2 is not valid"),
        ({"iters": -1}, r"iters=-1 is out of range: it must be >= 0"),
        ({"nsamples": 0}, r"nsamples=0 is out of range"),
        ({"seqlen": 1}, r"seqlen=1 is out of range"),
        ({"lr": -0.1}, r"lr=-0.1 must be a positive number"),
        ({"scale_dtype": "int8"}, r"scale_dtype='int8' is not supported"),
        ({"topk_mode": "clip"}, r"topk_mode='clip' is not supported: choose one of drop, huber"),
        ({"layer_config": {"a.b": {"bits": 7}}}, r"layer_config\['a.b'\]\['bits'\]=7 is not supported"),
        ({"layer_config": {"a.b": {"bitz": 4}}}, r"layer_config\['a.b'\] has unknown keys \['bitz'\]"),
        ({"layer_config": "all"}, r"layer_config must be a dict of module name -> \{'bits': ..., 'group_size'"),
        ({"layer_config": {"a.b": 4}}, r"layer_config must be a dict of module name -> .* got \{'a.b': 4\}"),
        ({"dataset": []}, r"empty"),
        ({"quant_method": "gptq"}, r"quant_method='gptq' does not belong"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SignRoundV2Config(**kwargs)


@pytest.mark.parametrize("saved, match", [
    ({"format_version": 99}, r"format_version=99: this hf_signround reads format 1 only; upgrade hf_signround"),
    ({"realized_avg_bits": "three"}, r"realized_avg_bits='three' is not a number"),
    ({"bits": 5}, r"bits=5 is not supported"),
])
def test_checkpoint_metadata_is_read_and_checked_by_from_dict(saved, match):
    with pytest.raises(ValueError, match=rf"invalid quantization_config in the checkpoint's config.json: {match}"):
        SignRoundV2Config.from_dict({**SignRoundV2Config().to_dict(), **saved})
    config = SignRoundV2Config.from_dict({**SignRoundV2Config().to_dict(), "realized_avg_bits": 3.25})
    assert config.realized_avg_bits == 3.25 and config.format_version == 1
    assert config.to_dict()["realized_avg_bits"] == 3.25


def test_metadata_and_positions_are_not_constructor_arguments(caplog):
    with caplog.at_level("WARNING"):
        config = SignRoundV2Config(realized_avg_bits=3.0)
    assert "ignores unknown keys: realized_avg_bits" in caplog.text and config.realized_avg_bits is None
    with pytest.raises(TypeError):
        SignRoundV2Config(4)  # every argument is a keyword


def test_sym_and_iters_types():
    with pytest.raises(TypeError, match="sym must be True or False"):
        SignRoundV2Config(sym="yes")
    with pytest.raises(TypeError, match="iters must be an int"):
        SignRoundV2Config(iters=1.5)


def test_unknown_keys_warn(caplog):
    with caplog.at_level("WARNING"):
        SignRoundV2Config(future_knob=1)
    assert "future_knob" in caplog.text


def test_token_id_dataset_is_not_serialised():
    cfg = SignRoundV2Config(dataset=torch.zeros(4, 16, dtype=torch.long))
    assert "dataset" not in cfg.to_dict()


@pytest.mark.parametrize("kw,lr", [
    ({"bits": 4, "iters": 200}, 1 / 200),
    ({"bits": 2, "iters": 999}, 1 / 999),
    ({"bits": 2, "iters": 1000}, 2 / 1000),  # the spec's rule: 2/iters from 1000 steps at 3 bits or fewer
    ({"bits": 3, "iters": 2000}, 2 / 2000),
    ({"bits": 4, "iters": 1000}, 1 / 1000),
    ({"bits": 4, "iters": 1000, "avg_bits": 3.0, "bit_options": [(2, 64), (4, 128)]}, 2 / 1000),
    ({"bits": 4, "iters": 1000, "avg_bits": 6.0, "bit_options": [(4, 128), (8, 128)]}, 1 / 1000),
    ({"bits": 2, "iters": 1000, "lr": 5e-3}, 5e-3),
])
def test_default_learning_rate_follows_the_spec(kw, lr):
    assert SignRoundV2Config(**kw).effective_lr == pytest.approx(lr)
