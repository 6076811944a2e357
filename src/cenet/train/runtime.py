"""Run-time setup shared by training and evaluation: threads, seeding, device, model, data."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from cenet.data import build_loaders
from cenet.models import create_model
from cenet.train.allocator import keep_freed_memory
from cenet.train.config import TrainConfig

logger = logging.getLogger(__name__)


def resolve_threads(threads: int | None, processes_per_node: int = 1) -> int:
    """``threads``, or when ``None`` the cores shared out among the processes of this node:
    ``os.cpu_count() // processes_per_node`` (at least 1)."""
    if threads is not None:
        return threads
    return max(1, (os.cpu_count() or 1) // max(1, processes_per_node))


def setup_torch(
    cfg: TrainConfig, *, device: torch.device | None = None, processes_per_node: int = 1
) -> torch.device:
    """Set the thread count, determinism and allocator of ``cfg`` and return its device.

    Args:
        cfg: the settings (``threads``, ``deterministic``, ``keep_freed_memory``, ``device``).
        device: the device to use instead of ``cfg.device`` (a distributed process's own,
            e.g. ``cuda:LOCAL_RANK``).
        processes_per_node: processes sharing this machine's cores when ``threads`` is null.

    Raises:
        ValueError: if the device is CUDA and no (such) CUDA device is available.
    """
    torch.set_num_threads(resolve_threads(cfg.threads, processes_per_node))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    if cfg.keep_freed_memory:
        keep_freed_memory()
    device = torch.device(cfg.device) if device is None else device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available; use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(device)!r} but only {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's torch RNG states, for a checkpoint: ``cpu`` and, on CUDA, ``device``'s
    (``cuda``, else ``None``)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def restore_rng(state: dict[str, Any] | None, device: torch.device) -> None:
    """Set the torch RNG states of :func:`rng_state` again (``None``: nothing to restore). On
    CUDA, a state without ``cuda`` may hold ``cuda_all`` (every device's state, as the
    single-process checkpoints of ``cenet train`` store it)."""
    if state is None:
        return
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        if state.get("cuda") is not None:
            torch.cuda.set_rng_state(state["cuda"], device)
        elif state.get("cuda_all"):
            torch.cuda.set_rng_state_all(state["cuda_all"])


def build_data(cfg: TrainConfig, **changes: Any) -> tuple[Any, Any, Any]:
    """``cenet.data.build_loaders`` with the data settings of ``cfg`` (``changes`` override
    or add single keyword arguments, e.g. ``num_replicas``, ``rank``, ``pin_memory``).
    ``batch_size`` is the global batch. Returns ``(train_loader, test_loader, info)``."""
    kwargs: dict[str, Any] = dict(
        dataset=cfg.dataset,
        data=cfg.data,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        image_size=cfg.image_size,
        train_subset=cfg.train_subset,
        label_noise=cfg.label_noise,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        download=cfg.download,
        skip_bad_images=cfg.skip_bad_images,
    )
    kwargs.update(changes)
    return build_loaders(**kwargs)


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """``cenet.models.create_model(cfg.model, num_classes=..., **cfg.model_kwargs)``.

    Raises:
        ValueError: for an unknown model name (with close matches) or arguments the builder
            does not take.
    """
    try:
        return create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs)
    except TypeError as err:
        raise ValueError(
            f"model {cfg.model!r} rejected model_kwargs={cfg.model_kwargs!r}: {err}"
        ) from None


def to_device(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move ``model`` to ``device`` (and to channels-last memory format if asked)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def batch_to_device(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to ``device`` (images in channels-last format if asked)."""
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=non_blocking)
