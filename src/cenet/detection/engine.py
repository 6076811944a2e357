"""Training iterations and COCO evaluation of torchvision detectors (Faster / Mask R-CNN).

:func:`train_one_epoch` runs the optimizer steps of one (possibly resumed) epoch over a loader
of :func:`cenet.detection.data.collate_detection` batches; :func:`train_step` is one of them.
:func:`evaluate` runs a detector over a loader, gathers its COCO-format predictions on rank 0
(under ``torch.distributed``) and scores them with pycocotools (:mod:`cenet.detection.coco_eval`).
:func:`build_lr_scheduler` is the learning-rate schedule of the CE paper's Table 5 (MMDetection's
linear warm-up times a step decay), stepped once per iteration.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR, LRScheduler, MultiStepLR

from cenet.detection.coco_eval import evaluate_coco, predictions_to_coco
from cenet.train import distributed
from cenet.train.parallel import AMP_DTYPES

logger = logging.getLogger(__name__)

Batch = tuple[list[torch.Tensor], list[dict[str, Any]], int]
"""``(images, targets, n_bad)`` as :func:`cenet.detection.data.collate_detection` makes them."""

TOTAL_LOSS = "loss"
"""Key of the summed loss in the dicts of :func:`train_step`."""


def amp_dtype(amp: str | torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype of ``amp`` (``"bf16"``, ``"fp16"``, a dtype, or ``None``/``"none"``
    for float32).

    Raises:
        ValueError: for another value.
    """
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    if amp == "none":
        return None
    if amp not in AMP_DTYPES:
        raise ValueError(f"invalid amp={amp!r}: must be null, 'none', 'bf16' or 'fp16'")
    return AMP_DTYPES[amp]


def build_lr_scheduler(
    optimizer: Optimizer,
    *,
    iters_per_epoch: int,
    milestones: Sequence[int],
    gamma: float,
    warmup_iters: int,
    warmup_factor: float,
) -> LRScheduler:
    """The schedule of the CE paper's detection runs, stepped after every iteration.

    The learning rate of iteration ``i`` (0-based, counted over the whole run) is
    ``lr * w(i) * gamma ** (number of milestones m with m * iters_per_epoch <= i)`` with the
    linear warm-up ``w(i) = warmup_factor + (1 - warmup_factor) * min(i, W) / W`` over
    ``W = warmup_iters`` iterations (MMDetection's ``warmup="linear"``: the warm-up multiplies
    the step schedule, so a milestone inside the warm-up still decays). Built from
    ``LinearLR`` and ``MultiStepLR`` in a ``ChainedScheduler`` (their states are plain data,
    saved in checkpoints).

    Args:
        optimizer: its param groups' ``lr`` is the peak learning rate.
        iters_per_epoch: iterations of one epoch (>= 1); milestones are converted with it.
        milestones: epochs after which the rate is multiplied by ``gamma``.
        gamma: decay factor.
        warmup_iters: warm-up length in iterations (0 = none).
        warmup_factor: ``w(0)``, in (0, 1].

    Raises:
        ValueError: for ``iters_per_epoch < 1``, a negative ``warmup_iters`` or a
            ``warmup_factor`` outside (0, 1].
    """
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
    if warmup_iters < 0 or not 0 < warmup_factor <= 1:
        raise ValueError(
            f"need warmup_iters >= 0 and warmup_factor in (0, 1], got {warmup_iters} and "
            f"{warmup_factor}"
        )
    steps = MultiStepLR(
        optimizer, milestones=[int(m) * iters_per_epoch for m in milestones], gamma=gamma
    )
    if warmup_iters == 0:
        return ChainedScheduler([steps], optimizer=optimizer)
    ramp = LinearLR(
        optimizer, start_factor=warmup_factor, end_factor=1.0, total_iters=warmup_iters
    )
    return ChainedScheduler([ramp, steps], optimizer=optimizer)


def targets_to(targets: Sequence[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """The targets with every tensor on ``device`` (``image_id`` and other numbers kept)."""
    return [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        for t in targets
    ]


def train_step(
    model: nn.Module,
    optimizer: Optimizer,
    images: Sequence[torch.Tensor],
    targets: Sequence[dict[str, Any]],
    *,
    device: torch.device | str = "cpu",
    scheduler: LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp: str | torch.dtype | None = None,
    where: str = "",
) -> dict[str, float]:
    """One optimizer step of a torchvision detector on one batch.

    The forward (``model(images, targets)`` in training mode, which returns the loss dict)
    runs under ``torch.autocast`` with ``amp``; the losses are summed in float32 and
    back-propagated (through ``scaler`` when given, for fp16), then ``optimizer`` and
    ``scheduler`` step once. Under ``torch.distributed`` the loss values are all-reduced
    before the backward (one small collective), so that the returned values are the means
    over the processes and a non-finite loss stops every process at the same iteration.

    Args:
        model: the detector (or its ``DistributedDataParallel`` wrapper) in training mode.
        optimizer: over the trainable parameters.
        images: float ``[3, H_i, W_i]`` images in [0, 1] (any device; moved to ``device``).
        targets: per image ``boxes`` float ``[K, 4]`` (x1, y1, x2, y2 pixels), ``labels``
            int64 ``[K]``, for Mask R-CNN ``masks`` uint8 ``[K, H_i, W_i]``.
        device: where the model is.
        scheduler: stepped once after the optimizer (``None`` = no schedule).
        scaler: a ``torch.amp.GradScaler`` (fp16), or ``None``.
        amp: autocast dtype (``"bf16"``, ``"fp16"``, a dtype) or ``None`` for float32.
        where: the position for an error message, e.g. ``"epoch 3, iteration 17/500"``.

    Returns:
        ``{"loss": summed loss, "loss_classifier": ..., ...}`` as Python floats (means over the
        processes).

    Raises:
        FloatingPointError: if a loss is NaN or infinite (on any process), naming ``where``
            and every loss value; nothing has been stepped then.
    """
    device = torch.device(device)
    dtype = amp_dtype(amp)
    images = [img.to(device, non_blocking=device.type == "cuda") for img in images]
    targets = targets_to(targets, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss_dict = model(images, targets)
    if not isinstance(loss_dict, dict) or not loss_dict:
        raise TypeError(
            f"the detector returned {type(loss_dict).__name__} in training mode, expected a "
            f"dict of losses (is the model a torchvision detector in train() mode?)"
        )
    names = list(loss_dict)
    loss = sum(v.float() for v in loss_dict.values())
    values = torch.stack([loss.detach(), *(v.detach().float() for v in loss_dict.values())])
    world = distributed.world_size()
    if world > 1:
        values = distributed.all_reduce_sum(values.double()) / world
    report = dict(zip([TOTAL_LOSS, *names], values.tolist(), strict=True))
    if not all(math.isfinite(v) for v in report.values()):
        parts = ", ".join(f"{k}={v:.4g}" for k, v in report.items())
        raise FloatingPointError(
            f"non-finite training loss at {where or 'this iteration'}: {parts}; the weights were "
            f"not updated. Lower the learning rate, lengthen the warm-up, or train in float32 "
            f"(amp: none) if mixed precision is on"
        )
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return report


@dataclass
class EpochStats:
    """What :func:`train_one_epoch` did.

    Attributes:
        iterations: optimizer steps taken in this call.
        losses: the loss dict of every step (means over the processes), in order.
        images: training images used on this process.
        bad_images: unreadable images skipped on this process (the batches' ``n_bad``).
        seconds: wall time of the call.
        stopped: ``after_step`` asked to stop before the loader was exhausted.
    """

    iterations: int = 0
    losses: list[dict[str, float]] = field(default_factory=list)
    images: int = 0
    bad_images: int = 0
    seconds: float = 0.0
    stopped: bool = False

    def mean(self, key: str = TOTAL_LOSS) -> float:
        """Mean of loss ``key`` over the steps (NaN without steps)."""
        values = [d[key] for d in self.losses if key in d]
        return sum(values) / len(values) if values else math.nan


def train_one_epoch(
    model: nn.Module,
    optimizer: Optimizer,
    loader: Iterable[Batch],
    *,
    device: torch.device | str = "cpu",
    scheduler: LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp: str | torch.dtype | None = None,
    epoch: int = 1,
    start_step: int = 0,
    total: int | None = None,
    after_step: Callable[[int, dict[str, float], int], bool] | None = None,
) -> EpochStats:
    """Train ``model`` on every batch of ``loader`` (one epoch, or its rest after a resume).

    Puts ``model`` in training mode and calls :func:`train_step` per batch.

    Args:
        model: the detector (or its DDP wrapper).
        optimizer, scheduler, scaler, amp, device: as in :func:`train_step`.
        loader: yields ``(images, targets, n_bad)`` batches; a resumed epoch's loader yields
            only the batches not yet trained on.
        epoch: the epoch (from 1), for messages.
        start_step: iterations of this epoch done before (a resumed epoch), for messages and
            the step numbers given to ``after_step``.
        total: iterations of the full epoch, for messages (``None``: ``len(loader)`` if any).
        after_step: called after every step with ``(step, losses, images)`` — the 1-based
            iteration of the epoch, :func:`train_step`'s dict and the batch's image count;
            returning ``True`` ends the epoch early (``max_steps``).

    Returns:
        The :class:`EpochStats` of this call.

    Raises:
        FloatingPointError: from :func:`train_step`.
    """
    if total is None:
        total = start_step + len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    model.train()
    stats = EpochStats()
    start = time.perf_counter()
    step = start_step
    for images, targets, n_bad in loader:
        stats.bad_images += int(n_bad)
        where = f"epoch {epoch}, iteration {step + 1}" + (f"/{total}" if total else "")
        losses = train_step(
            model, optimizer, images, targets, device=device, scheduler=scheduler,
            scaler=scaler, amp=amp, where=where,
        )  # fmt: skip
        step += 1
        stats.iterations += 1
        stats.images += len(images)
        stats.losses.append(losses)
        if after_step is not None and after_step(step, losses, len(images)):
            stats.stopped = True
            break
    stats.seconds = time.perf_counter() - start
    return stats


def iou_types_of(model: nn.Module) -> tuple[str, ...]:
    """``("bbox", "segm")`` for a detector with a mask head (Mask R-CNN), else ``("bbox",)``."""
    heads = getattr(model, "roi_heads", None)
    has_mask = heads is not None and callable(getattr(heads, "has_mask", None)) and heads.has_mask()
    return ("bbox", "segm") if has_mask else ("bbox",)


@dataclass(frozen=True)
class DetectionEval:
    """Result of :func:`evaluate`.

    Attributes:
        metrics: ``{"bbox": {...}, "segm": {...}}`` of :func:`cenet.detection.coco_eval.
            evaluate_coco` (fractions in [0, 1], NaN where COCOeval cannot measure);
            ``"segm"`` only for Mask R-CNN.
        num_images: images the model ran on (all processes).
        bad_images: unreadable images skipped (all processes).
        num_detections: detections scored (all processes).
        seconds: wall time of the pass (inference, gathering and COCOeval).
    """

    metrics: dict[str, dict[str, float]]
    num_images: int
    bad_images: int
    num_detections: int
    seconds: float


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    coco_gt: Any,
    *,
    device: torch.device | str = "cpu",
    iou_types: Sequence[str] | None = None,
    mask_threshold: float = 0.5,
    progress: bool = False,
) -> DetectionEval:
    """COCO box (and mask) AP of ``model`` on the images of ``loader``.

    The model runs in eval mode (its previous mode is restored), in float32, without
    autograd; the torch RNG state is left as it was. Each process runs its shard of the
    evaluation set (uneven shards, every image once over the processes); the COCO-format
    results are gathered on rank 0 (``all_gather_object``), which runs COCOeval restricted to
    the images the model ran on and sends the metrics to every process.

    Args:
        model: the detector, unwrapped (not DDP: the shards may differ in length).
        loader: ``(images, targets, n_bad)`` batches; each target has ``image_id``.
        coco_gt: the ``pycocotools.coco.COCO`` ground truth of the images.
        device: where the model is.
        iou_types: ``("bbox",)`` / ``("bbox", "segm")``; ``None`` = from the model
            (:func:`iou_types_of`).
        mask_threshold: mask probability above which a pixel is in the instance.
        progress: a tqdm bar over the batches (rank 0).

    Returns:
        The :class:`DetectionEval`, the same on every process.

    Raises:
        ValueError: if no process evaluated an image, or from ``evaluate_coco``.
    """
    from tqdm import tqdm

    device = torch.device(device)
    iou_types = tuple(iou_types) if iou_types is not None else iou_types_of(model)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    bad = 0
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            batches = tqdm(
                loader, desc="evaluating", unit="batch", leave=False, dynamic_ncols=True,
                disable=not (progress and distributed.is_main()),
            )  # fmt: skip
            for images, targets, n_bad in batches:
                bad += int(n_bad)
                if not images:
                    continue
                outputs = model([img.to(device) for img in images])
                ids = [int(t["image_id"]) for t in targets]
                outputs = [{k: v.cpu() for k, v in o.items()} for o in outputs]
                results.extend(predictions_to_coco(outputs, ids, mask_threshold=mask_threshold))
                image_ids.extend(ids)
    finally:
        model.train(was_training)
    shards = distributed.all_gather_objects((results, image_ids, bad))
    all_ids = sorted({i for _, ids, _ in shards for i in ids})
    total_bad = sum(b for *_, b in shards)

    def score() -> dict[str, dict[str, float]]:
        if not all_ids:
            raise ValueError(
                f"no image was evaluated ({total_bad} unreadable images skipped): the "
                f"evaluation set is empty"
            )
        merged = [r for res, _, _ in shards for r in res]
        return evaluate_coco(coco_gt, merged, iou_types=iou_types, image_ids=all_ids)

    metrics = distributed.run_on_main(score)
    return DetectionEval(
        metrics=metrics,
        num_images=len(all_ids),
        bad_images=total_bad,
        num_detections=sum(len(res) for res, _, _ in shards),
        seconds=time.perf_counter() - start,
    )
