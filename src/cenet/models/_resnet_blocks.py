"""Residual blocks of the ImageNet ResNets (He et al. 2016; torchvision's V1.5), with two
optional channel blocks: one after the last norm of the residual branch (CE, SE) and one before
every convolution (GCT).

Parameter and buffer names are torchvision's (``conv1``, ``bn1``, ..., ``downsample.0``,
``downsample.1``); the optional blocks are extra attributes (``attn``, ``conv1_attn``, ...)
that add keys without renaming any, so a torchvision ``state_dict`` loads with ``strict=False``
and only the added blocks' keys missing. Activations are separate modules ``act1``, ``act2``
(, ``act3``), as in timm, instead of torchvision's shared ``relu`` (no parameters, so no key
changes).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from cenet.layers import get_attn

Factory = str | Callable[..., nn.Module] | None


def conv_kaiming(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """A bias-free ``kernel_size``×``kernel_size`` convolution with padding ``kernel_size // 2``
    and torchvision's ResNet initialization (Kaiming normal, fan_out, ReLU gain)."""
    conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def make_optional(layer: Factory, num_features: int, kwargs: dict | None) -> nn.Module | None:
    """``layer(num_features, **kwargs)`` resolved by :func:`cenet.layers.get_attn`, or None."""
    factory = get_attn(layer)
    return None if factory is None else factory(num_features, **(kwargs or {}))


def _apply(module: nn.Module | None, x: Tensor) -> Tensor:
    return x if module is None else module(x)


class _ResidualBlock(nn.Module):
    """Shared parts: the projection shortcut and the optional blocks."""

    expansion = 1

    def _build_shortcut(self, inplanes: int, out_chs: int, stride: int,
                        norm_layer: Callable[..., nn.Module], conv_attn_layer: Factory,
                        conv_attn_kwargs: dict | None) -> None:
        self.downsample = self.downsample_attn = None
        if stride != 1 or inplanes != out_chs:
            # torchvision's keys downsample.0 (1×1 conv) and downsample.1 (norm)
            self.downsample = nn.Sequential(
                conv_kaiming(inplanes, out_chs, 1, stride), norm_layer(out_chs)
            )
            self.downsample_attn = make_optional(conv_attn_layer, inplanes, conv_attn_kwargs)

    def shortcut(self, x: Tensor) -> Tensor:
        """The identity, or ``downsample(downsample_attn(x))`` (projection, option B)."""
        if self.downsample is None:
            return x
        return self.downsample(_apply(self.downsample_attn, x))


class BasicBlock(_ResidualBlock):
    """ResNet-18/34 block: ``conv3×3-norm-act-conv3×3-norm[-attn] + shortcut → act``.

    With ``conv_attn_layer`` (GCT paper, Sec. 4: "one GCT layer before each convolutional
    layer") a block ``conv{1,2}_attn`` precedes ``conv1``/``conv2``, and ``downsample_attn``
    precedes the shortcut's 1×1 convolution (as in the GCT authors' code).

    Args:
        inplanes: input channels.
        planes: output channels (``expansion`` = 1).
        stride: stride of ``conv1`` and of the projection shortcut.
        norm_layer: callable ``C -> module`` (default ``nn.BatchNorm2d``).
        act_layer: rectifier class taking ``inplace`` (default ``nn.ReLU``).
        attn_layer: block after ``bn2``, before the addition (CE paper Fig. 2c; SENet), as
            :func:`cenet.layers.get_attn` resolves it; None for none. Attribute ``attn``.
        attn_kwargs: its keyword arguments.
        conv_attn_layer, conv_attn_kwargs: block before every convolution (GCT), or None.

    Shape:
        input (N, inplanes, H, W), output (N, planes, ⌈H/stride⌉, ⌈W/stride⌉).

    Raises:
        ValueError: for an unknown ``attn_layer``/``conv_attn_layer`` name.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        *,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        attn_layer: Factory = None,
        attn_kwargs: dict | None = None,
        conv_attn_layer: Factory = None,
        conv_attn_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.conv1_attn = make_optional(conv_attn_layer, inplanes, conv_attn_kwargs)
        self.conv1 = conv_kaiming(inplanes, planes, 3, stride)
        self.bn1 = norm_layer(planes)
        self.act1 = act_layer(inplace=True)
        self.conv2_attn = make_optional(conv_attn_layer, planes, conv_attn_kwargs)
        self.conv2 = conv_kaiming(planes, planes, 3)
        self.bn2 = norm_layer(planes)
        self.attn = make_optional(attn_layer, planes, attn_kwargs)
        self.act2 = act_layer(inplace=True)
        self._build_shortcut(inplanes, planes, stride, norm_layer, conv_attn_layer,
                             conv_attn_kwargs)

    @property
    def last_norm(self) -> nn.Module:
        """The norm of the last convolution of the residual branch (``bn2``)."""
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(_apply(self.conv1_attn, x))))
        out = _apply(self.attn, self.bn2(self.conv2(_apply(self.conv2_attn, out))))
        return self.act2(out + self.shortcut(x))


class Bottleneck(_ResidualBlock):
    """ResNet-50/101 block (V1.5: the stride on the 3×3 conv, as torchvision):
    ``conv1×1-norm-act-conv3×3-norm-act-conv1×1-norm[-attn] + shortcut → act``.

    Optional blocks as in :class:`BasicBlock`, with ``conv3_attn`` before ``conv3`` and
    ``attn`` after ``bn3``.

    Args:
        inplanes: input channels.
        planes: width of the 3×3 conv; the output has ``planes * 4`` channels.
        stride: stride of ``conv2`` and of the projection shortcut.
        norm_layer, act_layer, attn_layer, attn_kwargs, conv_attn_layer, conv_attn_kwargs:
            as in :class:`BasicBlock`.

    Shape:
        input (N, inplanes, H, W), output (N, 4·planes, ⌈H/stride⌉, ⌈W/stride⌉).

    Raises:
        ValueError: for an unknown ``attn_layer``/``conv_attn_layer`` name.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        *,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        attn_layer: Factory = None,
        attn_kwargs: dict | None = None,
        conv_attn_layer: Factory = None,
        conv_attn_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1_attn = make_optional(conv_attn_layer, inplanes, conv_attn_kwargs)
        self.conv1 = conv_kaiming(inplanes, planes, 1)
        self.bn1 = norm_layer(planes)
        self.act1 = act_layer(inplace=True)
        self.conv2_attn = make_optional(conv_attn_layer, planes, conv_attn_kwargs)
        self.conv2 = conv_kaiming(planes, planes, 3, stride)
        self.bn2 = norm_layer(planes)
        self.act2 = act_layer(inplace=True)
        self.conv3_attn = make_optional(conv_attn_layer, planes, conv_attn_kwargs)
        self.conv3 = conv_kaiming(planes, out_chs, 1)
        self.bn3 = norm_layer(out_chs)
        self.attn = make_optional(attn_layer, out_chs, attn_kwargs)
        self.act3 = act_layer(inplace=True)
        self._build_shortcut(inplanes, out_chs, stride, norm_layer, conv_attn_layer,
                             conv_attn_kwargs)

    @property
    def last_norm(self) -> nn.Module:
        """The norm of the last convolution of the residual branch (``bn3``)."""
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(_apply(self.conv1_attn, x))))
        out = self.act2(self.bn2(self.conv2(_apply(self.conv2_attn, out))))
        out = _apply(self.attn, self.bn3(self.conv3(_apply(self.conv3_attn, out))))
        return self.act3(out + self.shortcut(x))
