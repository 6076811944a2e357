"""Cumulative channel ablation curves (Morcos et al., ICLR 2018; CE paper Fig. 1c, 4c, 7)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cenet.analysis._common import to_jsonable
from cenet.analysis.evaluate import evaluate_top1
from cenet.analysis.hooks import forward_hooks
from cenet.analysis.inhibited import activation_means
from cenet.analysis.selection import LayerSpec, select_modules

ABLATION_ORDERS = ("random", "importance")
DEFAULT_RATIOS = tuple(i / 10 for i in range(10))


@dataclass
class AblationCurve:
    """Top-1 (fraction in [0, 1]) against the ablation ratio r.

    ``accuracy[i][j]``: repeat i at ratio j; ``mean``/``std`` over repeats (std unbiased, 0.0
    for one repeat); ``area``: trapezoid area under the mean curve divided by the r-range (the
    mean top-1 over r; the value itself for a single ratio); ``num_channels``: C per ablated
    output key.
    """

    ratios: list[float]
    accuracy: list[list[float]]
    mean: list[float]
    std: list[float]
    area: float
    order: str
    num_channels: dict[str, int]

    def to_dict(self) -> dict:
        """A JSON-serializable dict."""
        return to_jsonable(self)


def num_dropped(ratio: float, channels: int) -> int:
    """Channels dropped at ``ratio`` of ``channels``: ⌊r·C + ½⌋ (round half up)."""
    return min(channels, math.floor(ratio * channels + 0.5))


def channel_masks(orders: dict[str, Tensor], ratio: float) -> dict[str, Tensor]:
    """(C,) 0/1 masks that zero the first ⌊r·C + ½⌋ channels of each drop order (a permutation
    of the C channels); the zeroed sets grow with r, so the ablation is cumulative."""
    masks = {}
    for key, order in orders.items():
        mask = torch.ones(order.numel())
        mask[order[: num_dropped(ratio, order.numel())]] = 0
        masks[key] = mask
    return masks


def _check_ratios(ratios: Sequence[float]) -> list[float]:
    values = [float(r) for r in ratios]
    if not values or any(not 0 <= r <= 1 for r in values):
        raise ValueError(f"ratios must be a non-empty sequence of values in [0, 1], got {ratios}")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"ratios must be strictly increasing, got {ratios}")
    return values


def ablation_curve(
    model: nn.Module,
    loader: Iterable,
    *,
    layers: LayerSpec | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    order: str = "random",
    repeats: int = 5,
    seed: int = 0,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> AblationCurve:
    """Cumulative ablation curve: top-1 when a fraction r of the channels of the selected
    layers' outputs is zeroed at inference (Morcos et al. 2018; CE paper Fig. 1c, 4c, 7 and
    appendix G: 5 random repeats, r from 0 to 0.9, third layer of VGG).

    For each selected output (N, C, ...) (keys as in :func:`inhibited_channels`, default every
    rectifier) a drop order of its C channels is fixed per repeat and the first ⌊r·C + ½⌋ are
    zeroed by a forward hook multiplying the channel dimension 1 by a 0/1 mask, the same for
    every batch; so the dropped set at r contains the set at any smaller r. At r = 0 nothing
    is changed (exactly the plain evaluation); at r = 1 every selected channel is zero.

    Orders: ``"random"``, a permutation from ``torch.Generator().manual_seed(seed + i)`` for
    repeat i; ``"importance"``, channels sorted by mean |activation| over the loader, least
    important (smallest) first, deterministic, so it runs once whatever ``repeats`` is (the
    cheap importance; Morcos et al. also rank by the accuracy drop of single-channel ablation,
    which needs C evaluations per layer).

    ``loader`` is iterated once per (repeat, ratio) plus once for the drop orders, so it must
    be re-iterable (a ``DataLoader`` or a list) and, for r = 0 to reproduce
    :func:`evaluate_top1` exactly, deterministic (no shuffling or random augmentation).

    Raises:
        ValueError: for ratios outside [0, 1] or not strictly increasing, an unknown order
            (the valid ones listed), ``repeats < 1``, an empty selection or loader, or batches
            without labels.
    """
    values = _check_ratios(ratios)
    if order not in ABLATION_ORDERS:
        raise ValueError(f"unknown ablation order {order!r}; valid orders are {ABLATION_ORDERS}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    probe_batches = max_batches if order == "importance" else 1
    means, _ = activation_means(
        model, loader, layers=layers, device=device, max_batches=probe_batches
    )
    modules = select_modules(model, layers)
    if order == "importance":
        repeats = 1
    accuracy: list[list[float]] = []
    for i in range(repeats):
        if order == "random":
            gen = torch.Generator().manual_seed(seed + i)
            orders = {k: torch.randperm(m.numel(), generator=gen) for k, m in means.items()}
        else:
            orders = {k: torch.sort(m.cpu(), stable=True).indices for k, m in means.items()}
        row = []
        for ratio in values:
            masks = channel_masks(orders, ratio)

            def hook(key: str, _m: nn.Module, _i: tuple, output: Tensor, masks=masks) -> Tensor:
                mask = masks.get(key)
                if mask is None or bool(mask.all()):
                    return output
                shape = (1, -1) + (1,) * (output.dim() - 2)
                return output * mask.to(output.device, output.dtype).view(shape)

            with forward_hooks(model, modules, hook):
                row.append(evaluate_top1(model, loader, device=device, max_batches=max_batches))
        accuracy.append(row)
    acc = torch.tensor(accuracy, dtype=torch.float64)
    mean = acc.mean(0)
    std = acc.std(0) if repeats > 1 else torch.zeros_like(mean)
    if len(values) == 1:
        area = mean[0].item()
    else:
        area = torch.trapezoid(mean, torch.tensor(values, dtype=torch.float64)).item()
        area /= values[-1] - values[0]
    return AblationCurve(
        values, accuracy, mean.tolist(), std.tolist(), area, order,
        {k: m.numel() for k, m in means.items()},
    )
