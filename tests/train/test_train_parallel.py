"""Gradient accumulation, max_steps, EMA, AMP and the start-up checks of distributed training,
in one process (the multi-process runs are in ``test_distributed.py``)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from cenet.models import registry
from cenet.train import TrainConfig, load_checkpoint, parallel, resume_training, train
from cenet.train import loop as loop_mod
from cenet.train.parallel import (
    check_batch_split,
    check_sync_settings,
    prepare_model,
    train_step,
)
from cenet.train.runtime import resolve_threads

TIME_KEYS = {"epoch_time_s", "train_time_s", "eval_time_s", "images_per_s", "wall_time_s", "time"}


class LinearProbe(nn.Module):
    """Flatten + linear: no batch statistics, no randomness, so the loss of a batch is the
    mean of per-image losses and accumulation changes only the rounding."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture
def linear_probe(monkeypatch) -> str:
    """``_test_linear_probe`` in the model registry for the duration of a test."""

    def _test_linear_probe(*, num_classes: int = 10) -> nn.Module:
        return LinearProbe(num_classes)

    monkeypatch.setitem(registry._MODELS, "_test_linear_probe", _test_linear_probe)
    return "_test_linear_probe"


def tiny_cfg(data: Path, out: Path, **changes) -> TrainConfig:
    values = dict(
        model="_test_tiny_cnn",
        data=str(data),
        download=False,
        epochs=3,
        batch_size=8,  # 50 images, drop_last: 6 iterations per epoch
        lr=0.05,
        warmup_epochs=0.5,
        threads=1,
        out=str(out),
    )
    values.update(changes)
    return TrainConfig(**values)


def without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]


def max_rel_diff(a: dict, b: dict, *, skip: tuple[str, ...] = ()) -> float:
    """max over tensors of max|a - b| / max|b|, floating tensors only."""
    worst = 0.0
    for key, x in a.items():
        if not x.is_floating_point() or any(s in key for s in skip):
            continue
        y = b[key].double()
        worst = max(worst, ((x.double() - y).abs().max() / y.abs().max().clamp_min(1e-30)).item())
    return worst


# ----------------------------------------------------------------------------- accumulation


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 2)
        self.seen: list[list[float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x[:, 0, 0, 0].tolist())
        return self.fc(x[:, :1, 0, 0])


def test_micro_batches_are_strided_slices_of_the_batch() -> None:
    cfg = TrainConfig(batch_size=8, grad_accum_steps=2)
    model = _Recorder()
    tm = prepare_model(model, cfg, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 2, 2)
    loss_sum, hits, count = train_step(
        tm, opt, sched, nn.CrossEntropyLoss(), images, torch.zeros(8, dtype=torch.int64)
    )
    assert model.seen == [[0, 2, 4, 6], [1, 3, 5, 7]]  # images[a::A]
    assert count == 8 and loss_sum.dtype == torch.float64 and hits.dtype == torch.int64


def test_one_step_with_two_micro_batches_equals_one_batch() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    grads = []
    for accum in (1, 2):
        torch.manual_seed(1)
        model = LinearProbe()
        cfg = TrainConfig(batch_size=8, grad_accum_steps=accum)
        tm = prepare_model(model, cfg, torch.device("cpu"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
        loss_sum, _, _ = train_step(tm, opt, sched, nn.CrossEntropyLoss(), x, y)
        grads.append((model.fc.weight.grad.clone(), loss_sum.item()))
    (g2, loss2), (g1, loss1) = grads[1], grads[0]
    assert (g2 - g1).abs().max() <= 1e-6 * g1.abs().max()  # rounding only (observed 9.6e-8)
    assert loss2 == pytest.approx(loss1, rel=1e-6)


def test_accumulation_equals_the_whole_batch_over_a_run(
    tiny_cifar_dir: Path, tmp_path, linear_probe
) -> None:
    """W=1, A=2 against A=1 with a model without batch statistics: the same weights up to
    rounding (observed max relative difference 2.2e-7; asserted 1e-5) and the same losses."""
    runs = {}
    for accum in (1, 2):
        cfg = tiny_cfg(tiny_cifar_dir, tmp_path / f"a{accum}", model=linear_probe,
                       epochs=2, lr=0.01, grad_accum_steps=accum)  # fmt: skip
        runs[accum] = train(cfg, progress=False)
    a, b = load_checkpoint(tmp_path / "a2"), load_checkpoint(tmp_path / "a1")
    assert max_rel_diff(a["model"], b["model"]) < 1e-5
    for r2, r1 in zip(runs[2].metrics, runs[1].metrics, strict=True):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-6)
        assert r2["test_loss"] == pytest.approx(r1["test_loss"], rel=1e-5)


def test_batch_must_divide_into_processes_and_micro_batches() -> None:
    assert check_batch_split(TrainConfig(batch_size=64, grad_accum_steps=2), 4) == 8
    with pytest.raises(ValueError, match=r"batch_size=60 .* divisible by processes x "
                                         r"grad_accum_steps = 4 x 2 = 8.*batch_size=56 or 64"):
        check_batch_split(TrainConfig(batch_size=60, grad_accum_steps=2), 4)
    with pytest.raises(ValueError, match="batch_size=4$|batch_size=4,"):
        check_batch_split(TrainConfig(batch_size=3), 4)
    with pytest.raises(ValueError, match="multiple of grad_accum_steps=3"):
        TrainConfig(batch_size=8, grad_accum_steps=3)


def test_sync_bn_on_cpu_is_refused_with_a_hint_and_one_process_is_a_no_op(caplog) -> None:
    cfg = TrainConfig(sync_bn=True)
    with pytest.raises(ValueError, match="--sync-bn .* needs CUDA.*--sync-ce"):
        check_sync_settings(cfg, 2, torch.device("cpu"))
    check_sync_settings(cfg, 1, torch.device("cpu"))  # nothing to synchronize: allowed
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with caplog.at_level(logging.INFO, logger="cenet"):
        same = parallel.convert_sync(model, cfg.replace(sync_ce=True), 1)
    assert same is model and isinstance(model[1], nn.BatchNorm2d)
    assert "sync_ce and sync_bn: a single process, nothing to synchronize" in caplog.text


def test_threads_are_shared_among_the_processes_of_a_node(monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert resolve_threads(None) == 8 and resolve_threads(None, 4) == 2
    assert resolve_threads(None, 16) == 1 and resolve_threads(3, 4) == 3


# ----------------------------------------------------------------------------- max_steps


def test_max_steps_stops_evaluates_checkpoints_and_resumes(tiny_cifar_dir, tmp_path) -> None:
    ref = train(tiny_cfg(tiny_cifar_dir, tmp_path / "ref"), progress=False)
    run = tmp_path / "run"
    short = train(tiny_cfg(tiny_cifar_dir, run, max_steps=8), progress=False)
    assert short.stopped_at_max_steps and short.global_step == 8 and short.epochs == 1
    records = short.metrics
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["partial"] is True
    assert records[1]["step"] == 2 and records[1]["global_step"] == 8
    assert math.isfinite(records[1]["test_loss"]) and short.final_top1 == records[1]["test_top1"]
    ckpt = load_checkpoint(run)
    assert (ckpt["epoch"], ckpt["step"], ckpt["global_step"]) == (1, 2, 8)
    # resuming with the same max_steps does nothing and keeps the partial record
    again = resume_training(run, progress=False)
    assert again.global_step == 8 and without_times(again.metrics) == without_times(records)
    # without max_steps it continues to the end, as if it had never stopped
    done = resume_training(run, {"max_steps": None}, progress=False)
    assert not done.stopped_at_max_steps and done.global_step == 18
    assert without_times(done.metrics) == without_times(ref.metrics)  # the partial line is gone
    a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(run)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ----------------------------------------------------------------------------- EMA and AMP


class _Crash(RuntimeError):
    pass


def test_ema_is_evaluated_checkpointed_and_restored_after_a_crash(
    tiny_cifar_dir, tmp_path, monkeypatch
) -> None:
    changes = dict(model_ema_decay=0.9, checkpoint_every_steps=4)
    ref = train(tiny_cfg(tiny_cifar_dir, tmp_path / "ref", **changes), progress=False)
    assert {"test_loss_ema", "test_top1_ema", "test_top5_ema"} <= set(ref.metrics[0])
    best = max(ref.metrics, key=lambda r: r["test_top1"])  # the model's top-1 picks best.pt
    assert ref.best_epoch == best["epoch"]
    a = load_checkpoint(tmp_path / "ref")
    assert int(a["model_ema"]["n_averaged"]) == 18
    assert a["model_ema"].keys() == {"n_averaged", *(f"module.{k}" for k in a["model"])}

    real_save, calls = loop_mod.atomic_save, {"last": 0}

    def crashing_save(obj, path):
        real_save(obj, path)
        if Path(path).name == "last.pt":
            calls["last"] += 1
            if calls["last"] == 3:  # mid-epoch 2 (global step 8)
                raise _Crash("simulated crash")

    monkeypatch.setattr(loop_mod, "atomic_save", crashing_save)
    run = tmp_path / "run"
    with pytest.raises(_Crash):
        train(tiny_cfg(tiny_cifar_dir, run, **changes), progress=False)
    monkeypatch.undo()
    assert load_checkpoint(run)["global_step"] == 8
    resumed = resume_training(run, progress=False)
    b = load_checkpoint(run)
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert without_times(resumed.metrics) == without_times(ref.metrics)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_on_the_cpu(tiny_cifar_dir, tmp_path, amp) -> None:
    """bf16 autocast without a scaler; fp16 with torch.amp.GradScaler("cpu"), whose state is
    checkpointed."""
    out = tmp_path / amp
    result = train(tiny_cfg(tiny_cifar_dir, out, amp=amp, epochs=1), progress=False)
    record = result.metrics[0]
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["test_loss"])
    ckpt = load_checkpoint(out)
    assert ("scaler" in ckpt) == (amp == "fp16")
    assert all(v.dtype == torch.float32 for k, v in ckpt["model"].items() if v.is_floating_point())


def test_log_states_the_parallel_set_up(tiny_cifar_dir, tmp_path, caplog) -> None:
    cfg = tiny_cfg(tiny_cifar_dir, tmp_path / "run", epochs=1, grad_accum_steps=2,
                   model_ema_decay=0.5, amp="bf16", log_interval=2)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="cenet"):
        train(cfg, progress=False)
    text = caplog.text
    assert (
        "world size 1 (no process group), device cpu | global batch 8, 8 per process, 2 "
        "accumulation steps of 4 images | peak lr 0.05 | amp bf16 | sync_ce off, sync_bn off "
        "| EMA decay 0.5 | compile off, channels_last off" in text
    )
    # progress lines every log_interval iterations when there is no bar
    lines = [r.getMessage() for r in caplog.records if " it " in r.getMessage()]
    assert [line.split(" |")[0] for line in lines] == [
        "epoch 1/1 it 2/6", "epoch 1/1 it 4/6", "epoch 1/1 it 6/6"
    ]  # fmt: skip
    assert all("img/s" in line and "ETA" in line and "loss" in line for line in lines)
    assert "EMA loss" in text and "bad images" not in text
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["bad_images"] == 0


def test_skipped_bad_images_are_counted_in_the_log_and_metrics(tmp_path, caplog) -> None:
    from cenet.data.synthetic import make_image_folder

    root = make_image_folder(tmp_path / "data", num_classes=2, train_per_class=4,
                             val_per_class=1, size=32)  # fmt: skip
    (root / "train" / "class_000" / "zz_broken.jpg").write_bytes(b"not a jpeg")
    cfg = TrainConfig(
        model="_test_tiny_cnn", dataset="folder", data=str(root), image_size=32, epochs=2,
        batch_size=3, lr=0.01, threads=1, out=str(tmp_path / "run"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="zz_broken.jpg"):  # BadImageError is a ValueError
        train(cfg, progress=False)
    with caplog.at_level(logging.INFO, logger="cenet"):
        result = train(cfg.replace(skip_bad_images=True), overwrite=True, progress=False)
    assert [r["bad_images"] for r in result.metrics] == [1, 1]
    assert "| 1 bad images skipped |" in caplog.text
