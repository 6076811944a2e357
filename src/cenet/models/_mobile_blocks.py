"""Helpers shared by the MobileNetV2 and ShuffleNetV2 definitions: where a channel block goes
and how it is inserted without moving any of torchvision's state_dict keys."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from cenet.layers import ChannelEquilibrium, SqueezeExcitation, get_attn
from cenet.layers._validate import check_positive_int

#: where a channel block goes relative to the rectifier that follows a norm layer
ATTN_POSITIONS = ("before_act", "after_act")

#: SE of the mobile networks: reduction r = 4 (MnasNet, MobileNetV3, ShuffleNetV2+)
MOBILE_SE = partial(SqueezeExcitation, rd_ratio=1 / 4)


def largest_divisor(num_features: int, limit: int) -> int:
    """The largest divisor of ``num_features`` not above ``limit`` (the CE group size rule).

    E.g. ``largest_divisor(96, 16) == 16``, ``largest_divisor(24, 16) == 12``,
    ``largest_divisor(58, 16) == 2``. (The reference code halves g until it divides C instead,
    which gives 8 for C = 24.)

    Raises:
        ValueError: if ``num_features`` or ``limit`` (named ``ce_group_size`` in the message)
            is not a positive integer.
    """
    check_positive_int("num_features", num_features)
    check_positive_int("ce_group_size", limit)
    return max(d for d in range(1, min(num_features, limit) + 1) if num_features % d == 0)


def _is_channel_equilibrium(factory: Callable[..., nn.Module]) -> bool:
    while isinstance(factory, partial):
        factory = factory.func
    return isinstance(factory, type) and issubclass(factory, ChannelEquilibrium)


def channel_block_factory(
    attn_layer: str | Callable[..., nn.Module] | None,
    attn_kwargs: dict | None = None,
    *,
    ce_group_size: int = 16,
) -> Callable[[int], nn.Module] | None:
    """Resolve a channel block to ``make(num_features) -> nn.Module`` (or ``None``).

    For :class:`~cenet.layers.ChannelEquilibrium` (``"ce"``, ``"bd"``, ``"ir"`` or the class
    itself), the group size of a C-channel block is ``largest_divisor(C, ce_group_size)``;
    other blocks ignore ``ce_group_size``.

    Raises:
        ValueError: for an unknown block name, a non-positive ``ce_group_size``, or a
            ``"group_size"`` in ``attn_kwargs`` of a CE block (use ``ce_group_size``).
    """
    factory = get_attn(attn_layer)
    check_positive_int("ce_group_size", ce_group_size)
    kwargs = dict(attn_kwargs or {})
    if factory is None:
        return None
    if not _is_channel_equilibrium(factory):
        return partial(factory, **kwargs)
    if "group_size" in kwargs:
        raise ValueError(
            f"attn_kwargs must not set group_size (got {kwargs['group_size']!r}): pass "
            f"ce_group_size, the CE group size these networks reduce per block to the largest "
            f"divisor of its channel count"
        )

    def make(num_features: int) -> nn.Module:
        group_size = largest_divisor(num_features, ce_group_size)
        return factory(num_features, group_size=group_size, **kwargs)

    return make


def check_attn_position(attn_position: str) -> None:
    """Raise ``ValueError`` unless ``attn_position`` is one of :data:`ATTN_POSITIONS`."""
    if attn_position not in ATTN_POSITIONS:
        raise ValueError(
            f"attn_position must be one of {ATTN_POSITIONS}, got {attn_position!r}"
        )


def insert_channel_block(
    seq: nn.Sequential, act_index: int, block: nn.Module, *, attn_position: str
) -> None:
    """Put ``block`` next to the rectifier ``seq[act_index]`` without moving any key of ``seq``.

    ``"before_act"``: ``seq[act_index]`` becomes ``nn.Sequential(block, act)``;
    ``"after_act"``: ``block`` is appended to ``seq`` (``act_index`` must be its last index).
    """
    act = seq[act_index]
    if attn_position == "before_act":
        seq[act_index] = nn.Sequential(block, act)
    else:
        if act_index != len(seq) - 1:
            raise ValueError(
                f"after_act needs the rectifier last, got index {act_index} of {len(seq)}"
            )
        seq.append(block)


def replace_modules(
    root: nn.Module, cls: type[nn.Module], make: Callable[[nn.Module], nn.Module]
) -> None:
    """Replace every submodule of exact type ``cls`` by ``make(old)``, keeping its name."""
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is cls:
                setattr(parent, name, make(child))
