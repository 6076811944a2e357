"""ImageNet ResNet-18/34/50/101 (He et al. 2016; torchvision's V1.5) with the CE paper's CE
placements (Sec. 5.1, Fig. 2c, appendix G) and the baselines it compares against (Tables 1, 3).

Plain networks have torchvision's parameter and buffer names and counts, so
``torchvision.models.resnet50().state_dict()`` loads into ``resnet50`` with ``strict=True``.
The optional blocks are extra attributes (``attn``, ``stem_attn``, ``conv1_attn``, ...), so
into the other variants it loads with ``strict=False``: the added blocks' keys are missing and
none is unexpected.

Registered variants, ``resnet{18,34,50,101}`` followed by:

- ``""``: plain BN.
- ``_ce``, ``_bd``, ``_ir``: CE (λ learnable), BD only (λ ≡ 1), IR only (λ ≡ 0) (paper
  Table 4 ablation), placed after the norm of the last conv of the residual branch, before the
  addition (paper Sec. 3.3 and 5.1, Fig. 2c): ``conv-BN-CE (+ shortcut) → ReLU``, in
  the blocks chosen by ``attn_blocks`` (:data:`CE_BLOCKS` by default):

  * ResNet-18/34: every residual block (paper Sec. 5.1).
  * ResNet-50: every block except the three of layer4, whose output has 2048 channels.
  * ResNet-101: the paper says "the first seven residual blocks". We read this literally as
    the first seven blocks in forward order, layer1 (3) + layer2 (4), exactly the first two
    stages. The paper's GFLOPs support this: R-101 costs 0.25 % · 7.87 ≈ 0.020 GFLOPs more
    with CE, no more than R-50's 0.48 % · 4.14 ≈ 0.020 with 13 CE blocks. Reading it as
    "layers 1-3" (30 blocks, a superset of R-50's 13 positions at the same shapes plus 17
    more) would cost strictly more than R-50, whatever the cost per block. The authors' code
    (``imagenet/models/resnet_v1_ce.py``) has no ResNet-101 builder. ``attn_blocks=(3, 4, 23,
    0)`` gives that other reading.

  Also a CE after the stem's BN (``stem_attn=True``), with group 64 and its statistics on
  2×2 max pooling (paper appendix G; the authors' code: ``CE(64, num_channels=64)``, though
  with ``pooling=False``): ``ChannelEquilibrium(64, group_size=64, pool=True)``.
  ``attn_kwargs`` (e.g. ``{"identity_init": True}``, beyond the paper: each freshly inserted
  CE is an exact identity, so a pretrained network is fine-tuned from its exact outputs) go
  to every CE, the stem's included. The authors' code also leaves layer4 of ResNet-18 without
  CE; we follow the paper's text ("each residual block").
- ``_se``: SE (reduction 16) in every block, after the last BN, before the addition (SENet).
- ``_gct``: GCT before every convolution (GCT paper, Sec. 4): the stem conv and, in each
  block, ``conv1``, ``conv2`` (, ``conv3``) and the projection shortcut's 1×1 conv (as the GCT
  authors' code does).
- ``_iternorm``, ``_dbn``: the whitening norm in place of every BN (paper Table 3): IterNorm
  with group 64 and T = 5, DBN with group 16; a layer with fewer channels than the group uses
  one group of all its channels, min(group, C) (no layer of these widths is that narrow).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from cenet.layers import DecorrelatedBatchNorm, IterNorm
from cenet.models._resnet_blocks import (
    BasicBlock,
    Bottleneck,
    Factory,
    conv_kaiming,
    make_optional,
)
from cenet.models.registry import register_model

__all__ = ["CE_BLOCKS", "STEM_CE_KWARGS", "BasicBlock", "Bottleneck", "ResNet",
           "dbn_layer", "iternorm_layer", "resolve_attn_blocks"]

#: depth → (block, blocks per stage), as torchvision
ARCHS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}

#: the paper's CE blocks per stage (the first k of each stage; see the module docstring)
CE_BLOCKS: dict[int, tuple[int, ...]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 0),
    101: (3, 4, 0, 0),
}

#: the stem CE of the paper's appendix G: one group of 64 channels, statistics on 2×2 pooling
STEM_CE_KWARGS: dict = {"group_size": 64, "pool": True}

STAGE_PLANES = (64, 128, 256, 512)


def resolve_attn_blocks(attn_blocks: int | Sequence[int] | None,
                        layers: Sequence[int]) -> tuple[int, ...]:
    """How many leading blocks of each stage get the block after the last norm.

    Args:
        attn_blocks: None (every block); an int k (the first k blocks of the network in
            forward order, e.g. 7 for ResNet-101 gives (3, 4, 0, 0)); or one count per stage.
        layers: blocks per stage.

    Returns:
        one count per stage, each in [0, layers[i]].

    Raises:
        ValueError: for a count out of range or a sequence of the wrong length.
    """
    if attn_blocks is None:
        return tuple(layers)
    total = sum(layers)
    if isinstance(attn_blocks, int) and not isinstance(attn_blocks, bool):
        if not 0 <= attn_blocks <= total:
            raise ValueError(f"attn_blocks must lie in [0, {total}] (the network's blocks), "
                             f"got {attn_blocks}")
        counts, left = [], attn_blocks
        for n in layers:
            counts.append(min(n, left))
            left -= counts[-1]
        return tuple(counts)
    counts = tuple(attn_blocks)
    if len(counts) != len(layers) or not all(
        isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= n
        for k, n in zip(counts, layers, strict=True)
    ):
        raise ValueError(f"attn_blocks must be None, an int in [0, {total}] or {len(layers)} "
                         f"ints with 0 <= k_i <= {tuple(layers)}, got {attn_blocks!r}")
    return counts


def iternorm_layer(num_features: int) -> IterNorm:
    """IterNorm as the paper's Table 3 baseline: group min(64, C), T = 5."""
    return IterNorm(num_features, group_size=min(64, num_features), num_iters=5)


def dbn_layer(num_features: int) -> DecorrelatedBatchNorm:
    """DBN as the paper's Table 3 baseline: group min(16, C)."""
    return DecorrelatedBatchNorm(num_features, group_size=min(16, num_features))


class ResNet(nn.Module):
    """ImageNet ResNet: 7×7/2 stem conv, norm, act, 3×3/2 max pool, four stages (64, 128, 256,
    512 planes; stride 1, 2, 2, 2), global average pooling, linear classifier.

    Args:
        block: :class:`BasicBlock` (ResNet-18/34) or :class:`Bottleneck` (ResNet-50/101).
        layers: blocks per stage, four positive ints.
        num_classes: classifier outputs.
        in_chans: input channels.
        norm_layer: callable ``C -> module`` used for every norm (default ``nn.BatchNorm2d``).
        act_layer: rectifier class taking ``inplace`` (default ``nn.ReLU``).
        attn_layer: block after the last norm of the residual branch, before the addition
            (``"ce"``, ``"bd"``, ``"ir"``, ``"se"``, a callable, or None); attribute ``attn``
            of each block (None where there is none).
        attn_kwargs: its keyword arguments (every such block, the stem's included).
        attn_blocks: which blocks get it, see :func:`resolve_attn_blocks` (None: all).
        stem_attn: also put ``attn_layer`` after the stem's norm (attribute ``stem_attn``).
        stem_attn_kwargs: keyword arguments of the stem block on top of ``attn_kwargs`` (the
            CE variants pass :data:`STEM_CE_KWARGS`).
        conv_attn_layer: block before every convolution (``"gct"``, a callable, or None);
            attributes ``conv1_attn`` (stem), and ``conv{1,2,3}_attn``, ``downsample_attn``
            in the blocks.
        conv_attn_kwargs: its keyword arguments.
        zero_init_residual: start each block's last norm weight at 0 (torchvision's option).

    Shape:
        input (N, in_chans, H, W), output (N, num_classes) logits.

    Raises:
        ValueError: for an unknown ``block``, ``layers`` that are not four positive ints,
            non-positive ``num_classes``/``in_chans``, invalid ``attn_blocks``,
            ``stem_attn=True`` without an ``attn_layer``, or an unknown block name.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        attn_layer: Factory = None,
        attn_kwargs: dict | None = None,
        attn_blocks: int | Sequence[int] | None = None,
        stem_attn: bool = False,
        stem_attn_kwargs: dict | None = None,
        conv_attn_layer: Factory = None,
        conv_attn_kwargs: dict | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise ValueError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        layers = tuple(layers)
        if len(layers) != 4 or not all(isinstance(n, int) and n >= 1 for n in layers):
            raise ValueError(f"layers must be four positive ints (blocks per stage), got "
                             f"{layers!r}")
        for name, value in (("num_classes", num_classes), ("in_chans", in_chans)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if stem_attn and attn_layer is None:
            raise ValueError("stem_attn=True needs an attn_layer (got attn_layer=None)")
        self.attn_blocks = resolve_attn_blocks(attn_blocks, layers)

        self.conv1_attn = make_optional(conv_attn_layer, in_chans, conv_attn_kwargs)
        self.conv1 = conv_kaiming(in_chans, 64, 7, 2)
        self.bn1 = norm_layer(64)
        self.stem_attn = None
        if stem_attn:
            kwargs = {**(attn_kwargs or {}), **(stem_attn_kwargs or {})}
            self.stem_attn = make_optional(attn_layer, 64, kwargs)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, num_blocks) in enumerate(zip(STAGE_PLANES, layers, strict=True)):
            blocks = []
            for j in range(num_blocks):
                blocks.append(block(
                    inplanes, planes, 2 if i > 0 and j == 0 else 1,
                    norm_layer=norm_layer, act_layer=act_layer,
                    attn_layer=attn_layer if j < self.attn_blocks[i] else None,
                    attn_kwargs=attn_kwargs, conv_attn_layer=conv_attn_layer,
                    conv_attn_kwargs=conv_attn_kwargs,
                ))
                inplanes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes)
        if zero_init_residual:
            for m in self.blocks():
                if getattr(m.last_norm, "weight", None) is not None:
                    nn.init.zeros_(m.last_norm.weight)

    def blocks(self) -> list[BasicBlock | Bottleneck]:
        """The residual blocks in forward order."""
        return [m for m in self.modules() if isinstance(m, (BasicBlock, Bottleneck))]

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_chans, H, W) → the last stage's map (N, num_features, H/32, W/32)."""
        if self.conv1_attn is not None:
            x = self.conv1_attn(x)
        x = self.bn1(self.conv1(x))
        if self.stem_attn is not None:
            x = self.stem_attn(x)
        x = self.maxpool(self.act1(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(self.forward_features(x)).flatten(1))


def _variant_defaults(depth: int, suffix: str) -> dict:
    """The keyword arguments of :class:`ResNet` that make variant ``suffix``."""
    if suffix in ("_ce", "_bd", "_ir"):
        return {"attn_layer": suffix[1:], "attn_blocks": CE_BLOCKS[depth], "stem_attn": True,
                "stem_attn_kwargs": dict(STEM_CE_KWARGS)}
    return {
        "": {},
        "_se": {"attn_layer": "se"},
        "_gct": {"conv_attn_layer": "gct"},
        "_iternorm": {"norm_layer": iternorm_layer},
        "_dbn": {"norm_layer": dbn_layer},
    }[suffix]


_DESCRIPTIONS = {
    "": "plain BN (torchvision's architecture and names)",
    "_ce": "CE after the last BN of the paper's blocks and after the stem BN",
    "_bd": "BD only (λ ≡ 1) where ``_ce`` has CE (paper Table 4)",
    "_ir": "IR only (λ ≡ 0) where ``_ce`` has CE (paper Table 4)",
    "_se": "SE (reduction 16) after the last BN of every block",
    "_gct": "GCT before every convolution",
    "_iternorm": "IterNorm (group 64, T = 5) in place of every BN",
    "_dbn": "DBN (group 16) in place of every BN",
}

VARIANTS = tuple(_DESCRIPTIONS)


def _make_builder(depth: int, suffix: str):
    block, layers = ARCHS[depth]

    def builder(*, num_classes: int = 1000, **kwargs) -> ResNet:
        return ResNet(block, layers, num_classes=num_classes,
                      **{**_variant_defaults(depth, suffix), **kwargs})

    builder.__name__ = builder.__qualname__ = f"resnet{depth}{suffix}"
    defaults = ", ".join(f"{k}={getattr(v, '__name__', repr(v))}"
                         for k, v in _variant_defaults(depth, suffix).items())
    builder.__doc__ = (
        f"ResNet-{depth} for ImageNet, {_DESCRIPTIONS[suffix]}. Keyword arguments: see "
        f":class:`ResNet`{'; defaults ' + defaults if defaults else ''}."
    )
    return register_model(builder)


for _depth in ARCHS:
    for _suffix in VARIANTS:
        _make_builder(_depth, _suffix)
