"""Top-k counting and the metrics.jsonl log."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cenet.train import MetricsLog, topk_correct


def test_topk_correct_by_hand() -> None:
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # top-1 = 1
            [0.5, 0.1, 0.4, 0.3, 0.2, 0.0],  # order 0, 2, 3, 4, 1, 5
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # order 5, 4, 3, 2, 1, 0
        ]
    )
    targets = torch.tensor([1, 1, 0])
    # sample 0 right at top-1; sample 1's target is 5th (in top-5); sample 2's is last
    assert topk_correct(logits, targets, (1, 5)) == [1, 2]
    assert topk_correct(logits[:, :3], targets, (1, 5)) == [1, 3]  # k > classes: all count


def test_topk_shape_error() -> None:
    with pytest.raises(ValueError, match="expected logits"):
        topk_correct(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))


def test_metrics_log_append_read_truncate(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert log.read() == []
    log.truncate_to_epochs(0)  # no file: nothing to do
    for epoch in (1, 2, 3):
        log.append({"epoch": epoch, "test_top1": None if epoch == 2 else 10.0 * epoch})
    assert [r["epoch"] for r in log.read()] == [1, 2, 3]
    log.truncate_to_epochs(2)
    assert log.read() == [{"epoch": 1, "test_top1": 10.0}, {"epoch": 2, "test_top1": None}]
