import pytest
import torch

from hf_signround.qfunc import QuantSpec, fake_quantize, quantize_rtn, scale_zero

SPECS = [QuantSpec(b, g, s) for b in (2, 3, 4, 8) for g in (32, -1) for s in (False, True)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rtn_codes_match_the_formula(spec):
    torch.manual_seed(0)
    w = torch.randn(24, 96)
    codes, scales, zeros = quantize_rtn(w, spec, scale_dtype=torch.float32)
    g = spec.group_len(96)
    wg = w.reshape(24, -1, g)
    if spec.sym:
        half = 2 ** (spec.bits - 1)
        assert zeros is None
        big = wg.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)
        torch.testing.assert_close(scales, -big / half)  # largest magnitude -> code 0 (-maxq)
        q = torch.clamp(torch.round(wg / scales[..., None]), -half, half - 1) + half
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        s = (hi - lo) / spec.maxq
        torch.testing.assert_close(scales, s)
        z = torch.round(-lo / s)
        assert torch.equal(zeros, z.to(torch.int32))
        q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, spec.maxq)
    assert codes.dtype == torch.uint8
    assert torch.equal(codes, q.reshape(24, 96).to(torch.uint8))


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_stored_scales_reproduce_fake_quant_exactly(spec, scale_dtype):
    torch.manual_seed(1)
    w = torch.randn(16, 64) * 0.02
    codes, scales, zeros = quantize_rtn(w, spec, scale_dtype=scale_dtype)
    z = torch.full_like(scales, 2 ** (spec.bits - 1), dtype=torch.float32) if zeros is None else zeros.float()
    g_idx = torch.arange(64) // spec.group_len(64)
    deq = (codes.float() - z[:, g_idx]) * scales.float()[:, g_idx]
    assert torch.equal(deq, fake_quantize(w, spec, scale_dtype=scale_dtype))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_error_within_half_step(spec):
    torch.manual_seed(2)
    w = torch.randn(8, 64)
    s, z = scale_zero(w, spec)
    wg = w.reshape(8, spec.groups(64), -1)
    err = (fake_quantize(w, spec) - w).abs().reshape(wg.shape)
    # inside the representable range rounding errs by at most s/2; asymmetric min-max
    # ranges cover every element, the symmetric one can clip the shorter side only
    level = wg / s[..., None] + z[..., None]
    inside = (level >= -0.5) & (level <= spec.maxq + 0.5)
    assert torch.all(err[inside] <= (s.abs()[..., None] / 2 + 1e-6).expand_as(err)[inside])
    if not spec.sym:
        assert inside.all()


def test_gradients_flow_to_tuned_parameters():
    spec = QuantSpec(4, 32, False)
    w = torch.randn(4, 64)
    v = torch.zeros_like(w, requires_grad=True)
    alpha = torch.ones(4, 2, requires_grad=True)
    beta = torch.ones(4, 2, requires_grad=True)
    fake_quantize(w, spec, v, alpha, beta).pow(2).sum().backward()
    assert v.grad.abs().sum() > 0 and alpha.grad.abs().sum() > 0 and beta.grad.abs().sum() > 0


def test_zero_group_is_safe():
    for sym in (False, True):
        spec = QuantSpec(4, 32, sym)
        codes, scales, zeros = quantize_rtn(torch.zeros(2, 64), spec)
        assert torch.isfinite(scales.float()).all()
        assert torch.equal(fake_quantize(torch.zeros(2, 64), spec), torch.zeros(2, 64))


@pytest.mark.parametrize("sym", [False, True])
def test_short_last_group_matches_per_group_quantization(sym):
    # group_size 40 on K=100: groups [0,40), [40,80), [80,100)
    torch.manual_seed(3)
    w = torch.randn(6, 100)
    spec = QuantSpec(3, 40, sym)
    codes, scales, zeros = quantize_rtn(w, spec, scale_dtype=torch.float32)
    assert scales.shape == (6, 3)
    for g, (lo, hi) in enumerate([(0, 40), (40, 80), (80, 100)]):
        part = QuantSpec(3, -1, sym)
        c, s, z = quantize_rtn(w[:, lo:hi], part, scale_dtype=torch.float32)
        assert torch.equal(codes[:, lo:hi], c) and torch.equal(scales[:, g : g + 1], s)
        if not sym:
            assert torch.equal(zeros[:, g : g + 1], z)


@pytest.mark.parametrize("with_v", [True, False])
def test_hand_written_straight_through_backward_matches_autograd(with_v):
    """``_FakeQuantSTE`` against autograd on the same expression written with a detached
    rounding (the straight-through estimator) and a plain clamp: the forward, and the
    gradients reaching ``v`` and ``s``."""
    from hf_signround.qfunc import fake_quantize_grouped

    gen = torch.Generator().manual_seed(0)
    wg = torch.randn(6, 3, 16, generator=gen)
    s = (torch.rand(6, 3, generator=gen) * 0.2 + 0.05).requires_grad_()
    z = torch.randint(0, 8, (6, 3), generator=gen).float()
    v = ((torch.rand(6, 3, 16, generator=gen) - 0.5) * 0.8).requires_grad_() if with_v else None
    spec = QuantSpec(3, 16, False)
    upstream = torch.randn(6, 3, 16, generator=gen)

    ours = fake_quantize_grouped(wg, spec, s, z, v)
    got = torch.autograd.grad((ours * upstream).sum(), [t for t in (v, s) if t is not None])

    x = wg / s[..., None] + (v if v is not None else 0)
    rounded = x + (torch.round(x) - x).detach()  # forward: round; backward: identity
    ref = (torch.clamp(rounded + z[..., None], 0, spec.maxq) - z[..., None]) * s[..., None]
    want = torch.autograd.grad((ref * upstream).sum(), [t for t in (v, s) if t is not None])
    assert torch.equal(ours, ref.detach())
    assert ((ref.detach() / s.detach()[..., None] + z[..., None]) == spec.maxq).any()  # clamping is exercised
    assert ((ref.detach() / s.detach()[..., None] + z[..., None]) == 0).any()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
