"""Newton(-Schulz) iteration for the inverse square root of a covariance (CE paper, Eqn 6)."""

from __future__ import annotations

import torch
from torch import Tensor


def trace_normalize(cov: Tensor) -> Tensor:
    """Divide each matrix of a batch by its trace: Σ_N = Σ / tr(Σ) (CE paper, Sec. 3.1).

    For a positive definite Σ the eigenvalues of Σ_N lie in (0, 1), so ‖I − Σ_N‖₂ < 1 and the
    Newton iteration of :func:`newton_schulz_isqrt` converges (Bini et al. 2005).

    Args:
        cov: (..., g, g) symmetric positive (semi-)definite matrices.

    Returns:
        (..., g, g) matrices with unit trace, same dtype as ``cov``.
    """
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    return cov / trace[..., None, None]


def newton_schulz_isqrt(cov: Tensor, num_iters: int) -> Tensor:
    """Approximate Σ_N^{-1/2} by ``num_iters`` Newton steps (CE paper, Eqn 6).

    P_0 = I,  P_k = ½ (3 P_{k-1} − P_{k-1}³ Σ_N),  k = 1..T;  returns P_T.

    The result is *not* rescaled by tr(Σ)^{-1/2}: CE uses the inverse square root of the
    trace-normalized covariance (SPEC §1.1). With the paper's T = 3 the result is a soft
    decorrelation; it converges to the exact Σ_N^{-1/2} as T grows when Σ_N is well
    conditioned. The iteration is plain matrix algebra, so autograd differentiates through it.
    It always runs in float32 or wider, also under autocast (half precision diverges). This
    uncoupled iteration amplifies round-off once converged: in float64 it reaches ~1e-14 of
    the eigendecomposition result after ~10 steps on well-conditioned input and drifts away
    again after a few dozen; in float32 large T diverges on ill-conditioned Σ_N.

    Args:
        cov: (..., g, g) trace-normalized covariance matrices Σ_N (see :func:`trace_normalize`).
        num_iters: number of iterations T ≥ 1.

    Returns:
        (..., g, g) tensor P_T in ``cov``'s dtype promoted to at least float32.

    Raises:
        ValueError: if ``num_iters`` < 1 or ``cov`` is not a batch of square matrices.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be a positive integer, got {num_iters}")
    if cov.dim() < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"cov must have shape (..., g, g), got {tuple(cov.shape)}")
    dtype = torch.promote_types(cov.dtype, torch.float32)
    with torch.autocast(cov.device.type, enabled=False):
        sigma = cov.to(dtype)
        eye = torch.eye(sigma.shape[-1], dtype=dtype, device=sigma.device)
        # P_1 = ½(3I − Σ_N) in closed form saves one cubic product.
        p = 1.5 * eye - 0.5 * sigma
        for _ in range(num_iters - 1):
            p3 = torch.linalg.matrix_power(p, 3)
            p = 1.5 * p - 0.5 * (p3 @ sigma)
    return p
