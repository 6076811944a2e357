"""Channel correlation of layer outputs, once or along training (CE paper Sec. 5.2, Fig. 5)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cenet.analysis._common import inference_mode, iter_images, model_device
from cenet.analysis.hooks import forward_hooks
from cenet.analysis.selection import LayerSpec, select_modules

_REL_TOL = 1e-10


class _Moments:
    """Streaming float64 count, sum (C,) and cross-product sum (C, C) of channel vectors."""

    def __init__(self) -> None:
        self.n = 0
        self.s: Tensor | None = None
        self.ss: Tensor | None = None

    def add(self, output: Tensor) -> None:
        if not isinstance(output, Tensor) or output.dim() < 2:
            raise ValueError("channel correlation needs (N, C, ...) tensor outputs")
        x = output.detach().double().transpose(0, 1).reshape(output.shape[1], -1)
        s, ss = x.sum(1), x @ x.T
        if self.s is not None and self.s.shape != s.shape:
            raise ValueError("a layer output changed its channel count between batches")
        self.n += x.shape[1]
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss

    def mean_abs_correlation(self) -> float:
        mean = self.s / self.n
        second = self.ss / self.n
        cov = second - torch.outer(mean, mean)
        var = cov.diagonal().clamp_min(0)
        varying = var > _REL_TOL * second.diagonal() + 1e-300
        c = int(varying.sum())
        if c < 2:
            return 0.0
        cov = cov[varying][:, varying]
        std = var[varying].sqrt()
        corr = (cov / torch.outer(std, std)).clamp(-1, 1)
        off = corr.abs().sum() - corr.diagonal().abs().sum()
        return (off / (c * (c - 1))).item()


def channel_correlation(features: Tensor) -> float:
    """Mean absolute off-diagonal Pearson correlation of the channels of an (N, C, ...)
    tensor, each channel a variable observed at the N·H·W positions (CE paper Fig. 5).

    Constant channels (zero variance, e.g. dead ReLU channels) have no correlation and are
    excluded, so the mean runs over the pairs of varying channels; with fewer than two varying
    channels the result is 0.0 (never NaN). Computed in float64.

    Raises:
        ValueError: for a tensor with fewer than 2 dimensions.
    """
    moments = _Moments()
    moments.add(features)
    return moments.mean_abs_correlation()


def channel_correlations(
    model: nn.Module,
    loader: Iterable,
    *,
    layers: LayerSpec | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Per selected output (keys as in :func:`inhibited_channels`, default every rectifier),
    the mean absolute off-diagonal channel correlation (see :func:`channel_correlation`) over
    all positions of all batches of ``loader`` (streaming float64 moments). Eval mode under
    ``torch.no_grad()``, training flags restored.

    Raises:
        ValueError: for an empty selection or loader, or a non-(N, C, ...) output.
    """
    modules = select_modules(model, layers)
    moments: dict[str, _Moments] = {}

    def hook(key: str, _module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        moments.setdefault(key, _Moments()).add(output)

    dev = model_device(model, device)
    with inference_mode(model), forward_hooks(model, modules, hook):
        for images, _labels in iter_images(loader, dev, max_batches):
            model(images)
    return {k: m.mean_abs_correlation() for k, m in moments.items()}


@dataclass
class CorrelationRecorder:
    """Records channel correlations along training (CE paper Fig. 5).

    Call ``recorder(model, images, step=step)`` every few steps (e.g. from a training loop) to
    append ``(step, value)`` to ``history[key]`` for each selected output; the model is
    measured in eval mode and its training flags are restored, so training is unaffected
    (apart from the time spent).

    Raises:
        ValueError: at a call, for an empty selection or a malformed batch.
    """

    layers: LayerSpec | None = None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def __call__(self, model: nn.Module, images: Tensor, *, step: int) -> dict[str, float]:
        """Measure on one batch ``images`` (N, C_in, H, W); returns this step's values."""
        values = channel_correlations(model, [images], layers=self.layers)
        for key, value in values.items():
            self.history.setdefault(key, []).append((int(step), value))
        return values

    def to_dict(self) -> dict:
        """``{key: {"step": [...], "correlation": [...]}}``, JSON-serializable."""
        return {
            k: {"step": [s for s, _ in v], "correlation": [c for _, c in v]}
            for k, v in self.history.items()
        }
