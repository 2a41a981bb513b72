"""Sibling layers (q/k/v, gate/up) run as one fused product: found by the probe, bit-identical to the
members run alone on every architecture of the zoo, stored codes given back bit for bit, undone by
moves and state-dict loads, and traced by torch.compile as one custom op call a group."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from hf_signround import SignRoundV2Config, quantize_model
from hf_signround.fusion import Siblings, fuse_siblings, sibling_groups
from hf_signround.kernels.backend import ark_installed, triton_installed, triton_interpret
from hf_signround.qlinear import QuantLinear, set_backend
from tests.tiny import ZOO, tiny_llama, tiny_zoo_model

CPU_BACKENDS = ["torch"] + (["ark"] if ark_installed() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _quantized(bits: int = 4, sym: bool = False, backend: str = "auto", model=None, **kw):
    model = model if model is not None else tiny_llama()
    quantize_model(model, SignRoundV2Config(bits=bits, group_size=32, iters=0, sym=sym, backend=backend, **kw))
    return model.eval()


def _layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _layer(n: int, k: int = 96, bits: int = 3, sym: bool = False, seed: int = 0, backend: str = "torch",
           bias: bool = True) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    g = -(-k // 32)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8)
    zeros = None if sym else torch.randint(0, 2**bits, (n, g), generator=gen)
    return QuantLinear.from_codes(codes, torch.rand(n, g, generator=gen) * 0.02 + 1e-3, zeros, bits=bits,
                                  group_size=32, sym=sym, bias=torch.randn(n, generator=gen) if bias else None,
                                  bias_dtype=torch.float32, backend=backend)


class _Attention(nn.Module):
    """Three layers that read one input, with widths that are no multiple of 32 (zero points straddle words)."""

    def __init__(self, **kw):
        super().__init__()
        self.q, self.k, self.v = _layer(40, seed=1, **kw), _layer(24, seed=2, **kw), _layer(72, seed=3, **kw)

    def forward(self, x):
        return self.q(x) + self.k(x).sum(-1, keepdim=True) * self.v(x)[..., :40]


def test_the_probe_finds_qkv_and_gate_up_in_forward_order() -> None:
    model = _quantized()
    assert sibling_groups(model) == [
        [f"model.layers.{i}.{part}" for part in parts]
        for i in range(2)
        for parts in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
    ]
    assert all(m.kernel is None for m in _layers(model).values()), "the probe chose no kernel"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bits,sym", [(4, False), (3, True), (2, False), (8, True)])
def test_fused_logits_equal_the_members_run_alone(backend, bits, sym, caplog) -> None:
    model = _quantized(bits, sym, backend)
    ids = torch.randint(3, 60, (2, 7))
    with torch.no_grad():
        alone = model(ids).logits
        with caplog.at_level(logging.INFO, logger="hf_signround.fusion"):
            assert fuse_siblings(model) == 4
        assert "run fused: 8 products a forward instead of 14" in caplog.text
        fused = model(ids).logits
    assert torch.equal(fused, alone)
    q = model.model.layers[0].self_attn.q_proj
    assert q.qweight.device.type == "meta" and q.kernel == backend  # one packed copy: the group's


@pytest.mark.parametrize("backend", [b for b in ("aten_int4", "ark") if b != "ark" or ark_installed()])
def test_bfloat16_cpu_kernels_fuse_bit_identically(backend) -> None:
    model = _quantized(4, False, backend, model=tiny_llama().to(torch.bfloat16))
    ids = torch.randint(3, 60, (2, 7))
    with torch.no_grad():
        alone = model(ids).logits
        fuse_siblings(model)
        assert torch.equal(model(ids).logits, alone)
    assert model.model.layers[0].mlp.up_proj.kernel == backend


def test_float32_through_the_int4_kernel_in_bfloat16_fuses_bit_identically(float32_in_bfloat16) -> None:
    model = _quantized(4, False, "auto")
    ids = torch.randint(3, 60, (2, 7))
    with torch.no_grad():
        alone = model(ids).logits
        fuse_siblings(model)
        assert torch.equal(model(ids).logits, alone)
    assert model.model.layers[0].mlp.up_proj.kernel == "aten_int4"


@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_every_architecture_fuses_without_changing_its_logits(model_type) -> None:
    model = _quantized(bits=3, model=tiny_zoo_model(model_type))
    ids = torch.randint(3, 60, (1, 9))
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        linked = fuse_siblings(model)
        fused = model(input_ids=ids).logits
    assert torch.equal(fused, alone)
    # These store q/k/v (and phi3 gate/up) as one matrix already; every other family has siblings.
    assert (linked == 0) == (model_type in ("bloom", "falcon", "gpt2", "gpt_neox", "phi3")), linked


def test_members_in_any_order_repeated_or_fed_another_tensor_give_their_own_outputs() -> None:
    block = _Attention()
    x, other = torch.randn(2, 5, 96), torch.randn(2, 5, 96)
    with torch.no_grad():
        want = {name: layer(x) for name, layer in block.named_children()}
        want_other = {name: layer(other) for name, layer in block.named_children()}
        ref = block(x)
        Siblings.link(list(block.children()))  # a hand-built block: no input_ids to probe with
        assert torch.equal(block(x), ref)
        for order in (["v", "q", "k"], ["k", "k", "q", "v"], ["q", "v"]):
            for name in order:
                assert torch.equal(getattr(block, name)(x), want[name]), order
        assert torch.equal(block.q(x), want["q"]) and torch.equal(block.k(other), want_other["k"])
        assert torch.equal(block.v(x), want["v"])  # x again after another input: recomputed, not stale
        block.q(x)
        x.mul_(2.0)  # changed in place between two siblings: the version counter sees it
        assert torch.equal(block.k(x), _layer(24, seed=2)(x))
    group = block.q._siblings
    assert group.fused is not None and block.k.qweight.device.type == "meta", "the calls above ran fused"
    block.q(x), block.v(x)  # k already has its share of this product
    assert group._state is None, "the fused output is let go once every member has its share"
    with torch.inference_mode():  # inference tensors keep no version counter
        y = torch.randn(1, 96)
        assert torch.equal(block(y), _Attention()(y))


def test_stored_codes_state_dict_and_dequantized_weights_are_unchanged_by_fusion() -> None:
    block = _Attention(backend=CPU_BACKENDS[-1])
    before = {k: v.clone() for k, v in block.state_dict().items()}
    dense = {n: m.dequantize_weight() for n, m in block.named_children()}
    Siblings.link(list(block.children()))
    with torch.no_grad():
        block(torch.randn(1, 96))
    assert all(m.qweight.device.type == "meta" for m in block.children())
    after = block.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(m.dequantize_weight(), dense[n]) for n, m in block.named_children())
    fused = block.q._siblings.fused
    assert fused.out_features == 40 + 24 + 72 and torch.equal(fused.stored_qweight()[:, 40:64], before["k.qweight"])
    block.q.release()  # one member's release restores every member
    assert all(torch.equal(m.qweight, before[f"{n}.qweight"]) for n, m in block.named_children())
    assert block.q._siblings.fused is None


def test_a_state_dict_load_or_a_move_rebuilds_the_fused_layer() -> None:
    block, donor = _Attention(), _Attention()
    Siblings.link(list(block.children()))
    x = torch.randn(3, 96)
    with torch.no_grad():
        block(x)
        changed = {k: (v + 1) % 8 if k.endswith("qweight") else v for k, v in donor.state_dict().items()}
        block.load_state_dict(changed)
        donor.load_state_dict(changed)
        assert torch.equal(block(x), donor(x)), "a stale fused copy of the old weights ran"
        block.to(torch.float64)  # a move: every member released, rebuilt on the next call
        assert block.q._siblings.fused is None and block.q.qweight.device.type == "cpu"
        assert torch.equal(block(x.double()), donor.to(torch.float64)(x.double()))
        set_backend(block.k, "auto")  # one member on another backend: the group parts on the next call
        set_backend(donor.k, "auto")
        assert torch.equal(block(x.double()), donor(x.double()))
        assert all(m._siblings is None for m in block.children()) and block.q.kernel == "torch"


def test_layers_that_differ_in_layout_stay_apart() -> None:
    with pytest.raises(ValueError, match="must share in_features, bits, group_size"):
        Siblings([_layer(40, bits=3), _layer(40, bits=4)])
    with pytest.raises(ValueError, match="at least two layers"):
        Siblings([_layer(40)])
    model = _quantized(avg_bits=3.0, bit_options=[(2, 32), (4, 32)], tie_fused=False, sensitivity_method="weight_error")
    groups = sibling_groups(model)
    layers = _layers(model)
    mixed = [g for g in groups if len({layers[n].bits for n in g}) > 1]
    assert mixed, "the untied allocation gave some siblings different bits"
    fuse_siblings(model)
    assert all(layers[n]._siblings is None for g in mixed for n in g)
    ids = torch.randint(3, 60, (1, 6))
    with torch.no_grad():
        fused = model(ids).logits
        fuse_siblings(model, enable=False)
        assert all(m._siblings is None for m in layers.values())
        assert torch.equal(model(ids).logits, fused)


def test_a_model_the_probe_cannot_run_keeps_its_layers_apart(caplog) -> None:
    model = _quantized()

    def needs_pixels(*args, **kwargs):
        raise ValueError("pixel_values are required")

    model.model.forward = needs_pixels
    with caplog.at_level(logging.WARNING, logger="hf_signround.fusion"):
        assert fuse_siblings(model) == 0
    assert "probe that finds layers reading one input failed (ValueError: pixel_values are required)" in caplog.text
    assert all(m._siblings is None and not m._probing for m in _layers(model).values())


def test_save_and_reload_fuse_again_and_save_the_same_tensors(tmp_path) -> None:
    model = _quantized(backend=CPU_BACKENDS[-1])
    model.config.quantization_config = SignRoundV2Config(bits=4, group_size=32, iters=0, backend=CPU_BACKENDS[-1])
    model.config.quantization_config.layer_config = {n: {"bits": 4, "group_size": 32, "sym": False}
                                                     for n in _layers(model)}
    ids = torch.randint(3, 60, (1, 6))
    with torch.no_grad():
        alone = model(ids).logits
    model.save_pretrained(tmp_path / "a")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert sum(m._siblings is not None for m in _layers(again).values()) == 10  # the loader linked them
    with torch.no_grad():
        assert torch.equal(again(ids).logits, alone)
    again.save_pretrained(tmp_path / "b")
    first, second = (load_file(tmp_path / d / "model.safetensors") for d in "ab")
    assert list(first) == list(second) and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_traces_one_custom_op_call_a_group(backend) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    model = _quantized(backend=backend)
    fuse_siblings(model)
    ids = torch.randint(3, 60, (1, 7))
    with torch.no_grad():
        eager = model(ids).logits
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("eager")
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        assert torch.equal(compiled(ids).logits, eager)
        assert torch.equal(compiled(ids).logits, eager)
    calls = [n for n in counter.graphs[0].graph.nodes if n.op == "call_function" and "ark_linear" in str(n.target)]
    assert counter.frame_count == 1 and len(calls) == (8 if backend == "ark" else 0)
    assert all(m._siblings._state is None for m in _layers(model).values() if m._siblings is not None)


@pytest.mark.skipif(not triton_installed() or (DEVICE == "cpu" and not triton_interpret()),
                    reason="needs Triton on a GPU or TRITON_INTERPRET=1")
def test_triton_fused_model_matches_unfused() -> None:
    model = _quantized(bits=3, backend="triton", model=tiny_llama().to(torch.float16)).to(DEVICE)
    ids = torch.randint(3, 60, (1, 5), device=DEVICE)
    with torch.no_grad():
        alone = model(ids).logits.float()
        assert fuse_siblings(model) == 4
        fused = model(ids).logits.float()
        set_backend(model, "torch")
        ref = model(ids).logits.float()
    assert ((fused - alone).norm() / alone.norm()).item() < 2e-3
    assert ((fused - ref).norm() / ref.norm()).item() < 5e-3


def test_an_offloaded_checkpoint_probes_without_losing_accelerates_hooks(tmp_path) -> None:
    # block 1 on disk: accelerate's hooks bring its weights in call by call; its layers stay apart
    model = _quantized()
    model.config.quantization_config = SignRoundV2Config(bits=4, group_size=32, iters=0)
    model.config.quantization_config.layer_config = {n: {"bits": 4, "group_size": 32, "sym": False}
                                                     for n in _layers(model)}
    model.save_pretrained(tmp_path / "q")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map=device_map,
                                                     offload_folder=tmp_path / "offload")
    resident = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    linked = {n: m._siblings is not None for n, m in _layers(offloaded).items()}
    assert linked["model.layers.0.self_attn.k_proj"] and not any(v for n, v in linked.items() if ".layers.1." in n)
    ids = torch.tensor([[1, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(offloaded(input_ids=ids).logits, resident(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)  # offloaded layers run the reference kernel


@pytest.mark.skipif(not ark_installed(), reason="auto-round-lib's CPU kernel (hf-signround[cpu]) is not installed")
def test_compiled_static_cache_generation_gives_the_eager_tokens() -> None:
    # the path generate() auto-compiles on a GPU: static cache, the forward compiled with fullgraph=True
    from transformers import GenerationConfig

    model = _quantized(backend="ark")
    fuse_siblings(model)
    ids = torch.randint(3, 60, (1, 6))
    gen = GenerationConfig(do_sample=False, cache_implementation="static", disable_compile=True, pad_token_id=0,
                           eos_token_id=None, max_new_tokens=8, min_new_tokens=8)
    eager = model.generate(ids, generation_config=gen)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, fullgraph=True)
    assert torch.equal(model.generate(ids, generation_config=gen), eager)
