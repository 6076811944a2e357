"""Remark 1 and Proposition 1 of the CE paper, checked numerically (paper Sec. 2 and 3.3)."""

import math

import torch

from cenet.layers import newton_schulz_isqrt


def relu_moments(gamma, beta, z):
    y = torch.clamp(gamma * z + beta, min=0)
    return y.mean().item(), (y * y).mean().item()


def relu_mean_closed_form(gamma, beta):
    # E[max(0, γz + β)] = γ φ(β/γ) + β Φ(β/γ) for γ > 0 (appendix A, Eqn 9)
    t = beta / gamma
    return gamma * math.exp(-t * t / 2) / math.sqrt(2 * math.pi) + beta * 0.5 * (
        1 + math.erf(t / math.sqrt(2))
    )


def test_remark1_inhibited_iff_beta_nonpositive_and_gamma_vanishing():
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for beta in (-0.5, 0.0):
        means = [relu_moments(g, beta, z) for g in (1.0, 0.1, 1e-3, 1e-6)]
        assert means[-1][0] < 1e-6 and means[-1][1] < 1e-11
        assert [m[0] for m in means] == sorted([m[0] for m in means], reverse=True)
    for g in (1.0, 0.1):
        assert abs(relu_moments(g, -0.2, z)[0] - relu_mean_closed_form(g, -0.2)) < 2e-3
    # β > 0: the output tends to β, not 0; γ not small: the output is not 0 even for β ≤ 0
    assert abs(relu_moments(1e-6, 0.3, z)[0] - 0.3) < 1e-6
    assert relu_moments(1.0, -0.5, z)[0] > 0.1
    # γ < 0 behaves as |γ| (z is symmetric)
    assert relu_moments(-1e-6, -0.1, z)[0] == 0.0


def bn_covariance(gamma, seed):
    """Σ = (γγᵀ ⊙ ρ) / tr, ρ the correlation of standardized features (Eqn 5)."""
    gen = torch.Generator().manual_seed(seed)
    c = gamma.numel()
    x = torch.randn(c, 4 * c, generator=gen, dtype=torch.float64)
    x = x + torch.randn(c, c, generator=gen, dtype=torch.float64) @ x * 0.3
    rho = torch.corrcoef(x)
    sigma = torch.outer(gamma, gamma) * rho
    return sigma / sigma.trace(), rho


def exact_isqrt(sigma):
    e, v = torch.linalg.eigh(sigma)
    return v @ torch.diag(e.rsqrt()) @ v.T


def test_proposition1_part1_equivalent_gamma_grows_for_decorrelated_channels():
    gamma = torch.tensor([0.01, -0.5, 2.0, 0.3], dtype=torch.float64)
    sigma = torch.diag(gamma * gamma) / (gamma * gamma).sum()  # ρ = I
    gamma_hat = exact_isqrt(sigma) @ gamma
    assert (gamma_hat.abs() >= gamma.abs()).all()
    torch.testing.assert_close(gamma_hat.abs(), gamma.norm().expand(4))


def test_proposition1_each_channel_own_gain_exceeds_one():
    # diag(Σ^(-1/2)) > 1 for every trace-normalized Σ: each channel's own γ_c is amplified.
    for seed in range(20):
        gamma = torch.randn(8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        sigma, _ = bn_covariance(gamma, seed)
        assert (exact_isqrt(sigma).diagonal() > 1).all()


def test_proposition1_part1_does_not_hold_for_every_correlated_sigma():
    # Recorded finding: with strongly correlated channels |(Σ^(-1/2)γ)_c| < |γ_c| can happen
    # for some c; the elementwise claim needs the proof's assumptions (see the README).
    found = False
    for seed in range(200):
        gamma = torch.randn(8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        sigma, _ = bn_covariance(gamma, seed)
        if ((exact_isqrt(sigma) @ gamma).abs() < gamma.abs()).any():
            found = True
            break
    assert found


def test_proposition1_part2_feature_norm_grows():
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        gamma = torch.randn(8, generator=gen, dtype=torch.float64)
        sigma, _ = bn_covariance(gamma, seed)
        w = exact_isqrt(sigma)
        x = torch.randn(8, 100, generator=gen, dtype=torch.float64)
        assert (torch.linalg.vector_norm(w @ x, dim=0) > torch.linalg.vector_norm(x, dim=0)).all()


def test_proposition1_holds_approximately_with_the_paper_newton_iteration():
    # With T = 3 Newton steps the operator is soft, but still amplifies every feature vector.
    gamma = torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigma, _ = bn_covariance(gamma, 3)
    w = newton_schulz_isqrt(sigma, 3)
    x = torch.randn(8, 100, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert (torch.linalg.vector_norm(w @ x, dim=0) > torch.linalg.vector_norm(x, dim=0)).all()
