"""The training loop on tiny real data (cenet.data.build_loaders): files, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cenet.train import TrainConfig, load_checkpoint, resume_training, train
from cenet.train import loop as loop_mod

TIME_KEYS = {"epoch_time_s", "train_time_s", "eval_time_s", "images_per_s", "wall_time_s", "time"}


def tiny_cfg(data: Path, out: Path, **changes) -> TrainConfig:
    values = dict(
        model="_test_tiny_cnn",
        data=str(data),
        download=False,
        epochs=3,
        batch_size=8,  # 50 images, drop_last: 6 iterations per epoch
        lr=0.05,
        schedule="cosine",
        warmup_epochs=0.5,
        label_smoothing=0.1,
        no_wd_1d=True,
        threads=1,
        out=str(out),
    )
    values.update(changes)
    return TrainConfig(**values)


def without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_new_run_writes_run_files(tiny_cifar_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(tiny_cfg(tiny_cifar_dir, out, epochs=2), progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt",
        "config.yaml",
        "last.pt",
        "metrics.jsonl",
    ]
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["num_classes"] == 10 and stored["out"] == str(out) and stored["threads"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["global_step"] for r in records] == [6, 12]
    assert set(records[0]) >= {"lr", "train_loss", "train_top1", "test_loss", "test_top1"}
    assert result.final_top1 == records[-1]["test_top1"]
    assert result.best_top1 == max(r["test_top1"] for r in records)
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["epoch"], last["step"], last["global_step"]) == (2, 0, 12)
    assert last["config"]["model"] == "_test_tiny_cnn"
    assert isinstance(last["rng_state"], torch.Tensor)


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("crash_after_saves", [3, 4])
def test_resume_after_crash_equals_uninterrupted_run(
    tiny_cifar_dir: Path, tmp_path: Path, monkeypatch, crash_after_saves: int
) -> None:
    """Saves of last.pt every 4 iterations and at epoch ends: 4 (e0 s4), 6 (end e0),
    8 (e1 s2), 12 (end e1), 16 (e2 s4); crash right after the 3rd (mid-epoch: the resumed
    run skips 2 batches of epoch 2) or the 4th (after the end of epoch 2, so metrics and
    best.pt of 2 epochs exist)."""
    changes = dict(checkpoint_every_steps=4, eval_every=1)
    ref = train(tiny_cfg(tiny_cifar_dir, tmp_path / "ref", **changes), progress=False)

    real_save = loop_mod.atomic_save
    calls = {"last": 0}

    def crashing_save(obj, path):
        real_save(obj, path)
        if Path(path).name == "last.pt":
            calls["last"] += 1
            if calls["last"] == crash_after_saves:
                raise _Crash("simulated crash")

    monkeypatch.setattr(loop_mod, "atomic_save", crashing_save)
    run = tmp_path / "run"
    with pytest.raises(_Crash):
        train(tiny_cfg(tiny_cifar_dir, run, **changes), progress=False)
    monkeypatch.undo()
    assert load_checkpoint(run)["global_step"] < 18
    resumed = resume_training(run, progress=False)

    a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(run)
    assert_same_state(a["model"], b["model"])
    for pa, pb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert (b["epoch"], b["step"], b["global_step"]) == (3, 0, 18)
    assert without_times(resumed.metrics) == without_times(ref.metrics)
    assert resumed.best_top1 == ref.best_top1 and resumed.best_epoch == ref.best_epoch
    assert_same_state(
        load_checkpoint(tmp_path / "ref" / "best.pt")["model"],
        load_checkpoint(run / "best.pt")["model"],
    )


def test_resuming_a_finished_run_changes_nothing(tiny_cifar_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tiny_cifar_dir, tmp_path / "run", epochs=1)
    first = train(cfg, progress=False)
    again = train(cfg, resume_from=tmp_path / "run", progress=False)
    assert again.metrics == first.metrics and again.epochs == 1


def test_new_run_refuses_non_empty_dir_unless_overwrite(
    tiny_cifar_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "something.txt").write_text("mine")
    cfg = tiny_cfg(tiny_cifar_dir, out, epochs=1)
    with pytest.raises(FileExistsError, match="not empty.*--resume.*--overwrite"):
        train(cfg, progress=False)
    train(cfg, overwrite=True, progress=False)
    assert (out / "last.pt").is_file() and (out / "something.txt").read_text() == "mine"


def test_resume_rejects_changed_epochs_but_allows_data_and_threads(
    tiny_cifar_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train(tiny_cfg(tiny_cifar_dir, out, epochs=1), progress=False)
    with pytest.raises(ValueError, match="cannot change epochs when resuming.*checkpoint 1"):
        resume_training(out, {"epochs": 5})
    with pytest.raises(ValueError, match="cannot change lr, schedule"):
        resume_training(out, {"lr": 0.5, "schedule": "step"})
    result = resume_training(out, {"threads": 2, "data": str(tiny_cifar_dir)}, progress=False)
    assert result.epochs == 1


def test_eval_every_evaluates_last_epoch(tiny_cifar_dir: Path, tmp_path: Path) -> None:
    result = train(tiny_cfg(tiny_cifar_dir, tmp_path / "run", eval_every=2), progress=False)
    assert [r["test_top1"] is None for r in result.metrics] == [True, False, False]


def test_bad_model_fails_before_anything_is_written(tiny_cifar_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="unknown model 'cifar_resnet2O'"):
        train(tiny_cfg(tiny_cifar_dir, out, model="cifar_resnet2O"), progress=False)
    with pytest.raises(ValueError, match="rejected model_kwargs"):
        train(tiny_cfg(tiny_cifar_dir, out, model_kwargs={"depth": 3}), progress=False)
    assert not out.exists()


def test_record_channels_adds_channel_health_to_metrics(tiny_cifar_dir, tmp_path) -> None:
    import json

    from cenet.train import TrainConfig, train

    cfg = TrainConfig(
        model="cifar_vgg11_ce", model_kwargs={"width": 0.25}, data=str(tiny_cifar_dir),
        epochs=1, batch_size=16, lr=0.05, record_channels=1, out=str(tmp_path / "run"),
        threads=1,
    )
    train(cfg, progress=False)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= record["inhibited_ratio"] <= 1.0
    assert len(record["channel_correlation"]) == 8  # the 8 ReLUs of VGG-11
    assert all(0.0 <= v <= 1.0 for v in record["channel_correlation"].values())
    with pytest.raises(ValueError, match="record_channels"):
        TrainConfig(model="cifar_vgg11", record_channels=-1)
