"""Block-wise sign-gradient tuning on tiny models built in code."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_signround import QuantLinear, SignRoundV2Config, quantize_model
from hf_signround.blocks import capture_block_inputs, find_blocks, set_module
from hf_signround.calibration import build_calibration
from hf_signround.qfunc import QuantSpec
from hf_signround.quantize import to_quant_linear
from hf_signround import tuning
from hf_signround.tuning import (BlockCall, TunableLinear, TuneSettings, block_loss, epoch_batches, fast_bf16,
                                 frozen_losses, largest, tune_block)
from tests.tiny import make_corpus, make_tokenizer, tiny_llama, tiny_neox


@pytest.fixture(scope="module")
def calib():
    return build_calibration(make_corpus(), make_tokenizer(), nsamples=8, seqlen=32, seed=0)


def tuned(arch=tiny_llama, **kw):
    base = dict(bits=3, group_size=32, iters=20, batch_size=4, nsamples=8, seqlen=32)
    base.update(kw)
    return SignRoundV2Config(**base)


def first_block_rtn_mse(arch, config: SignRoundV2Config, calib) -> float:
    """Plain MSE of block 0 rounded to nearest against the float block, over all windows (the
    quantity ``BlockReport.mse_after`` measures for the tuned block 0, which gets the same input)."""
    model = arch()
    _, blocks = find_blocks(model)
    hidden, args, kwargs = capture_block_inputs(model, blocks, calib)
    call = BlockCall(args, kwargs)
    reference = call.batched(blocks[0], hidden, 8)
    quantize_model(model, SignRoundV2Config.from_dict({**config.to_dict(), "iters": 0}))
    return (call.batched(blocks[0], hidden, 8) - reference).square().mean().item()


@pytest.mark.parametrize("arch", [tiny_llama, tiny_neox])
@pytest.mark.parametrize("sym", [False, True])
def test_tuning_lowers_reconstruction_loss_on_every_block(arch, sym, calib):
    # without the scale search the first step is round-to-nearest; full fp32 batches make the
    # first step's loss the whole set's reconstruction MSE
    config = tuned(sym=sym, scale_search=False, batch_size=8, amp=False, topk_exclusion=False)
    reports = quantize_model(arch(), config, calib).reports
    for name, report in reports.items():
        assert report.loss_after < 0.9 * report.loss_before, (name, report)
        assert report.mse_after == pytest.approx(report.loss_after, rel=1e-3), (name, report)
    first = reports["model.layers.0" if arch is tiny_llama else "gpt_neox.layers.0"]
    assert first.mse_after < 0.9 * first_block_rtn_mse(arch, config, calib)


@pytest.mark.parametrize("bits, group_size", [(2, 32), (3, -1), (4, 48), (8, 32)])
@pytest.mark.parametrize("sym", [False, True])
def test_every_bit_width_and_group_size(bits, group_size, sym, calib):
    model = tiny_llama()
    config = tuned(bits=bits, group_size=group_size, sym=sym, iters=4)
    reports = quantize_model(model, config, calib).reports
    # the tuned first block beats round-to-nearest on the same input (round-to-nearest with
    # the scale search's start is what tuning begins from)
    assert reports["model.layers.0"].mse_after < first_block_rtn_mse(tiny_llama, config, calib)
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantLinear) and (layer.bits, layer.group_size, layer.sym) == (bits, group_size, sym)


def block_setup(calib, spec=QuantSpec(2, 32, False)):
    model = tiny_llama()
    model.requires_grad_(False)
    _, blocks = find_blocks(model)
    hidden, args, kwargs = capture_block_inputs(model, blocks, calib)
    call = BlockCall(args, kwargs)
    block = blocks[0]
    target = call.batched(block, hidden, 8)
    tunables = {}
    for rel in ("self_attn.q_proj", "mlp.down_proj"):
        tunables[rel] = TunableLinear(block.get_submodule(rel), spec, None, torch.float16)
        set_module(block, rel, tunables[rel])
    return block, call, hidden, target, tunables


def test_best_step_is_kept_not_the_last(calib):
    block, call, hidden, target, tunables = block_setup(calib)
    # full batches make every step's loss comparable; a negative lr climbs the loss, so the
    # first step is the best and the last the worst
    history = tune_block(block, tunables, call, hidden, target, TuneSettings(6, -0.2, 8, None, "drop", 0))
    assert history[-1] > 2 * history[0] and min(history) == history[0]
    final, _, _ = frozen_losses(block, call, hidden, target, 8)
    assert final == pytest.approx(history[0], rel=1e-5)
    # and with a real lr the kept step is the lowest one seen
    history = tune_block(block, tunables, call, hidden, target, TuneSettings(8, 0.1, 8, None, "drop", 1))
    final, _, _ = frozen_losses(block, call, hidden, target, 8)
    assert final == pytest.approx(min(history), rel=1e-5)


def test_frozen_layer_reproduces_the_tuned_quantizer_exactly(calib):
    block, call, hidden, target, tunables = block_setup(calib, QuantSpec(3, 48, True))
    tune_block(block, tunables, call, hidden, target, TuneSettings(5, 0.05, 4, 0.001, "huber", 0))
    for t in tunables.values():
        with torch.no_grad():
            fake = t(torch.eye(t.layer.in_features)).T  # rows of the effective weight
        frozen = to_quant_linear(t.layer, t.spec, torch.float16, **{k: v.detach() for k, v in t.quant_args().items()})
        assert torch.equal(frozen.dequantize_weight(torch.float32), fake)


def test_topk_exclusion_drops_exactly_k_errors():
    torch.manual_seed(0)
    pred, ref = torch.randn(5, 1000), torch.zeros(5, 1000)
    sq = pred.square().flatten().sort().values
    k = 5  # max(1, 5000 * 0.001)
    assert block_loss(pred, ref, 0.001).item() == pytest.approx(sq[:-k].sum().item() / 5000, rel=1e-6)
    assert block_loss(pred, ref, None).item() == pytest.approx(sq.mean().item(), rel=1e-6)
    small = torch.randn(1, 300)
    s = small.square().flatten().sort().values
    assert block_loss(small, torch.zeros_like(small), 0.001).item() == pytest.approx(s[:-1].sum().item() / 300, rel=1e-6)


def test_topk_huber_counts_the_outliers_linearly_past_the_kth_error():
    torch.manual_seed(0)
    pred = torch.randn(5, 1000, requires_grad=True)
    ref = torch.zeros(5, 1000)
    err = pred.detach().flatten()
    t = err.abs().sort().values[-5]  # the k-th largest error, k = 5
    outlier = err.abs() > t
    expected = torch.where(outlier, 2 * t * err.abs() - t * t, err.square()).sum() / 5000
    loss = block_loss(pred, ref, 0.001, "huber")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, pred)
    grad = grad.flatten()
    # past the threshold the pull is capped at the threshold's, but it is not zero (as "drop" makes it)
    assert torch.allclose(grad[outlier].abs(), torch.full((4,), 2 * t.item() / 5000))
    assert torch.allclose(grad[~outlier], 2 * err[~outlier] / 5000)
    (dropped,) = torch.autograd.grad(block_loss(pred, ref, 0.001, "drop"), pred)
    assert int((dropped.flatten() == 0).sum()) == 5


def test_epoch_batches_deal_each_window_once_per_epoch():
    batches = epoch_batches(10, 3, seed=0)
    for _ in range(4):  # four epochs of three full batches; the tenth window waits for a later epoch
        epoch = torch.cat([next(batches) for _ in range(3)]).tolist()
        assert len(epoch) == len(set(epoch)) == 9
        assert set(epoch) <= set(range(10))
    one, two = epoch_batches(10, 3, seed=0), epoch_batches(10, 3, seed=0)
    assert all(torch.equal(next(one), next(two)) for _ in range(7))  # seeded: the same stream
    assert sorted(next(epoch_batches(4, 8, seed=1)).tolist()) == [0, 1, 2, 3]  # batch larger than the data


def test_same_seed_same_packed_tensors(calib):
    states = []
    for _ in range(2):
        model = tiny_llama()
        quantize_model(model, tuned(iters=6), calib)
        states.append({k: v for k, v in model.state_dict().items() if "layers" in k})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_tuned_checkpoint_saves_and_reloads_bit_exactly(llama_dir, corpus, tokenizer, tmp_path):
    cfg = SignRoundV2Config(bits=2, group_size=32, iters=5, batch_size=4, nsamples=8, seqlen=32,
                            dataset=corpus, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    assert again.config.quantization_config.iters == 5


def test_user_parameters_keep_their_grad_flags(calib):
    model = tiny_llama()
    quantize_model(model, tuned(iters=2), calib)
    assert model.lm_head.weight.requires_grad and model.model.embed_tokens.weight.requires_grad


@pytest.mark.parametrize("iters", [0, 3])
def test_offloaded_blocks_quantize_like_resident_ones(iters, corpus, tokenizer, tmp_path):
    # block 1 offloaded to disk by accelerate: its Linears hold meta weights behind hooks
    tiny_llama().save_pretrained(tmp_path / "float")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    cfg = SignRoundV2Config(bits=3, group_size=32, iters=iters, batch_size=4, nsamples=8, seqlen=32,
                            dataset=corpus, tokenizer=tokenizer)
    resident = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg)
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg,
                                                     device_map=device_map, offload_folder=tmp_path / "offload")
    layer = offloaded.model.layers[1].mlp.up_proj
    assert isinstance(layer, QuantLinear) and layer.qweight.device.type == "cpu"
    ids = torch.tensor([[1, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(offloaded(input_ids=ids).logits, resident(input_ids=ids).logits)
    offloaded.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, resident(input_ids=ids).logits)


@pytest.mark.parametrize("flags, speedup, expected", [(False, 3.0, False), (True, 0.5, False),
                                                      (True, 1.2, False), (True, 2.0, True)])
def test_cpu_autocasts_only_where_bf16_measures_faster(monkeypatch, caplog, flags, speedup, expected):
    measured = []
    monkeypatch.setattr(tuning, "cpu_has_bf16_instructions", lambda: flags)
    monkeypatch.setattr(tuning, "cpu_bf16_speedup", lambda: measured.append(1) or speedup)
    tuning._cpu_bf16_choice.cache_clear()
    try:
        with caplog.at_level("INFO", logger="hf_signround.tuning"):
            assert [fast_bf16(torch.device("cpu")) for _ in range(3)] == [expected] * 3
    finally:
        tuning._cpu_bf16_choice.cache_clear()
    assert len(measured) == (1 if flags else 0)  # measured once, and only with the instructions
    if flags:
        assert f"{speedup:.2f}x float32's speed" in caplog.text
        assert ("tuning steps in bfloat16" if expected else "tuning steps in float32") in caplog.text


def test_bf16_speedup_is_float32_time_over_bfloat16_time(monkeypatch):
    """With a clock that a float32 product advances by 3 and a bfloat16 one by 2, the measured
    speedup is exactly 1.5; the verdict takes bfloat16 only from 1.25x, once per thread count."""
    clock = [0.0]
    real_matmul = torch.Tensor.__matmul__

    def timed_matmul(a, b):
        clock[0] += 3.0 if a.dtype == torch.float32 else 2.0
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", timed_matmul)
    monkeypatch.setattr(tuning.time, "perf_counter", lambda: clock[0])
    assert tuning.cpu_bf16_speedup(size=8, repeats=3) == 1.5
    monkeypatch.setattr(torch.Tensor, "__matmul__", real_matmul)
    for speedup, verdict in ((1.5, True), (1.2, False)):
        monkeypatch.setattr(tuning, "cpu_bf16_speedup", lambda speedup=speedup: speedup)
        tuning._cpu_bf16_choice.cache_clear()
        assert tuning._cpu_bf16_choice(2) is verdict
    monkeypatch.setattr(tuning, "cpu_bf16_speedup", lambda: 2.0)
    assert tuning._cpu_bf16_choice(2) is False  # cached for this thread count
    tuning._cpu_bf16_choice.cache_clear()


def _cases():
    gen = torch.Generator().manual_seed(0)
    plain = torch.randn(8 * 64 * 96, generator=gen).square()
    aligned = plain.clone()
    aligned[::61] += 100.0  # every element the strided sample sees is an outlier: the threshold is too high
    spread = plain.clone()
    spread[torch.randperm(plain.numel(), generator=gen)[:40]] = 50.0
    return {"plain": plain, "sample-aligned outliers": aligned, "few big outliers": spread,
            "all tied": torch.ones(50_000), "small": plain[:500]}


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("k", [1, 49, 500])
def test_largest_returns_exactly_the_topk_values(case, k):
    x = _cases()[case]
    k = min(k, x.numel())
    assert torch.equal(largest(x, k).sort().values, torch.topk(x, k).values.sort().values)


def test_largest_passes_gradients_like_topk():
    x = torch.randn(40_000, generator=torch.Generator().manual_seed(1)).square().requires_grad_()
    (g_ours,) = torch.autograd.grad(largest(x, 40).sum(), x)
    (g_ref,) = torch.autograd.grad(torch.topk(x, 40).values.sum(), x)
    assert torch.equal(g_ours, g_ref) and int(g_ours.sum()) == 40


def test_a_block_whose_tuning_does_worse_than_its_start_keeps_the_start(calib, monkeypatch):
    """The kept step is chosen on mini-batch losses; where it is worse than the start on all
    windows, the block keeps the start: the model is then bit-identical to the scale search alone."""
    from hf_signround import quantize as quantize_mod

    real = quantize_mod.tune_block

    def tune_then_spoil(block, tunables, *args):
        history = real(block, tunables, *args)
        with torch.no_grad():
            for t in tunables.values():  # every weight half a step off, every range halved
                t.v.fill_(0.5)
                t.alpha.fill_(0.5)
                t.beta.fill_(0.5)
        return history

    monkeypatch.setattr(quantize_mod, "tune_block", tune_then_spoil)
    spoiled, start_only = tiny_llama(), tiny_llama()
    reports = quantize_model(spoiled, tuned(iters=3), calib).reports
    quantize_model(start_only, tuned(iters=0), calib)
    assert all(r.kept_start and r.mse_after == r.mse_start for r in reports.values()), reports
    a, b = spoiled.state_dict(), start_only.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tuned_blocks_report_their_start_and_beat_it_by_the_tuning_objective(calib):
    """The guard compares what tuning lowers: below 4 bits the top-k (Huber) objective over all
    windows, which caps the largest errors and so lies below the plain MSE; at 4 bits the MSE."""
    reports = quantize_model(tiny_llama(), tuned(), calib).reports  # 3 bits: top-k on
    first = reports["model.layers.0"]
    assert not first.kept_start and first.objective_after < first.objective_start
    assert all(r.objective_start is not None and r.objective_after <= r.objective_start for r in reports.values())
    assert all(r.objective_after < r.mse_after and r.objective_start < r.mse_start for r in reports.values())
    four = quantize_model(tiny_llama(), tuned(bits=4, iters=3), calib).reports
    assert all(r.objective_after == r.mse_after and r.objective_start == r.mse_start for r in four.values())
