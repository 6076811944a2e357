"""Inhibited channels of rectified outputs (CE paper Sec. 2, Fig. 1, Fig. 4c; appendix G)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cenet.analysis._common import inference_mode, iter_images, model_device, to_jsonable
from cenet.analysis.hooks import forward_hooks
from cenet.analysis.selection import LayerSpec, select_modules


@dataclass
class LayerInhibition:
    """Inhibited channels of one layer output: ``mean_abs`` (C,) float64 is the mean |activation|
    of each channel over samples and positions; a channel is inhibited when it is below the
    threshold."""

    num_channels: int
    num_inhibited: int
    ratio: float
    mean_abs: Tensor


@dataclass
class InhibitedChannels:
    """Result of :func:`inhibited_channels`: per-layer results (keys in execution order), the
    keys averaged, their mean ratio, and the threshold used."""

    layers: dict[str, LayerInhibition]
    averaged: list[str]
    ratio: float
    threshold: float
    num_samples: int = field(default=0)

    def to_dict(self) -> dict:
        """A JSON-serializable dict (tensors become lists)."""
        return to_jsonable(self)


def channel_mean_abs(output: Tensor) -> tuple[Tensor, int]:
    """Per-channel sum of |x| in float64 (C,) of an (N, C, ...) tensor, and the number of
    values summed per channel (N times the positions).

    Raises:
        ValueError: for a tensor with fewer than 2 dimensions.
    """
    if not isinstance(output, Tensor) or output.dim() < 2:
        raise ValueError(
            "channel measurements need (N, C, ...) tensor outputs, got "
            f"{tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__}"
        )
    x = output.detach().double().abs()
    dims = [d for d in range(x.dim()) if d != 1]
    return x.sum(dims), x.numel() // x.shape[1]


def activation_means(
    model: nn.Module,
    loader: Iterable,
    *,
    layers: LayerSpec | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Mean |activation| per channel, (C,) float64, of each selected output over ``loader``.

    Streaming float64 sums; model in eval mode under ``torch.no_grad()``, every module's
    training flag restored afterwards. Keys follow :func:`cenet.analysis.hooks.call_key` in
    execution order. Returns the means and the number of samples seen.

    Raises:
        ValueError: for an empty selection or loader, or a non-(N, C, ...) output.
    """
    modules = select_modules(model, layers)
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(key: str, _module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        total, count = channel_mean_abs(output)
        if key in sums and sums[key].shape != total.shape:
            raise ValueError(f"output of {key!r} changed its channel count between batches")
        sums[key] = sums[key] + total if key in sums else total
        counts[key] = counts.get(key, 0) + count

    dev = model_device(model, device)
    num_samples = 0
    with inference_mode(model), forward_hooks(model, modules, hook):
        for images, _labels in iter_images(loader, dev, max_batches):
            model(images)
            num_samples += images.shape[0]
    if not sums:
        raise ValueError(f"the selected modules {list(modules)[:12]} never ran during forward")
    return {k: sums[k] / counts[k] for k in sums}, num_samples


def inhibited_channels(
    model: nn.Module,
    loader: Iterable,
    *,
    layers: LayerSpec | None = None,
    threshold: float = 1e-2,
    first_n: int | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> InhibitedChannels:
    """Ratio of inhibited channels of rectified outputs over a data loader (CE paper Sec. 2,
    Fig. 1b, Fig. 4c; appendix G).

    A channel c of a layer output (N, C, ...) is inhibited when its mean |activation| over all
    samples and positions is below ``threshold`` (paper: 1e-2). By default every ``nn.ReLU``,
    ``nn.ReLU6``, ``nn.ELU`` and ``nn.LeakyReLU`` output is measured (in-place ones too: the
    hook sees the rectified tensor). A module run several times per forward pass (torchvision's
    shared block ``relu``) gives one entry per call, ``"name"``, ``"name:1"``, ...

    Args:
        model: any network; used in eval mode under ``torch.no_grad()``, every module's
            training flag restored afterwards.
        loader: iterable of image tensors (N, C_in, H, W) or of ``(images, labels, ...)``.
        layers: selection (see :func:`cenet.analysis.select_modules`).
        threshold: inhibition threshold on the mean |activation| (units of the activation).
        first_n: average the ratio over the first ``first_n`` outputs in execution order only
            (the paper uses the first six layers of VGG); ``None`` averages over all.
        device: where to run; default the model's device.
        max_batches: stop after this many batches.

    Returns:
        :class:`InhibitedChannels`; ``ratio`` is the unweighted mean of the per-layer ratios.

    Raises:
        ValueError: for a negative ``threshold``, a non-positive ``first_n``, an empty
            selection or loader.
    """
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    if first_n is not None and (not isinstance(first_n, int) or first_n < 1):
        raise ValueError(f"first_n must be None or a positive int, got {first_n!r}")
    means, num_samples = activation_means(
        model, loader, layers=layers, device=device, max_batches=max_batches
    )
    result = {}
    for key, mean_abs in means.items():
        num = int((mean_abs < threshold).sum())
        c = mean_abs.numel()
        result[key] = LayerInhibition(c, num, num / c, mean_abs.cpu())
    averaged = list(result)[:first_n]
    ratio = sum(result[k].ratio for k in averaged) / len(averaged)
    return InhibitedChannels(result, averaged, ratio, float(threshold), num_samples)
