"""End to end through transformers: quantize while loading, save, reload, generate."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, pipeline

from hf_signround import QuantLinear, SignRoundV2Config
from hf_signround.shards import CheckpointError


def rtn_config(**kw):
    base = dict(bits=4, group_size=32, sym=False, iters=0)
    base.update(kw)
    return SignRoundV2Config(**base)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def test_quantize_save_reload_bit_exact(model_dir, tmp_path):
    float_model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=rtn_config())
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    linears = {n for n, m in float_model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}
    assert set(qlayers) == linears  # every block Linear quantized, lm_head kept
    assert isinstance(model.lm_head, nn.Linear)
    assert torch.equal(model.get_input_embeddings().weight, float_model.get_input_embeddings().weight)

    ref = logits(float_model, IDS)
    out = logits(model, IDS)
    snr = 20 * torch.log10(ref.norm() / (ref - out).norm())
    assert snr > 15, f"W4 round-to-nearest logits SNR {snr:.1f} dB"

    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "signround_v2" and saved["bits"] == 4
    assert set(saved["layer_config"]) == linears
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        name = next(iter(qlayers))
        assert f.get_tensor(f"{name}.qweight").dtype == torch.int32

    again, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert isinstance(again.config.quantization_config, SignRoundV2Config)
    assert torch.equal(logits(again, IDS), out)
    for n, m in again.named_modules():
        if isinstance(m, QuantLinear):
            for key, t in m.state_dict().items():
                assert torch.equal(t, qlayers[n].state_dict()[key]), (n, key)


def test_generate_and_pipeline(llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=rtn_config())
    out = model.generate(IDS, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 5)
    gen = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = gen("the model", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("the model")


def test_user_config_is_left_untouched(llama_dir):
    cfg = rtn_config(modules_to_not_convert=["mlp.down_proj"])
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)
    assert cfg.layer_config == {}  # from_pretrained worked on a copy
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


def test_mixed_layer_config(llama_dir, tmp_path):
    over = {"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": -1, "sym": True},
            "model.layers.1.self_attn.q_proj": {"bits": 2}}
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=rtn_config(bits=3, layer_config=over))
    down, q = model.model.layers[0].mlp.down_proj, model.model.layers[1].self_attn.q_proj
    assert (down.bits, down.group_size, down.sym) == (8, -1, True)
    assert (q.bits, q.group_size) == (2, 32)
    assert model.model.layers[0].mlp.up_proj.bits == 3
    assert "bits=8" in repr(down) and "group_size=-1" in repr(down)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(again, IDS), logits(model, IDS))


def test_group_size_that_does_not_divide_gives_a_short_last_group(llama_dir, tmp_path):
    # 48 does not divide 64 or 128: groups are k // 48, the last one shorter (GPTQ's g_idx)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=rtn_config(group_size=48))
    down = model.model.layers[0].mlp.down_proj  # in_features 128 -> groups of 48, 48, 32
    assert down.num_groups == 3 and down.scales.shape == (3, 64)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path), IDS), logits(model, IDS))


def test_stray_layer_config_name(llama_dir):
    with pytest.raises(ValueError, match=r"layer_config names \['model.layers.0.nope'\]"):
        AutoModelForCausalLM.from_pretrained(
            llama_dir, quantization_config=rtn_config(layer_config={"model.layers.0.nope": {"bits": 2}}))


def test_tuning_needs_a_dataset_and_a_tokenizer(llama_dir, corpus):
    with pytest.raises(ValueError, match="iters=5 tunes on calibration data: pass dataset="):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=SignRoundV2Config(iters=5))
    with pytest.raises(ValueError, match="a tokenizer is needed"):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=SignRoundV2Config(iters=5, dataset=corpus))


def test_iters0_reads_the_dataset_for_the_allocation_only(llama_dir, corpus, tokenizer):
    # round-to-nearest stays data-free and cheap: the blocks never see the calibration windows
    cfg = rtn_config(avg_bits=3.0, bit_options=[(2, 32), (4, 32)], dataset=corpus, tokenizer=tokenizer,
                     sensitivity_nsamples=2, sensitivity_seqlen=32)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)
    result = model.hf_quantizer.result
    assert result.allocation is not None and {s.bits for s in result.plan.values()} == {2, 4}
    assert all(r.mse_after is None and r.loss_after is None for r in result.reports.values())


def _saved(llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=rtn_config())
    model.save_pretrained(tmp_path)
    return tmp_path


def _rewrite(path, change, metadata=None):
    """Re-save ``path``'s tensors after ``change(tensors)``, with the file's metadata unless given."""
    from safetensors.torch import load_file, save_file

    if metadata is None:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def _edit_config(path, change):
    cfg = json.loads((path / "config.json").read_text())
    change(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def test_corrupt_checkpoint_missing_tensor(llama_dir, tmp_path):
    path = _saved(llama_dir, tmp_path)
    _rewrite(path / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.qweight"))
    with pytest.raises(CheckpointError, match=re.escape(f"the checkpoint in {path} does not match the model its "
                                                        "config.json describes: model.layers.1.mlp.up_proj.qweight is "
                                                        "missing. ")):
        AutoModelForCausalLM.from_pretrained(path)


def test_corrupt_checkpoint_wrong_shape(llama_dir, tmp_path):
    path = _saved(llama_dir, tmp_path)
    _edit_config(path, lambda qc: qc["layer_config"]["model.layers.0.mlp.up_proj"].update(bits=2))  # by hand
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.qweight in model\.safetensors has shape "
                                              r"\[8, 128\], expected \[4, 128\]"):
        AutoModelForCausalLM.from_pretrained(path)


def test_corrupt_config_without_layers(llama_dir, tmp_path):
    path = _saved(llama_dir, tmp_path)
    _edit_config(path, lambda qc: qc.update(layer_config={}))
    with pytest.raises(ValueError, match="lists no quantized layers"):
        AutoModelForCausalLM.from_pretrained(path)


def test_push_to_hub_uploads_a_reloadable_checkpoint(llama_dir, tmp_path, monkeypatch):
    # offline: intercept the hub calls and keep the folder push_to_hub would upload
    import shutil
    from types import SimpleNamespace

    import transformers.utils.hub as hub

    monkeypatch.setattr(hub, "hf_api", lambda: SimpleNamespace(create_repo=lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id)))
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **kw: SimpleNamespace(save=lambda path: None))
    uploaded = tmp_path / "uploaded"
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=rtn_config())
    monkeypatch.setattr(model, "_upload_modified_files", lambda working_dir, *a, **kw: shutil.copytree(working_dir, uploaded))
    model.push_to_hub("someone/tiny-w4")
    again = AutoModelForCausalLM.from_pretrained(uploaded)
    assert torch.equal(logits(again, IDS), logits(model, IDS))


# ----------------------------------------------------------------------------- load checks
def test_a_missing_float_tensor_is_refused(llama_dir, tmp_path):
    # transformers would initialise the embedding afresh and only report it: logits off by ~0.8
    path = _saved(llama_dir, tmp_path)
    _rewrite(path / "model.safetensors", lambda t: t.pop("model.embed_tokens.weight"))
    with pytest.raises(CheckpointError, match=re.escape(
            f"the checkpoint in {path} does not match the model its config.json describes: "
            "model.embed_tokens.weight is missing. Loading it would leave weights uninitialised or decode them "
            "wrongly: re-download or re-save the checkpoint, or restore the config.json saved with it")):
        AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("quantized", [True, False])
def test_a_truncated_file_is_named(llama_dir, tmp_path, quantized):
    path = _saved(llama_dir, tmp_path / "q") if quantized else Path(shutil.copytree(llama_dir, tmp_path / "fp"))
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    load = {} if quantized else {"quantization_config": rtn_config()}  # a float load fails before quantizing
    with pytest.raises(CheckpointError, match=re.escape(
            f"{weights} is not a valid safetensors file: its tensors end at byte {size} but the file has "
            f"{size // 2} bytes (it was cut short). The file is damaged or incomplete (e.g. an interrupted download "
            "or save): re-download or re-save the checkpoint")):
        AutoModelForCausalLM.from_pretrained(path, **load)


def test_a_float_checkpoint_missing_a_tensor_is_not_quantized(llama_dir, tmp_path):
    path = Path(shutil.copytree(llama_dir, tmp_path / "fp"))
    _rewrite(path / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=rtn_config())


def test_an_edit_that_keeps_every_shape_is_caught_by_the_layout_fingerprint(llama_dir, tmp_path):
    # q_proj is 64 wide: groups of 32 or of 48 both make two groups, so every tensor keeps its shape
    path = _saved(llama_dir, tmp_path)
    _edit_config(path, lambda qc: qc["layer_config"]["model.layers.0.self_attn.q_proj"].update(group_size=48))
    with pytest.raises(CheckpointError, match=re.escape(
            f"{path / 'model.safetensors'} was written for another quantization layout than config.json's "
            "quantization_config describes (a layer's bits, group_size or sym, scale_dtype or format_version differ)")):
        AutoModelForCausalLM.from_pretrained(path)


def test_a_zero_point_the_config_does_not_use_is_refused(llama_dir, tmp_path):
    # the config says symmetric: transformers would skip qzeros and decode with 2**(bits-1)
    path = _saved(llama_dir, tmp_path)
    _edit_config(path, lambda qc: qc["layer_config"]["model.layers.1.mlp.up_proj"].update(sym=True))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.qzeros in model\.safetensors is not "
                                              r"expected \(the config does not quantize it this way\)"):
        AutoModelForCausalLM.from_pretrained(path)


def test_packed_tensors_must_have_their_dtype(llama_dir, tmp_path):
    path = _saved(llama_dir, tmp_path)
    key = "model.layers.0.mlp.up_proj.scales"
    _rewrite(path / "model.safetensors", lambda t: t.update({key: t[key].view(torch.bfloat16)}))  # same bytes
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)} in model\.safetensors is BF16, expected F16"):
        AutoModelForCausalLM.from_pretrained(path)


def test_a_checkpoint_without_a_fingerprint_still_loads(llama_dir, tmp_path):
    path = _saved(llama_dir, tmp_path)
    expected = logits(AutoModelForCausalLM.from_pretrained(path), IDS)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert set(f.metadata()) == {"format", "hf_signround_layout"}
    _rewrite(path / "model.safetensors", lambda t: None, metadata={"format": "pt"})  # as saved before fingerprints
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(path), IDS), expected)


def test_an_invalid_config_field_says_it_is_the_checkpoints(llama_dir, tmp_path):
    path = _saved(llama_dir, tmp_path)
    _edit_config(path, lambda qc: qc.update(layer_config="all"))
    with pytest.raises(TypeError, match=re.escape(
            "invalid quantization_config in the checkpoint's config.json: layer_config must be a dict of module name "
            "-> {'bits': ..., 'group_size': ..., 'sym': ...}, got 'all'. Restore the config.json saved with the "
            "checkpoint, or re-download it")):
        AutoModelForCausalLM.from_pretrained(path)


def test_encoder_decoder_models_are_refused_before_loading(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                        decoder_start_token_id=0)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(
            "T5ForConditionalGeneration is an encoder-decoder model (config.is_encoder_decoder=True): hf_signround "
            "quantizes decoder-only causal LMs (Llama, Qwen2, GPT-NeoX, ...); choose a decoder-only model")):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path, quantization_config=rtn_config())
