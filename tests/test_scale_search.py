import pytest
import torch

from hf_signround.qfunc import QuantSpec, fake_quantize
from hf_signround.scale_search import candidate_factors, search_factors, weighted_error


def objective(w, imp, spec, factor):
    err = fake_quantize(w, spec, alpha=factor, beta=factor) - w
    return (err.square() * (imp + 1e-5)).reshape(w.shape[0], factor.shape[1], -1).sum(-1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_search_never_worse_than_min_max(bits, sym):
    torch.manual_seed(bits)
    spec = QuantSpec(bits, 32, sym)
    w = torch.randn(16, 128) * torch.rand(16, 1)
    imp = torch.rand(128) ** 4 * 100  # a few dominant channels, as real activations have
    c = search_factors(w, spec, imp)
    ones = torch.ones_like(c)
    searched, minmax = objective(w, imp, spec, c), objective(w, imp, spec, ones)
    assert torch.all(searched <= minmax * (1 + 1e-6))
    assert searched.sum() < 0.97 * minmax.sum()  # and it finds something better overall


def test_sym_grid_is_the_spec_inverse_scale_grid():
    spec = QuantSpec(4, 128, True)
    grid = candidate_factors(spec)
    maxq, step = 8, 2 * 0.75 * 8 / 200
    assert len(grid) == 201 and grid[100] == 1.0
    # s = -gmax / (maxq - step k) == min-max scale (-gmax / maxq) times c
    torch.testing.assert_close(grid, maxq / (maxq - step * torch.arange(-100, 101).float()))
    assert len(candidate_factors(QuantSpec(2, 64, True))) == 181


@pytest.mark.parametrize("sym", [False, True])
def test_coarse_to_fine_matches_exhaustive_closely(sym):
    torch.manual_seed(0)
    spec = QuantSpec(3, 64, sym)
    w = torch.randn(32, 256)
    imp = torch.rand(256)
    exhaustive = objective(w, imp, spec, search_factors(w, spec, imp, stride=1))
    fast = objective(w, imp, spec, search_factors(w, spec, imp))
    assert fast.sum() <= exhaustive.sum() * 1.02


def test_weighted_error_matches_fake_quantize():
    torch.manual_seed(1)
    spec = QuantSpec(4, 32, False)
    w = torch.randn(8, 96)
    imp = torch.rand(96)
    factor = torch.rand(8, 3) * 0.5 + 0.6
    wg = w.reshape(8, 3, 32)
    torch.testing.assert_close(weighted_error(wg, (imp + 1e-5).reshape(3, 32), spec, factor, torch.float32),
                               objective(w, imp, spec, factor))


def _float_block_importance(model, calibration):
    """Σx² over the calibration windows of each block Linear's input, from the float model in one batch
    (the float chain the pipeline reads the scale search's weights from)."""
    sums, hooks = {}, []
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(mod, args, out, name=name):
                x = args[0].detach().float()
                sums[f"model.layers.{name}"] = x.reshape(-1, x.shape[-1]).square().sum(0)
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(calibration)
    for h in hooks:
        h.remove()
    return sums


@pytest.mark.parametrize("sym", [False, True])
def test_iters0_with_calibration_is_the_scale_search_alone(sym):
    from hf_signround import QuantLinear, SignRoundV2Config, quantize_model
    from hf_signround.calibration import build_calibration
    from hf_signround.quantize import to_quant_linear
    from hf_signround.tuning import TunableLinear
    from tests.tiny import make_corpus, make_tokenizer, tiny_llama

    calibration = build_calibration(make_corpus(), make_tokenizer(), nsamples=8, seqlen=32, seed=0)
    reference = tiny_llama()
    importance = _float_block_importance(reference, calibration)
    model = tiny_llama()
    config = SignRoundV2Config(bits=3, group_size=32, sym=sym, iters=0, batch_size=8)
    result = quantize_model(model, config, calibration, skip=["lm_head"])
    spec = QuantSpec(3, 32, sym)
    assert sorted(result.plan) == sorted(importance)
    searched = rtn = 0
    for name, weights in importance.items():
        layer = reference.get_submodule(name)
        factor = search_factors(layer.weight, spec, weights, torch.float16)
        start = TunableLinear(layer, spec, factor, torch.float16).quant_args()
        expected = to_quant_linear(layer, spec, torch.float16, **{k: v.detach() for k, v in start.items()})
        got = model.get_submodule(name)
        assert isinstance(got, QuantLinear)
        for key, tensor in expected.state_dict().items():
            assert torch.equal(got.state_dict()[key], tensor), (name, key)
        plain = to_quant_linear(layer, spec, torch.float16)
        searched += not torch.equal(plain.scales, expected.scales)
        rtn += 1
    assert searched == rtn  # the search moved every layer's ranges away from min-max
    report = result.reports["model.layers.0"]
    assert report.loss_after is None and report.mse_after > 0  # nothing tuned; the frozen block is measured


def test_iters0_without_the_search_is_round_to_nearest():
    from hf_signround import SignRoundV2Config, quantize_model
    from hf_signround.calibration import build_calibration
    from tests.tiny import make_corpus, make_tokenizer, tiny_llama

    calibration = build_calibration(make_corpus(), make_tokenizer(), nsamples=8, seqlen=32, seed=0)
    with_data, without = tiny_llama(), tiny_llama()
    quantize_model(with_data, SignRoundV2Config(bits=4, group_size=32, iters=0, scale_search=False), calibration)
    result = quantize_model(without, SignRoundV2Config(bits=4, group_size=32, iters=0))
    assert result.reports["model.layers.0"].mse_after is None
    a, b = with_data.state_dict(), without.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
