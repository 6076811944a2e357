"""Instance reweighting (IR), the second branch of the CE block (CE paper, Eqns 7, 8, 21, 32)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cenet.layers import functional as CF
from cenet.layers._running import all_finite, check_finite, update_running_
from cenet.layers._validate import check_eps, check_input, check_unit_interval


class InstanceReweighting(nn.Module):
    """IR(x̃)_n = f(σ̃²_n) · s^{-1/2} ⊙ x̃_n (CE paper, Eqn 8; appendix B.1, Eqn 21).

    σ̃²_n (N, C) is the population variance of each channel of sample n over H×W (Eqn 7).
    The gate f(σ̃²_n) = Sigmoid(W₂ ReLU(LN(W₁ σ̃²_n))) with W₁ (C/r × C) and W₂ (C × C/r)
    without biases and a LayerNorm over the C/r hidden features. s is the mean of σ̃² over
    the batch and the channels (one scalar); (s + ε)^{-1/2} scales the output in training, its
    running estimate ``running_inv_std`` (Eqn 32, initialized to 1) in eval. The maths is
    :mod:`cenet.layers.functional`.

    Args:
        num_features: C, channels of the (N, C, H, W) input.
        rd_ratio: 1/r, hidden width of the gate as a fraction of C (paper: r = 4); the hidden
            width is max(1, round(C · rd_ratio)).
        eps: ε in (s + ε)^{-1/2}, so a constant input stays finite.
        momentum: m of the running estimate, in (0, 1].

    Shape:
        input (N, C, H, W), output (N, C, H, W).

    Raises:
        ValueError: in ``__init__`` for ``rd_ratio`` outside (0, 1] or non-positive ``eps``;
            in ``forward`` for a non-4D input or a wrong channel count.
        FloatingPointError: in eager CPU training, for a batch whose scale s is not finite
            (the running buffer is left untouched).
    """

    def __init__(
        self,
        num_features: int,
        *,
        rd_ratio: float = 1 / 4,
        eps: float = 1e-5,
        momentum: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_unit_interval("rd_ratio", rd_ratio, closed=False)
        check_unit_interval("momentum", momentum, closed=False)
        check_eps(eps)
        factory = {"device": device, "dtype": dtype}
        hidden = max(1, round(num_features * rd_ratio))
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.fc1 = nn.Linear(num_features, hidden, bias=False, **factory)
        self.norm = nn.LayerNorm(hidden, **factory)
        self.fc2 = nn.Linear(hidden, num_features, bias=False, **factory)
        self.register_buffer("running_inv_std", torch.ones(1, **factory))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def reset_running_stats(self) -> None:
        """Reset ``running_inv_std`` to 1."""
        with torch.no_grad():
            self.running_inv_std.fill_(1.0)

    def gate(self, inst_var: Tensor) -> Tensor:
        """f(σ̃²_n) ∈ (0, 1), (N, C), from instance variances (N, C) (Eqn 21)."""
        return CF.instance_gate(inst_var, self.fc1.weight, self.norm.weight, self.norm.bias,
                                self.fc2.weight, self.norm.eps)

    def statistics(self, inst_var: Tensor) -> CF.VarianceStatistics:
        """Count and sum of the instance variances (N, C) (Eqn 8).
        :class:`~cenet.layers.sync_ce.SyncInstanceReweighting` returns them summed over all
        processes."""
        return CF.variance_statistics(inst_var)

    def scale(self, stats: CF.VarianceStatistics) -> tuple[Tensor, Tensor]:
        """(s + ε)^{-1/2} (1,) from the statistics and a bool flag: it is finite (Eqn 8)."""
        inv_std = CF.inv_std_from_statistics(stats, self.eps)
        return inv_std, all_finite(inv_std)

    def batch_scale(self, inst_var: Tensor) -> tuple[Tensor, Tensor]:
        """(s + ε)^{-1/2} (1,) of the batch and a bool flag: it is finite (Eqn 8)."""
        return self.scale(self.statistics(inst_var))

    def update_running(self, inv_std: Tensor, finite: Tensor) -> None:
        """``running_inv_std`` ← (1 − m)·running + m·(s + ε)^{-1/2} (Eqn 32), unless
        ``finite`` is False."""
        update_running_(self.running_inv_std, inv_std, self.momentum, finite)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        inst_var = CF.instance_variance(x)
        inv_std = self.running_inv_std
        if self.training:
            inv_std, finite = self.batch_scale(inst_var)
            check_finite(finite, type(self).__name__)
            self.update_running(inv_std, finite)
        return CF.channel_equilibrium(x, None, self.gate(inst_var) * inv_std)
