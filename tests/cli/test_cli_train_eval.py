"""``cenet train`` / ``cenet eval`` end to end on tiny CIFAR data, and the CLI's errors."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from cenet.cli.main import main
from cenet.models import list_models


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_cifar_dir, cli_env, cli_command):
    """``cenet train`` in a subprocess: tiny model, 2 epochs. Returns (run_dir, stdout)."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = subprocess.run(
        cli_command(
            "train",
            "--model", "_test_tiny_cnn",
            "--data", tiny_cifar_dir,
            "--epochs", "2",
            "--batch-size", "8",
            "--lr", "0.05",
            "--threads", "1",
            "--label-smoothing", "0.1",
            "--set", "download=false",
            "--set", "eval_batch_size=7",
            "--out", out,
        ),
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout, proc.stderr


def test_train_writes_run_files_and_summary(smoke_run) -> None:
    out, stdout, stderr = smoke_run
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt",
        "config.yaml",
        "last.pt",
        "metrics.jsonl",
    ]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    final = records[-1]["test_top1"]
    assert f"final test top-1: {final:.2f}%" in stdout
    assert "best test top-1:" in stdout
    assert "training time:" in stdout and "images/s" in stdout
    assert f"run directory:    {out}" in stdout
    assert "epoch 2/2" in stderr  # the one-line-per-epoch log


def test_checkpoints_load_weights_only(smoke_run) -> None:
    out = smoke_run[0]
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        assert ckpt["config"]["model"] == "_test_tiny_cnn"
        assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())


def test_eval_reproduces_recorded_top1(smoke_run, capsys) -> None:
    out = smoke_run[0]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert main(["-q", "eval", "--checkpoint", str(out / "last.pt"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["top1"] == pytest.approx(records[-1]["test_top1"], abs=1e-9)
    assert got["top5"] == pytest.approx(records[-1]["test_top5"], abs=1e-9)
    assert got["loss"] == pytest.approx(records[-1]["test_loss"], rel=1e-5)
    assert got["num_samples"] == 20 and got["epoch"] == 2 and got["images_per_s"] > 0
    best = max(r["test_top1"] for r in records)
    assert main(["-q", "eval", "--checkpoint", str(out / "best.pt"), "--batch-size", "3"]) == 0
    text = capsys.readouterr().out
    assert f"top-1 {best:.2f}%" in text and "images/s" in text


def test_new_run_into_existing_dir_is_refused(smoke_run, tiny_cifar_dir, capsys) -> None:
    out = smoke_run[0]
    before = (out / "last.pt").read_bytes()
    code = main(["train", "--model", "_test_tiny_cnn", "--data", str(tiny_cifar_dir),
                 "--out", str(out), "--epochs", "1"])  # fmt: skip
    assert code == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == before


def test_resume_with_other_epochs_is_refused(smoke_run, capsys) -> None:
    out = smoke_run[0]
    assert main(["train", "--resume", str(out), "--epochs", "5"]) == 2
    err = capsys.readouterr().err
    assert "cannot change epochs when resuming" in err and "checkpoint 2, given 5" in err


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"garbage" * 50, "not a readable torch checkpoint"), (None, "holds a Tensor")],
)
def test_eval_of_a_bad_checkpoint_is_a_clear_error(tmp_path, capsys, content, needle) -> None:
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)
    assert main(["eval", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cenet eval: error:") and needle in err and "Traceback" not in err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_set_key_is_a_clear_error(capsys) -> None:
    assert main(["train", "--set", "learning_rate=0.1", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key" in err and "'learning_rate'" in err and "valid keys:" in err


def test_print_config_resolves_yaml_and_overrides(capsys) -> None:
    assert main(["train", "--config", "main", "--epochs", "3", "--print-config"]) == 0
    text = capsys.readouterr().out
    # the YAML's model and width, the command line's epochs (main.yaml says 8)
    assert "model: cifar_vgg11_ce" in text and "width: 0.5" in text and "epochs: 3" in text


def test_help_lists_commands_and_options(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in ("train", "eval", "models", "configs"):
        assert word in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--config", "--model", "--data", "--epochs", "--batch-size", "--lr",
                 "--weight-decay", "--seed", "--out", "--resume", "--train-subset",
                 "--label-noise", "--schedule", "--warmup-epochs", "--label-smoothing",
                 "--threads", "--set", "--overwrite"):  # fmt: skip
        assert flag in text, flag


def test_models_command_prints_the_registry(capsys) -> None:
    assert main(["models"]) == 0
    assert capsys.readouterr().out.split() == list_models()
    assert main(["list-models", "_test_*"]) == 0
    assert capsys.readouterr().out.split() == ["_test_tiny_cnn"]


@pytest.mark.slow
def test_real_ce_model_trains_and_evaluates(tiny_cifar_dir, tmp_path, capsys) -> None:
    out = tmp_path / "ce"
    code = main(["-q", "train", "--model", "cifar_resnet20_ce", "--data", str(tiny_cifar_dir),
                 "--epochs", "1", "--batch-size", "16", "--threads", "2", "--out", str(out),
                 "--no-progress", "--set", "no_wd_1d=true"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "metrics.jsonl").read_text())
    capsys.readouterr()
    assert main(["-q", "eval", "--checkpoint", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(record["test_top1"])


def test_eval_ema_of_a_run_without_ema_is_a_clear_error(smoke_run, capsys) -> None:
    out = smoke_run[0]
    assert main(["-q", "eval", "--checkpoint", str(out / "last.pt"), "--ema"]) == 2
    assert "no EMA weights" in capsys.readouterr().err
