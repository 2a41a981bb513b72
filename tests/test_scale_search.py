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
