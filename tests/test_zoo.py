"""Every architecture family the plug-in supports, as a tiny random model built in code (tests/tiny.py
``ZOO``): dense decoders, GPT-2's Conv1D, Bloom's batch-dependent alibi and the mixture-of-experts
models whose experts transformers fuses into 3-D tensors (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V3, GPT-OSS).

Each one is quantized with round-to-nearest, tuned (a few steps) and mixed (``avg_bits``), then
saved, reloaded in this process and in a fresh one, and used to generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_signround import SignRoundV2Config, quantize_model
from hf_signround.calibration import build_calibration
from hf_signround.convert import LinearExperts
from hf_signround.streaming import quantize_checkpoint
from tests.tiny import ZOO, tiny_zoo_model

ROOT = Path(__file__).resolve().parents[1]
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "phimoe", "granitemoe", "minimax",
       "ernie4_5_moe", "glm4_moe", "hunyuan_v1_moe"}
PACKED = ("qweight", "qzeros", "scales")


def settings(**kw) -> dict:
    return {"bits": 3, "group_size": 32, "batch_size": 4, "nsamples": 8, "seqlen": 32, **kw}


MIXED = settings(iters=2, avg_bits=3.0, bit_options=[(2, 32), (4, 32)])


@pytest.fixture(scope="module")
def windows(tokenizer, corpus):
    return build_calibration(corpus, tokenizer, nsamples=8, seqlen=32, seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer, corpus, windows):
    """Per architecture: its float checkpoint, and the mixed-precision quantized one from_pretrained
    + save_pretrained wrote, with that model's logits on two calibration windows."""
    out = {}
    for model_type in sorted(ZOO):
        root = tmp_path_factory.mktemp(f"zoo-{model_type}")
        tiny_zoo_model(model_type).save_pretrained(root / "fp")
        cfg = SignRoundV2Config(**MIXED, dataset=corpus, tokenizer=tokenizer)
        model = AutoModelForCausalLM.from_pretrained(root / "fp", quantization_config=cfg)
        model.save_pretrained(root / "q")
        with torch.no_grad():
            logits = model(input_ids=windows[:2]).logits
        torch.save(logits, root / "logits.pt")
        out[model_type] = (root, model.hf_quantizer.result)
    return out


def logits_error(model, reference: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(input_ids=ids).logits - reference).square().mean().item()


def packed_fraction(model) -> float:
    """Share of the decoder blocks' matrix weights (expert tensors included) stored packed."""
    packed = floating = 0
    for name, module in model.named_modules():
        if hasattr(module, "qweight"):
            packed += module.in_features * module.out_features
            continue
        if ".layers." in name or ".h." in name:
            floating += sum(p.numel() for k, p in module.named_parameters(recurse=False) if p.dim() >= 2)
    return packed / (packed + floating)


@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_quantizes_with_defaults_tunes_better_than_rounding_and_reloads(model_type, saved, windows):
    root, mixed = saved[model_type]
    reference = tiny_zoo_model(model_type)
    with torch.no_grad():
        float_logits = reference(input_ids=windows[:4]).logits

    errors = {}
    for mode, kw in {"rtn": settings(iters=0), "tuned": settings(iters=16)}.items():
        model = tiny_zoo_model(model_type)
        result = quantize_model(model, SignRoundV2Config(**kw), windows if kw["iters"] else None)
        errors[mode] = logits_error(model, float_logits, windows[:4])
        assert packed_fraction(model) >= (0.95 if model_type in MOE else 1.0)
        assert set(result.plan) == {n for n, m in model.named_modules() if hasattr(m, "qweight")}
    assert errors["tuned"] < errors["rtn"], errors

    # few layers make the budget coarse: at most 3.0 bits, both options used
    assert 2.5 < mixed.realized_avg_bits <= 3.0 and {s.bits for s in mixed.plan.values()} == {2, 4}
    again = AutoModelForCausalLM.from_pretrained(root / "q")
    with torch.no_grad():
        assert torch.equal(again(input_ids=windows[:2]).logits, torch.load(root / "logits.pt"))
    generated = again.generate(windows[:1, :6], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 10)
    if model_type in MOE:  # routers stay in full precision; the experts are per-expert packed layers
        experts = [m for m in again.modules() if isinstance(m, LinearExperts)]
        assert experts and all(hasattr(m, "qweight") for e in experts for m in e.modules() if m is not e
                               and not list(m.children()) and hasattr(m, "in_features"))


def test_moe_checkpoints_store_experts_one_by_one_and_routers_in_float(saved):
    names = {}
    for model_type in ("mixtral", "qwen3_moe", "gpt_oss"):
        with safe_open(str(saved[model_type][0] / "q" / "model.safetensors"), "pt") as f:
            names[model_type] = set(f.keys())  # noqa: SIM118 - not iterable
    # transformers' own per-expert names (its conversion mapping), Mixtral's block_sparse_moe prefix included
    assert "model.layers.0.block_sparse_moe.experts.3.w1.qweight" in names["mixtral"]
    assert "model.layers.0.block_sparse_moe.gate.weight" in names["mixtral"]
    assert {"model.layers.1.mlp.experts.0.gate_proj.qweight", "model.layers.1.mlp.experts.0.up_proj.scales",
            "model.layers.1.mlp.experts.3.down_proj.qzeros", "model.layers.1.mlp.gate.weight"} <= names["qwen3_moe"]
    assert {"model.layers.0.mlp.experts.2.gate_proj.bias", "model.layers.0.mlp.router.weight",
            "model.layers.0.mlp.router.bias"} <= names["gpt_oss"]
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for n in names.values() for k in n)


def test_reload_in_a_fresh_process_gives_the_same_logits(saved, windows, tmp_path):
    torch.save(windows[:2], tmp_path / "ids.pt")
    roots = [str(saved[t][0]) for t in sorted(ZOO)]
    script = (
        "import sys, torch, hf_signround\n"
        "from transformers import AutoModelForCausalLM\n"
        "ids = torch.load(sys.argv[1])\n"
        "for root in sys.argv[2:]:\n"
        "    model = AutoModelForCausalLM.from_pretrained(root + '/q')\n"
        "    with torch.no_grad():\n"
        "        same = torch.equal(model(input_ids=ids).logits, torch.load(root + '/logits.pt'))\n"
        "    print(root, same)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ids.pt"), *roots], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n")
    assert all(f"{root} True" in lines for root in roots), done.stdout


# Mixtral and Qwen3-MoE checkpoints hold experts one by one, GPT-OSS's fused (gate_up_proj)
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss", "gpt2", "bloom"])
def test_streaming_writes_what_from_pretrained_writes(model_type, saved, tmp_path, tokenizer, corpus):
    root, mixed = saved[model_type]
    result = quantize_checkpoint(root / "fp", tmp_path / "streamed",
                                 SignRoundV2Config(**MIXED, dataset=corpus, tokenizer=tokenizer))
    assert result.plan == mixed.plan
    files = {}
    for folder in (root / "q", tmp_path / "streamed"):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            files[folder.name] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not iterable
    assert files["q"].keys() == files["streamed"].keys()
    assert all(torch.equal(files["q"][k], files["streamed"][k]) for k in files["q"])
    saved_config = json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"]
    assert saved_config == json.loads((root / "q" / "config.json").read_text())["quantization_config"]


def test_routers_and_skipped_experts_stay_in_full_precision():
    model = tiny_zoo_model("qwen3_moe")
    result = quantize_model(model, SignRoundV2Config(bits=4, group_size=32, iters=0,
                                                     modules_to_not_convert=["layers.1.mlp.experts"]))
    assert not any(".mlp.gate" in n for n in result.plan)
    assert any(n.startswith("model.layers.0.mlp.experts.") for n in result.plan)
    assert not any(n.startswith("model.layers.1.mlp.experts") for n in result.plan)
    assert type(model.model.layers[1].mlp.experts).__name__ == "Qwen3MoeExperts"  # left fused, untouched


def test_experts_without_calibration_tokens_are_counted(windows, caplog):
    model = tiny_zoo_model("mixtral")

    def only_experts_0_and_1(module, args, out):
        logits, scores, indices = out
        return logits, scores, torch.tensor([0, 1]).expand_as(indices)

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(only_experts_0_and_1)
    with caplog.at_level("INFO", logger="hf_signround.quantize"):
        result = quantize_model(model, SignRoundV2Config(**settings(iters=4)), windows)
    idle = [rel for report in result.reports.values() for rel in report.unrouted]
    assert idle and all(".experts.2." in rel or ".experts.3." in rel for rel in idle)
    assert "received no calibration token" in caplog.text


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt2"])
def test_gptq_export_writes_experts_one_by_one_exactly(model_type, saved, tmp_path):
    from hf_signround import QuantLinear
    from hf_signround.checkpoint import stored_names
    from hf_signround.export import export_gptq
    from tests.test_export_gptq import gptq_dequantize

    root, _ = saved[model_type]
    model = AutoModelForCausalLM.from_pretrained(root / "q")
    result = export_gptq(model, tmp_path / "gptq")
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not iterable
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, layer in qlayers.items():  # under the checkpoint's names (Mixtral: block_sparse_moe.experts.{e}.w1)
        stored = next(iter(stored_names(model, {f"{name}.qweight": None})))[: -len(".qweight")]
        t = {k: written.pop(f"{stored}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(gptq_dequantize(t, layer.bits, layer.in_features, layer.out_features),
                           layer.dequantize_weight(torch.float32)), name
    rest = stored_names(model, {k: v for k, v in model.state_dict().items()
                                if k.rpartition(".")[0] not in qlayers or k.endswith(".bias")})
    assert all(torch.equal(written[k], rest[k]) for k in written)
    if model_type == "mixtral":
        rules = list(result.quantization_config["dynamic"])
        assert any("block_sparse_moe\\.experts" in rule for rule in rules) and not any("mlp" in rule for rule in rules)
        assert "block_sparse_moe.experts.0.w1" in result.quantization_config["modules_in_block_to_quantize"][0]


@pytest.mark.parametrize("model_type", ["mixtral", "gpt2"])
def test_inspect_reads_per_expert_and_conv1d_checkpoints(model_type, saved, tmp_path):
    from hf_signround.export import export_gptq
    from hf_signround.inspection import inspect_checkpoint

    root, mixed = saved[model_type]
    ours = inspect_checkpoint(root / "q")
    assert ours["layers"] == len(mixed.plan)
    assert ours["avg_bits"] == pytest.approx(mixed.realized_avg_bits, abs=1e-4)
    export_gptq(AutoModelForCausalLM.from_pretrained(root / "q"), tmp_path / "gptq")
    theirs = inspect_checkpoint(tmp_path / "gptq")
    assert theirs["layers"] == len(mixed.plan)
    if model_type == "mixtral":  # the checkpoint's own names
        assert "model.layers.1.block_sparse_moe.experts.2.w2" in ours["per_layer"]


@pytest.mark.parametrize("model_type,where", [("qwen3_moe", "model.layers.0.mlp.experts.1.down_proj"),
                                              ("mixtral", "model.layers.0.mlp.experts.1.w2"),
                                              ("gpt2", "transformer.h.0.attn.c_attn")])
def test_layers_kept_in_float_inside_split_modules_reload(model_type, where, tmp_path):
    # skip_nonfinite keeps one expert projection (or Conv1D) float inside a split module: it is
    # saved under its per-expert name (a Conv1D as a Conv1D again) and reloads as it was
    model = tiny_zoo_model(model_type)
    with torch.no_grad():
        if model_type == "gpt2":
            model.transformer.h[0].attn.c_attn.weight[0, 0] = float("inf")
        else:
            model.model.layers[0].mlp.experts.down_proj[1, 0, 0] = float("inf")
    model.save_pretrained(tmp_path / "fp")
    cfg = SignRoundV2Config(bits=4, group_size=32, iters=0, skip_nonfinite=True)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    assert where not in quantized.hf_quantizer.result.plan and len(quantized.hf_quantizer.result.plan) > 1
    kept = quantized.get_submodule(where).weight
    quantized.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(again.get_submodule(where)) is type(quantized.get_submodule(where))
    assert torch.equal(again.get_submodule(where).weight, kept) and torch.isinf(kept).sum() == 1


def test_a_vision_language_model_quantizes_its_language_blocks(tmp_path, caplog):
    from transformers import AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaConfig, \
        LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8)
    LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=100)) \
        .save_pretrained(tmp_path / "fp")
    with caplog.at_level("WARNING", logger="hf_signround.blocks"):
        model = AutoModelForImageTextToText.from_pretrained(
            tmp_path / "fp", quantization_config=SignRoundV2Config(bits=4, group_size=32, iters=0))
    assert "leaves model.vision_tower.encoder.layers in full precision" in caplog.text
    plan = model.hf_quantizer.result.plan
    assert len(plan) == 14 and all(n.startswith("model.language_model.layers.") for n in plan)
    ids = torch.randint(0, 99, (1, 16))
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("tie_fused", [True, False])
def test_every_expert_layer_is_allocated(tie_fused):
    # units come from shared_input_groups; experts the probe tokens skip are paired by structure, and
    # with tie_fused=False every layer is its own unit
    model = tiny_zoo_model("mixtral")
    cfg = SignRoundV2Config(bits=4, group_size=32, iters=0, avg_bits=3.0, bit_options=[(2, 32), (4, 32)],
                            tie_fused=tie_fused, sensitivity_method="weight_error")
    result = quantize_model(model, cfg)
    assert set(result.allocation.specs) == set(result.plan)
    assert sum(".experts." in n for n in result.plan) == 2 * 4 * 3 and result.realized_avg_bits <= 3.0
    if tie_fused:
        assert all(result.plan[f"{e}.w1"] == result.plan[f"{e}.w3"]
                   for e in {n.rpartition(".")[0] for n in result.plan if ".experts." in n})
