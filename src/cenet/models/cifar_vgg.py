"""VGG with batch normalization for CIFAR (32×32 inputs), with optional CE blocks.

CE placement (CE paper, Sec. 3.3 and 5.3): ``conv → BN → CE → ReLU`` after every BN
(``attn_ratio=1``) or after the first ``round(attn_ratio · L)`` of the L BN layers (the
paper's 75% / 50% ablation; the paper does not say which layers, we take the shallowest,
where inhibited channels are measured); ``attn_position="before_norm"`` gives the paper's
``conv → CE → BN → ReLU`` position ablation; ``attn_position="after_act"`` puts the block
before the next convolution, where GCT goes (``cifar_vgg11_gct``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from cenet.models._builder import init_conv_weights, make_divisible, norm_attn_act
from cenet.models.registry import register_model

VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
}

ATTN_POSITIONS = ("after_norm", "before_norm", "after_act")

#: registered variants: name suffix → block after the norm layers
VARIANTS: dict[str, str | None] = {
    "": None, "_ce": "ce", "_bd": "bd", "_ir": "ir", "_se": "se", "_gct": "gct"
}
#: default ``attn_position`` of a block: CE and its branches after the norm (the paper), SE on
#: the block output (SENet), GCT after each rectifier, i.e. before the next convolution (GCT)
DEFAULT_POSITION = {"se": "after_act", "gct": "after_act"}


class CifarVGG(nn.Module):
    """VGG-BN for 32×32 images: 3×3 conv stages, 2×2 max pooling, one linear classifier.

    Args:
        cfg: channels per conv layer, ``"M"`` for max pooling (see ``VGG_CFGS``).
        num_classes: classifier outputs.
        width: channel multiplier; channel counts are rounded to multiples of 16 (the CE
            group size), so ``width=0.25`` gives 16-32-64-128-128.
        norm_layer: normalization after each conv (default ``nn.BatchNorm2d``).
        act_layer: rectifier (default ``nn.ReLU``).
        attn_layer: block after the norm (``"ce"``, ``"bd"``, ``"ir"``, a callable, or None).
        attn_kwargs: keyword arguments of the block (e.g. ``{"group_size": 16}``).
        attn_ratio: fraction of the conv layers, shallowest first, that get the block.
        attn_position: ``"after_norm"`` (conv-BN-CE-ReLU, the paper's), ``"before_norm"``
            (conv-CE-BN-ReLU, the paper's position ablation) or ``"after_act"``
            (conv-BN-ReLU-block, i.e. before the next convolution, GCT's place).
        in_chans: input channels.

    Shape:
        input (N, in_chans, 32, 32), output (N, num_classes) logits.

    Raises:
        ValueError: for ``attn_ratio`` outside [0, 1], an unknown ``attn_position`` or a
            non-positive ``width``.
    """

    def __init__(
        self,
        cfg: list[int | str],
        *,
        num_classes: int = 10,
        width: float = 1.0,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        attn_layer: str | Callable[..., nn.Module] | None = None,
        attn_kwargs: dict | None = None,
        attn_ratio: float = 1.0,
        attn_position: str = "after_norm",
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if not 0 <= attn_ratio <= 1:
            raise ValueError(f"attn_ratio must lie in [0, 1], got {attn_ratio!r}")
        if attn_position not in ATTN_POSITIONS:
            raise ValueError(
                f"attn_position must be one of {ATTN_POSITIONS}, got {attn_position!r}"
            )
        if not width > 0:
            raise ValueError(f"width must be positive, got {width!r}")
        num_convs = sum(1 for v in cfg if v != "M")
        num_attn = round(attn_ratio * num_convs)
        layers: list[nn.Module] = []
        channels, index = in_chans, 0
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out = make_divisible(v * width)
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=False))
            layers += norm_attn_act(
                out, norm_layer=norm_layer, act_layer=act_layer,
                attn_layer=attn_layer if index < num_attn else None, attn_kwargs=attn_kwargs,
                attn_position=attn_position,
            )
            channels, index = out, index + 1
        self.features = nn.Sequential(*layers)
        self.num_features = channels
        self.classifier = nn.Linear(channels, num_classes)
        init_conv_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _make_builder(cfg: str, suffix: str, attn: str | None):
    position = DEFAULT_POSITION.get(attn, "after_norm")

    def builder(
        *, num_classes: int = 10, attn_layer=attn, attn_position=position, **kwargs
    ) -> CifarVGG:
        return CifarVGG(
            VGG_CFGS[cfg], num_classes=num_classes, attn_layer=attn_layer,
            attn_position=attn_position, **kwargs,
        )

    builder.__name__ = builder.__qualname__ = f"cifar_{cfg}{suffix}"
    block = {None: "plain BN", "ce": "CE after every BN", "bd": "BD only (λ ≡ 1) after every BN",
             "ir": "IR only (λ ≡ 0) after every BN", "se": "SE after every conv block",
             "gct": "GCT after every conv block (before the next convolution)"}[attn]
    builder.__doc__ = (
        f"{cfg.upper()}-BN for CIFAR, {block}. Keyword arguments: see :class:`CifarVGG`."
    )
    return register_model(builder)


for _cfg in VGG_CFGS:
    for _suffix, _attn in VARIANTS.items():
        _make_builder(_cfg, _suffix, _attn)
