"""The learning-rate schedule, stepped once per iteration.

Built only from ``torch.optim.lr_scheduler`` classes whose state is plain data (so it survives
``torch.load(weights_only=True)``): an optional ``LinearLR`` warm-up chained by ``SequentialLR``
to ``MultiStepLR`` (``"step"``, ``"multistep"``), ``CosineAnnealingLR``, ``PolynomialLR`` or
``ConstantLR``. Epoch values are converted to iterations with ``round(epochs * iters_per_epoch)``
and count from the start of training, warm-up included; the decay of ``"cosine"`` and
``"poly"`` spans the iterations after the warm-up.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    PolynomialLR,
    SequentialLR,
)

from cenet.train.config import SCHEDULES, TrainConfig


def epochs_to_iters(epochs: float, iters_per_epoch: int) -> int:
    """``round(epochs * iters_per_epoch)``: an epoch count as a number of iterations."""
    return int(round(epochs * iters_per_epoch))


def decay_milestones(cfg: TrainConfig, iters_per_epoch: int) -> list[int]:
    """Iterations (from the start of training) at which ``"step"``/``"multistep"`` decay.

    ``"step"``: every ``step_size`` epochs before the end of training; ``"multistep"``:
    ``milestones``. Milestones at or after the end of training are dropped.
    """
    total = cfg.epochs * iters_per_epoch
    if cfg.schedule == "step":
        step = epochs_to_iters(cfg.step_size, iters_per_epoch)
        return list(range(step, total, step)) if step > 0 else []
    out = [epochs_to_iters(m, iters_per_epoch) for m in cfg.milestones]
    return [m for m in out if m < total]


def build_scheduler(optimizer: Optimizer, cfg: TrainConfig, iters_per_epoch: int) -> LRScheduler:
    """The LR scheduler of ``cfg`` for ``optimizer``; call ``.step()`` after every iteration.

    The LR of iteration ``i`` (0-based) is, with ``W`` warm-up and ``T`` total iterations and
    ``lr`` the optimizer's LR: ``lr * (f + (1 - f) * i / W)`` for ``i < W`` (``f`` =
    ``warmup_start_factor``), then ``lr * gamma ** (number of milestones <= i)`` (step,
    multistep), ``min_lr + (lr - min_lr) * (1 + cos(pi * (i - W) / (T - W))) / 2`` (cosine),
    ``lr * (1 - (i - W) / (T - W)) ** poly_power`` (poly) or ``lr`` (constant).

    Args:
        optimizer: the optimizer whose param groups' ``lr`` is scheduled.
        cfg: the run's config (schedule, epochs, warm-up ...).
        iters_per_epoch: batches per training epoch.

    Raises:
        ValueError: if ``iters_per_epoch < 1``, the warm-up takes all iterations or a decay
            milestone falls within the warm-up.
    """
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
    if cfg.schedule not in SCHEDULES:  # validated by TrainConfig; kept for direct callers
        raise ValueError(f"unknown schedule {cfg.schedule!r}; valid: {SCHEDULES}")
    total = cfg.epochs * iters_per_epoch
    warmup = epochs_to_iters(cfg.warmup_epochs, iters_per_epoch)
    if warmup >= total:
        raise ValueError(
            f"warmup_epochs={cfg.warmup_epochs} is {warmup} iterations, not fewer than the "
            f"{total} iterations of training"
        )
    rest = total - warmup
    main: LRScheduler
    if cfg.schedule in ("step", "multistep"):
        points = decay_milestones(cfg, iters_per_epoch)
        if any(m <= warmup for m in points):
            raise ValueError(
                f"LR decay at iteration {points[0]} is not after the warm-up of {warmup} "
                f"iterations (warmup_epochs={cfg.warmup_epochs}); shorten the warm-up or move "
                f"the {'step_size' if cfg.schedule == 'step' else 'milestones'}"
            )
        milestones = [m - warmup for m in points]
        main = MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)
    elif cfg.schedule == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=rest, eta_min=cfg.min_lr)
    elif cfg.schedule == "poly":
        main = PolynomialLR(optimizer, total_iters=rest, power=cfg.poly_power)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    ramp = LinearLR(
        optimizer, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=warmup
    )
    return SequentialLR(optimizer, schedulers=[ramp, main], milestones=[warmup])
