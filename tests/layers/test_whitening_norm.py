"""IterNorm and DBN whitening normalizations (baselines of the CE paper, Table 3)."""

import pytest
import torch

from cenet.layers import DecorrelatedBatchNorm, IterNorm, newton_schulz_isqrt

CLASSES = [IterNorm, DecorrelatedBatchNorm]
F64 = torch.float64


def make_input(n=16, c=8, h=4, w=4, seed=0, dtype=F64):
    """Correlated channels with unequal scales and a mean (group covariances cond ≈ 20)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(c, dtype=F64) + 0.5 * torch.randn(c, c, generator=gen, dtype=F64)
    x = torch.einsum("dc,nchw->ndhw", mix, torch.randn(n, c, h, w, generator=gen, dtype=F64))
    return (x * 1.5 + 0.3).to(dtype)


def well_conditioned_input(n=32, c=4, h=4, w=4, seed=0):
    """A rotated input whose covariance has eigenvalue ratio ≈ 1.6 (< 2.4, see IterNorm)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=gen, dtype=F64))
    scales = torch.linspace(1.0, 1.3, c, dtype=F64)
    z = torch.randn(n, c, h, w, generator=gen, dtype=F64) * scales[None, :, None, None]
    return torch.einsum("dc,nchw->ndhw", q, z) + 0.5


def channels(x):
    """(C, N·H·W) view of the samples of each channel."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def group_covs(x, g):
    flat = channels(x)
    return [torch.cov(flat[k:k + g], correction=0) for k in range(0, x.shape[1], g)]


def dist_to_eye(cov):
    return torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype), 2).item()


def hand_whitening(cls, cov, eps, num_iters=None):
    """W from an independently computed (torch.cov) covariance."""
    sigma = cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype)
    if cls is IterNorm:
        tr = sigma.trace()
        return newton_schulz_isqrt(sigma / tr, num_iters) / tr.sqrt()
    evals, evecs = torch.linalg.eigh(sigma)
    return evecs @ torch.diag(evals.rsqrt()) @ evecs.T


def hand_apply(x, mean, wms, weight=None, bias=None):
    g = wms.shape[-1]
    flat = channels(x) - mean[:, None]
    out = torch.cat([wms[k] @ flat[k * g:(k + 1) * g] for k in range(wms.shape[0])])
    if weight is not None:
        out = weight[:, None] * out + bias[:, None]
    n, c, h, w = x.shape
    return out.reshape(c, n, h, w).transpose(0, 1)


def build(cls, c=8, g=4, **kw):
    kw = {"num_iters": 5, **kw} if cls is IterNorm else kw
    return cls(c, group_size=g, **kw).double()


def test_dbn_output_covariance_is_identity_and_w_is_zca():
    x = make_input()
    dbn = DecorrelatedBatchNorm(8, group_size=4, eps=1e-10).double()
    y = dbn(x)
    for cov in group_covs(y, 4):
        torch.testing.assert_close(cov, torch.eye(4, dtype=F64), rtol=0, atol=1e-6)
    assert channels(y).mean(1).abs().max() < 1e-12
    torch.testing.assert_close(y, hand_apply(
        x, channels(x).mean(1),
        torch.stack([hand_whitening(DecorrelatedBatchNorm, c, 1e-10) for c in group_covs(x, 4)]),
    ))


def test_iternorm_converges_to_whitening_on_well_conditioned_input():
    x = well_conditioned_input()
    y = IterNorm(4, group_size=4, num_iters=30, eps=1e-10).double()(x)
    assert dist_to_eye(group_covs(y, 4)[0]) < 1e-8


def test_iternorm_t5_is_partial_whitening_with_the_trace_rescaled_back():
    x = make_input()
    m = build(IterNorm, eps=1e-5)
    y = m(x)
    covs_in, covs_out = group_covs(x, 4), group_covs(y, 4)
    for cov_in, cov_out in zip(covs_in, covs_out, strict=True):
        # measured: ‖Cov − I‖₂ ≈ 13 and 19 for the input, 0.16 and 0.20 after T = 5
        assert dist_to_eye(cov_in) > 10
        assert dist_to_eye(cov_out) < 0.25
        # exact prediction: eigenvalue λ of Σ_N maps to λ·p_T(λ)² (scalar Newton iteration;
        # minus the ε share, since W is built from Σ + εI and applied to data with Σ)
        sigma = cov_in + 1e-5 * torch.eye(4, dtype=F64)
        lam = torch.linalg.eigvalsh(sigma / sigma.trace())
        p = torch.ones_like(lam)
        for _ in range(5):
            p = 0.5 * (3 * p - p**3 * lam)
        expected = ((lam - 1e-5 / sigma.trace()) * p**2).sort().values
        torch.testing.assert_close(torch.linalg.eigvalsh(cov_out), expected)
    wms = torch.stack([hand_whitening(IterNorm, c, 1e-5, 5) for c in covs_in])
    torch.testing.assert_close(y, hand_apply(x, channels(x).mean(1), wms))


@pytest.mark.parametrize("cls", CLASSES)
def test_affine_is_applied_after_whitening(cls):
    x = make_input()
    plain = build(cls, affine=False)
    assert plain.weight is None and plain.bias is None
    m = build(cls)
    with torch.no_grad():
        m.weight.fill_(2.0)
        m.bias.fill_(1.0)
    torch.testing.assert_close(m(x), 2 * plain(x) + 1, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("cls", CLASSES)
def test_running_stats_update_in_training_and_are_used_in_eval(cls):
    x = make_input()
    m = build(cls, momentum=0.25)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2, 8))
        m.bias.copy_(torch.linspace(-1, 1, 8))
    m(x)
    mean = channels(x).mean(1)
    wms = torch.stack([hand_whitening(cls, c, 1e-5, 5) for c in group_covs(x, 4)])
    eye = torch.eye(4, dtype=F64).expand(2, 4, 4)
    torch.testing.assert_close(m.running_mean, 0.25 * mean)
    torch.testing.assert_close(m.running_wm, 0.75 * eye + 0.25 * wms)
    assert m.running_wm.is_contiguous() and m.running_wm.stride() == (16, 4, 1)

    m.eval()
    x2 = make_input(n=4, seed=1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    expected = hand_apply(x2, m.running_mean, m.running_wm, m.weight, m.bias)
    torch.testing.assert_close(m(x2), expected)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # eval: no update
    assert not torch.allclose(m(x2), m.train()(x2))  # eval really uses the running stats

    m.reset_running_stats()
    assert torch.equal(m.running_mean, torch.zeros(8, dtype=F64))
    assert torch.equal(m.running_wm, eye)


@pytest.mark.parametrize("cls", CLASSES)
def test_fresh_module_in_eval_is_finite_identity(cls):
    c = 64 if cls is IterNorm else 16  # the default group size must divide C
    m = cls(c).eval()
    x = make_input(n=2, c=c).float()
    y = m(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, x)
    assert set(m.state_dict()) == {"weight", "bias", "running_mean", "running_wm"}


def test_gradcheck_iternorm_in_float64():
    torch.manual_seed(0)
    m = IterNorm(4, group_size=2, num_iters=3).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    x = make_input(n=3, c=4, h=2, w=2).requires_grad_(True)

    def f(x, weight, bias):
        return torch.func.functional_call(m, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, m.weight, m.bias))


def test_gradcheck_dbn_input_in_float64():
    m = DecorrelatedBatchNorm(4, group_size=2).double()
    x = make_input(n=3, c=4, h=2, w=2).requires_grad_(True)
    assert torch.autograd.gradcheck(m, (x,))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_gives_the_same_numbers_and_layout(cls, training):
    x = make_input()
    a, b = build(cls), build(cls)
    if not training:
        a(x), b(x)
        a.eval(), b.eval()
    x = x.requires_grad_(True)
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    ya, yb = a(x), b(xc)
    assert yb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yb, ya, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.running_wm, a.running_wm, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(-1, 2, 8, dtype=F64)[:, None, None]
    (ya * weights).square().sum().backward()
    (yb * weights).square().sum().backward()
    torch.testing.assert_close(xc.grad, x.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", CLASSES)
def test_bfloat16_autocast_computes_in_float32(cls):
    x = make_input(dtype=torch.float32)
    m = cls(8, group_size=4)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref)  # float32 tolerance: nothing ran in bfloat16
    yb = m(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (IterNorm, {"group_size": 3}, r"group_size=3 does not divide num_features=8.*\[1, 2, 4"),
        (DecorrelatedBatchNorm, {"group_size": 5}, "does not divide"),
        (IterNorm, {"group_size": 4, "num_iters": 0}, "num_iters"),
        (IterNorm, {"group_size": 4, "eps": 0.0}, "eps"),
        (DecorrelatedBatchNorm, {"group_size": 4, "eps": -1.0}, "eps"),
        (DecorrelatedBatchNorm, {"group_size": 4, "momentum": 0.0}, "momentum"),
        (IterNorm, {"group_size": 4, "momentum": 1.5}, "momentum"),
    ],
)
def test_bad_arguments_raise_in_init(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(8, **kwargs)


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_inputs_raise_clear_errors(cls):
    m = cls(8, group_size=4)
    with pytest.raises(ValueError, match=r"4-D input \(N, C, H, W\)"):
        m(torch.randn(4, 8))
    with pytest.raises(ValueError, match="num_features=8 channels, got an input with 6"):
        m(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match="at least 2 positions"):
        m(torch.randn(1, 8, 1, 1))
    assert m.eval()(torch.randn(1, 8, 1, 1)).shape == (1, 8, 1, 1)  # fine in eval


@pytest.mark.parametrize("cls", CLASSES)
def test_non_finite_batch_raises_before_running_buffers_change(cls):
    m = cls(8, group_size=4)
    x = make_input(dtype=torch.float32)
    m(x)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bad = x.clone()
    bad[0, 5, 1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        m(bad)
    bad[0, 5, 1, 1] = float("inf")
    with pytest.raises(FloatingPointError, match="not finite"):
        m(bad)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_diverging_newton_iteration_raises_before_running_buffers_change():
    m = IterNorm(8, group_size=4, num_iters=200).double()
    with pytest.raises(FloatingPointError, match="num_iters=200"):
        m(make_input())  # cond ≈ 20 > 2.4: round-off grows after convergence
    assert torch.equal(m.running_mean, torch.zeros(8, dtype=F64))
    assert torch.equal(m.running_wm, torch.eye(4, dtype=F64).repeat(2, 1, 1))


def test_extra_repr_and_defaults():
    it, dbn = IterNorm(128), DecorrelatedBatchNorm(32)
    assert repr(it) == (
        "IterNorm(128, group_size=64, num_iters=5, eps=1e-05, momentum=0.1, affine=True)"
    )
    assert repr(dbn) == "DecorrelatedBatchNorm(32, group_size=16, eps=1e-05, momentum=0.1, " \
        "affine=True)"
    assert it.running_wm.shape == (2, 64, 64) and dbn.running_wm.shape == (2, 16, 16)
    assert it.running_wm.dtype == torch.float32
    half = IterNorm(8, group_size=4, dtype=torch.float64)
    assert half.weight.dtype == F64 and half.running_wm.dtype == F64
