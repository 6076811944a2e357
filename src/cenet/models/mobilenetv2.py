"""MobileNetV2 1.0× (Sandler et al., CVPR 2018) as torchvision builds it, plain, SE and CE.

The network is torchvision's :class:`torchvision.models.MobileNetV2` itself (same modules,
parameter and buffer names, initialization and random-number use), so torchvision's
``mobilenet_v2`` state_dict loads with ``strict=True`` into ``mobilenet_v2`` and with only the
blocks' own keys missing into ``mobilenet_v2_se`` / ``mobilenet_v2_ce``. The channel blocks are
inserted after torchvision's initialization (they keep their own) without moving any
torchvision key: the parameter-free ReLU6 of the depthwise conv becomes
``nn.Sequential(block, ReLU6)`` (keys ``features.{i}.conv.{j}.2.0.*``) or the block is appended
after it (keys ``features.{i}.conv.{j}.3.*``); j = 0 in the first block, 1 elsewhere.

Placement (CE paper, appendix E and Fig. 6a):

- CE: ``3×3 depthwise conv → BN → CE → ReLU6`` in each of the 17 inverted residual blocks.
  The depthwise conv is the widest layer of the bottleneck (t·C channels) and its last
  rectified one: the 1×1 projection after it is linear, and CE sits before a rectifier. The
  first block (t = 1) has no 1×1 expansion, so its depthwise conv (32 channels) is its first
  layer; it gets a CE too. The stem conv and the final 1×1 conv (1280 channels) get none.
- SE (baseline of the paper's Table 2): ``depthwise conv → BN → ReLU6 → SE → 1×1 projection``,
  as MnasNet and MobileNetV3 place it, with reduction r = 4 of the expanded width
  (MobileNetV3's; the CE paper does not give its SE ratio), ReLU and sigmoid as in the original
  SE (:data:`MOBILE_SE`).
- CE group size: every depthwise width of the 1.0× network (32, 96, 144, 192, 384, 576, 960)
  is a multiple of 16, so all blocks use g = 16. For a width C that ``ce_group_size`` does not
  divide, the block uses the largest divisor of C not above it (:func:`largest_divisor`).

This module also holds the helpers that :mod:`cenet.models.shufflenetv2` shares.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import mobilenetv2 as tv_mobilenetv2
from torchvision.ops import Conv2dNormActivation

from cenet.models._mobile_blocks import (
    MOBILE_SE,
    channel_block_factory,
    check_attn_position,
    insert_channel_block,
    replace_modules,
)
from cenet.models.registry import register_model


class MobileNetV2(tv_mobilenetv2.MobileNetV2):
    """torchvision's MobileNetV2 with a channel block at the depthwise conv of every block.

    Sources: the network of Sandler et al. 2018 (Table 2) as torchvision defines it; the CE
    placement of the CE paper, appendix E, Fig. 6a (see the module docstring).

    Args:
        num_classes: classifier outputs.
        width_mult: channel multiplier (torchvision's; 1.0 is the paper's 1×).
        dropout: dropout before the classifier (torchvision's 0.2).
        norm_layer: normalization (torchvision's ``norm_layer``; default ``nn.BatchNorm2d``).
        act_layer: rectifier class taking ``inplace``, put in place of every ReLU6.
        attn_layer: block at the 3×3 depthwise conv of each inverted residual block
            (``"ce"``, ``"bd"``, ``"ir"``, ``"se"``, ``"gct"``, a callable, or None).
        attn_kwargs: keyword arguments of that block (e.g. ``{"identity_init": True}``).
        attn_position: ``"before_act"`` (dw conv → BN → block → ReLU6, CE's) or
            ``"after_act"`` (dw conv → BN → ReLU6 → block, SE's).
        ce_group_size: CE group size g; a block of C channels uses the largest divisor of C
            not above g (all 1.0× widths are multiples of 16).

    Shape:
        input (N, 3, H, W), output (N, num_classes) logits.

    Raises:
        ValueError: for an unknown ``attn_layer`` or ``attn_position``, a non-positive
            ``ce_group_size``, or ``group_size`` in ``attn_kwargs`` of a CE block.
    """

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        dropout: float = 0.2,
        norm_layer: Callable[..., nn.Module] | None = None,
        act_layer: Callable[..., nn.Module] = nn.ReLU6,
        attn_layer: str | Callable[..., nn.Module] | None = None,
        attn_kwargs: dict | None = None,
        attn_position: str = "before_act",
        ce_group_size: int = 16,
    ) -> None:
        check_attn_position(attn_position)
        make_attn = channel_block_factory(attn_layer, attn_kwargs, ce_group_size=ce_group_size)
        super().__init__(
            num_classes=num_classes, width_mult=width_mult, norm_layer=norm_layer, dropout=dropout
        )
        self.num_features = self.last_channel
        if act_layer is not nn.ReLU6:
            replace_modules(self, nn.ReLU6, lambda _: act_layer(inplace=True))
        if make_attn is None:
            return
        for block in self.features:
            if isinstance(block, tv_mobilenetv2.InvertedResidual):
                dw = depthwise_layer(block)
                insert_channel_block(
                    dw, 2, make_attn(dw[0].out_channels), attn_position=attn_position
                )


def depthwise_layer(block: tv_mobilenetv2.InvertedResidual) -> Conv2dNormActivation:
    """The ``conv → norm → act`` layer of ``block`` whose conv is the 3×3 depthwise one."""
    for layer in block.conv:
        if isinstance(layer, Conv2dNormActivation) and layer[0].groups > 1:
            return layer
    raise ValueError(f"no depthwise conv layer in {type(block).__name__}")


#: registered variants: name suffix → (block, position)
VARIANTS: dict[str, tuple[str | Callable[..., nn.Module] | None, str]] = {
    "": (None, "before_act"),
    "_se": (MOBILE_SE, "after_act"),
    "_ce": ("ce", "before_act"),
}


def _make_builder(suffix: str, attn, position: str):
    def builder(
        *, num_classes: int = 1000, attn_layer=attn, attn_position: str = position, **kwargs
    ) -> MobileNetV2:
        return MobileNetV2(
            num_classes=num_classes, attn_layer=attn_layer, attn_position=attn_position, **kwargs
        )

    builder.__name__ = builder.__qualname__ = f"mobilenet_v2{suffix}"
    block = {
        "": "plain (torchvision's mobilenet_v2)",
        "_se": "SE (r = 4) after the depthwise BN-ReLU6 of every block",
        "_ce": "CE between the depthwise BN and ReLU6 of every block",
    }[suffix]
    builder.__doc__ = f"MobileNetV2 1.0×, {block}. Keyword arguments: see :class:`MobileNetV2`."
    return register_model(builder)


for _suffix, (_attn, _position) in VARIANTS.items():
    _make_builder(_suffix, _attn, _position)
