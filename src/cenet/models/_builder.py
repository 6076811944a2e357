"""Small helpers the network definitions share."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cenet.layers import get_attn


def make_divisible(value: float, divisor: int = 16) -> int:
    """Round a channel count to the nearest multiple of ``divisor`` (at least ``divisor``),
    never going below 90% of ``value`` (torchvision's ``_make_divisible``)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def norm_attn_act(
    num_features: int,
    *,
    norm_layer: Callable[..., nn.Module],
    act_layer: Callable[..., nn.Module] | None,
    attn_layer: str | Callable[..., nn.Module] | None,
    attn_kwargs: dict | None = None,
    attn_position: str = "after_norm",
) -> list[nn.Module]:
    """The modules ``norm → attn → act`` for ``num_features``, or with the block at
    ``attn_position`` ``"before_norm"`` (attn → norm → act) or ``"after_act"``
    (norm → act → attn, i.e. before the next convolution, where GCT goes).

    ``attn_layer`` is resolved by :func:`cenet.layers.get_attn`; ``None`` leaves it out, as
    ``act_layer=None`` leaves out the rectifier.
    """
    mods = [norm_layer(num_features)]
    if act_layer is not None:
        mods.append(act_layer(inplace=True))
    factory = get_attn(attn_layer)
    if factory is not None:
        attn = factory(num_features, **(attn_kwargs or {}))
        mods.insert({"before_norm": 0, "after_norm": 1, "after_act": len(mods)}[attn_position],
                    attn)
    return mods


def init_conv_weights(model: nn.Module) -> None:
    """He (Kaiming) normal initialization, fan-out, of every ``nn.Conv2d`` in ``model``."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
