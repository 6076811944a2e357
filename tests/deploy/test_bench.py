"""``cenet bench`` (cenet.deploy.bench): the CLI on tiny settings, its files, the ratios, the
multiply-add counts against torchvision's and the errors. Speed itself is never asserted."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import cenet
from cenet import kernels
from cenet.cli.main import main
from cenet.deploy import fuse
from cenet.deploy.bench import (
    calibrate,
    count_macs,
    parse_backends,
    parse_batch_sizes,
    reference_of,
    select_models,
    time_rounds,
)

TINY = ["--batch-size", "1", "--image-size", "32", "--repeats", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CLI run of resnet18 and resnet18_ce, eager and fused, and its parsed files."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--models", "resnet18", "resnet18_ce", *TINY,
                 "--backends", "eager,fused", "--profile", "5", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "table1.json").read_text()), (out / "table1.md").read_text()


def test_cli_writes_markdown_and_json_with_the_machine_header(tiny_run, capsys):
    out, result, md = tiny_run
    h = result["header"]
    info = kernels.info()
    assert h["cpu"] == info["cpu"] and h["cpu_capability"] == info["cpu_capability"]
    assert h["threads"] == torch.get_num_threads()
    assert h["torch"] == torch.__version__ and h["command"].startswith("cenet bench --models")
    assert set(result["models"]) == {"resnet18", "resnet18_ce"}
    assert {(r["model"], r["backend"]) for r in result["latency"]} == {
        (m, b) for m in ("resnet18", "resnet18_ce") for b in ("eager", "fused")}
    assert all(r["batch_size"] == 1 and len(r["runs_s"]) == 1 and r["median_s"] > 0
               for r in result["latency"])
    for text in (h["cpu"], "resnet18_ce", "Latency, batch 1", "fused ms", h["command"]):
        assert text in md
    prof = result["profile"]["resnet18_ce fused batch 1"]
    assert len(prof["ops"]) == 5 and 0 < prof["conv_share"] < 1
    assert "Profile, resnet18_ce fused batch 1" in md


def test_bn_is_its_own_reference_with_ratio_one(tiny_run):
    _, result, _ = tiny_run
    for row in result["latency"]:
        assert row["reference"] == "resnet18"
        if row["model"] == "resnet18":
            assert row["ratio"] == row["min_ratio"] == row["paired_ratio"] == 1.0
    assert result["models"]["resnet18"]["macs_ratio"] == 1.0
    assert result["models"]["resnet18"]["fused_macs_ratio"] == 1.0


def test_fused_ce_counts_no_more_macs_and_bn_folds(tiny_run):
    _, result, _ = tiny_run
    ce, bn = result["models"]["resnet18_ce"], result["models"]["resnet18"]
    assert ce["fused_macs"] <= ce["macs"] and bn["fused_macs"] == bn["macs"]
    assert ce["macs"] > bn["macs"] and bn["folded"] == 20  # every BN of ResNet-18
    assert bn["fused_params"] < bn["params"]


def test_macs_of_resnet18_equal_torchvision_resnet18():
    ref = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ref(torch.randn(1, 3, 32, 32))
    ours = cenet.create_model("resnet18").eval()
    assert count_macs(ours, 32) == counter.get_total_flops() // 2
    assert count_macs(fuse(ours), 32) == counter.get_total_flops() // 2


def test_ce_macs_are_the_same_with_the_native_op_and_the_reference():
    model = calibrate(cenet.create_model("resnet18_ce"), 32)
    native = count_macs(model, 32)
    with kernels.use_isa(None):
        reference = count_macs(model, 32)
    assert native == reference


def test_fused_ce_runs_natively_under_inference_mode_as_under_no_grad():
    model = calibrate(cenet.create_model("resnet18_ce"), 32)
    fused, x = fuse(model), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y, yf = model(x), fused(x)
    with torch.inference_mode():
        native = fused.get_submodule("layer1.0.attn").uses_native(torch.randn(2, 64, 8, 8))
        assert native == (kernels.active_isa() is not None)
        assert torch.equal(model(x), y) and torch.equal(fused(x), yf)
    assert ((y - yf).abs().max() / y.abs().max()).item() < 1e-4  # float32 round-off of folding


def test_calibrate_fills_running_statistics_and_restores_momentum():
    model = cenet.create_model("resnet18_ce")
    calibrate(model, 32)
    assert not model.training
    assert model.bn1.momentum == 0.1 and not torch.all(model.bn1.running_var == 1)


@pytest.mark.skipif(any(__import__("importlib").util.find_spec(m) is None
                        for m in ("onnxruntime", "onnxscript")), reason="needs onnxruntime")
def test_cli_onnx_backend(tmp_path):
    assert main(["bench", "--models", "resnet18", *TINY, "--backends", "onnx,eager",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "table1.json").read_text())
    rows = {r["backend"]: r for r in result["latency"]}
    assert set(rows) == {"onnx", "eager"} and rows["onnx"]["ratio"] == 1.0
    assert result["header"]["onnxruntime"] and not result["notes"]


def test_time_rounds_interleaves_and_drops_warmup():
    calls = []
    runners = {k: (lambda k=k: calls.append(k)) for k in "ab"}
    times = time_rounds(runners, warmup=1, repeats=2)
    assert calls == ["b", "a", "a", "b", "b", "a"] and all(len(v) == 2 for v in times.values())


def test_model_selection_groups_variants_under_their_bn_network():
    groups, notes = select_models(["resnet50_ce", "resnet18", "resnet18_se"])
    assert groups == {"resnet50": ["resnet50", "resnet50_ce"],
                      "resnet18": ["resnet18", "resnet18_se"]}
    assert any("resnet50: added as the BN reference" in n for n in notes)
    groups, notes = select_models(None)
    assert groups["resnet50"] == ["resnet50", "resnet50_se", "resnet50_gct", "resnet50_ce"]
    assert "mobilenet_v2_gct" not in groups["mobilenet_v2"]
    assert any(n.startswith("mobilenet_v2_gct: not registered") for n in notes)
    assert reference_of("shufflenet_v2_x1_0_ce", set(cenet.list_models())) == \
        "shufflenet_v2_x1_0"


def test_parsers():
    assert parse_batch_sizes("1,32") == (1, 32) and parse_batch_sizes(" 8 ") == (8,)
    assert parse_backends("fused,onnx") == ("fused", "onnx")
    for bad in ("", "1,,2", "0", "1,1", "a", "-3"):
        with pytest.raises(ValueError, match="batch sizes"):
            parse_batch_sizes(bad)
    for bad in ("", "tensorrt", "eager,eager"):
        with pytest.raises(ValueError, match="backends"):
            parse_backends(bad)


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--models", "resnet50_cee", *TINY, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cenet bench: error:" in err and "resnet50_cee" in err and "resnet50_ce" in err
    assert main(["bench", "--models", "nosuch*", *TINY, "--out", str(tmp_path)]) == 2
    assert "no registered model matches 'nosuch*'" in capsys.readouterr().err
    assert not (tmp_path / "table1.json").exists()


@pytest.mark.parametrize("option,value", [("--batch-size", "1,x"), ("--batch-size", "0"),
                                          ("--backends", "eager,tvm"), ("--repeats", "0")])
def test_bad_options_are_usage_errors(option, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--models", "resnet18", option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and value in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--models", "resnet18", *TINY, "--device", "cuda",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available" in err
