"""Eqn (6): Newton iteration for the inverse square root, against eigendecomposition."""

import pytest
import torch

from cenet.layers import newton_schulz_isqrt, trace_normalize


def random_spd(batch, g, cond=10.0, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, g, g, generator=gen, dtype=dtype))
    eig = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), g, dtype=dtype)
    return q @ torch.diag_embed(eig.expand(batch, g)) @ q.transpose(1, 2)


def eigh_isqrt(mat):
    e, v = torch.linalg.eigh(mat)
    return v @ torch.diag_embed(e.rsqrt()) @ v.transpose(-1, -2)


def test_trace_normalize_gives_unit_trace():
    sigma = random_spd(3, 5) * 7.0
    out = trace_normalize(sigma)
    torch.testing.assert_close(
        out.diagonal(dim1=-2, dim2=-1).sum(-1), torch.ones(3, dtype=out.dtype)
    )
    torch.testing.assert_close(out * sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None], sigma)


def test_converges_to_eigh_inverse_sqrt_in_float64():
    sigma_n = trace_normalize(random_spd(4, 8, cond=5.0))
    exact = eigh_isqrt(sigma_n)
    errors = [
        (
            torch.linalg.matrix_norm(newton_schulz_isqrt(sigma_n, t) - exact)
            / torch.linalg.matrix_norm(exact)
        )
        .max()
        .item()
        for t in (1, 3, 6, 10)
    ]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-10
    assert errors[1] > 1e-3  # T = 3 is far from exact even for a well-conditioned Σ


def test_first_step_matches_eqn6_by_hand():
    sigma_n = trace_normalize(random_spd(1, 4))
    eye = torch.eye(4, dtype=sigma_n.dtype)
    p1 = 0.5 * (3 * eye - eye @ eye @ eye @ sigma_n)
    p2 = 0.5 * (3 * p1 - p1 @ p1 @ p1 @ sigma_n)
    torch.testing.assert_close(newton_schulz_isqrt(sigma_n, 1), p1)
    torch.testing.assert_close(newton_schulz_isqrt(sigma_n, 2), p2)


def test_whitened_covariance_approaches_identity_as_iterations_grow():
    gen = torch.Generator().manual_seed(1)
    mix = torch.eye(6, dtype=torch.float64) + 0.3 * torch.randn(
        6, 6, generator=gen, dtype=torch.float64
    )
    x = mix @ torch.randn(6, 4000, generator=gen, dtype=torch.float64)
    sigma = torch.cov(x, correction=0)
    sigma_n = trace_normalize(sigma)
    # W Σ_N W → I: W is the inverse square root of the *trace-normalized* covariance.
    dist = [
        torch.linalg.matrix_norm(
            (w := newton_schulz_isqrt(sigma_n, t)) @ sigma_n @ w - torch.eye(6, dtype=torch.float64)
        ).item()
        for t in (1, 2, 3, 5, 8, 12)
    ]
    assert all(a > b for a, b in zip(dist, dist[1:], strict=False)) or dist[-1] < 1e-12
    assert dist[-1] < 1e-8
    assert dist[2] > 1e-3  # T = 3, the paper's default, is a soft decorrelation


def test_runs_in_float32_under_autocast_for_bfloat16_input():
    sigma_n = trace_normalize(random_spd(2, 4, dtype=torch.float32)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = newton_schulz_isqrt(sigma_n, 3)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("num_iters", [0, -1])
def test_rejects_non_positive_iterations(num_iters):
    with pytest.raises(ValueError, match="num_iters"):
        newton_schulz_isqrt(torch.eye(3), num_iters)


def test_rejects_non_square_input():
    with pytest.raises(ValueError, match="g, g"):
        newton_schulz_isqrt(torch.ones(2, 3, 4), 3)
