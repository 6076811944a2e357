"""Batch decorrelation (BD), the first branch of the CE block (CE paper, Eqns 5, 6, 32)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cenet.layers._validate import (
    check_eps,
    check_group_size,
    check_input,
    check_positive_int,
    check_unit_interval,
)
from cenet.layers.fused_block import fused_block_usable, fused_group_block
from cenet.layers.grouped import apply_group_transform, group_conv_weight
from cenet.layers.moments import Moments, batch_covariance, group_moments
from cenet.layers.newton import newton_schulz_isqrt, trace_normalize
from cenet.layers.pooling import max_pool_2x2


class BatchDecorrelation(nn.Module):
    """Group-wise batch decorrelation BD(x̃) = Σ_N^{-1/2} x̃ (CE paper, Sec. 3.1).

    In training, each group of ``group_size`` consecutive channels gets the covariance Σ of
    the batch (Eqn 5, over N·H·W positions, of the 2×2-max-pooled input when ``pool``), its
    trace-normalized Σ_N = Σ / tr Σ, and W ≈ Σ_N^{-1/2} from ``num_iters`` Newton steps
    (Eqn 6). W is applied to the full-resolution, un-centered input. The running estimate
    ``running_wm`` (G, g, g) follows Eqn 32 with ``momentum`` and starts at I; in eval the
    branch is the fixed grouped 1×1 convolution with weight :meth:`conv_weight` (computed as a
    batched matrix product for NCHW input, which gives the same numbers several times faster
    than a grouped convolution in NCHW on CPU). In training on an NCHW CPU tensor,
    statistics, Newton and product form one autograd node whose backward makes one
    pass for the input gradient (:mod:`cenet.layers.fused_block`); a subclass that changes
    :meth:`statistics` (for example to all-reduce them) sets ``fuse_training = False``.

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
            ``num_iters``/``eps``; in ``forward`` for a non-4D input, a wrong channel count,
            fewer than 2 positions per group in training, or a non-finite covariance (the
            running buffer is left untouched).
    """

    #: use the fused training node where it applies (see the class docstring)
    fuse_training: bool = True

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
        self.register_buffer("running_wm", eye.repeat(self.num_groups, 1, 1).contiguous())

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, group_size={self.group_size}, num_iters={self.num_iters}, "
            f"eps={self.eps}, momentum={self.momentum}, pool={self.pool}"
        )

    def reset_running_stats(self) -> None:
        """Reset ``running_wm`` to the identity."""
        with torch.no_grad():
            self.running_wm.copy_(torch.eye(self.group_size, dtype=self.running_wm.dtype))

    def statistics(self, x: Tensor) -> Moments:
        """The batch statistics: :func:`group_moments` of x, or of its 2×2 max pooling when
        ``pool`` (what a distributed version would all-reduce).

        Raises:
            ValueError: if there are fewer than 2 positions (N·H·W) to estimate from.
        """
        self.check_positions(x)
        return group_moments(max_pool_2x2(x) if self.pool else x, self.group_size)

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

    def whitening_matrix(self, moments: Moments) -> Tensor:
        """W = Newton(Σ_N) (G, g, g) from the batch moments, and the running-estimate update.

        Raises:
            FloatingPointError: if the covariance is not finite; nothing is updated then.
        """
        cov = batch_covariance(moments, self.eps)
        if not torch.isfinite(cov).all():
            raise FloatingPointError(
                "BatchDecorrelation: the batch covariance is not finite (NaN/Inf in the "
                "input); the running whitening matrix was not updated"
            )
        wm = newton_schulz_isqrt(trace_normalize(cov), self.num_iters)
        with torch.no_grad():
            self.running_wm.lerp_(wm.detach().to(self.running_wm.dtype), self.momentum)
        return wm

    def conv_weight(self) -> Tensor:
        """The eval-time BD as the weight (C, g, 1, 1) of a grouped 1×1 convolution
        (groups = G), ready to fold into the preceding convolution."""
        return group_conv_weight(self.running_wm)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        if self.training and self.fusable(x):
            self.check_positions(x)
            return fused_group_block(x, self.group_size, self._batch_operator, [], pool=self.pool)
        wm = self.whitening_matrix(self.statistics(x)) if self.training else self.running_wm
        return apply_group_transform(x, wm)

    def fusable(self, x: Tensor) -> bool:
        """True if training on ``x`` takes the fused node: ``fuse_training`` and
        :func:`cenet.layers.fused_block.fused_block_usable`."""
        return self.fuse_training and fused_block_usable(x, self.group_size, self.pool)

    def _batch_operator(self, moments: Moments, ir_moments: Moments) -> tuple[Tensor, None]:
        return self.whitening_matrix(moments), None
