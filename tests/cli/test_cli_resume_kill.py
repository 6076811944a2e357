"""THE resume-after-kill test: ``cenet train`` SIGKILLed right after its first ``last.pt``,
then ``cenet train --resume``, ends with the same weights and metrics as an uninterrupted
run with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

TIME_KEYS = {"epoch_time_s", "train_time_s", "eval_time_s", "images_per_s", "wall_time_s", "time"}


def train_args(data: Path, out: Path) -> list[str]:
    # 50 images, batch 4: 12 iterations per epoch, 3 epochs, last.pt after every iteration
    return [
        "train",
        "--model", "_test_tiny_cnn",
        "--data", str(data),
        "--epochs", "3",
        "--batch-size", "4",
        "--lr", "0.05",
        "--warmup-epochs", "0.5",
        "--label-smoothing", "0.1",
        "--threads", "1",
        "--seed", "7",
        "--out", str(out),
        "--set", "checkpoint_every_steps=1",
        "--set", "download=false",
        "--set", "no_wd_1d=true",
    ]  # fmt: skip


def metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIME_KEYS} for x in lines]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(
    tmp_path: Path, tiny_cifar_dir: Path, cli_env: dict, cli_command
) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = subprocess.run(
        cli_command(*train_args(tiny_cifar_dir, ref)),
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr

    proc = subprocess.Popen(
        cli_command(*train_args(tiny_cifar_dir, run)),
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists():
            assert proc.poll() is None, "training ended before writing last.pt"
            assert time.monotonic() < deadline, "no last.pt after 120 s"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(run / "last.pt", weights_only=True)
    assert killed_at["global_step"] < 36, "the run finished before it was killed"

    resumed = subprocess.run(
        cli_command("train", "--resume", "--out", str(run)),
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at epoch {killed_at['epoch']} step {killed_at['step']}" in resumed.stderr
    assert "final test top-1" in resumed.stdout

    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    assert (b["epoch"], b["step"], b["global_step"]) == (3, 0, 36)
    assert a["model"].keys() == b["model"].keys()
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    where = f"killed at epoch {killed_at['epoch']} step {killed_at['step']}"
    assert not differ, f"{where}: weights differ: {differ}"
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng_state"], b["rng_state"])
    assert metrics(run) == metrics(ref)
    assert not list(run.glob(".*.tmp"))
