"""Instance reweighting (IR), the second branch of the CE block (CE paper, Eqns 7, 8, 21, 32)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cenet.layers._validate import check_eps, check_input, check_unit_interval
from cenet.layers.moments import spatial_variance


class InstanceReweighting(nn.Module):
    """IR(x̃)_n = f(σ̃²_n) · s^{-1/2} ⊙ x̃_n (CE paper, Eqn 8; appendix B.1, Eqn 21).

    σ̃²_n (N, C) is the population variance of each channel of sample n over H×W (Eqn 7).
    The gate f(σ̃²_n) = Sigmoid(W₂ ReLU(LN(W₁ σ̃²_n))) with W₁ (C/r × C) and W₂ (C × C/r)
    without biases and a LayerNorm over the C/r hidden features. s is the mean of σ̃² over
    the batch and the channels (one scalar); (s + ε)^{-1/2} scales the output in training, its
    running estimate ``running_inv_std`` (Eqn 32, initialized to 1) in eval.

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
        hidden = torch.relu(self.norm(self.fc1(inst_var.to(self.fc1.weight.dtype))))
        return torch.sigmoid(self.fc2(hidden))

    def channel_scale(self, inst_var: Tensor) -> Tensor:
        """The per-sample channel weights d_n = f(σ̃²_n) · s^{-1/2}, (N, C) (Eqn 8).

        In training this updates ``running_inv_std`` from the batch's s.

        Raises:
            FloatingPointError: in training, if s is not finite; nothing is updated then.
        """
        if self.training:
            inv_std = (inst_var.mean() + self.eps).rsqrt()
            if not torch.isfinite(inv_std):
                raise FloatingPointError(
                    "InstanceReweighting: the batch variance is not finite (NaN/Inf in the "
                    "input); the running scale was not updated"
                )
            with torch.no_grad():
                self.running_inv_std.lerp_(inv_std.detach().reshape(1), self.momentum)
        else:
            inv_std = self.running_inv_std
        return self.gate(inst_var) * inv_std

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        inst_var = spatial_variance(x)
        return x * self.channel_scale(inst_var).to(x.dtype)[:, :, None, None]
