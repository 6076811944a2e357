"""Squeeze-and-Excitation (SE), a baseline channel block (Hu et al., CVPR 2018; CE paper
Table 1)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from cenet.layers._validate import check_input, check_positive_int, check_unit_interval


class SqueezeExcitation(nn.Module):
    """SE block y = x ⊙ σ(W₂ δ(W₁ GAP(x) + b₁) + b₂) (Hu et al. 2018, Eqns 2-4).

    Squeeze: global average pooling over H×W gives z (N, C, 1, 1). Excitation: a 1×1
    convolution ``fc1`` (C → C_r, with bias), ``act_layer`` (ReLU), a 1×1 convolution ``fc2``
    (C_r → C, with bias) and ``gate_layer`` (sigmoid) give the channel weights s (N, C, 1, 1).
    Scale: y = x · s. The 1×1 convolutions on the pooled (N, C, 1, 1) tensor are the paper's
    fully connected layers (timm's parameter names and layout: ``fc1.weight`` (C_r, C, 1, 1),
    ``fc1.bias`` (C_r,), ``fc2.weight`` (C, C_r, 1, 1), ``fc2.bias`` (C,)). NCHW and
    channels-last inputs give the same numbers; the output keeps the input's memory layout.

    Args:
        num_features: C, channels of the (N, C, H, W) input.
        rd_ratio: 1/r, the reduction ratio (paper: r = 16); the hidden width is
            C_r = max(1, round(C · rd_ratio)) unless ``rd_channels`` is given.
        rd_channels: C_r explicitly (overrides ``rd_ratio``).
        act_layer: class (or zero-argument callable) of the hidden activation (paper: ReLU).
        gate_layer: class (or zero-argument callable) of the gate (paper: sigmoid).
        device, dtype: factory arguments of the parameters.

    Shape:
        input (N, C, H, W), output (N, C, H, W).

    Raises:
        ValueError: in ``__init__`` for a non-positive ``num_features``/``rd_channels`` or an
            ``rd_ratio`` outside (0, 1]; in ``forward`` for a non-4D input or a wrong channel
            count.
    """

    def __init__(
        self,
        num_features: int,
        *,
        rd_ratio: float = 1 / 16,
        rd_channels: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        gate_layer: Callable[[], nn.Module] = nn.Sigmoid,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int("num_features", num_features)
        if rd_channels is None:
            check_unit_interval("rd_ratio", rd_ratio, closed=False)
            rd_channels = max(1, round(num_features * rd_ratio))
        check_positive_int("rd_channels", rd_channels)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.rd_channels = rd_channels
        self.fc1 = nn.Conv2d(num_features, rd_channels, 1, bias=True, **factory)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(rd_channels, num_features, 1, bias=True, **factory)
        self.gate = gate_layer()

    def extra_repr(self) -> str:
        return f"{self.num_features}, rd_channels={self.rd_channels}"

    def channel_weights(self, x: Tensor) -> Tensor:
        """The excitation s = gate(fc2(act(fc1(GAP(x))))), (N, C, 1, 1)."""
        z = x.mean((2, 3), keepdim=True)
        return self.gate(self.fc2(self.act(self.fc1(z))))

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        return x * self.channel_weights(x).to(x.dtype)
