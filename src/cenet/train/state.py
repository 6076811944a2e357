"""The position of a run in training and its running sums, as saved in checkpoints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TrainState:
    """Position in training and running sums, saved under ``"state"`` in every checkpoint.

    Attributes:
        epoch: epochs completed, i.e. the 0-based index of the epoch in progress.
        step: batches of the epoch in progress already trained on (0 at an epoch boundary).
        global_step: iterations done in total.
        best_top1: best test top-1 (%) so far, -1 before the first evaluation.
        best_epoch: epoch (from 1) of ``best_top1``.
        epoch_loss_sum: sum over the images of the epoch in progress of their training loss.
        epoch_correct: training top-1 hits of the epoch in progress.
        epoch_seen: training images of the epoch in progress.
        epoch_train_s: seconds of training of the epoch in progress.
        epoch_lr: learning rate of the epoch's first iteration.
        epoch_bad_images: unreadable training images skipped in the epoch in progress (all
            processes).
        train_s: seconds of training of the whole run.
        eval_s: seconds of evaluation of the whole run.
        images: training images of the whole run.
        bad_images: unreadable training images skipped in the whole run.
        elapsed_s: wall time of the run's sessions up to the checkpoint.
    """

    epoch: int = 0  # epochs completed = index of the epoch in progress
    step: int = 0  # batches of the epoch in progress already trained on
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int | None = None
    epoch_loss_sum: float = 0.0  # sum over images of the epoch in progress
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_train_s: float = 0.0
    epoch_lr: float = math.nan  # LR of the epoch's first iteration
    epoch_bad_images: int = 0
    train_s: float = 0.0  # totals of the run
    eval_s: float = 0.0
    images: int = 0
    bad_images: int = 0
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (numbers and None only)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        """The state saved by :meth:`to_dict` (unknown keys are ignored)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
