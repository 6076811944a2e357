"""Batch decorrelation (BD), the first branch of the CE block (CE paper, Eqns 5, 6, 32)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cenet.layers import functional as CF
from cenet.layers._running import all_finite, check_finite, update_running_
from cenet.layers._validate import (
    check_eps,
    check_group_size,
    check_input,
    check_positive_int,
    check_unit_interval,
)


class BatchDecorrelation(nn.Module):
    """Group-wise batch decorrelation BD(x̃) = Σ_N^{-1/2} x̃ (CE paper, Sec. 3.1).

    In training, each group of ``group_size`` consecutive channels gets the covariance Σ of
    the batch (Eqn 5, over N·H·W positions, of the 2×2-max-pooled input when ``pool``), its
    trace-normalized Σ_N = Σ / tr Σ, and W ≈ Σ_N^{-1/2} from ``num_iters`` Newton steps
    (Eqn 6), applied to the full-resolution, un-centered input. The running estimate
    ``running_wm`` (G, g, g) follows Eqn 32 with ``momentum`` and starts at I; in eval the
    branch is the fixed grouped 1×1 convolution with weight :meth:`conv_weight`. The maths is
    :mod:`cenet.layers.functional`; as a part of :class:`~cenet.layers.ChannelEquilibrium`
    this module only holds the buffer and the settings.

    Args:
        num_features: C, channels of the (N, C, H, W) input.
        group_size: g, channels per group (paper: 16); must divide C.
        num_iters: T, Newton iterations (paper: 3).
        eps: ε added to the covariance diagonal.
        momentum: m of the running estimate (Eqn 32), in (0, 1].
        pool: compute the statistics on MaxPool2d(2, 2) of the input (paper appendix G,
            used after the stem's BN where H, W are large).

    Shape:
        input (N, C, H, W), output (N, C, H, W).

    Raises:
        ValueError: in ``__init__`` for a group size that does not divide C or non-positive
            ``num_iters``/``eps``; in ``forward`` for a non-4D input, a wrong channel count or
            fewer than 2 positions per group in training.
        FloatingPointError: in eager CPU training, for a batch whose covariance is not finite
            (the running buffer is left untouched).
    """

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int = 16,
        num_iters: int = 3,
        eps: float = 1e-5,
        momentum: float = 0.1,
        pool: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_group_size(num_features, group_size)
        check_positive_int("num_iters", num_iters)
        check_eps(eps)
        check_unit_interval("momentum", momentum, closed=False)
        self.num_features = num_features
        self.group_size = group_size
        self.num_groups = num_features // group_size
        self.num_iters = num_iters
        self.eps = eps
        self.momentum = momentum
        self.pool = pool
        eye = torch.eye(group_size, device=device, dtype=dtype or torch.float32)
        self.register_buffer("running_wm", eye.repeat(self.num_groups, 1, 1))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, group_size={self.group_size}, num_iters={self.num_iters}, "
            f"eps={self.eps}, momentum={self.momentum}, pool={self.pool}"
        )

    def reset_running_stats(self) -> None:
        """Reset ``running_wm`` to the identity."""
        with torch.no_grad():
            eye = torch.eye(self.group_size, dtype=self.running_wm.dtype,
                            device=self.running_wm.device)
            self.running_wm.copy_(eye)

    def check_positions(self, x: Tensor) -> None:
        """Raise ``ValueError`` if the statistics of x (N, C, H, W) (after the pooling, with
        ``pool``) have fewer than 2 positions N·H·W to estimate a covariance from."""
        n, _, h, w = x.shape
        if self.pool:
            h, w = h // 2, w // 2
        if n * h * w < 2:
            raise ValueError(
                f"BatchDecorrelation needs at least 2 positions per group in training to "
                f"estimate a covariance, got N·H·W = {n}·{h}·{w} = {n * h * w}"
                + (" after 2×2 pooling" if self.pool else "")
                + "; use a larger batch or call .eval()"
            )

    def statistics(self, x: Tensor) -> CF.GroupStatistics:
        """Sufficient statistics (count, Σx, Σxxᵀ) of the batch x (Eqn 5), after the 2×2
        pooling with ``pool``. :class:`~cenet.layers.sync_ce.SyncBatchDecorrelation` returns
        them summed over all processes."""
        return CF.group_statistics(x, self.group_size, pool=self.pool)

    def matrix(self, stats: CF.GroupStatistics) -> tuple[Tensor, Tensor]:
        """W (G, g, g) from the statistics (Eqns 5-6) and a bool flag: the covariance is
        finite."""
        cov = CF.batch_covariance(stats)
        return CF.whitening_matrix(cov, self.num_iters, self.eps), all_finite(cov)

    def batch_matrix(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """W (G, g, g) of the batch x (Eqns 5-6) and a bool flag: its covariance is finite."""
        return self.matrix(self.statistics(x))

    def update_running(self, wm: Tensor, finite: Tensor) -> None:
        """``running_wm`` ← (1 − m)·running_wm + m·W (Eqn 32), unless ``finite`` is False."""
        update_running_(self.running_wm, wm, self.momentum, finite)

    def conv_weight(self) -> Tensor:
        """The eval-time BD as the weight (C, g, 1, 1) of a grouped 1×1 convolution
        (groups = G), ready to fold into the preceding convolution."""
        return self.running_wm.reshape(self.num_features, self.group_size, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        if not self.training:
            return CF.channel_equilibrium(x, self.running_wm, None)
        self.check_positions(x)
        wm, finite = self.batch_matrix(x)
        check_finite(finite, type(self).__name__)
        self.update_running(wm, finite)
        return CF.channel_equilibrium(x, wm, None)
