"""Moments of grouped channels: the statistics step of the CE block.

The statistics are computed in a step of their own (SPEC §1.1, steps 1-3), separate from the
whitening, so that a distributed version can all-reduce them before the covariance is formed:
a batch contributes the per-sample means and mean squares (N, C) and the batch second moment
(G, g, g) of each channel group. Both memory layouts are handled without copying the feature
map: NCHW (``torch.contiguous_format``) and NHWC (``torch.channels_last``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from cenet import kernels


class Moments(NamedTuple):
    """Spatial moments of a (N, C, H, W) feature map for channel groups of size g.

    Attributes:
        mean: (N, C) mean of each channel of each sample over H×W.
        sq_mean: (N, C) mean of the squares over H×W.
        second: (G, g, g) uncentered second moment E[x xᵀ] of each group over N×H×W.
    """

    mean: Tensor
    sq_mean: Tensor
    second: Tensor


def is_channels_last(x: Tensor) -> bool:
    """True if ``x`` (N, C, H, W) is stored NHWC and not also NCHW-contiguous."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class _MomentsNCHW(torch.autograd.Function):
    """Moments of an NCHW map viewed as (B, g, M) feature rows, B = N·G groups, M = H·W.

    Forward: per-row mean and mean square (B, g), and the batch second moment of each group
    Σ_n X Xᵀ / (N·M) (G, g, g), in one pass of the compiled kernels (:mod:`cenet.kernels`).
    Backward: dX_b = (S_{b mod G} + Diag(2·dsq_b / M)) X_b + dmean_b / M with
    S = (dΣ + dΣᵀ) / (N·M), one pass over the feature map. Only the input is kept for backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(x)
        ctx.groups = groups
        b, g, m = x.shape
        second, total, sq = kernels.group_second_moments(x, groups)
        return total.div_(m), sq.div_(m), second.div_(b // groups * m)

    @staticmethod
    def backward(ctx, grad_mean: Tensor, grad_sq: Tensor, grad_second: Tensor):
        (x,) = ctx.saved_tensors
        b, g, m = x.shape
        sym = (grad_second + grad_second.transpose(1, 2)).div_(b // ctx.groups * m)
        return kernels.group_apply(sym, x, grad_sq.mul(2 / m), grad_mean.div(m)), None


class _RowMoments(torch.autograd.Function):
    """Sums and sums of squares of the rows of X (B, M) in one pass (compiled kernel).

    Backward: dX = dsum 1ᵀ + 2 X ⊙ dsq 1ᵀ.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x)
        return kernels.row_moments(x)

    @staticmethod
    def backward(ctx, grad_sum: Tensor, grad_sq: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.addcmul(grad_sum.unsqueeze(1), x, grad_sq.mul(2).unsqueeze(1))


class _MomentsNHWC(torch.autograd.Function):
    """Per-sample mean and mean square (N, C) and batch second moment (G, g, g) of an NHWC map.

    The input is the (N, H·W, C) view of a channels-last tensor; each group's (N·H·W, g) slice
    is a strided matrix that a batched GEMM reads in place.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(x)
        ctx.group_size = group_size
        n, m, c = x.shape
        xg = x.reshape(n * m, c // group_size, group_size).transpose(0, 1)  # (G, NM, g)
        second = torch.bmm(xg.transpose(1, 2), xg).div_(n * m)
        mean = x.sum(1).div_(m)
        sq_mean = torch.linalg.vector_norm(x, dim=1).square_().div_(m)
        return mean, sq_mean, second

    @staticmethod
    def backward(ctx, grad_mean: Tensor, grad_sq: Tensor, grad_second: Tensor):
        (x,) = ctx.saved_tensors
        n, m, c = x.shape
        g = ctx.group_size
        # d/dx of mean and sq_mean: dmean/M + 2 x dsq/M, per sample and channel.
        grad = torch.addcmul(
            grad_mean.div(m).unsqueeze(1), x, grad_sq.mul(2 / m).unsqueeze(1)
        )
        sym = (grad_second + grad_second.transpose(1, 2)).div_(n * m)  # (G, g, g)
        xg = x.reshape(n * m, c // g, g).transpose(0, 1)  # (G, NM, g)
        grad.view(n * m, c // g, g).transpose(0, 1).add_(torch.bmm(xg, sym))
        return grad, None


def group_moments(x: Tensor, group_size: int) -> Moments:
    """Spatial moments of ``x`` for groups of ``group_size`` consecutive channels.

    Computed in ``x``'s dtype promoted to at least float32 (also under autocast); for NCHW
    input in one pass of the compiled kernels (the symmetric group second moments, with the
    row sums and squares from their diagonal tiles), for NHWC input by a strided batched GEMM
    and two reductions.

    Args:
        x: (N, C, H, W) feature map, NCHW or channels-last, C divisible by ``group_size``.
        group_size: g, channels per group; G = C / g.

    Returns:
        :class:`Moments` with ``mean`` (N, C), ``sq_mean`` (N, C), ``second`` (G, g, g).
    """
    n, c, h, w = x.shape
    groups = c // group_size
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        xf = x.to(dtype)
        if is_channels_last(xf):
            return Moments(*_MomentsNHWC.apply(xf.permute(0, 2, 3, 1).reshape(n, h * w, c),
                                               group_size))
        mean, sq_mean, second = _MomentsNCHW.apply(
            xf.reshape(n * groups, group_size, h * w), groups
        )
        return Moments(mean.view(n, c), sq_mean.view(n, c), second)


def batch_covariance(moments: Moments, eps: float) -> Tensor:
    """Group-wise batch covariance Σ + εI (CE paper, Eqn 5).

    Σ = (1/M) Σ_nij (x_nij − μ)(x_nij − μ)ᵀ = E[x xᵀ] − μμᵀ, μ the batch mean, M = N·H·W.

    Args:
        moments: :class:`Moments` of the batch.
        eps: ε added to the diagonal.

    Returns:
        (G, g, g) covariance matrices.
    """
    groups, g = moments.second.shape[0], moments.second.shape[1]
    mu = moments.mean.mean(0).view(groups, g, 1)
    cov = moments.second - mu @ mu.transpose(1, 2)
    return cov + eps * torch.eye(g, dtype=cov.dtype, device=cov.device)


def instance_variance(moments: Moments) -> Tensor:
    """Population variance of each channel of each sample over H×W (CE paper, Eqn 7).

    Returns:
        (N, C) variances σ̃²_n = E[x²] − E[x]², clamped at 0 against round-off.
    """
    return (moments.sq_mean - moments.mean.square()).clamp_min(0)


def spatial_variance(x: Tensor) -> Tensor:
    """Population variance of each channel of each sample over H×W (CE paper, Eqn 7).

    Computed as E[x²] − E[x]² from the sums and sums of squares of the rows (one pass with the
    compiled kernels, :func:`cenet.kernels.row_moments`; ``torch.var`` over two dimensions is
    an order of magnitude slower on CPU).

    Args:
        x: (N, C, H, W) feature map.

    Returns:
        (N, C) variances in ``x``'s dtype promoted to at least float32, clamped at 0.
    """
    n, c, h, w = x.shape
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    if xf.is_contiguous():
        total, sq = _RowMoments.apply(xf.view(n * c, h * w))
        mean, sq = total.view(n, c).div_(h * w), sq.view(n, c).div_(h * w)
    else:
        mean = xf.mean((2, 3))
        sq = torch.linalg.vector_norm(xf, dim=(2, 3)).square().div(h * w)
    return (sq - mean * mean).clamp_min(0)
