"""Top-1 accuracy of any classifier over a loader (used by the ablation curves)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from cenet.analysis._common import inference_mode, iter_images, model_device


def evaluate_top1(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> float:
    """Top-1 accuracy, a fraction in [0, 1], of ``model`` over ``(images, labels)`` batches.

    ``model(images)`` must return logits (N, num_classes); labels are class indices (N,). The
    model runs in eval mode under ``torch.no_grad()`` (every training flag restored after).

    Raises:
        ValueError: for an empty loader, a batch without labels, or logits that are not
            (N, num_classes).
    """
    dev = model_device(model, device)
    correct = total = 0
    with inference_mode(model):
        for images, labels in iter_images(loader, dev, max_batches):
            if labels is None:
                raise ValueError("evaluate_top1 needs (images, labels) batches, got images only")
            logits = model(images)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ValueError("the model must return (N, num_classes) logits")
            correct += int((logits.argmax(1) == labels).sum())
            total += labels.numel()
    return correct / total
