"""Test-set evaluation: loss, top-1/top-5 accuracy and throughput; and of a saved checkpoint."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cenet.train.checkpoint import CheckpointError, load_checkpoint
from cenet.train.config import TrainConfig, config_from_dict
from cenet.train.metrics import percent, topk_correct
from cenet.train.runtime import batch_to_device, build_data, build_model, setup_torch, to_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one pass over a test set.

    Attributes:
        loss: mean cross-entropy (no label smoothing) per image.
        top1: top-1 accuracy in percent.
        top5: top-5 accuracy in percent.
        num_samples: images evaluated.
        seconds: wall time of the pass.
        images_per_s: ``num_samples / seconds``.
    """

    loss: float
    top1: float
    top5: float
    num_samples: int
    seconds: float
    images_per_s: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    expected_samples: int | None = None,
) -> EvalResult:
    """Evaluate ``model`` (switched to eval mode, restored afterwards) on ``loader``.

    Args:
        model: the network, already on ``device`` (not a DDP wrapper: with uneven evaluation
            shards the ranks run different numbers of batches, and DDP's forward would wait
            for the others).
        loader: yields ``(images, labels)`` batches.
        device: where batches are moved.
        channels_last: feed images in channels-last memory format.
        reduce: sums a float64 tensor ``[5]`` (loss sum, top-1 hits, top-5 hits, images,
            skipped unreadable images) over the processes (e.g.
            :func:`cenet.train.distributed.all_reduce_sum`), so that each process evaluates
            its shard and all get the metrics of the whole test set; ``None`` = this
            process's loader is the whole test set.
        expected_samples: images the pass must count in total (all processes, including
            unreadable ones the loader skipped, its ``bad_images``); ``None`` = no check.

    Raises:
        ValueError: if no process saw a sample.
        RuntimeError: if the images counted differ from ``expected_samples``.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = [0, 0]
    seen = 0
    start = time.perf_counter()
    try:
        for images, labels in loader:
            images, labels = batch_to_device(images, labels, device, channels_last)
            logits = model(images)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            c1, c5 = topk_correct(logits, labels, (1, 5))
            correct[0] += c1
            correct[1] += c5
            seen += labels.shape[0]
    finally:
        model.train(was_training)
    skipped = len(getattr(loader, "bad_images", ()))  # unreadable images the loader skipped
    counts = (*correct, seen, skipped)
    totals = torch.stack([loss_sum.cpu(), *(torch.tensor(float(v)) for v in counts)])
    if reduce is not None:
        totals = reduce(totals)
    loss_total, hits1, hits5, count, bad = totals.tolist()
    seen = int(count)
    seconds = time.perf_counter() - start
    if seen == 0:
        raise ValueError("the evaluation loader yielded no sample")
    if expected_samples is not None and seen + int(bad) != expected_samples:
        raise RuntimeError(
            f"evaluation counted {seen} images and {int(bad)} skipped, the test set has "
            f"{expected_samples}: the processes' evaluation shards do not partition the test set"
        )
    return EvalResult(
        loss=loss_total / seen,
        top1=percent(int(hits1), seen),
        top5=percent(int(hits5), seen),
        num_samples=seen,
        seconds=seconds,
        images_per_s=seen / seconds if seconds > 0 else float("inf"),
    )


def checkpoint_weights(ckpt: dict[str, Any], weights: str = "model") -> dict[str, Any]:
    """The state dict of the network in a checkpoint: ``"model"``, or ``"ema"`` for the EMA
    weights and buffers a run with ``model_ema_decay`` keeps (``AveragedModel``'s ``module.``
    prefix removed).

    Raises:
        ValueError: for another ``weights`` value.
        CheckpointError: for ``"ema"`` when the checkpoint holds no EMA.
    """
    if weights == "model":
        return ckpt["model"]
    if weights != "ema":
        raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
    if "model_ema" not in ckpt:
        raise CheckpointError(
            "the checkpoint holds no EMA weights: train with --model-ema DECAY to keep them"
        )
    prefix = "module."
    return {k[len(prefix):]: v for k, v in ckpt["model_ema"].items() if k.startswith(prefix)}


def load_for_eval(
    path: str | os.PathLike[str], *, weights: str = "model", **changes: Any
) -> tuple[nn.Module, Any, TrainConfig, dict[str, Any], torch.device]:
    """Rebuild the model of a checkpoint from its stored config, load its weights, and build
    the test loader of that config's data set.

    Args:
        path: a checkpoint file.
        weights: ``"model"`` or ``"ema"`` (:func:`checkpoint_weights`).
        **changes: config values overriding the stored ones (``data``, ``eval_batch_size``,
            ``device``, ``threads``); ``None`` values are ignored.

    Returns:
        ``(model on its device in the config's memory format, test_loader, config, the
        checkpoint dict, device)``.

    Raises:
        FileNotFoundError: if the checkpoint does not exist.
        CheckpointError: if it is not a cenet checkpoint, its stored config is not valid, or
            its weights do not fit the model.
    """
    ckpt = load_checkpoint(path)
    changes = {k: v for k, v in changes.items() if v is not None}
    try:
        cfg = config_from_dict({**ckpt["config"], **changes}, source=f"{path} config")
    except ValueError as err:
        raise CheckpointError(f"{path}: stored config is not valid: {err}") from None
    state = checkpoint_weights(ckpt, weights)
    dev = setup_torch(cfg)
    _, test_loader, info = build_data(cfg)
    model = build_model(cfg, cfg.num_classes or info.num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit model {cfg.model!r}: {err}") from None
    return to_device(model, dev, cfg.channels_last), test_loader, cfg, ckpt, dev


def evaluate_checkpoint(
    path: str | os.PathLike[str],
    *,
    data: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    threads: int | None = None,
    weights: str = "model",
) -> tuple[EvalResult, dict[str, Any]]:
    """Rebuild the model from the config stored in a checkpoint, load its weights and evaluate
    it on the test set of that config's data set.

    Args:
        path: a checkpoint file (``last.pt``, ``best.pt``) or a run directory.
        weights: ``"model"``, or ``"ema"`` for the EMA weights (runs with ``--model-ema``).
        data: data path overriding the stored one.
        batch_size: test batch size overriding the stored ``eval_batch_size``.
        device: device overriding the stored one.
        threads: torch threads overriding the stored ones.

    Returns:
        The metrics, and facts about the checkpoint: ``{"config": dict (with the overrides
        applied), "epoch": epochs completed, "global_step": iterations done, "step":
        iterations into the epoch in progress (0 at an epoch boundary)}``.

    Raises:
        FileNotFoundError: if the checkpoint does not exist.
        CheckpointError: if it is not a cenet checkpoint or its weights do not fit the model.
        ValueError: for invalid overrides.
    """
    changes = {"data": data, "eval_batch_size": batch_size, "device": device, "threads": threads}
    model, test_loader, cfg, ckpt, dev = load_for_eval(path, weights=weights, **changes)
    result = evaluate(model, test_loader, device=dev, channels_last=cfg.channels_last)
    logger.info(
        "eval %s: loss %.4f top-1 %.2f%% top-5 %.2f%% (%d images, %.0f img/s)",
        path,
        result.loss,
        result.top1,
        result.top5,
        result.num_samples,
        result.images_per_s,
    )
    meta = {
        "config": cfg.to_dict(),
        "epoch": int(ckpt["epoch"]),
        "global_step": int(ckpt["global_step"]),
        "step": int(ckpt["step"]),
    }
    return result, meta
