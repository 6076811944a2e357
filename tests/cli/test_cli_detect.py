"""``cenet detect train / eval / list`` end to end on a tiny synthetic COCO set (8 train / 4 val
images of 64 px), the errors of bad input, and (slow) a 2-process torchrun run with gloo."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cenet.cli.main import main
from cenet.detection import list_detectors
from cenet.detection.synthetic import make_synthetic_coco

TINY = [
    "--min-size", "64", "--max-size", "64", "--batch-size", "2", "--threads", "1",
    "--workers", "0", "--lr", "0.08", "--no-progress", "--set", "warmup_iters=2",
    "--set", "detector_kwargs={box_batch_size_per_image: 64, rpn_post_nms_top_n_train: 100, "
    "rpn_post_nms_top_n_test: 50, box_detections_per_img: 20}",
]  # fmt: skip
"""Options that make a ResNet-18 detector iterate in well under a second at 64 px."""

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("coco"), num_train=8, num_val=4,
                               image_size=64, seed=0)  # fmt: skip


@pytest.fixture(scope="module")
def trained(coco: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``cenet detect train`` of Mask R-CNN R-18 CE for 2 iterations, then ``--resume`` to 3.
    Returns (run dir, stdout of the resumed run)."""
    out = tmp_path_factory.mktemp("detect") / "run"
    argv = ["detect", "train", "--model", "maskrcnn_resnet18_fpn_ce", "--data", str(coco),
            "--out", str(out), "--epochs", "2", *TINY]  # fmt: skip
    first = io.StringIO()
    with contextlib.redirect_stdout(first):
        assert main([*argv, "--max-steps", "2"]) == 0
    assert "trained 2 iterations (max_steps; 0 epochs complete)" in first.getvalue()
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2
    resumed = io.StringIO()
    with contextlib.redirect_stdout(resumed):
        assert main(["detect", "train", "--resume", "--out", str(out), "--max-steps", "3"]) == 0
    return out, resumed.getvalue()


def test_train_writes_the_run_files_and_resumes(trained: tuple[Path, str]) -> None:
    out, stdout = trained
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml", "last.pt", "metrics.json", "metrics.jsonl"
    ]
    final = json.loads((out / "metrics.json").read_text())
    assert final["global_step"] == 3 and final["stopped_at_max_steps"] is True
    assert final["lr"] == pytest.approx(0.08 * 2 / 16)  # linear scaling from a batch of 16
    assert "trained 3 iterations (max_steps; 0 epochs complete), lr 0.01" in stdout
    assert "| box AP | AP50 | AP75 | mask AP | AP50 | AP75 |" in stdout
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["global_step"], r.get("partial")) for r in records] == [(3, True)]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["max_steps"] == 3 and ckpt["step"] == 3


def test_eval_prints_table_5_columns_and_writes_the_run_s_final_aps(
    trained: tuple[Path, str], coco: Path, tmp_path: Path, capsys
) -> None:
    out, _ = trained
    report = tmp_path / "aps.json"
    argv = ["detect", "eval", "--checkpoint", str(out / "last.pt"), "--data", str(coco),
            "--json", str(report), "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    got = json.loads(report.read_text())
    final = json.loads((out / "metrics.json").read_text())
    assert got["model"] == "maskrcnn_resnet18_fpn_ce" and got["num_images"] == 4
    for kind in ("bbox", "segm"):  # the same model on the same images: the run's final APs
        assert set(got[kind]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert got[kind] == final[kind]
    box, mask = got["bbox"], got["segm"]
    row = " | ".join(f"{100 * v:.1f}" for v in (box["AP"], box["AP50"], box["AP75"],
                                                mask["AP"], mask["AP50"], mask["AP75"]))
    assert f"| maskrcnn_resnet18_fpn_ce | {row} |" in stdout
    assert "| | AP | AP50 | AP75 | APs | APm | APl |" in stdout
    assert "| box | " in stdout and "| mask | " in stdout
    # default JSON: beside the checkpoint
    assert main(argv[:-4] + ["--threads", "1"]) == 0
    assert json.loads((out / "eval_val2017.json").read_text())["bbox"] == box


def test_list_and_print_config(capsys) -> None:
    assert main(["detect", "list"]) == 0
    assert capsys.readouterr().out.split() == list_detectors()
    assert "maskrcnn_resnet50_fpn_ce" in list_detectors()
    assert main(["detect", "list", "--configs"]) == 0
    assert "coco_maskrcnn_r50_fpn_ce_sync" in capsys.readouterr().out.split()
    assert main(["detect", "train", "--config", "coco_maskrcnn_r101_fpn_ce", "--lr", "0.01",
                 "--print-config"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "model: maskrcnn_resnet101_fpn_ce\n" in text and "lr: 0.01\n" in text
    assert "milestones: [16, 22]\n" in text


def _fails(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_gets_a_clear_error_and_status_2(coco: Path, tmp_path: Path, capsys) -> None:
    base = ["detect", "train", "--model", "fasterrcnn_resnet18_fpn_ce", *TINY]
    missing = tmp_path / "no_such_coco"
    err = _fails([*base, "--data", str(missing), "--out", str(tmp_path / "a")], capsys)
    assert f"cenet detect: error: data folder {missing} does not exist" in err
    err = _fails(["detect", "train", "--model", "maskrcnn_resnet51_fpn_ce", "--data", str(coco),
                  "--out", str(tmp_path / "b")], capsys)  # fmt: skip
    assert "unknown detector 'maskrcnn_resnet51_fpn_ce'; did you mean" in err
    assert "'maskrcnn_resnet50_fpn_ce'" in err
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--data", str(coco), "--norm", "bad"])
    assert exit_info.value.code == 2
    assert "argument --norm: invalid choice: 'bad'" in capsys.readouterr().err
    err = _fails([*base, "--data", str(coco), "--set", "wight_decay=0"], capsys)
    assert "unknown detection config key in --set: 'wight_decay' (did you mean 'weight_decay'" \
        in err
    err = _fails([*base, "--data", str(coco), "--set", "num_classes=3", "--out",
                  str(tmp_path / "c")], capsys)  # fmt: skip
    assert "category ids 3 outside 1..2 (num_classes=3)" in err
    assert not (tmp_path / "c").exists()  # nothing written for a run that cannot start
    broken = Path(shutil.copytree(coco, tmp_path / "broken"))
    (broken / "annotations" / "instances_val2017.json").unlink()
    err = _fails([*base, "--data", str(broken), "--out", str(tmp_path / "d")], capsys)
    assert f"COCO annotation file not found: {broken}/annotations/instances_val2017.json" in err
    err = _fails([*base, "--data", str(coco), "--resume", "--overwrite"], capsys)
    assert "--resume and --overwrite exclude each other" in err
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("x")
    err = _fails([*base, "--data", str(coco), "--out", str(tmp_path / "e")], capsys)
    assert "is not empty; continue it with --resume" in err
    err = _fails(["detect", "train", "--resume", "--out", str(tmp_path / "f")], capsys)
    assert "checkpoint" in err and "does not exist" in err
    err = _fails(["detect", "eval", "--checkpoint", str(tmp_path / "x.pt"), "--data", str(coco)],
                 capsys)  # fmt: skip
    assert "x.pt does not exist" in err


@pytest.mark.slow
def test_torchrun_two_processes_gloo(coco: Path, tmp_path: Path, cli_env: dict) -> None:
    """2 processes (gloo), 2 iterations of 2 images each: one set of run files with the
    global batch of 4, every process's RNG state; norm=sync is refused on the CPU."""
    out = tmp_path / "run"
    argv = [*TORCHRUN, "2", "-m", "cenet", "detect", "train", "--model",
            "fasterrcnn_resnet18_fpn_ce", "--data", str(coco), "--max-steps", "2", *TINY]
    proc = subprocess.run([*argv, "--out", str(out)], env=cli_env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml", "last.pt", "metrics.json", "metrics.jsonl"
    ]
    assert proc.stdout.count("trained 2 iterations") == 1  # rank 0 alone prints
    assert proc.stderr.count("world size 2 (gloo), device cpu | 2 images per process, "
                             "global batch 4 | lr 0.02") == 1  # fmt: skip
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_states"]) == 2
    assert json.loads((out / "metrics.json").read_text())["bbox"]["AP"] is not None
    sync = subprocess.run([*argv, "--out", str(tmp_path / "sync"), "--norm", "sync"],
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert sync.returncode != 0
    assert "norm='sync' with 2 processes needs CUDA" in sync.stderr
