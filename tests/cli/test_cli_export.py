"""``cenet export``: both formats, --fuse, --checkpoint (a run of ``cenet train``) and the
errors: unknown model, another architecture's checkpoint, weights that do not fit, missing
ONNX packages, unwritable --out, failed parity."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from cenet.cli.main import main
from cenet.data.synthetic import make_image_folder
from cenet.deploy import export as ex

needs_onnx = pytest.mark.skipif(
    not all(find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs the ONNX packages: pip install 'cenet[export]'",
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cli_env, cli_command) -> Path:
    """A one-step ``cenet train`` run of cifar_resnet20_ce on a tiny 32x32 image folder,
    keeping EMA weights."""
    root = tmp_path_factory.mktemp("export_run")
    data = make_image_folder(root / "data", num_classes=2, train_per_class=4, val_per_class=2,
                             size=32)
    out = root / "run"
    subprocess.run(cli_command(
        "-q", "train", "--dataset", "folder", "--data", data, "--image-size", "32",
        "--model", "cifar_resnet20_ce", "--max-steps", "1", "--batch-size", "4",
        "--workers", "0", "--threads", "1", "--model-ema", "0.9", "--out", out,
        "--no-progress"), env=cli_env, check=True, capture_output=True)
    return out


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


@needs_onnx
def test_onnx_fused_writes_checks_and_reports(tmp_path, capsys):
    out = tmp_path / "r20.onnx"
    assert main(["-q", "export", "--model", "cifar_resnet20_ce", "--fuse", "--out",
                 str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out} (" in text and "MiB, onnx)" in text
    assert "cifar_resnet20_ce, untrained weights, fused (" in text and "maps folded" in text
    assert "dynamic batch, input (B, 3, 32, 32)" in text
    assert "at batch 2" in text and "at batch 1" in text and "at batch 3" in text
    assert "(ok, tolerance 0.0001)" in text
    assert {d for d, _ in ex.onnx_ops(out)} == {""}


def test_pt2_unfused_json_with_its_parity_at_three_batch_sizes(tmp_path, capsys):
    out = tmp_path / "r20.pt2"
    assert main(["-q", "export", "--model", "cifar_resnet20_ir", "--format", "pt2",
                 "--out", str(out), "--json"]) == 0
    r = _json(capsys)
    assert (r["format"], r["fused"], r["model"], r["image_size"]) == ("pt2", False,
                                                                     "cifar_resnet20_ir", 32)
    assert set(r["parity"]) == {"1", "2", "3"} and max(r["parity"].values()) <= 1e-5
    assert r["bytes"] == out.stat().st_size and r["ok"] and r["weights"] == "untrained"
    assert not ex.native_ops(torch.export.load(out))


@pytest.mark.slow  # with the `cenet train` subprocess of run_dir
@needs_onnx
def test_checkpoint_exports_its_network_and_ema_weights(run_dir, tmp_path, capsys):
    out = tmp_path / "ckpt.pt2"
    assert main(["-q", "export", "--checkpoint", str(run_dir), "--out", str(out),
                 "--static-batch", "--json"]) == 0
    r = _json(capsys)
    assert (r["model"], r["image_size"], r["dynamic_batch"]) == ("cifar_resnet20_ce", 32, False)
    assert r["checkpoint"] == str(run_dir) and r["weights"] == "model"
    assert list(r["parity"]) == ["2"]
    program = torch.export.load(out)
    assert program.module()(torch.randn(2, 3, 32, 32)).shape == (2, 2)  # 2 classes, from config
    # --model agreeing with the checkpoint, the EMA weights, and ONNX of the fused network
    out = tmp_path / "ema.onnx"
    assert main(["-q", "export", "--checkpoint", str(run_dir / "last.pt"), "--model",
                 "cifar_resnet20_ce", "--ema", "--fuse", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"EMA weights of {run_dir / 'last.pt'}, fused (" in text and "ok, tolerance" in text


@pytest.mark.slow
def test_checkpoint_of_another_architecture(run_dir, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(run_dir), "--model", "cifar_resnet20_bd",
                 "--out", str(tmp_path / "m.pt2")]) == 2
    err = capsys.readouterr().err
    assert "holds a 'cifar_resnet20_ce' network (its config), not 'cifar_resnet20_bd'" in err
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    ckpt["config"]["model"] = "cifar_resnet20_bd"  # weights of a CE network, config of BD
    torch.save(ckpt, tmp_path / "renamed.pt")
    assert main(["export", "--checkpoint", str(tmp_path / "renamed.pt"), "--out",
                 str(tmp_path / "m.pt2")]) == 2
    assert "weights do not fit model 'cifar_resnet20_bd'" in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()


@pytest.mark.parametrize("argv,message", [
    (["--model", "cifar_resnet2_ce"], "unknown model 'cifar_resnet2_ce'; did you mean"),
    ([], "give --model NAME (an untrained registered network) or --checkpoint PATH"),
    (["--model", "cifar_resnet20", "--ema"], "--ema needs --checkpoint"),
    (["--checkpoint", "empty_run"], "no checkpoint last.pt in run directory empty_run"),
    (["--model", "cifar_resnet20", "--format", "onnx"], "ends in .pt2; name the file .onnx"),
    (["--model", "cifar_resnet20", "--tolerance", "0"], "--tolerance must be > 0"),
])
def test_bad_arguments(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_run").mkdir()
    assert main(["export", *argv, "--out", "m.pt2"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()


def test_unknown_format(tmp_path, capsys):
    assert main(["export", "--model", "cifar_resnet20", "--out", str(tmp_path / "m.bin")]) == 2
    assert "cannot tell the format from --out" in capsys.readouterr().err


def test_missing_onnx_packages(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", "--model", "cifar_resnet20", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "'onnxruntime', which is not installed: pip install 'cenet[export]'" in err


def test_unwritable_out(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["export", "--model", "cifar_resnet20", "--out",
                 str(tmp_path / "file" / "m.pt2")]) == 2
    assert "cannot create its directory" in capsys.readouterr().err
    assert main(["export", "--model", "cifar_resnet20", "--format", "pt2", "--out",
                 str(tmp_path)]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err


def test_failed_parity_is_an_error_and_keeps_the_file(tmp_path, capsys):
    out = tmp_path / "m.pt2"  # folded weights round differently: never exactly the eager output
    assert main(["export", "--model", "cifar_resnet20", "--fuse", "--static-batch", "--tolerance",
                 "1e-30", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "FAILED, tolerance 1e-30" in captured.out
    assert "parity check failed" in captured.err and "kept for inspection" in captured.err
    assert out.is_file()
