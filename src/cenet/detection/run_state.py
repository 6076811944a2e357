"""The state of a detection run: :class:`DetectState` (position and running sums, saved in
every checkpoint), :class:`DetectResult` (the summary of a run) and :class:`LossProgress` (the
progress bar or lines of an epoch)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cenet.train.progress import EpochProgress

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "detection"
"""Value of the ``"kind"`` key that marks a checkpoint of ``cenet detect train``."""

FINAL_METRICS = "metrics.json"
"""File of the final box/mask APs in the run directory."""


@dataclass
class DetectState:
    """Position in training and running sums, saved under ``"state"`` in every checkpoint.

    Attributes:
        epoch: epochs completed (the 0-based index of the epoch in progress).
        step: iterations of the epoch in progress done (0 at an epoch boundary).
        global_step: iterations done in total.
        epoch_loss_sums: per loss name, the sum over the epoch's iterations of the loss
            (each the mean over the processes).
        epoch_iters: iterations summed in ``epoch_loss_sums``.
        epoch_images: training images of the epoch so far (all processes).
        epoch_bad_images: unreadable training images skipped in the epoch (all processes).
        epoch_train_s: seconds of training of the epoch.
        epoch_lr: learning rate of the epoch's first iteration.
        train_s: seconds of training of the finished epochs.
        eval_s: seconds of evaluation of the run.
        images: training images of the finished epochs.
        elapsed_s: wall time of the run's sessions up to the checkpoint.
        metrics: the latest evaluation (``{"bbox": {...}, "segm": {...}}``), ``None`` before.
        metrics_epoch: epoch (from 1) of ``metrics``.
    """

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    epoch_loss_sums: dict[str, float] = field(default_factory=dict)
    epoch_iters: int = 0
    epoch_images: int = 0
    epoch_bad_images: int = 0
    epoch_train_s: float = 0.0
    epoch_lr: float = math.nan
    train_s: float = 0.0
    eval_s: float = 0.0
    images: int = 0
    elapsed_s: float = 0.0
    metrics: dict[str, dict[str, float]] | None = None
    metrics_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectState:
        """The state saved by :meth:`to_dict` (unknown keys ignored)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class DetectResult:
    """Summary of a finished (or ``max_steps``-stopped) run, the same on every process.

    Attributes:
        run_dir: the run directory.
        epochs: epochs completed.
        global_step: iterations done.
        metrics: the final evaluation ``{"bbox": {...}, "segm": {...}}`` (fractions).
        records: the lines of ``metrics.jsonl``.
        wall_time_s: time of training and evaluation over all sessions.
        train_time_s: time of the training iterations.
        images_per_s: training images per second (all processes).
        lr: the learning rate used (after linear scaling).
        stopped_at_max_steps: training ended at ``max_steps`` before the last epoch.
    """

    run_dir: Path
    epochs: int
    global_step: int
    metrics: dict[str, dict[str, float]]
    records: list[dict[str, Any]] = field(repr=False)
    wall_time_s: float
    train_time_s: float
    images_per_s: float
    lr: float
    stopped_at_max_steps: bool


class LossProgress(EpochProgress):
    """:class:`cenet.train.progress.EpochProgress` reporting detection losses."""

    def report_losses(self, step: int, *, losses: dict[str, float], images_per_s: float) -> None:
        """Show the epoch's mean losses after iteration ``step`` (1-based) of the epoch.

        Args:
            step: iterations of the epoch done.
            losses: mean of each loss over the epoch so far (``"loss"``: their sum).
            images_per_s: training images per second, all processes together.
        """
        if not self.enabled:
            return
        total = losses.get("loss", math.nan)
        if not self.lines:
            self.bar.set_postfix(loss=f"{total:.3f}", ips=f"{images_per_s:.1f}", refresh=False)
            return
        parts = " ".join(
            f"{k.removeprefix('loss_')} {v:.3f}" for k, v in losses.items() if k != "loss"
        )
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        left = (self.total - step) * elapsed / done if done > 0 else math.nan
        eta = _interval(left)
        logger.info(
            "epoch %d/%d it %d/%d | loss %.4f (%s) | %.1f img/s | ETA %s",
            self.epoch, self.epochs, step, self.total, total, parts, images_per_s, eta,
        )  # fmt: skip


def _interval(seconds: float) -> str:
    from tqdm import tqdm

    return tqdm.format_interval(seconds) if math.isfinite(seconds) else "?"
