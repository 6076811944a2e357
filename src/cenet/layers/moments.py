"""Per-sample moments of grouped channels: the statistics step of the CE block.

The statistics are computed in a separate step (SPEC §1.1, steps 1-3) so that a distributed
version can all-reduce the per-batch sums before the covariance is formed: everything a batch
contributes is ``sum_n mean_n`` (N, C) and ``sum_n second_n`` (G, g, g) plus a sample count.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _GroupMoments(torch.autograd.Function):
    """Per-sample mean and uncentered second moment of (B, g, M) matrices, fused backward.

    Forward: mean = X 1 / M (B, g), second = X Xᵀ / M (B, g, g).
    Backward: dX = ((dS + dSᵀ) X + dmean 1ᵀ) / M as one batched product; autograd's generic
    backward would take three full passes (two products for X Xᵀ, one broadcast for the
    mean) and two additions. Only a view of the input is kept for backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x)
        m = x.shape[-1]
        second = torch.bmm(x, x.transpose(1, 2)).div_(m)
        return x.sum(-1).div_(m), second

    @staticmethod
    def backward(ctx, grad_mean: Tensor | None, grad_second: Tensor | None) -> Tensor:
        (x,) = ctx.saved_tensors
        b, g, m = x.shape
        if grad_second is None:
            grad_second = x.new_zeros(b, g, g)
        if grad_mean is None:
            grad_mean = x.new_zeros(b, g)
        sym = (grad_second + grad_second.transpose(1, 2)).div_(m)
        return torch.baddbmm(grad_mean.div(m).unsqueeze(-1).expand(b, g, m), sym, x)


def group_moments(x: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """First and second moments of each sample over its spatial positions, per channel group.

    Args:
        x: (N, C, H, W) feature map, C divisible by ``group_size``.
        group_size: g, channels per group; G = C / g groups of consecutive channels.

    Returns:
        ``mean`` (N, C): spatial mean of each channel of each sample;
        ``second`` (N, G, g, g): uncentered second moment (1/HW) Σ_ij x_ij x_ijᵀ of each group.
        Both in ``x``'s dtype promoted to at least float32.
    """
    n, c, h, w = x.shape
    groups = c // group_size
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        xf = x.to(dtype).reshape(n * groups, group_size, h * w)
        mean, second = _GroupMoments.apply(xf)
    return mean.view(n, c), second.view(n, groups, group_size, group_size)


def spatial_variance(x: Tensor) -> Tensor:
    """Population variance of each channel of each sample over H×W (CE paper, Eqn 7).

    Computed as E[x²] − E[x]² from a sum and a vector norm, two fast reductions
    (``torch.var`` over two dimensions is an order of magnitude slower on CPU).

    Args:
        x: (N, C, H, W) feature map.

    Returns:
        (N, C) variances in ``x``'s dtype promoted to at least float32, clamped at 0.
    """
    n, c, h, w = x.shape
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(n, c, h * w)
    mean = xf.mean(-1)
    sq = torch.linalg.vector_norm(xf, dim=-1).square().div(h * w)
    return (sq - mean * mean).clamp_min(0)


def batch_covariance(mean: Tensor, second: Tensor, eps: float) -> Tensor:
    """Group-wise batch covariance Σ + εI from per-sample moments (CE paper, Eqn 5).

    Σ = (1/M) Σ_nij (x_nij − μ)(x_nij − μ)ᵀ computed as E_n[second_n] − μμᵀ, with μ = E_n[mean_n].

    Args:
        mean: (N, C) per-sample means from :func:`group_moments`.
        second: (N, G, g, g) per-sample second moments from :func:`group_moments`.
        eps: ε added to the diagonal.

    Returns:
        (G, g, g) covariance matrices.
    """
    groups, g = second.shape[1], second.shape[2]
    mu = mean.mean(0).view(groups, g, 1)
    cov = second.mean(0) - mu @ mu.transpose(1, 2)
    eye = torch.eye(g, dtype=cov.dtype, device=cov.device)
    return cov + eps * eye


def instance_variance(mean: Tensor, second: Tensor) -> Tensor:
    """Population variance of each channel of each sample over H×W (CE paper, Eqn 7).

    Args:
        mean: (N, C) per-sample means; second: (N, G, g, g) per-sample second moments.

    Returns:
        (N, C) variances σ̃²_n (clamped at 0 against round-off).
    """
    sq = second.diagonal(dim1=-2, dim2=-1).reshape(mean.shape)
    return (sq - mean * mean).clamp_min(0)
