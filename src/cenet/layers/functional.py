"""The CE block as pure functions of tensors: the reference implementation (CE paper, Eqns 2-8).

One function per step of the paper, without buffers, dispatch or device assumptions: this is
the path that runs on CUDA, MPS and ``meta``, under ``torch.compile`` and ``torch.export``,
and the reference that the native CPU operator (:mod:`cenet.kernels.operators`) is tested against.

    x ─▶ group_statistics ─▶ batch_covariance ─▶ whitening_matrix          (BD, Eqns 5-6)
    x ─▶ instance_variance ─▶ variance_statistics ─▶ inv_std_from_statistics (IR, Eqns 7-8)
                          └─▶ instance_gate                                (IR, Eqn 21)
    x, W, d ─▶ channel_equilibrium                                         (Eqns 2, 4)

Dtype rules: statistics, the covariance, the Newton iteration and the gate run in the input's
dtype promoted to at least float32 (float32 for float16/bfloat16/float32 input, float64 for
float64), with autocast disabled; :func:`channel_equilibrium` returns the input's dtype.
``group_statistics`` and ``variance_statistics`` return *sufficient* statistics (sums and
counts), which add up across batches, so a distributed version (:mod:`cenet.layers.sync_ce`)
all-reduces them before :func:`batch_covariance` and :func:`inv_std_from_statistics`.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GroupStatistics",
    "VarianceStatistics",
    "batch_covariance",
    "batch_inv_std",
    "channel_equilibrium",
    "group_statistics",
    "instance_gate",
    "instance_variance",
    "inv_std_from_statistics",
    "is_channels_last",
    "newton_schulz_isqrt",
    "no_autocast",
    "statistics_dtype",
    "trace_normalize",
    "variance_statistics",
    "whitening_matrix",
]


class GroupStatistics(NamedTuple):
    """Sufficient statistics of a batch for group-wise covariances (sums, not means).

    Attributes:
        count: () number of positions M = N·H·W that were summed (after pooling, if any).
        total: (G, g) Σ x over the positions, per group and channel.
        gram: (G, g, g) Σ x xᵀ over the positions, per group.
    """

    count: Tensor
    total: Tensor
    gram: Tensor


class VarianceStatistics(NamedTuple):
    """Sufficient statistics of IR's batch scale s (sums, not means).

    Attributes:
        count: () number of instance variances summed, N·C.
        total: () Σ σ̃²_{n,c} over samples and channels.
    """

    count: Tensor
    total: Tensor


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the CE block's statistics for an input of ``dtype``: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device`` where it is on; otherwise nothing (no autocast region
    in a traced graph: ``torch.export`` passes over such regions slowly)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def is_channels_last(x: Tensor) -> bool:
    """True if ``x`` (N, C, H, W) is stored NHWC and not also NCHW-contiguous."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def group_statistics(x: Tensor, group_size: int, *, pool: bool = False) -> GroupStatistics:
    """Sufficient statistics of groups of ``group_size`` consecutive channels (CE paper, Eqn 5).

    Args:
        x: (N, C, H, W) feature map, any layout, C divisible by ``group_size``.
        group_size: g; G = C / g groups.
        pool: take the statistics of MaxPool2d(2, 2)(x) (paper appendix G: the stem's CE).

    Returns:
        :class:`GroupStatistics` in :func:`statistics_dtype` of ``x``.
    """
    if pool:
        x = F.max_pool2d(x, 2, 2)
    n, c, h, w = x.shape
    groups = c // group_size
    with no_autocast(x.device):
        xf = x.to(statistics_dtype(x.dtype))
        if is_channels_last(xf):  # (G, M, g) strided view of the NHWC storage
            rows = xf.permute(0, 2, 3, 1).reshape(n * h * w, groups, group_size).transpose(0, 1)
            gram = torch.bmm(rows.transpose(1, 2), rows)
            total = rows.sum(1)
        else:  # (N, G, g, H·W) view of the NCHW storage
            rows = xf.reshape(n, groups, group_size, h * w)
            gram = torch.matmul(rows, rows.transpose(-1, -2)).sum(0)
            total = rows.sum((0, 3))
        count = total.new_full((), n * h * w)
    return GroupStatistics(count, total, gram)


def batch_covariance(stats: GroupStatistics) -> Tensor:
    """Group-wise batch covariance Σ = Σxxᵀ/M − μμᵀ, μ = Σx/M (CE paper, Eqn 5; population).

    Args:
        stats: :class:`GroupStatistics` of the batch (or of all processes' batches summed).

    Returns:
        (G, g, g) covariance matrices in the statistics' dtype.
    """
    mean = stats.total / stats.count
    return stats.gram / stats.count - mean.unsqueeze(-1) * mean.unsqueeze(-2)


def trace_normalize(cov: Tensor) -> Tensor:
    """Σ_N = Σ / tr(Σ) for each matrix of a batch (CE paper, Sec. 3.1, before Eqn 6).

    For a positive definite Σ the eigenvalues of Σ_N lie in (0, 1), so ‖I − Σ_N‖₂ < 1 and the
    Newton iteration of :func:`newton_schulz_isqrt` converges.

    Args:
        cov: (..., g, g) symmetric positive (semi-)definite matrices.

    Returns:
        (..., g, g) matrices with unit trace, in ``cov``'s dtype.
    """
    return cov / cov.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]


def newton_schulz_isqrt(cov: Tensor, num_iters: int) -> Tensor:
    """Approximate Σ_N^{-1/2} by ``num_iters`` Newton steps (CE paper, Eqn 6).

    P_0 = I,  P_k = 1.5·P_{k-1} − 0.5·P_{k-1}³ Σ_N,  k = 1..T;  returns P_T.

    Not rescaled by tr(Σ)^{-1/2}: CE uses the inverse square root of the trace-normalized
    covariance (paper Eqn 6). With the paper's T = 3 this is a soft decorrelation; it converges
    to the exact Σ_N^{-1/2} as T grows when Σ_N is well conditioned. The uncoupled iteration
    amplifies round-off once converged: in float64 it reaches ~1e-14 of the
    eigendecomposition after ~10 steps on well-conditioned input and drifts after a few dozen;
    in float32 large T diverges on ill-conditioned Σ_N. Runs in at least float32, also under
    autocast (half precision diverges).

    Args:
        cov: (..., g, g) trace-normalized covariances Σ_N (:func:`trace_normalize`).
        num_iters: T ≥ 1.

    Returns:
        (..., g, g) P_T in ``cov``'s dtype promoted to at least float32.

    Raises:
        ValueError: if ``num_iters`` < 1 or ``cov`` is not a batch of square matrices.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be a positive integer, got {num_iters}")
    if cov.dim() < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"cov must have shape (..., g, g), got {tuple(cov.shape)}")
    with no_autocast(cov.device):
        sigma = cov.to(statistics_dtype(cov.dtype))
        eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
        p = 1.5 * eye - 0.5 * sigma  # P_1 in closed form (P_0 = I)
        for _ in range(num_iters - 1):
            p = 1.5 * p - 0.5 * (p @ p @ p @ sigma)
    return p


def whitening_matrix(cov: Tensor, num_iters: int, eps: float) -> Tensor:
    """W = Newton_T((Σ + εI) / tr(Σ + εI)) ≈ Σ_N^{-1/2}, BD's matrix (CE paper, Eqns 5-6).

    Args:
        cov: (G, g, g) batch covariances (:func:`batch_covariance`).
        num_iters: T, Newton steps (paper: 3).
        eps: ε added to the diagonal before the trace normalization.

    Returns:
        (G, g, g) whitening matrices in ``cov``'s dtype promoted to at least float32.
    """
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return newton_schulz_isqrt(trace_normalize(cov + eps * eye), num_iters)


def instance_variance(x: Tensor) -> Tensor:
    """σ̃²_n: population variance of each channel of each sample over H×W (CE paper, Eqn 7).

    Args:
        x: (N, C, H, W) feature map.

    Returns:
        (N, C) variances in :func:`statistics_dtype` of ``x``.
    """
    with no_autocast(x.device):
        xf = x.to(statistics_dtype(x.dtype))
        return torch.var_mean(xf, dim=(2, 3), correction=0)[0]


def variance_statistics(inst_var: Tensor) -> VarianceStatistics:
    """Count and sum of the instance variances (N, C): what IR's batch scale needs (Eqn 8).

    Returns:
        :class:`VarianceStatistics` in ``inst_var``'s dtype.
    """
    return VarianceStatistics(inst_var.new_full((), inst_var.numel()), inst_var.sum())


def inv_std_from_statistics(stats: VarianceStatistics, eps: float) -> Tensor:
    """IR's batch scale (s + ε)^{-1/2}, s = Σσ̃² / (N·C) (CE paper, Eqn 8).

    Args:
        stats: :class:`VarianceStatistics` of the batch (or of all processes' batches summed).
        eps: ε, so that a constant input stays finite.

    Returns:
        (1,) tensor in the statistics' dtype.
    """
    return (stats.total / stats.count + eps).rsqrt().reshape(1)


def batch_inv_std(inst_var: Tensor, eps: float) -> Tensor:
    """IR's batch scale (s + ε)^{-1/2}, s the mean of σ̃² over samples and channels (Eqn 8).

    Args:
        inst_var: (N, C) instance variances (:func:`instance_variance`).
        eps: ε, so that a constant input stays finite.

    Returns:
        (1,) tensor in ``inst_var``'s dtype.
    """
    return inv_std_from_statistics(variance_statistics(inst_var), eps)


def instance_gate(
    inst_var: Tensor,
    fc1_weight: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    fc2_weight: Tensor,
    ln_eps: float,
) -> Tensor:
    """IR's gate f(σ̃²_n) = Sigmoid(W₂ ReLU(LN(W₁ σ̃²_n))) (CE paper, Eqn 8; appendix B.1, Eqn 21).

    Args:
        inst_var: (N, C) instance variances.
        fc1_weight: W₁ (C/r, C); ``ln_weight``, ``ln_bias``: (C/r,) LayerNorm affine;
            ``fc2_weight``: W₂ (C, C/r). Cast to ``inst_var``'s dtype (float32 or wider).
        ln_eps: ε of the LayerNorm.

    Returns:
        (N, C) gate values in (0, 1), in ``inst_var``'s dtype.
    """
    dt = inst_var.dtype
    with no_autocast(inst_var.device):
        hidden = F.linear(inst_var, fc1_weight.to(dt))
        hidden = F.layer_norm(hidden, hidden.shape[-1:], ln_weight.to(dt), ln_bias.to(dt), ln_eps)
        return torch.sigmoid(F.linear(torch.relu(hidden), fc2_weight.to(dt)))


def channel_equilibrium(x: Tensor, wm: Tensor | None, diag: Tensor | None) -> Tensor:
    """p_n = (W + Diag(d_n)) x_n at every position (CE paper, Eqns 2 and 4).

    With W = λ·Σ_N^{-1/2} (BD) and d_n = (1 − λ)·f(σ̃²_n)·s^{-1/2} (IR) this is the CE block's
    output λ·BD(x) + (1 − λ)·IR(x); W alone is BD (λ ≡ 1), d alone is IR (λ ≡ 0).

    Args:
        x: (N, C, H, W) input, NCHW or channels-last.
        wm: (G, g, g) block-diagonal matrices shared by the batch (G·g = C), or None.
        diag: (N, C) per-sample diagonals, or None (not both None).

    Returns:
        (N, C, H, W) in ``x``'s dtype and memory layout.

    Raises:
        ValueError: if both ``wm`` and ``diag`` are None.
    """
    n, c, h, w = x.shape
    if wm is None:
        if diag is None:
            raise ValueError("channel_equilibrium needs wm, diag or both, got neither")
        return x * diag.to(x.dtype)[:, :, None, None]
    groups, g = wm.shape[0], wm.shape[-1]
    mats = wm.unsqueeze(0)
    if diag is not None:
        mats = mats + torch.diag_embed(diag.reshape(n, groups, g).to(wm.dtype))
    mats = mats.to(x.dtype)
    if is_channels_last(x):  # (N, H·W, G, g) view; output NHWC as well
        rows = x.permute(0, 2, 3, 1).reshape(n, h * w, groups, g)
        out = torch.einsum("ngij,nmgj->nmgi", mats.expand(n, groups, g, g), rows)
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2)
    return torch.matmul(mats, x.reshape(n, groups, g, h * w)).reshape(n, c, h, w)
