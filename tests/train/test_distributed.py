"""Data-parallel training through the real command line: ``python -m torch.distributed.run
--standalone --nproc_per_node 2 -m cenet train ...`` with gloo on the CPU, on a synthetic JPEG
folder (3 classes: 24 training images, 3 iterations of the global batch 8 per epoch; 9 test
images, so the two evaluation shards hold 5 and 4 images).

Measured on a 2-core VM: a 2-process run of 2 epochs takes about 10 s, mostly start-up;
two processes without accumulation and one process with 2 micro-batches end with bitwise
equal weights (asserted: max relative difference <= 1e-6); a 2-process run SIGKILLed mid-epoch
and resumed ends bitwise equal to the uninterrupted run (model, EMA, optimizer, metrics).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cenet.cli.main import main
from cenet.data.synthetic import make_image_folder
from cenet.train import distributed
from cenet.train.evaluate import evaluate, load_for_eval

TIME_KEYS = {"epoch_time_s", "train_time_s", "eval_time_s", "images_per_s", "wall_time_s", "time"}
RUN_FILES = ["best.pt", "config.yaml", "last.pt", "metrics.jsonl"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    return make_image_folder(root, num_classes=3, train_per_class=8, val_per_class=3, size=32)


def recipe(data: Path) -> list[str]:
    """A small deterministic recipe: float32 unless told, a model without dropout, the
    folder's per-position seeded augmentation (the same images whatever the sharding)."""
    return [
        "--dataset", "folder", "--data", str(data), "--image-size", "32",
        "--model", "cifar_resnet20_ce", "--threads", "1", "--batch-size", "8",
        "--epochs", "2", "--lr", "0.02", "--warmup-epochs", "0.5", "--seed", "5",
    ]  # fmt: skip


def torchrun(*args: str, processes: int = 2) -> list[str]:
    return [*TORCHRUN, str(processes), "-m", "cenet", *map(str, args)]


def run(argv: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIME_KEYS} for x in lines]


def max_rel_diff(a: dict, b: dict, *, skip: tuple[str, ...] = ()) -> float:
    worst = 0.0
    for key, x in a.items():
        if not x.is_floating_point() or any(s in key for s in skip):
            continue
        y = b[key].double()
        worst = max(worst, ((x.double() - y).abs().max() / y.abs().max().clamp_min(1e-30)).item())
    return worst


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"differ: {differ}"


# ----------------------------------------------------------------------------- one full run

# bf16 autocast, EMA and synchronized CE statistics, a checkpoint after every iteration
FEATURES = ["--amp", "bf16", "--model-ema", "0.9", "--sync-ce",
            "--set", "checkpoint_every_steps=1"]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, jpeg_folder, cli_env):
    out = tmp_path_factory.mktemp("full") / "run"
    start = time.perf_counter()
    proc = run(torchrun("train", *recipe(jpeg_folder), *FEATURES, "--out", out), cli_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc, time.perf_counter() - start


@pytest.mark.slow
def test_two_processes_write_one_set_of_run_files(full_run) -> None:
    out, proc, seconds = full_run
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES  # no temp files, nothing else
    assert seconds < 120
    # rank 0 alone logs INFO lines and prints the summary
    assert proc.stdout.count("final test top-1") == 1
    assert proc.stderr.count("world size 2 (gloo), device cpu | global batch 8, 4 per process, "
                             "1 accumulation step of 4 images") == 1  # fmt: skip
    assert "amp bf16 | sync_ce on, sync_bn off | EMA decay 0.9" in proc.stderr
    assert proc.stderr.count("epoch 2/2 lr") == 1
    assert proc.stderr.count(": cifar_resnet20_ce on") == 1
    got = records(out)
    assert [r["epoch"] for r in got] == [1, 2] and [r["global_step"] for r in got] == [3, 6]
    assert all(r["bad_images"] == 0 and r["test_top1_ema"] is not None for r in got)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_states"]) == 2
    assert not torch.equal(ckpt["rng_states"][0]["cpu"], ckpt["rng_states"][1]["cpu"])
    assert int(ckpt["model_ema"]["n_averaged"]) == 6
    assert ckpt["config"]["amp"] == "bf16" and ckpt["config"]["sync_ce"] is True


@pytest.mark.slow
def test_all_reduced_evaluation_equals_single_process_evaluation(full_run, capsys) -> None:
    """The metrics summed over the two evaluation shards (5 + 4 images) are those of
    ``cenet eval`` in one process, for the model and for its EMA; the synchronized CE layers
    saved the state-dict keys of the plain model."""
    out = full_run[0]
    last = records(out)[-1]
    assert main(["-q", "eval", "--checkpoint", str(out / "last.pt"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["num_samples"] == 9 and got["top1"] == pytest.approx(last["test_top1"], abs=1e-9)
    assert got["loss"] == pytest.approx(last["test_loss"], rel=1e-6)
    model, loader, cfg, ckpt, dev = load_for_eval(out / "last.pt", threads=1)
    ema = {k.removeprefix("module."): v for k, v in ckpt["model_ema"].items() if k != "n_averaged"}
    model.load_state_dict(ema)
    result = evaluate(model, loader, device=dev)
    assert result.top1 == pytest.approx(last["test_top1_ema"], abs=1e-9)
    assert result.loss == pytest.approx(last["test_loss_ema"], rel=1e-6)
    # the same through the command line's --ema
    assert main(["-q", "eval", "--checkpoint", str(out / "last.pt"), "--ema", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["weights"] == "ema" and got["loss"] == pytest.approx(result.loss, rel=1e-9)


def _descendants(pid: int) -> list[int]:
    try:
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


@pytest.mark.slow
def test_two_processes_killed_mid_epoch_resume_to_the_same_weights(
    full_run, tmp_path, jpeg_folder, cli_env
) -> None:
    """SIGKILL of torchrun and both workers as soon as the first checkpoint exists, then
    ``torchrun ... train --resume``: the same weights, EMA, optimizer state and metrics as
    the uninterrupted run, bit for bit."""
    ref, out = full_run[0], tmp_path / "run"
    proc = subprocess.Popen(
        torchrun("train", *recipe(jpeg_folder), *FEATURES, "--out", out),
        env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists():
            assert proc.poll() is None, "training ended before writing last.pt"
            assert time.monotonic() < deadline, "no last.pt after 120 s"
            time.sleep(0.002)
        for pid in [*_descendants(proc.pid), proc.pid]:  # the workers have their own sessions
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        proc.kill()
        proc.wait(timeout=30)
    killed_at = torch.load(out / "last.pt", weights_only=True)
    assert killed_at["global_step"] < 6, "the run finished before it was killed"

    resumed = run(torchrun("train", "--resume", "--out", out), cli_env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    where = f"resumed at epoch {killed_at['epoch']} step {killed_at['step']}"
    assert resumed.stderr.count(where) == 1
    assert resumed.stdout.count("final test top-1") == 1

    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    assert (b["epoch"], b["step"], b["global_step"]) == (2, 0, 6)
    assert_equal_states(a["model"], b["model"])
    assert_equal_states(a["model_ema"], b["model_ema"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):  # fmt: skip
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert records(out) == records(ref)
    assert_equal_states(torch.load(ref / "best.pt", weights_only=True)["model"],
                        torch.load(out / "best.pt", weights_only=True)["model"])  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES


# ----------------------------------------------------------------------------- equivalence


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory, jpeg_folder, cli_env):
    """The recipe in float32 with 2 processes (W=2, A=1), and in this process with 2
    micro-batches (W=1, A=2): the same global batch of 8, the same micro-batches."""
    root = tmp_path_factory.mktemp("equivalence")
    proc = run(torchrun("train", *recipe(jpeg_folder), "--out", root / "w2"), cli_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    argv = ["-q", "train", *recipe(jpeg_folder), "--grad-accum", "2", "--out", str(root / "w1")]
    assert main(argv) == 0
    return root


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_micro_batches(equivalence_runs) -> None:
    """Parameters and training losses agree (observed: bitwise; asserted: max relative
    difference <= 1e-6). The running BN/CE statistics differ: DDP keeps rank 0's, updated
    from its micro-batches only, one process updates them from both."""
    a = torch.load(equivalence_runs / "w2" / "last.pt", weights_only=True)
    b = torch.load(equivalence_runs / "w1" / "last.pt", weights_only=True)
    stats = ("running", "num_batches_tracked")
    assert max_rel_diff(a["model"], b["model"], skip=stats) <= 1e-6
    assert not torch.equal(a["model"]["stem.1.running_mean"], b["model"]["stem.1.running_mean"])
    ra, rb = records(equivalence_runs / "w2"), records(equivalence_runs / "w1")
    for x, y in zip(ra, rb, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-6)
        assert x["train_top1"] == y["train_top1"]


@pytest.mark.slow
def test_resume_on_another_number_of_processes(equivalence_runs, jpeg_folder, cli_env) -> None:
    """A one-process run (A=2) stopped by max_steps mid-epoch, continued by 2 processes
    with --grad-accum 1 (the same processes x micro-batches, so no warning): the weights of
    the uninterrupted 2-process run."""
    out = equivalence_runs / "switch"
    argv = ["-q", "train", *recipe(jpeg_folder), "--grad-accum", "2", "--max-steps", "4",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    proc = run(torchrun("train", "--resume", "--out", out, "--grad-accum", "1",
                        "--set", "max_steps=null"), cli_env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed at epoch 1 step 1" in proc.stderr and "differ from an uninterrupted" not in (
        proc.stderr
    )
    a = torch.load(equivalence_runs / "w2" / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    assert b["world_size"] == 2 and b["config"]["grad_accum_steps"] == 1
    assert b["config"]["max_steps"] is None and b["global_step"] == 6
    assert max_rel_diff(a["model"], b["model"], skip=("running", "num_batches_tracked")) <= 1e-6


# ----------------------------------------------------------------------------- errors


@pytest.mark.slow
def test_an_error_of_rank_0_in_set_up_ends_every_process(tmp_path, jpeg_folder, cli_env) -> None:
    """Only rank 0 looks at the run directory; its refusal reaches rank 1, which stops with
    the same message instead of waiting for rank 0 forever."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    start = time.perf_counter()
    proc = run(torchrun("train", *recipe(jpeg_folder), "--out", out), cli_env, timeout=120)
    assert proc.returncode != 0 and time.perf_counter() - start < 60
    for rank in (0, 1):  # rank 0's own error, and rank 1's copy of it, each labelled
        message = f"cenet train [rank {rank}/2]: error: run directory {out} is not empty"
        assert proc.stderr.count(message) == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------- helpers


def test_environment_of_torchrun_is_read_or_refused() -> None:
    assert distributed.env_ranks({}) is None
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert distributed.env_ranks(env) == (3, 4, 1, 2)
    with pytest.raises(ValueError, match="incomplete: RANK set but WORLD_SIZE, LOCAL_RANK"):
        distributed.env_ranks({"RANK": "0"})
    with pytest.raises(ValueError, match="must be integers"):
        distributed.env_ranks({**env, "RANK": "x"})
    with pytest.raises(ValueError, match="inconsistent"):
        distributed.env_ranks({**env, "RANK": "4"})


def test_single_process_helpers_are_no_ops(monkeypatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with distributed.session("cpu", None) as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (0, 1, None, True)
        assert not ctx.distributed and distributed.world_size() == 1 and distributed.is_main()
        assert distributed.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
        t = torch.ones(2)
        assert distributed.all_reduce_sum(t) is t
        assert distributed.broadcast_object({"a": 1}) == {"a": 1}
        assert distributed.run_on_main(lambda: 7) == 7
        with pytest.raises(KeyError), distributed.agree("test"):
            raise KeyError("x")
    with distributed.session("cpu", "nccl") as ctx:  # one process: no group, no backend
        assert ctx.backend is None


def test_nccl_on_the_cpu_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="dist_backend='nccl' needs CUDA devices"):
        with distributed.session("cpu", "nccl"):
            pass
