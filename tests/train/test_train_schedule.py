"""LR schedule values at chosen iterations against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cenet.train import TrainConfig, build_scheduler


def lrs(cfg: TrainConfig, iters_per_epoch: int) -> list[float]:
    """The LR used by each iteration of the whole run (scheduler stepped per iteration)."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=cfg.lr, momentum=cfg.momentum)
    sched = build_scheduler(opt, cfg, iters_per_epoch)
    out = []
    for _ in range(cfg.epochs * iters_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_divides_every_step_size_epochs() -> None:
    got = lrs(TrainConfig(epochs=6, lr=0.1, schedule="step", step_size=2, gamma=0.1), 2)
    want = [0.1] * 4 + [0.01] * 4 + [0.001] * 4
    assert got == pytest.approx(want, rel=1e-12)


def test_multistep_with_warmup_counts_epochs_from_start() -> None:
    cfg = TrainConfig(
        epochs=5,
        lr=0.2,
        schedule="multistep",
        milestones=[2, 4],
        gamma=0.1,
        warmup_epochs=0.5,
        warmup_start_factor=0.25,
    )
    got = lrs(cfg, 4)
    # warm-up: 2 iterations, 0.2 * (0.25 + 0.75 * i / 2); decays at epochs 2 and 4 = iters 8, 16
    want = [0.05, 0.125] + [0.2] * 6 + [0.02] * 8 + [0.002] * 4
    assert got == pytest.approx(want, rel=1e-9)


def test_cosine_with_warmup() -> None:
    cfg = TrainConfig(epochs=3, lr=0.1, schedule="cosine", warmup_epochs=1, warmup_start_factor=0.1)
    got = lrs(cfg, 4)
    assert got[:5] == pytest.approx([0.01, 0.0325, 0.055, 0.0775, 0.1], rel=1e-9)
    # after warm-up: 0.05 * (1 + cos(pi * t / 8)), t = iteration - 4
    assert got[6] == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)), rel=1e-9)
    assert got[8] == pytest.approx(0.05, rel=1e-9)
    assert got[11] == pytest.approx(0.05 * (1 + math.cos(math.pi * 7 / 8)), rel=1e-9)


def test_cosine_min_lr() -> None:
    cfg = TrainConfig(epochs=2, lr=0.1, schedule="cosine", min_lr=0.02)
    got = lrs(cfg, 5)
    assert got[0] == pytest.approx(0.1)
    assert got[5] == pytest.approx(0.02 + 0.08 * 0.5, rel=1e-9)


def test_poly() -> None:
    got = lrs(TrainConfig(epochs=2, lr=1.0, schedule="poly", poly_power=2.0), 5)
    # (1 - t / 10) ** 2
    assert got[0] == pytest.approx(1.0)
    assert got[5] == pytest.approx(0.25, rel=1e-9)
    assert got[9] == pytest.approx(0.01, rel=1e-9)


def test_constant_with_warmup() -> None:
    cfg = TrainConfig(
        epochs=2, lr=0.4, schedule="constant", warmup_epochs=1, warmup_start_factor=0.5
    )
    assert lrs(cfg, 2) == pytest.approx([0.2, 0.3, 0.4, 0.4], rel=1e-9)


def test_decay_inside_warmup_is_rejected() -> None:
    cfg = TrainConfig(epochs=4, schedule="multistep", milestones=[1], warmup_epochs=2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="warm-up"):
        build_scheduler(opt, cfg, 3)


def test_scheduler_state_survives_weights_only_load(tmp_path) -> None:
    cfg = TrainConfig(epochs=4, lr=0.1, schedule="multistep", milestones=[2, 3], warmup_epochs=1)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, 3)
    for _ in range(5):
        opt.step()
        sched.step()
    torch.save({"s": sched.state_dict(), "o": opt.state_dict()}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=cfg.lr)
    sched2 = build_scheduler(opt2, cfg, 3)
    opt2.load_state_dict(loaded["o"])
    sched2.load_state_dict(loaded["s"])
    rest1, rest2 = [], []
    for o, s, out in ((opt, sched, rest1), (opt2, sched2, rest2)):
        for _ in range(7):
            out.append(o.param_groups[0]["lr"])
            o.step()
            s.step()
    assert rest1 == rest2
    assert rest1[-1] == pytest.approx(0.001)
