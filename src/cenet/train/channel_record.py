"""Channel health recorded during training (``record_channels``; CE paper Figs. 4d and 5)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from cenet.analysis import channel_correlations, inhibited_channels


def channel_health(
    model: nn.Module, loader: Iterable, *, max_batches: int, device: torch.device
) -> dict[str, Any]:
    """Inhibited-channel ratio (mean over the first six rectified outputs, paper appendix G)
    and the mean absolute channel correlation of every rectified output, measured on the
    first ``max_batches`` batches of ``loader`` in eval mode (training flags restored).

    Returns:
        ``{"inhibited_ratio": float, "inhibited_per_layer": {key: ratio},
        "channel_correlation": {key: mean |corr|}}``, JSON-serializable.
    """
    inhibited = inhibited_channels(model, loader, first_n=6, max_batches=max_batches,
                                   device=device)
    return {
        "inhibited_ratio": inhibited.ratio,
        "inhibited_per_layer": {k: v.ratio for k, v in inhibited.layers.items()},
        "channel_correlation": channel_correlations(
            model, loader, max_batches=max_batches, device=device
        ),
    }
