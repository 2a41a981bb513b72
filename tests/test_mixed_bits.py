"""avg_bits end to end: DeltaLoss, DP allocation, tuning, save, reload and pipeline with mixed bits."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, pipeline

from hf_signround import QuantLinear, SignRoundV2Config, quantize_model
from hf_signround.calibration import build_calibration
from tests.tiny import make_corpus, make_tokenizer, tiny_llama

IDS = torch.tensor([[1, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
OPTIONS = [(2, 32), (4, 32), (8, 32)]


def mixed(**kw):
    base = dict(sym=True, iters=2, nsamples=8, seqlen=32, batch_size=4, avg_bits=3.2, bit_options=OPTIONS,
                sensitivity_nsamples=4, sensitivity_seqlen=32)
    base.update(kw)
    return SignRoundV2Config(**base)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def packed_bits(path):
    """Bits of every packed tensor (qweight, scales, qzeros) in a saved checkpoint."""
    total = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
            if key.endswith((".qweight", ".scales", ".qzeros")):
                t = f.get_tensor(key)
                total += 8 * t.numel() * t.element_size()
    return total


def test_mixed_bits_quantize_save_reload_pipeline(llama_dir, tokenizer, corpus, tmp_path):
    cfg = mixed(dataset=corpus, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)
    qcfg, result = model.config.quantization_config, model.hf_quantizer.result
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len({m.bits for m in qlayers.values()}) > 1, "a 3.2-bit budget over W2/W4/W8 mixes bit-widths"
    # q/k/v and gate/up are tied to one option (tie_fused defaults on)
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.bits == layer.self_attn.k_proj.bits == layer.self_attn.v_proj.bits
        assert layer.mlp.gate_proj.bits == layer.mlp.up_proj.bits
    params = sum(m.in_features * m.out_features for m in qlayers.values())
    assert qcfg.realized_avg_bits <= 3.2
    assert qcfg.realized_avg_bits == pytest.approx(sum(8 * m.packed_nbytes() for m in qlayers.values()) / params,
                                                   abs=1e-6)  # (no biases in tiny Llama)
    assert result.allocation.realized == pytest.approx(qcfg.realized_avg_bits, abs=1e-6)
    assert result.realized_avg_bits == qcfg.realized_avg_bits and result.layer_config == qcfg.layer_config
    assert "chosen" in result.allocation.table()
    assert cfg.layer_config == {} and cfg.realized_avg_bits is None  # the user's config is input only

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["realized_avg_bits"] == qcfg.realized_avg_bits and saved["avg_bits"] == 3.2
    assert saved["bit_options"] == [list(o) for o in OPTIONS]
    assert "allocation" not in saved and "dataset" not in saved
    assert {n: (v["bits"], v["group_size"]) for n, v in saved["layer_config"].items()} == {
        n: (m.bits, m.group_size) for n, m in qlayers.items()}
    # the saved size is the realised average
    assert packed_bits(tmp_path) / params == pytest.approx(saved["realized_avg_bits"], abs=1e-6)

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(again), logits(model))
    gen = pipeline("text-generation", model=again, tokenizer=tokenizer)
    assert gen("the model", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("the model")


def test_pinned_layers_keep_their_spec_and_count_in_the_budget():
    model = tiny_llama()
    calib = build_calibration(make_corpus(), make_tokenizer(), nsamples=4, seqlen=32, seed=0)
    pin = {"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": -1}}
    cfg = mixed(iters=0, layer_config=pin, avg_bits=4.0)
    result = quantize_model(model, cfg, calib)
    down = model.model.layers[0].mlp.down_proj
    assert (down.bits, down.group_size) == (8, -1)
    assert "model.layers.0.mlp.down_proj" not in result.allocation.scores
    assert result.realized_avg_bits <= 4.0
    qlayers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert result.realized_avg_bits == pytest.approx(
        sum(8 * m.packed_nbytes() for m in qlayers) / sum(m.in_features * m.out_features for m in qlayers), abs=1e-6)


def test_weight_error_allocation_needs_no_data_and_untied_layers_may_differ():
    model = tiny_llama()
    cfg = mixed(iters=0, sensitivity_method="weight_error", tie_fused=False, avg_bits=3.0)
    result = quantize_model(model, cfg)  # no calibration at all
    assert result.allocation.method == "weight_error" and all(len(u) == 1 for u in result.allocation.units)
    assert result.realized_avg_bits <= 3.0


def test_budget_outside_the_options_fails_before_scoring(llama_dir, tokenizer, corpus):
    with pytest.raises(ValueError, match=r"avg_bits=2.0 is below 2\.5000, the average with the cheapest of "
                                         r"bit_options \[\(2, 32\), \(4, 32\), \(8, 32\)\]"):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=mixed(avg_bits=2.0, dataset=corpus,
                                                                                  tokenizer=tokenizer))


def test_deltaloss_needs_data(llama_dir):
    with pytest.raises(ValueError, match="avg_bits=3.2 scores layers by DeltaLoss on calibration data: pass dataset="):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=mixed(iters=0))
    model = tiny_llama()
    with pytest.raises(ValueError, match="sensitivity_method='weight_error' for a data-free allocation"):
        quantize_model(model, mixed(iters=0))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # nothing changed


@pytest.mark.parametrize("kwargs, match", [
    ({"avg_bits": 0.5}, "avg_bits=0.5 must be a number of bits per weight"),
    ({"avg_bits": "3"}, "avg_bits='3' must be a number"),
    ({"bit_options": []}, "bit_options is empty"),
    ({"bit_options": [(5, 32)]}, r"bit_options\[0\] bits=5 is not supported"),
    ({"bit_options": [(4, 0)]}, r"bit_options\[0\] group_size=0 is not valid"),
    ({"bit_options": [(4, 32), (4, 32)]}, "lists an option twice"),
    ({"bit_options": [4, 32]}, r"bit_options must be a list of \(bits, group_size\) pairs"),
    ({"sensitivity_method": "hessian"}, "sensitivity_method='hessian' is not supported"),
    ({"sensitivity_nsamples": 0}, "sensitivity_nsamples=0 is out of range"),
    ({"tie_fused": 1}, "tie_fused must be True or False"),
])
def test_allocation_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mixed(**kwargs)


def test_allocation_config_round_trip():
    cfg = mixed()
    cfg.realized_avg_bits = 3.19  # as a quantization records it
    again = SignRoundV2Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.bit_options == OPTIONS and again.avg_bits == 3.2 and again.realized_avg_bits == 3.19
    assert SignRoundV2Config(avg_bits=3.0).options == [(2, 64), (3, 128), (4, 128), (8, 128)]


@pytest.mark.parametrize("scale_search", [True, False])
def test_second_order_allocation_scores_with_the_tuning_start(scale_search):
    """``deltaloss_fisher``: the allocation's scores are :func:`taylor_scores` on the scoring
    windows, priced with the scale search when the config searches scales, else round-to-nearest."""
    from hf_signround.blocks import ResidentBlocks, quantizable_layers
    from hf_signround.qfunc import QuantSpec
    from hf_signround.sensitivity import taylor_scores

    calib = build_calibration(make_corpus(), make_tokenizer(), nsamples=4, seqlen=32, seed=0)
    reference = tiny_llama()
    want = taylor_scores(ResidentBlocks(reference), quantizable_layers(reference, []), [QuantSpec(b, g, True) for b, g in OPTIONS],
                         calib, batch_size=4, scale_dtype=torch.float16, device=torch.device("cpu"),
                         scale_search=scale_search)
    model = tiny_llama()
    cfg = mixed(iters=0, sensitivity_method="deltaloss_fisher", scale_search=scale_search)
    result = quantize_model(model, cfg, calib)
    assert result.allocation.method == "deltaloss_fisher"
    assert result.allocation.scores.keys() == want.keys()
    for name, scores in result.allocation.scores.items():
        assert scores == pytest.approx(want[name], rel=1e-6, abs=1e-9), name
    assert result.realized_avg_bits <= 3.2
    assert len({s.bits for s in result.allocation.specs.values()}) > 1


@pytest.mark.parametrize("sym", [True, False])
def test_quality_benchmark_reads_realised_bits_from_the_saved_tensors(llama_dir, tmp_path, monkeypatch, sym):
    # benchmarks/quality.py compares mixed rows with auto-round's AutoScheme by the bytes each saved
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import quality

    cfg = mixed(iters=0, sym=sym, sensitivity_method="weight_error", avg_bits=3.0)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)
    model.save_pretrained(tmp_path)
    realised = model.hf_quantizer.result.realized_avg_bits
    assert quality.stored_bits_per_weight(tmp_path, quality.model_shapes(model)) == pytest.approx(realised, abs=1e-6)
    assert quality.packed_bits_per_weight(model) == pytest.approx(realised, abs=1e-6)
    assert 2.0 < realised <= 3.0
