"""String factory for the channel blocks, in the manner of timm's ``create_attn``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from cenet.layers.channel_equilibrium import ChannelEquilibrium
from cenet.layers.gct import GatedChannelTransformation
from cenet.layers.squeeze_excite import SqueezeExcitation

_ATTN_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "ce": partial(ChannelEquilibrium, mode="ce"),
    "bd": partial(ChannelEquilibrium, mode="bd"),
    "ir": partial(ChannelEquilibrium, mode="ir"),
    "se": SqueezeExcitation,
    "gct": GatedChannelTransformation,
}


def attn_names() -> tuple[str, ...]:
    """The names :func:`get_attn` accepts."""
    return tuple(sorted(_ATTN_LAYERS))


def get_attn(attn_layer: str | Callable[..., nn.Module] | None) -> Callable[..., nn.Module] | None:
    """Resolve ``attn_layer`` to a callable ``f(num_features, **kwargs) -> nn.Module``.

    Args:
        attn_layer: a name (``"ce"``, ``"bd"``, ``"ir"``, ...), a callable (a class or a
            ``functools.partial``) returned unchanged, or ``None`` (no block).

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    if attn_layer is None or callable(attn_layer):
        return attn_layer
    try:
        return _ATTN_LAYERS[attn_layer.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown attn_layer {attn_layer!r}; valid names are {attn_names()}"
        ) from None


def create_attn(attn_layer: str | Callable[..., nn.Module] | None, num_features: int,
                **kwargs) -> nn.Module | None:
    """Build the block named by ``attn_layer`` for ``num_features`` channels (or ``None``).

    Raises:
        ValueError: for an unknown name (see :func:`get_attn`) or invalid block arguments.
    """
    factory = get_attn(attn_layer)
    return None if factory is None else factory(num_features, **kwargs)
