"""ShuffleNetV2 0.5× and 1.0× (Ma et al., ECCV 2018) as torchvision builds them, plain, SE, CE.

The network is torchvision's :class:`torchvision.models.ShuffleNetV2` itself (same modules,
parameter and buffer names, initialization and random-number use), so torchvision's
``shufflenet_v2_x0_5`` / ``shufflenet_v2_x1_0`` state_dicts load with ``strict=True`` into the
plain variants and with only the blocks' own keys missing into the SE/CE variants. The blocks
are inserted after torchvision's initialization (they keep their own) without moving any
torchvision key: the parameter-free last ReLU of the main branch ``branch2`` becomes
``nn.Sequential(block, ReLU)`` (keys ``stage{s}.{u}.branch2.7.0.*``) or the block is appended
after it (keys ``stage{s}.{u}.branch2.8.*``).

Placement. A ShuffleNetV2 unit's main branch is ``1×1 conv → BN → ReLU → 3×3 depthwise conv →
BN → 1×1 conv → BN → ReLU`` (the stride-2 units also have a second branch, ``3×3 depthwise conv
→ BN → 1×1 conv → BN → ReLU``, in place of the identity half); the branches are concatenated
and the channels shuffled.

- CE (CE paper, appendix E, Fig. 6b, "following similar strategies"): one CE per unit,
  in each of the 16 units, at the *last* 1×1 conv of the main branch:
  ``1×1 conv → BN → CE → ReLU``, before the concatenation. Why this layer: CE goes between a
  norm layer and a rectifier, so the depthwise conv (BN, no ReLU) is out; the two 1×1 convs are
  the branch's rectified layers and have the same output width, so "the widest" does not
  decide between them; the paper's pattern elsewhere is the last rectified layer of the
  branch (ResNet: the last conv of the residual branch, Fig. 2c; MobileNetV2: the depthwise
  conv, the last layer with a rectifier), and this layer's output is the unit's own new
  channels, where SE also goes. The second branch of the stride-2 units gets no CE (one block
  per unit, as for SE).
- SE (baseline of the paper's Table 2): on the main branch output, after its last ReLU, before
  the concatenation, as in ShuffleNetV2+ / SE-ShuffleNet, with reduction r = 4 (theirs), ReLU
  and sigmoid as in the original SE (:data:`~cenet.models.mobilenetv2.MOBILE_SE`).
- CE group size: the main branch width is half the stage width: 24, 48, 96 (0.5×) and
  58, 116, 232 (1.0×). Where ``ce_group_size`` (16) does not divide C, the block uses the
  largest divisor of C not above it (:func:`~cenet.models.mobilenetv2.largest_divisor`):
  g = 12, 16, 16 for 0.5× and g = 2, 4, 8 for 1.0× (58 = 2·29, 116 = 4·29, 232 = 8·29).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import shufflenetv2 as tv_shufflenetv2

from cenet.models._mobile_blocks import (
    MOBILE_SE,
    channel_block_factory,
    check_attn_position,
    insert_channel_block,
    replace_modules,
)
from cenet.models.registry import register_model

#: torchvision's configurations: name → (units per stage, output channels of conv1,
#: stage2-4 and conv5)
SHUFFLENET_CFGS: dict[str, tuple[list[int], list[int]]] = {
    "x0_5": ([4, 8, 4], [24, 48, 96, 192, 1024]),
    "x1_0": ([4, 8, 4], [24, 116, 232, 464, 1024]),
}

#: index of the rectifier after the last 1×1 conv in torchvision's ``branch2``
MAIN_BRANCH_ACT = 7


class ShuffleNetV2(tv_shufflenetv2.ShuffleNetV2):
    """torchvision's ShuffleNetV2 with a channel block at the last 1×1 conv of every unit.

    Sources: the network of Ma et al. 2018 (Table 5, Fig. 3c/d) as torchvision defines it;
    the CE placement follows the CE paper, appendix E, Fig. 6b (the choice is argued in the
    module docstring).

    Args:
        stages_repeats: units in stages 2-4 (torchvision's, e.g. ``[4, 8, 4]``).
        stages_out_channels: output channels of conv1, stages 2-4 and conv5 (torchvision's).
        num_classes: classifier outputs.
        norm_layer: normalization class taking the channel count, put in place of every
            ``nn.BatchNorm2d`` (default: keep torchvision's BatchNorm2d).
        act_layer: rectifier class taking ``inplace``, put in place of every ReLU.
        attn_layer: block at the last 1×1 conv of each unit's main branch (``"ce"``, ``"bd"``,
            ``"ir"``, ``"se"``, ``"gct"``, a callable, or None).
        attn_kwargs: keyword arguments of that block (e.g. ``{"identity_init": True}``).
        attn_position: ``"before_act"`` (1×1 conv → BN → block → ReLU, CE's) or
            ``"after_act"`` (1×1 conv → BN → ReLU → block, SE's).
        ce_group_size: CE group size g; a block of C channels uses the largest divisor of C
            not above g.

    Shape:
        input (N, 3, H, W), output (N, num_classes) logits.

    Raises:
        ValueError: for an unknown ``attn_layer`` or ``attn_position``, a non-positive
            ``ce_group_size``, ``group_size`` in ``attn_kwargs`` of a CE block, or
            torchvision's checks of ``stages_repeats`` / ``stages_out_channels``.
    """

    def __init__(
        self,
        stages_repeats: list[int],
        stages_out_channels: list[int],
        *,
        num_classes: int = 1000,
        norm_layer: Callable[..., nn.Module] | None = None,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        attn_layer: str | Callable[..., nn.Module] | None = None,
        attn_kwargs: dict | None = None,
        attn_position: str = "before_act",
        ce_group_size: int = 16,
    ) -> None:
        check_attn_position(attn_position)
        make_attn = channel_block_factory(attn_layer, attn_kwargs, ce_group_size=ce_group_size)
        super().__init__(stages_repeats, stages_out_channels, num_classes=num_classes)
        self.num_features = stages_out_channels[-1]
        if norm_layer is not None and norm_layer is not nn.BatchNorm2d:
            replace_modules(self, nn.BatchNorm2d, lambda bn: norm_layer(bn.num_features))
        if act_layer is not nn.ReLU:
            replace_modules(self, nn.ReLU, lambda _: act_layer(inplace=True))
        if make_attn is None:
            return
        for unit in self.modules():
            if isinstance(unit, tv_shufflenetv2.InvertedResidual):
                branch = unit.branch2
                block = make_attn(branch[MAIN_BRANCH_ACT - 2].out_channels)
                insert_channel_block(
                    branch, MAIN_BRANCH_ACT, block, attn_position=attn_position
                )


#: registered variants: name suffix → (block, position)
VARIANTS: dict[str, tuple[str | Callable[..., nn.Module] | None, str]] = {
    "": (None, "before_act"),
    "_se": (MOBILE_SE, "after_act"),
    "_ce": ("ce", "before_act"),
}


def _make_builder(cfg: str, suffix: str, attn, position: str):
    repeats, channels = SHUFFLENET_CFGS[cfg]

    def builder(
        *, num_classes: int = 1000, attn_layer=attn, attn_position: str = position, **kwargs
    ) -> ShuffleNetV2:
        return ShuffleNetV2(
            list(repeats), list(channels), num_classes=num_classes, attn_layer=attn_layer,
            attn_position=attn_position, **kwargs,
        )

    builder.__name__ = builder.__qualname__ = f"shufflenet_v2_{cfg}{suffix}"
    block = {
        "": f"plain (torchvision's shufflenet_v2_{cfg})",
        "_se": "SE (r = 4) on the main branch output of every unit",
        "_ce": "CE between the BN and ReLU of the last 1×1 conv of every unit",
    }[suffix]
    builder.__doc__ = (
        f"ShuffleNetV2 {cfg[1:].replace('_', '.')}×, {block}. "
        f"Keyword arguments: see :class:`ShuffleNetV2`."
    )
    return register_model(builder)


for _cfg in SHUFFLENET_CFGS:
    for _suffix, (_attn, _position) in VARIANTS.items():
        _make_builder(_cfg, _suffix, _attn, _position)
