"""Shared helpers of :mod:`cenet.analysis`: batches, devices, eval mode, JSON conversion."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(images, labels)`` of one loader item: a tensor (labels ``None``) or a sequence
    ``(images, labels, ...)``.

    Raises:
        ValueError: for anything else (the message names the type seen).
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], labels
    raise ValueError(
        f"a loader item must be a tensor of images or a sequence (images, labels, ...); "
        f"got {type(batch).__name__}"
    )


def model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` if given, else the device of the model's first parameter or buffer (CPU for
    a model without any)."""
    if device is not None:
        return torch.device(device)
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def check_max_batches(max_batches: int | None) -> None:
    """Raise ValueError unless ``max_batches`` is ``None`` or a positive int."""
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be None or a positive int, got {max_batches!r}")


def iter_images(
    loader: Iterable, device: torch.device, max_batches: int | None
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(images, labels)`` moved to ``device`` for at most ``max_batches`` items.

    Raises:
        ValueError: if the loader yields nothing, or for a malformed item.
    """
    check_max_batches(max_batches)
    seen = 0
    for batch in loader:
        if max_batches is not None and seen >= max_batches:
            break
        images, labels = split_batch(batch)
        seen += 1
        yield images.to(device), None if labels is None else labels.to(device)
    if seen == 0:
        raise ValueError("the loader yielded no batch")


@contextmanager
def inference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode under ``torch.no_grad()``; on exit (also on an exception)
    restore every submodule's own ``training`` flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, flag in flags:
            module.training = flag


def summary(values: Tensor) -> dict[str, float]:
    """``{"mean", "std", "min", "max"}`` of a tensor (std unbiased; 0.0 for one element)."""
    v = values.detach().double().flatten()
    if v.numel() == 0:
        raise ValueError("cannot summarize an empty tensor")
    std = v.std().item() if v.numel() > 1 else 0.0
    return {"mean": v.mean().item(), "std": std, "min": v.min().item(), "max": v.max().item()}


def to_jsonable(value: Any) -> Any:
    """Recursively turn tensors into (nested) lists of floats, dataclasses into dicts, and
    non-finite floats into ``None``, so that ``json.dumps`` accepts the result."""
    if isinstance(value, Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
