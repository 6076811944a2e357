"""Accuracy counting and the ``metrics.jsonl`` log (one JSON object per evaluated epoch)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the top-``k`` logits, for each ``k``.

    ``k`` larger than the number of classes counts every sample as correct.

    Args:
        logits: (N, C) scores.
        targets: (N,) class indices.
        ks: the ``k`` values.

    Raises:
        ValueError: if the shapes do not match.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, C) and targets (N,), got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices
    hit = pred.eq(targets.unsqueeze(1))
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


def percent(count: float, total: float) -> float:
    """``100 * count / total``, NaN when ``total`` is 0."""
    return 100.0 * count / total if total else math.nan


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON line per finished epoch (``epoch`` from 1).

    Args:
        path: the ``.jsonl`` file (created on first write).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """All records, oldest first ([] if the file does not exist)."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line, flushed and fsynced."""
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_to_epochs(self, completed: int) -> None:
        """Keep only the records with ``epoch <= completed`` (epochs are numbered from 1). On
        resume this drops lines written after the resumed checkpoint, so no epoch appears
        twice."""
        self.keep_only(lambda r: r.get("epoch", math.inf) <= completed)

    def truncate_to_checkpoint(self, completed: int, global_step: int, *, finished: bool) -> None:
        """On resume from a checkpoint written after ``completed`` epochs and ``global_step``
        steps, drop the records written after it, so that no epoch appears twice: the epoch
        records of later epochs, and the partial (``max_steps``) records unless the run is
        ``finished`` and they are not later than ``global_step``."""
        self.keep_only(
            lambda r: (
                r.get("epoch", math.inf) <= completed
                if not r.get("partial")
                else finished and r.get("global_step", math.inf) <= global_step
            )
        )

    def keep_only(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite the file (atomically) with the records for which ``keep(record)`` is
        true; nothing happens if the file does not exist."""
        if not self.path.exists():
            return
        kept = [r for r in self.read() if keep(r)]
        text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path)


def to_float(x: Tensor | float) -> float:
    """A Python float from a 0-d tensor or a number."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)
