"""The reference CE maths (cenet.layers.functional) against independent computations:
eigendecomposition for Σ^{-1/2}, torch.cov, explicit loops, gradcheck (CE paper, Eqns 2-8)."""

import pytest
import torch
import torch.nn.functional as F

from cenet.layers import functional as CF


def correlated(n=5, c=8, h=4, w=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(c) + 0.4 * torch.randn(c, c, generator=gen)
    x = torch.einsum("dc,nchw->ndhw", mix, torch.randn(n, c, h, w, generator=gen))
    return (1.3 * x + 0.2).to(dtype)


def test_group_statistics_are_sums_that_add_over_batches():
    x = correlated()
    whole = CF.group_statistics(x, 4)
    parts = [CF.group_statistics(p, 4) for p in (x[:2], x[2:])]
    assert whole.count.item() == 5 * 4 * 3
    for field in ("count", "total", "gram"):
        torch.testing.assert_close(getattr(whole, field),
                                   sum(getattr(p, field) for p in parts))
    rows = x.permute(1, 0, 2, 3).reshape(8, -1)  # (C, N·H·W)
    torch.testing.assert_close(whole.total.reshape(8), rows.sum(1))
    torch.testing.assert_close(whole.gram[1], rows[4:] @ rows[4:].T)


def test_variance_statistics_add_over_batches_and_give_the_batch_scale():
    var = CF.instance_variance(correlated())  # (5, 8)
    whole = CF.variance_statistics(var)
    parts = [CF.variance_statistics(p) for p in (var[:2], var[2:], var[:0])]  # one empty
    assert whole.count.item() == 40
    torch.testing.assert_close(whole.total, sum(p.total for p in parts))
    torch.testing.assert_close(whole.count, sum(p.count for p in parts))
    summed = CF.VarianceStatistics(sum(p.count for p in parts), sum(p.total for p in parts))
    expected = (var.mean() + 1e-5) ** -0.5
    torch.testing.assert_close(CF.inv_std_from_statistics(summed, 1e-5), expected.reshape(1))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_batch_covariance_is_the_population_covariance_per_group(layout):
    x = correlated()
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    cov = CF.batch_covariance(CF.group_statistics(x, 4))
    rows = x.permute(1, 0, 2, 3).reshape(8, -1)
    for j in range(2):
        torch.testing.assert_close(cov[j], torch.cov(rows[4 * j:4 * j + 4], correction=0))


def test_pooled_statistics_are_those_of_the_2x2_max_pooled_map():
    x = correlated(h=6, w=6)
    pooled = CF.group_statistics(x, 8, pool=True)
    direct = CF.group_statistics(F.max_pool2d(x, 2, 2), 8)
    assert pooled.count.item() == 5 * 3 * 3
    torch.testing.assert_close(pooled.gram, direct.gram)


def eig_isqrt(sigma):
    vals, vecs = torch.linalg.eigh(sigma)
    return vecs @ torch.diag_embed(vals.rsqrt()) @ vecs.transpose(-1, -2)


def test_newton_converges_to_the_eigendecomposition_inverse_sqrt():
    cov = CF.batch_covariance(CF.group_statistics(correlated(n=20), 4))
    sigma_n = CF.trace_normalize(cov + 1e-5 * torch.eye(4, dtype=cov.dtype))
    # (the uncoupled iteration converges, then amplifies round-off: T = 10 here, not 30)
    torch.testing.assert_close(CF.newton_schulz_isqrt(sigma_n, 10), eig_isqrt(sigma_n),
                               atol=1e-9, rtol=1e-9)
    # the paper's T = 3 is a soft decorrelation, far from the exact inverse square root
    assert (CF.newton_schulz_isqrt(sigma_n, 3) - eig_isqrt(sigma_n)).abs().max() > 1e-2


def test_newton_step_is_eqn6_by_hand():
    sigma = torch.tensor([[0.7, 0.1], [0.1, 0.3]], dtype=torch.float64)
    p = torch.eye(2, dtype=torch.float64)
    for _ in range(3):
        p = 0.5 * (3 * p - torch.linalg.matrix_power(p, 3) @ sigma)
    torch.testing.assert_close(CF.newton_schulz_isqrt(sigma, 3), p)


def test_whitening_matrix_adds_eps_then_trace_normalizes():
    cov = torch.diag(torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)).unsqueeze(0)
    wm = CF.whitening_matrix(cov, 40, 0.5)
    # Σ + εI = diag(2.5, 1.5, 1.5), trace 5.5: W = diag(sqrt(5.5 / d))
    expected = torch.diag(torch.tensor([5.5 / 2.5, 5.5 / 1.5, 5.5 / 1.5]).sqrt()).double()
    torch.testing.assert_close(wm[0], expected)


def test_newton_runs_in_float32_for_half_input():
    sigma = torch.eye(4, dtype=torch.bfloat16) / 4
    assert CF.newton_schulz_isqrt(sigma, 3).dtype == torch.float32


def test_bad_newton_arguments_raise():
    with pytest.raises(ValueError, match="num_iters"):
        CF.newton_schulz_isqrt(torch.eye(3), 0)
    with pytest.raises(ValueError, match=r"\(\.\.\., g, g\)"):
        CF.newton_schulz_isqrt(torch.ones(3, 2), 3)


def test_instance_variance_gate_and_scale_by_hand():
    x = correlated(n=3, c=4)
    var = CF.instance_variance(x)
    torch.testing.assert_close(var, x.var((2, 3), correction=0))  # population, Eqn 7
    gen = torch.Generator().manual_seed(1)
    fc1, fc2 = torch.randn(2, 4, generator=gen).double(), torch.randn(4, 2, generator=gen).double()
    ln_w, ln_b = torch.tensor([1.5, 0.5]).double(), torch.tensor([0.1, -0.2]).double()
    gate = CF.instance_gate(var, fc1, ln_w, ln_b, fc2, 1e-5)
    for n in range(3):
        h = fc1 @ var[n]
        h = (h - h.mean()) / torch.sqrt(h.var(correction=0) + 1e-5) * ln_w + ln_b
        torch.testing.assert_close(gate[n], torch.sigmoid(fc2 @ h.clamp_min(0)))
    torch.testing.assert_close(CF.batch_inv_std(var, 1e-5), (var.mean() + 1e-5).rsqrt().reshape(1))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_channel_equilibrium_is_a_per_sample_block_diagonal_map(layout):
    x = correlated(n=2, c=8)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    wm = torch.randn(2, 4, 4, dtype=torch.float64)
    diag = torch.randn(2, 8, dtype=torch.float64)
    y = CF.channel_equilibrium(x, wm, diag)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "nhwc")
    for n in range(2):
        a = torch.block_diag(*wm) + torch.diag(diag[n])
        torch.testing.assert_close(y[n], torch.einsum("dc,chw->dhw", a, x[n]))
    torch.testing.assert_close(CF.channel_equilibrium(x, None, diag), x * diag[:, :, None, None])
    with pytest.raises(ValueError, match="neither"):
        CF.channel_equilibrium(x, None, None)


def test_gradcheck_of_the_whole_reference_chain():
    x = correlated(n=3, c=8, h=3, w=3).requires_grad_()
    gen = torch.Generator().manual_seed(2)
    fc1 = torch.randn(2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    fc2 = torch.randn(8, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    ln_w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    ln_b = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def chain(x, fc1, fc2, ln_w, ln_b):
        wm = CF.whitening_matrix(CF.batch_covariance(CF.group_statistics(x, 4)), 3, 1e-5)
        var = CF.instance_variance(x)
        d = CF.instance_gate(var, fc1, ln_w, ln_b, fc2, 1e-5) * CF.batch_inv_std(var, 1e-5)
        return CF.channel_equilibrium(x, 0.4 * wm, 0.6 * d)

    assert torch.autograd.gradcheck(chain, (x, fc1, fc2, ln_w, ln_b))


def test_reference_runs_on_meta_tensors():
    x = torch.empty(4, 16, 8, 8, device="meta")
    stats = CF.group_statistics(x, 16, pool=True)
    wm = CF.whitening_matrix(CF.batch_covariance(stats), 3, 1e-5)
    assert wm.shape == (1, 16, 16) and wm.device.type == "meta"
    assert CF.channel_equilibrium(x, wm, None).shape == x.shape
