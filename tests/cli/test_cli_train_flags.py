"""``cenet train``'s options for distributed training, precision, EMA, compilation,
accumulation, bad images and max_steps; what may change on ``--resume``."""

from __future__ import annotations

import pytest
import yaml

from cenet.cli.main import main
from cenet.train import RESUME_MUTABLE


def resolved(capsys, *args: str) -> dict:
    assert main(["train", *args, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_flag_sets_its_config_key(capsys) -> None:
    cfg = resolved(
        capsys,
        "--sync-ce", "--sync-bn", "--amp", "bf16", "--model-ema", "0.999", "--compile",
        "--channels-last", "--grad-accum", "2", "--skip-bad-images", "--max-steps", "5",
        "--workers", "3", "--dist-backend", "gloo",
    )  # fmt: skip
    assert {k: cfg[k] for k in (
        "sync_ce", "sync_bn", "amp", "model_ema_decay", "compile", "channels_last",
        "grad_accum_steps", "skip_bad_images", "max_steps", "num_workers", "dist_backend",
    )} == {
        "sync_ce": True, "sync_bn": True, "amp": "bf16", "model_ema_decay": 0.999,
        "compile": True, "channels_last": True, "grad_accum_steps": 2, "skip_bad_images": True,
        "max_steps": 5, "num_workers": 3, "dist_backend": "gloo",
    }  # fmt: skip
    defaults = resolved(capsys)
    assert (defaults["amp"], defaults["model_ema_decay"], defaults["max_steps"]) == (None,) * 3
    assert not any(defaults[k] for k in ("sync_ce", "sync_bn", "compile", "skip_bad_images"))


def test_switches_have_a_no_form_that_overrides_a_config(capsys) -> None:
    assert resolved(capsys, "--config", "main")["channels_last"] is True
    assert resolved(capsys, "--config", "main", "--no-channels-last")["channels_last"] is False
    assert resolved(capsys, "--set", "sync_ce=true", "--no-sync-ce")["sync_ce"] is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
        (["--model-ema", "1.5"], "argument --model-ema: expected a decay in (0, 1)"),
        (["--workers", "-1"], "argument --workers: expected an integer >= 0"),
        (["--grad-accum", "0"], "argument --grad-accum: expected a positive integer"),
        (["--max-steps", "x"], "argument --max-steps: expected a positive integer"),
        (["--dist-backend", "tcp"], "argument --dist-backend: invalid choice: 'tcp'"),
    ],
)
def test_bad_values_are_usage_errors(args, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", *args, "--print-config"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_batch_not_divisible_by_micro_batches_is_a_clear_error(capsys) -> None:
    assert main(["train", "--batch-size", "10", "--grad-accum", "4", "--print-config"]) == 2
    assert "invalid batch_size=10: must be a multiple of grad_accum_steps=4" in (
        capsys.readouterr().err
    )


def test_help_lists_the_new_options(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--sync-ce", "--sync-bn", "--amp {bf16,fp16}", "--model-ema DECAY",
                 "--compile", "--channels-last", "--grad-accum N", "--skip-bad-images",
                 "--max-steps N", "--workers N", "--dist-backend NAME"):  # fmt: skip
        assert flag in text, flag


def test_resume_may_change_how_but_not_what_is_computed(
    tiny_cifar_dir, tmp_path, capsys
) -> None:
    assert {"compile", "dist_backend", "skip_bad_images", "max_steps", "grad_accum_steps",
            "num_workers", "log_interval"} <= RESUME_MUTABLE  # fmt: skip
    assert not {"amp", "sync_ce", "sync_bn", "model_ema_decay", "batch_size"} & RESUME_MUTABLE
    out = tmp_path / "run"
    base = ["-q", "train", "--model", "_test_tiny_cnn", "--data", str(tiny_cifar_dir),
            "--epochs", "2", "--batch-size", "8", "--threads", "1", "--set", "download=false",
            "--max-steps", "3", "--out", str(out)]  # fmt: skip
    assert main(base) == 0
    assert "after 3 steps (max_steps; 0 epochs complete)" in capsys.readouterr().out
    assert main(["-q", "train", "--resume", "--out", str(out), "--amp", "bf16"]) == 2
    assert "cannot change amp when resuming" in capsys.readouterr().err
    assert main(["-q", "train", "--resume", "--out", str(out), "--model-ema", "0.9"]) == 2
    assert "cannot change model_ema_decay" in capsys.readouterr().err
    # accumulation (the batch stays global), max_steps and the workers may change
    argv = ["-q", "train", "--resume", "--out", str(out), "--grad-accum", "4", "--max-steps",
            "9", "--workers", "0"]  # fmt: skip
    assert main(argv) == 0
    assert "after 9 steps (max_steps; 1 epoch complete)" in capsys.readouterr().out
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert (stored["grad_accum_steps"], stored["max_steps"]) == (4, 9)
