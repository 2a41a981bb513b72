"""DeltaLoss against autograd, offloaded models against resident ones, fused-layer groups."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_signround import sensitivity
from hf_signround.blocks import ResidentBlocks, quantizable_layers
from hf_signround.qfunc import QuantSpec, fake_quantize
from hf_signround.scale_search import search_factors
from hf_signround.sensitivity import delta_loss_scores, shared_input_groups, taylor_scores, weight_error_scores
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
def test_delta_loss_equals_the_autograd_first_order_estimate(arch, ids):
    model = arch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = quantizable_layers(model, [])
    weights = {n: m.weight for n, m in layers.items()}
    scores = delta_loss_scores(ResidentBlocks(model), layers, OPTIONS, ids, batch_size=4, scale_dtype=torch.float16,
                               device=CPU)
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


def test_anchored_delta_loss_takes_one_gradient_for_every_option(ids):
    model = tiny_llama()
    layers = quantizable_layers(model, [])
    anchor = QuantSpec(8, 16, True)
    scores = delta_loss_scores(ResidentBlocks(model), layers, OPTIONS, ids, batch_size=4, scale_dtype=torch.float16,
                               device=CPU, anchor=anchor)
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
    got = delta_loss_scores(ResidentBlocks(offloaded), quantizable_layers(offloaded, []), OPTIONS, ids, batch_size=3,
                            scale_dtype=torch.float16, device=CPU)
    want = delta_loss_scores(ResidentBlocks(resident), quantizable_layers(resident, []), OPTIONS, ids, batch_size=3,
                             scale_dtype=torch.float16, device=CPU)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-4), name
    assert offloaded.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # offloaded again


def test_shared_input_groups_find_what_engines_fuse():
    llama = tiny_llama()
    groups = shared_input_groups(ResidentBlocks(llama), quantizable_layers(llama, []), CPU)
    attn, mlp = "model.layers.{}.self_attn.", "model.layers.{}.mlp."
    expected = []
    for i in range(2):
        expected += [[attn.format(i) + p for p in ("q_proj", "k_proj", "v_proj")], [attn.format(i) + "o_proj"],
                     [mlp.format(i) + "gate_proj", mlp.format(i) + "up_proj"], [mlp.format(i) + "down_proj"]]
    assert groups == expected
    neox = tiny_neox()
    layers = quantizable_layers(neox, [])
    assert shared_input_groups(ResidentBlocks(neox), layers, CPU) == [[n] for n in layers]  # already fused, nothing shared


def test_weight_error_scores():
    model = tiny_llama()
    layers = quantizable_layers(model, [])
    scores = weight_error_scores(ResidentBlocks(model), layers, OPTIONS, torch.float16, CPU)
    for name, layer in layers.items():
        w = layer.weight.detach()
        for o, spec in enumerate(OPTIONS):
            assert scores[name][o] == pytest.approx(float((w - fake_quantize(w, spec, scale_dtype=torch.float16))
                                                          .square().sum()), rel=1e-6)
        assert scores[name][0] > scores[name][1]


def taylor_reference(model, options, ids, batch_size, importance=None):
    """``Σ_batches [−Σ_t s_t + ½ n Σ_t s_t²]`` with ``s_t = δ_t·(ΔW x_t)`` found by plain autograd:
    each layer's output gets ``ε_t · ΔW x_t`` added, ``ε = 0`` a leaf, and ``s = ∂L/∂ε``."""
    layers = quantizable_layers(model, [])
    out = {n: [0.0] * len(options) for n in layers}
    for o, spec in enumerate(options):
        for name, layer in layers.items():
            w = layer.weight.detach()
            if importance is None:
                dw = w - fake_quantize(w, spec, scale_dtype=torch.float16)
            else:
                f = search_factors(w, spec, importance[name], torch.float16)
                dw = w - fake_quantize(w, spec, alpha=f, beta=f, scale_dtype=torch.float16)
            for start in range(0, len(ids), batch_size):
                batch = ids[start : start + batch_size]
                eps = torch.zeros(batch.shape, requires_grad=True)
                handle = layer.register_forward_hook(lambda m, a, y: y + eps[..., None] * (a[0] @ dw.T))
                try:
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                finally:
                    handle.remove()
                (s,) = torch.autograd.grad(loss, eps)
                n = batch.numel() - len(batch)
                out[name][o] += float(-s.sum() + 0.5 * n * s.square().sum())
    return out


def input_square_sums(model, ids):
    layers = quantizable_layers(model, [])
    sums = {}
    handles = [layer.register_forward_hook(
        lambda m, a, y, n=n: sums.__setitem__(n, sums.get(n, 0) + a[0].reshape(-1, a[0].shape[-1]).square().sum(0)))
        for n, layer in layers.items()]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return sums


@pytest.mark.parametrize("arch", [tiny_llama, tiny_neox])
@pytest.mark.parametrize("scale_search", [False, True])
def test_second_order_delta_loss_equals_the_autograd_taylor_estimate(arch, scale_search, ids, monkeypatch):
    model = arch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = quantizable_layers(model, [])
    weights = {n: m.weight for n, m in layers.items()}
    seen = {}  # the importance each layer's scale search was given, by weight storage

    def recording_search(w, spec, importance, scale_dtype):
        seen[w.data_ptr()] = importance.clone()
        return search_factors(w, spec, importance, scale_dtype)

    monkeypatch.setattr(sensitivity, "search_factors", recording_search)
    scores = taylor_scores(ResidentBlocks(model), layers, OPTIONS, ids, batch_size=4, scale_dtype=torch.float16,
                           device=CPU, scale_search=scale_search)
    # the same model, untouched, as the reference's starting point
    assert all(layers[n].weight is weights[n] for n in layers)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    importance = None
    if scale_search:
        # Σ x² gathered along the way equals one plain forward's, to float rounding; the reference
        # then searches with the very same tensor, because a last-bit difference may flip a near
        # tie between two candidate scales of one group (it does on AVX-512 CPUs)
        reference = input_square_sums(model, ids)
        importance = {n: seen[layers[n].weight.data_ptr()] for n in layers}
        for n in layers:
            torch.testing.assert_close(importance[n], reference[n], rtol=1e-5, atol=0)
    expected = taylor_reference(model, OPTIONS, ids, batch_size=4, importance=importance)
    for name in layers:
        for o, spec in enumerate(OPTIONS):
            assert scores[name][o] == pytest.approx(expected[name][o], rel=1e-3, abs=1e-7), (name, spec)
    # Fewer bits, a larger estimated loss change, summed over the model.
    assert sum(s[0] for s in scores.values()) > sum(s[1] for s in scores.values())


def test_second_order_delta_loss_builds_no_weight_gradient(ids):
    """The Taylor hooks need activation gradients only: in the pass that builds a graph, every
    scored layer's output needs a gradient while no weight does (a weight gradient would be
    computed and held only to be dropped), and every layer is scored."""
    model = tiny_llama()
    layers = quantizable_layers(model, [])
    graph_calls = {n: 0 for n in layers}

    def watch(name):
        def hook(module, args, out):
            if out.requires_grad:
                graph_calls[name] += 1
                assert not module.weight.requires_grad, name
                assert all(not p.requires_grad for p in model.parameters())
        return hook

    handles = [layer.register_forward_hook(watch(n)) for n, layer in layers.items()]
    try:
        scores = taylor_scores(ResidentBlocks(model), layers, OPTIONS, ids, batch_size=4, scale_dtype=torch.float16,
                               device=CPU)
    finally:
        for h in handles:
            h.remove()
    batches = -(-len(ids) // 4)
    assert graph_calls == {n: batches for n in layers}
    assert all(s[0] != 0 and s[1] != 0 for s in scores.values())


def test_second_order_first_term_is_the_signed_weight_gradient_product(ids):
    """The first-order part ``−Σ_t δ_t·ΔW x_t`` is ``−⟨∂L/∂W, ΔW⟩`` (the plain weight gradient):
    with a tiny ``ΔW`` (8 bits) the second-order part vanishes next to it."""
    model = tiny_llama()
    layers = quantizable_layers(model, [])
    spec = QuantSpec(8, 16, True)
    scores = taylor_scores(ResidentBlocks(model), layers, [spec], ids, batch_size=6, scale_dtype=torch.float32,
                           device=CPU, scale_search=False)
    params = dict(model.named_parameters())
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    grads = torch.autograd.grad(loss, [params[f"{n}.weight"] for n in layers])
    for (name, layer), g in zip(layers.items(), grads):
        w = layer.weight.detach()
        first = -float((g * (w - fake_quantize(w, spec, scale_dtype=torch.float32))).sum())
        assert scores[name][0] == pytest.approx(first, rel=0.05, abs=1e-7), name
