"""DeltaLoss against autograd, the two execution paths against each other, fused-layer groups."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_signround.blocks import quantizable_layers
from hf_signround.qfunc import QuantSpec, fake_quantize
from hf_signround.sensitivity import delta_loss_scores, shared_input_groups, weight_error_scores
from tests.tiny import tiny_llama, tiny_neox

OPTIONS = [QuantSpec(2, 32, True), QuantSpec(4, 16, False)]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 64, (6, 24), generator=torch.Generator().manual_seed(0))


def autograd_estimate(model, spec, ids, batch_size, at=None):
    """Σ_batches Σ |∂L/∂Q(W) ⊙ (W − Q(W))| with every layer at ``spec`` by plain autograd; with
    ``at``, the gradient is taken with every layer at ``at`` instead."""
    layers = quantizable_layers(model, [])
    w = {n: m.weight.detach() for n, m in layers.items()}
    q = {n: fake_quantize(w[n], at or spec, scale_dtype=torch.float16).requires_grad_() for n in layers}
    diff = {n: w[n] - fake_quantize(w[n], spec, scale_dtype=torch.float16) for n in layers}
    out = dict.fromkeys(layers, 0.0)
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        loss = torch.func.functional_call(model, {f"{n}.weight": t for n, t in q.items()},
                                          kwargs={"input_ids": batch, "labels": batch, "use_cache": False}).loss
        for n, g in zip(q, torch.autograd.grad(loss, list(q.values()))):
            out[n] += float((g * diff[n]).abs().sum())
    return out


@pytest.mark.parametrize("arch", [tiny_llama, tiny_neox])
@pytest.mark.parametrize("by_blocks", [False, True])
def test_delta_loss_equals_the_autograd_first_order_estimate(arch, by_blocks, ids):
    model = arch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = quantizable_layers(model, [])
    weights = {n: m.weight for n, m in layers.items()}
    scores = delta_loss_scores(model, layers, OPTIONS, ids, batch_size=4, scale_dtype=torch.float16, device=CPU,
                               by_blocks=by_blocks)
    for o, spec in enumerate(OPTIONS):
        expected = autograd_estimate(model, spec, ids, batch_size=4)
        for name in layers:
            assert scores[name][o] == pytest.approx(expected[name], rel=1e-4), (name, spec)
            assert scores[name][o] > 0
    # More bits, smaller loss change, on every layer.
    assert all(s[0] > s[1] for s in scores.values())
    # The model is left exactly as it was: same weights, same tensors, no gradients required.
    assert all(layers[n].weight is weights[n] for n in layers)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("by_blocks", [False, True])
def test_anchored_delta_loss_takes_one_gradient_for_every_option(by_blocks, ids):
    model = tiny_llama()
    layers = quantizable_layers(model, [])
    anchor = QuantSpec(8, 16, True)
    scores = delta_loss_scores(model, layers, OPTIONS, ids, batch_size=4, scale_dtype=torch.float16, device=CPU,
                               by_blocks=by_blocks, anchor=anchor)
    for o, spec in enumerate(OPTIONS):
        expected = autograd_estimate(model, spec, ids, batch_size=4, at=anchor)
        for name in layers:
            assert scores[name][o] == pytest.approx(expected[name], rel=1e-4), (name, spec)


def test_offloaded_model_scores_block_by_block_like_resident(ids, tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map, offload_folder=tmp_path / "off")
    resident = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert offloaded.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    got = delta_loss_scores(offloaded, quantizable_layers(offloaded, []), OPTIONS, ids, batch_size=3,
                            scale_dtype=torch.float16, device=CPU)  # auto: offloaded -> block by block
    want = delta_loss_scores(resident, quantizable_layers(resident, []), OPTIONS, ids, batch_size=3,
                             scale_dtype=torch.float16, device=CPU, by_blocks=False)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-4), name
    assert offloaded.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # offloaded again


def test_shared_input_groups_find_what_engines_fuse():
    llama = tiny_llama()
    groups = shared_input_groups(llama, quantizable_layers(llama, []))
    attn, mlp = "model.layers.{}.self_attn.", "model.layers.{}.mlp."
    expected = []
    for i in range(2):
        expected += [[attn.format(i) + p for p in ("q_proj", "k_proj", "v_proj")], [attn.format(i) + "o_proj"],
                     [mlp.format(i) + "gate_proj", mlp.format(i) + "up_proj"], [mlp.format(i) + "down_proj"]]
    assert groups == expected
    neox = tiny_neox()
    layers = quantizable_layers(neox, [])
    assert shared_input_groups(neox, layers) == [[n] for n in layers]  # already fused, nothing shared


def test_weight_error_scores():
    model = tiny_llama()
    layers = quantizable_layers(model, [])
    scores = weight_error_scores(layers, OPTIONS, torch.float16)
    for name, layer in layers.items():
        w = layer.weight.detach()
        for o, spec in enumerate(OPTIONS):
            assert scores[name][o] == pytest.approx(float((w - fake_quantize(w, spec, scale_dtype=torch.float16))
                                                          .square().sum()), rel=1e-6)
        assert scores[name][0] > scores[name][1]
