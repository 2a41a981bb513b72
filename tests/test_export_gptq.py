"""GPTQ v1 export: bit-stream packing, exact layer conversion, dynamic rules, the written checkpoint.

The GPTQ side is decoded here from the format's definition (codes laid end to end as one
little-endian bit stream, ``zero − 1`` stored, ``W = scales[g_idx] · (q − z)``), written
independently of ``hf_signround.export``; ``test_export_gptq_loaders.py`` loads the export
with a third-party loader.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_signround import QuantLinear, SignRoundV2Config
from hf_signround.export import export_gptq
from hf_signround.export.gptq import gptq_layer_tensors, gptq_quantization_config
from hf_signround.export.gptq_pack import pack_gptq_bitstream, unpack_gptq_bitstream
from hf_signround.packing import pack_int32_lastdim


def stream_decode(words: torch.Tensor, bits: int, count: int) -> list[list[int]]:
    """Rows of int32 words read as one little-endian bit stream each, cut into ``bits``-bit codes."""
    out = []
    for row in words.tolist():
        stream = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(row))
        out.append([(stream >> (bits * j)) & ((1 << bits) - 1) for j in range(count)])
    return out


def gptq_dequantize(t: dict[str, torch.Tensor], bits: int, k: int, n: int) -> torch.Tensor:
    """W (N, K) float32 from GPTQ v1 tensors, by the format's definition."""
    q = torch.tensor(stream_decode(t["qweight"].T, bits, k), dtype=torch.float32)  # (N, K)
    z = torch.tensor(stream_decode(t["qzeros"], bits, n), dtype=torch.float32) + 1  # (G, N), v1: stored zero - 1
    g = t["g_idx"].long()
    return t["scales"].float()[g].T * (q - z[g].T)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bitstream_packing(bits):
    codes = torch.randint(0, 2**bits, (6, 96), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    words = pack_gptq_bitstream(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (6, 96 * bits // 32)
    assert stream_decode(words, bits, 96) == codes.tolist()
    assert torch.equal(unpack_gptq_bitstream(words, bits), codes)
    if bits != 3:  # no code straddles a word: GPTQ's layout is ours
        assert torch.equal(words, pack_int32_lastdim(codes, bits))


def test_bitstream_packing_errors():
    with pytest.raises(ValueError, match="multiple of 32 codes"):
        pack_gptq_bitstream(torch.zeros(2, 40, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"codes out of range for 3 bits: \[8, 8\]"):
        pack_gptq_bitstream(torch.full((1, 32), 8, dtype=torch.uint8), 3)


def random_layer(bits, group_size, sym, n=64, k=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = 1 if group_size == -1 else -(-k // group_size)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, g, generator=gen) * 0.02 + 1e-3).half()
    zeros = None
    if not sym:
        zeros = torch.randint(0, 2**bits, (n, g), generator=gen)
        zeros[::3, 0] = 0  # zero point 0: not storable as v1's "zero - 1", written mirrored
    return QuantLinear.from_codes(codes, scales, zeros, bits=bits, group_size=group_size, sym=sym,
                                  bias=torch.randn(n, generator=gen), scale_dtype=torch.float16)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size,written", [(32, 32), (-1, -1), (48, 16)])
def test_layer_conversion_is_exact(bits, sym, group_size, written):
    layer = random_layer(bits, group_size, sym, seed=bits)
    tensors, spec = gptq_layer_tensors(layer)
    groups = 1 if written == -1 else 128 // written
    assert spec.pop("mirrored") >= (0 if sym else 22)  # asym: every third row's first group, at least
    assert spec == {"bits": bits, "group_size": written, "sym": sym}
    assert tensors["qweight"].shape == (128 * bits // 32, 64) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (groups, 64 * bits // 32) and tensors["qzeros"].dtype == torch.int32
    assert tensors["scales"].shape == (groups, 64) and tensors["scales"].dtype == torch.float16
    assert tensors["g_idx"].dtype == torch.int32 and tensors["g_idx"].tolist() == [
        0 if written == -1 else i // written for i in range(128)]
    assert torch.equal(tensors["bias"], layer.bias)
    assert torch.equal(gptq_dequantize(tensors, bits, 128, 64), layer.dequantize_weight(torch.float32))


def test_layer_conversion_needs_multiples_of_32():
    layer = random_layer(4, 16, True, n=64, k=80)
    with pytest.raises(ValueError, match=r"divisible by 32, this layer is 80 -> 64: keep it in full precision"):
        gptq_layer_tensors(layer)


LAYERS = [f"model.layers.{i}.{m}" for i in range(2) for m in
          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")]


def test_dynamic_rules_cover_fused_modules_and_float_layers(caplog):
    w4 = {"bits": 4, "group_size": 128, "sym": True}
    specs = {name: dict(w4) for name in LAYERS}
    for name in ("q_proj", "k_proj", "v_proj"):
        specs[f"model.layers.1.self_attn.{name}"] = {"bits": 8, "group_size": -1, "sym": True}
    specs["model.layers.0.mlp.up_proj"] = {"bits": 2, "group_size": 64, "sym": False}
    float_layers = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with caplog.at_level(logging.WARNING):
        cfg = gptq_quantization_config(specs, float_layers, dict.fromkeys(LAYERS, 1), "model.layers")
    assert (cfg["quant_method"], cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"]) == ("gptq", 4, 128, True, False)
    assert "meta" not in cfg  # transformers reads a "meta" key as the v2 zero-point format

    def rule(layer):  # how vLLM (re.match on the module name) reads the rules: first match wins
        for key, value in cfg["dynamic"].items():
            if re.match(key[2:], layer):
                return False if key.startswith("-:") else value
        return None

    w8 = {"bits": 8, "group_size": -1, "sym": True}
    assert rule("model.layers.1.self_attn.qkv_proj") == w8  # vLLM's fused module
    assert rule("model.layers.1.self_attn.k_proj") == w8  # the checkpoint's modules
    assert rule("model.layers.0.self_attn.qkv_proj") is None and rule("model.layers.1.self_attn.o_proj") is None
    assert rule("model.layers.0.mlp.up_proj") == {"bits": 2, "group_size": 64, "sym": False}
    assert rule("model.layers.0.mlp.gate_proj") is None
    assert rule("model.layers.1.mlp.down_proj") is False and rule("model.layers.0.mlp.down_proj") is False
    assert rule("model.layers.1.mlp.gate_up_proj") is None
    assert "vLLM fuses them into one module and will refuse this checkpoint" in caplog.text
    assert "model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj" in caplog.text
    assert cfg["modules_in_block_to_quantize"] == [sorted({n.split(".", 3)[3] for n in LAYERS})]


def rtn(llama_dir, **kw):
    cfg = SignRoundV2Config(**{"bits": 4, "group_size": 32, "sym": False, "iters": 0, **kw})
    return AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)


def read_all(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                assert key not in out, f"{key} written twice"
                out[key] = f.get_tensor(key)
    return out


def test_export_writes_a_gptq_checkpoint(llama_dir, tmp_path):
    over = {"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": -1, "sym": True}}
    model = rtn(llama_dir, bits=3, layer_config=over, modules_to_not_convert=["model.layers.1.mlp.down_proj"])
    result = export_gptq(model, tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == result.quantization_config
    assert json.loads((tmp_path / "quantize_config.json").read_text()) == result.quantization_config
    qc = result.quantization_config
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (3, 32, False)
    assert qc["dynamic"] == {r"+:model\.layers\.0\.mlp\.down_proj$": {"bits": 8, "group_size": -1, "sym": True},
                             r"-:model\.layers\.1\.mlp\.down_proj$": {}}
    assert result.files == ["model.safetensors", "config.json", "quantize_config.json"]

    saved = read_all(tmp_path)
    state = model.state_dict()
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, layer in qlayers.items():
        t = {k: saved.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(gptq_dequantize(t, layer.bits, layer.in_features, layer.out_features),
                           layer.dequantize_weight(torch.float32)), name
    for key, tensor in saved.items():  # everything else as in the model
        assert torch.equal(tensor, state[key]), key
    assert set(saved) == {k for k in state if k.rpartition(".")[0] not in qlayers}
    assert "model.layers.1.mlp.down_proj.weight" in saved


def test_export_shards_and_replaces_an_older_export(llama_dir, tmp_path):
    model = rtn(llama_dir)
    export_gptq(model, tmp_path)
    single = read_all(tmp_path)
    result = export_gptq(model, tmp_path, max_shard_size="20KB")
    assert len(result.files) > 4 and "model.safetensors.index.json" in result.files
    assert not (tmp_path / "model.safetensors").exists()  # the single-file export was replaced
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    sharded = read_all(tmp_path)
    assert set(index["weight_map"]) == set(sharded) == set(single)
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())


def test_export_writes_tied_embeddings_once(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "fp")
    model = rtn(tmp_path / "fp")
    export_gptq(model, tmp_path / "gptq")
    saved = read_all(tmp_path / "gptq")
    assert "model.embed_tokens.weight" in saved and "lm_head.weight" not in saved


def test_export_errors(llama_dir, tmp_path):
    float_model = AutoModelForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(ValueError, match="has no QuantLinear layers: quantize it first"):
        export_gptq(float_model, tmp_path)
    with pytest.raises(ValueError, match=r"max_shard_size='lots': give bytes as an int or a string such as '500MB'"):
        export_gptq(rtn(llama_dir), tmp_path, max_shard_size="lots")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match=r"cannot export model\.layers\.0\.mlp\.gate_proj to GPTQ: GPTQ needs "
                                         r"in_features and out_features divisible by 32, this layer is 64 -> 80"):
        export_gptq(rtn(tmp_path / "odd", group_size=16), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_export_of_an_offloaded_model_matches_the_resident_one(llama_dir, tmp_path):
    # block 1 offloaded to disk by accelerate: its norms are meta tensors behind hooks until brought in
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    cfg = SignRoundV2Config(bits=4, group_size=32, iters=0)
    offloaded = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg, device_map=device_map,
                                                     offload_folder=tmp_path / "offload")
    assert offloaded.model.layers[1].input_layernorm.weight.device.type == "meta"
    export_gptq(offloaded, tmp_path / "offloaded")
    export_gptq(rtn(llama_dir), tmp_path / "resident")
    assert read_all(tmp_path / "offloaded").keys() == read_all(tmp_path / "resident").keys()
    assert (tmp_path / "offloaded" / "model.safetensors").read_bytes() == \
        (tmp_path / "resident" / "model.safetensors").read_bytes()


def test_export_refuses_to_write_over_the_checkpoint_it_was_loaded_from(llama_dir, tmp_path):
    model = rtn(llama_dir)
    model.save_pretrained(tmp_path / "ours")
    before = (tmp_path / "ours" / "model.safetensors").read_bytes()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match=f"OUT {tmp_path}/ours is the input {tmp_path}/ours: writing there would"):
        export_gptq(loaded, tmp_path / "ours")
    with pytest.raises(ValueError, match=f"OUT {tmp_path}/ours/gptq lies inside the input {tmp_path}/ours"):
        export_gptq(loaded, tmp_path / "ours" / "gptq")
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == before
    export_gptq(loaded, tmp_path / "gptq")
    with pytest.raises(ValueError, match=f"OUT {tmp_path}/gptq is not empty: pass --overwrite"):
        export_gptq(loaded, tmp_path / "gptq", overwrite=False)
