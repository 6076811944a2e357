"""``cenet analyze`` and ``cenet compare`` end to end on tiny CIFAR runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cenet.cli.main import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL = "cifar_vgg11_ce"


def _train(data: Path, out: Path, seed: int) -> Path:
    code = main(["-q", "train", "--model", MODEL, "--data", str(data), "--epochs", "1",
                 "--batch-size", "16", "--threads", "2", "--out", str(out), "--no-progress",
                 "--set", "model_kwargs={width: 0.25}", "--set", f"seed={seed}",
                 "--set", "eval_batch_size=10", "--set", "download=false"])  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_cifar_dir) -> tuple[Path, Path]:
    """Two tiny 1-epoch runs (seeds 0 and 1); the first one analyzed."""
    root = tmp_path_factory.mktemp("report")
    first = _train(tiny_cifar_dir, root / "s0", 0)
    second = _train(tiny_cifar_dir, root / "s1", 1)
    assert main(["-q", "analyze", str(first), "--batches", "1", "--ablation-repeats", "2"]) == 0
    return first, second


def _finite_numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _finite_numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _finite_numbers(v)]
    return []


def test_analyze_writes_json_figures_and_report(runs, capsys) -> None:
    out = runs[0] / "analysis"
    a = json.loads((out / "analysis.json").read_text())
    for key in (
        "source",
        "test",
        "inhibited",
        "norm_params",
        "ablation",
        "magnitude",
        "correlation",
        "gct",
    ):
        assert key in a
    assert all(math.isfinite(x) for x in _finite_numbers(a))
    assert a["source"]["model"] == MODEL and a["source"]["checkpoint"].endswith("best.pt")
    assert a["test"]["num_samples"] == 10 and 0 <= a["test"]["top1"] <= 100
    inh = a["inhibited"]
    assert len(inh["averaged"]) == 6 and 0 <= inh["ratio"] <= 1
    assert inh["averaged"] == list(inh["layers"])[:6]
    ab = a["ablation"]
    assert ab["layers"] == [list(inh["layers"])[2]]  # the third rectified output
    assert len(ab["random"]["accuracy"]) == 2 and len(ab["random"]["ratios"]) == 10
    assert 0 <= ab["random"]["area"] <= 1 and ab["importance"]["order"] == "importance"
    assert set(a["magnitude"]) == {"after first BN", "after first CE"}
    assert len(a["correlation"]) == len(inh["layers"])
    assert a["gct"] is None
    norms = a["norm_params"]
    assert len(norms["gamma"]) == len(norms["beta"]) == norms["overall"]["num_channels"]

    report = (out / "report.md").read_text()
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {
        "inhibited.png",
        "norm_params.png",
        "ablation.png",
        "magnitude.png",
        "correlation.png",
    }
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
        assert f"]({png.name})" in report
    assert "inhibited ratio" in report and "ablation AUC" in report


def test_analyze_html_to_other_dir_with_checkpoint_file(runs, tmp_path, capsys) -> None:
    out = tmp_path / "html"
    code = main(["analyze", str(runs[1] / "last.pt"), "--out", str(out), "--batches", "1",
                 "--ablation-repeats", "1", "--format", "html",
                 "--ablation-layers", "features.3"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "inhibited channels" in printed
    a = json.loads((out / "analysis.json").read_text())
    assert a["ablation"]["layers"] == ["features.3"]
    assert "<img src='ablation.png'" in (out / "report.html").read_text()


def test_compare_tables_and_missing_analysis(runs, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    code = main(["compare", str(runs[0]), str(runs[1]), "--out", str(out),
                 "--labels", "ce-s0", "ce-s1"])  # fmt: skip
    assert code == 0
    c = json.loads((out / "comparison.json").read_text())
    rows = {r["label"]: r for r in c["runs"]}
    assert [rows[k]["seed"] for k in ("ce-s0", "ce-s1")] == [0, 1]
    assert rows["ce-s0"]["inhibited_ratio"] is not None and rows["ce-s1"]["has_analysis"] is False
    assert rows["ce-s1"]["inhibited_ratio"] is None and rows["ce-s1"]["ablation_auc"] is None
    for r in rows.values():
        assert r["final_top1"] is not None and r["best_top1"] >= r["final_top1"]
        assert r["num_parameters"] > 0 and r["train_time_s"] > 0
    assert rows["ce-s0"]["num_parameters"] == rows["ce-s1"]["num_parameters"]
    (agg,) = c["per_model"]
    assert agg["model"] == MODEL and agg["runs"] == 2 and agg["final_top1"]["n"] == 2

    md = (out / "comparison.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ce-s")]
    assert len(table) == 2
    s1 = next(line for line in table if line.startswith("| ce-s1"))
    cells = [x.strip() for x in s1.strip("|").split("|")]
    assert cells[5] == "-" and cells[6] == "-"  # inhibited %, ablation AUC
    assert f"| {MODEL} | 2 | 0, 1 |" in md
    for name in ("top1_vs_epoch.png", "inhibited_overlay.png", "ablation_overlay.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC and f"]({name})" in md


def test_analyze_missing_path_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["analyze", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cenet analyze: error:") and "nope" in err


def test_compare_missing_run_and_bad_labels(runs, tmp_path, capsys) -> None:
    assert main(["compare", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert "cenet compare: error:" in capsys.readouterr().err
    assert main(["compare", str(runs[0]), "--labels", "a", "b",
                 "--out", str(tmp_path / "c")]) == 2  # fmt: skip
    assert "labels" in capsys.readouterr().err


def test_compare_sweep_groups_by_value_and_plots(runs, tmp_path, capsys) -> None:
    out = tmp_path / "sweep"
    # the two runs differ in seed only: sweeping "seed" gives one group per run
    assert main(["compare", str(runs[0]), str(runs[1]), "--out", str(out),
                 "--sweep", "seed"]) == 0  # fmt: skip
    c = json.loads((out / "comparison.json").read_text())
    assert [r["sweep"] for r in c["runs"]] == [0, 1]
    assert [a["model"] for a in c["per_model"]] == [f"{MODEL} seed=0", f"{MODEL} seed=1"]
    md = (out / "comparison.md").read_text()
    assert "## Per model and seed" in md
    for name in ("top1_vs_seed.png", "inhibited_vs_seed.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC and f"]({name})" in md
    assert main(["compare", str(runs[0]), "--out", str(out), "--sweep", "nokey"]) == 2
    err = capsys.readouterr().err
    assert "'nokey' is not a key of" in err and "label_noise" in err
