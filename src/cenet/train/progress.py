"""Progress of a training epoch: a tqdm bar on a terminal, plain INFO lines elsewhere.

Only rank 0 reports (the caller passes ``enabled=False`` on the other ranks). Both forms show
the same: the epoch, the iteration out of the epoch's total, the mean training loss and
top-1 so far, images per second (summed over all processes) and the estimated time left in
the epoch. The INFO lines (every ``log_interval`` iterations and at the epoch's last one) are
what CI logs and ``nohup`` files get instead of a bar redrawn with carriage returns.
"""

from __future__ import annotations

import logging
import math
import time

from tqdm import tqdm

logger = logging.getLogger(__name__)


class EpochProgress:
    """Progress reporting of one epoch; use as a context manager.

    Args:
        epoch: the epoch, numbered from 1.
        epochs: epochs of the run.
        total: iterations of the epoch.
        initial: iterations already done (a resumed epoch).
        enabled: report at all (rank 0); ``False`` makes every method a no-op.
        bar: a tqdm bar (on a terminal) rather than INFO lines.
    """

    def __init__(
        self, *, epoch: int, epochs: int, total: int, initial: int, enabled: bool, bar: bool
    ) -> None:
        self.epoch, self.epochs, self.total = epoch, epochs, total
        self.enabled = enabled
        self.lines = enabled and not bar
        self.start_step = initial
        self.start_time = time.perf_counter()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=f"epoch {epoch}/{epochs}",
            unit="it",
            disable=not (enabled and bar),
            leave=False,
            dynamic_ncols=True,
        )

    def __enter__(self) -> EpochProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def advance(self) -> None:
        """One iteration done."""
        self.bar.update(1)

    def report(self, step: int, *, loss: float, top1: float, images_per_s: float) -> None:
        """Show the figures after iteration ``step`` (1-based) of the epoch.

        Args:
            step: iterations of the epoch done.
            loss: mean training loss of the epoch so far.
            top1: training top-1 (%) of the epoch so far.
            images_per_s: training images per second, all processes together.
        """
        if not self.enabled:
            return
        if not self.lines:
            self.bar.set_postfix(
                loss=f"{loss:.3f}", acc=f"{top1:.1f}", ips=f"{images_per_s:.0f}", refresh=False
            )
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        left = (self.total - step) * elapsed / done if done > 0 else math.nan
        eta = tqdm.format_interval(left) if math.isfinite(left) else "?"
        logger.info(
            "epoch %d/%d it %d/%d | loss %.4f top-1 %.2f%% | %.0f img/s | ETA %s",
            self.epoch,
            self.epochs,
            step,
            self.total,
            loss,
            top1,
            images_per_s,
            eta,
        )
