"""ResNet for CIFAR (He et al. 2016, Sec. 4.2: 6n+2 layers, widths 16-32-64), with CE.

CE placement (CE paper, Sec. 3.3, Fig. 2c): after the BN of the last conv of the residual
branch, before the addition: ``conv-BN-ReLU-conv-BN-CE (+ shortcut) → ReLU``. Shortcuts that
change shape are 1×1 conv + BN (option B), as in torchvision.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from cenet.layers import get_attn
from cenet.models._builder import init_conv_weights, make_divisible, norm_attn_act
from cenet.models.registry import register_model


class BasicBlock(nn.Module):
    """Residual basic block ``conv-norm-act-conv-norm[-attn] + shortcut → act``.

    Shape: input (N, in_chs, H, W), output (N, out_chs, H/stride, W/stride).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        *,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        attn_layer: str | Callable[..., nn.Module] | None = None,
        attn_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(out_chs)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(out_chs)
        factory = get_attn(attn_layer)
        self.attn = nn.Identity() if factory is None else factory(out_chs, **(attn_kwargs or {}))
        self.act2 = act_layer(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), norm_layer(out_chs)
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.attn(self.bn2(self.conv2(x)))
        return self.act2(x + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 images.

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110).
        num_classes: classifier outputs.
        width: channel multiplier of 16-32-64 (rounded to multiples of 16).
        norm_layer, act_layer: as in torchvision (callables taking the channel count).
        attn_layer: block after the last norm of each residual branch (``"ce"``, ``"bd"``,
            ``"ir"``, a callable, or None).
        attn_kwargs: keyword arguments of that block.
        stem_attn: also put the block after the stem's norm.
        in_chans: input channels.

    Shape:
        input (N, in_chans, 32, 32), output (N, num_classes) logits.

    Raises:
        ValueError: if ``depth`` is not 6n + 2 with n ≥ 1, or ``width`` is not positive.
    """

    def __init__(
        self,
        depth: int = 20,
        *,
        num_classes: int = 10,
        width: float = 1.0,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        attn_layer: str | Callable[..., nn.Module] | None = None,
        attn_kwargs: dict | None = None,
        stem_attn: bool = False,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        if not width > 0:
            raise ValueError(f"width must be positive, got {width!r}")
        blocks_per_stage = (depth - 2) // 6
        widths = [make_divisible(c * width) for c in (16, 32, 64)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False),
            *norm_attn_act(
                widths[0], norm_layer=norm_layer, act_layer=act_layer,
                attn_layer=attn_layer if stem_attn else None, attn_kwargs=attn_kwargs,
            ),
        )
        stages, in_chs = [], widths[0]
        for i, out_chs in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(
                    in_chs, out_chs, stride, norm_layer=norm_layer, act_layer=act_layer,
                    attn_layer=attn_layer, attn_kwargs=attn_kwargs,
                ))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_chs
        self.fc = nn.Linear(in_chs, num_classes)
        init_conv_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


#: registered variants: name suffix → block after the last norm of each residual branch
VARIANTS: dict[str, str | None] = {"": None, "_ce": "ce", "_bd": "bd", "_ir": "ir"}


def _make_builder(depth: int, suffix: str, attn: str | None):
    def builder(*, num_classes: int = 10, attn_layer=attn, **kwargs) -> CifarResNet:
        return CifarResNet(depth, num_classes=num_classes, attn_layer=attn_layer, **kwargs)

    builder.__name__ = builder.__qualname__ = f"cifar_resnet{depth}{suffix}"
    block = {None: "plain BN", "ce": "CE before each addition",
             "bd": "BD only (λ ≡ 1) before each addition",
             "ir": "IR only (λ ≡ 0) before each addition"}[attn]
    builder.__doc__ = (
        f"ResNet-{depth} for CIFAR, {block}. Keyword arguments: see :class:`CifarResNet`."
    )
    return register_model(builder)


for _depth in (20, 56):
    for _suffix, _attn in VARIANTS.items():
        _make_builder(_depth, _suffix, _attn)
