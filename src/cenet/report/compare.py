"""Comparison of several runs: one table row per run, a per-model aggregate over seeds, and
overlaid figures.

:func:`compare_runs` reads, for each run directory, ``config.yaml``, ``metrics.jsonl``, a
checkpoint (``last.pt`` or ``best.pt``, for the parameter count) and ``analysis/analysis.json``
if ``cenet analyze`` wrote one (it is never computed here: a missing value is ``None`` in the
JSON and ``-`` in the tables). It writes into the output directory ``comparison.json``,
``comparison.md``, ``top1_vs_epoch.png``, ``inhibited_overlay.png`` and
``ablation_overlay.png`` (the last two only when at least one run has an analysis).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cenet.report import plots
from cenet.train.checkpoint import load_checkpoint
from cenet.train.config import config_from_dict, read_yaml_config
from cenet.train.runtime import build_model

COLUMNS = (
    ("label", "label"),
    ("model", "model"),
    ("seed", "seed"),
    ("final_top1", "final top-1 %"),
    ("best_top1", "best top-1 %"),
    ("inhibited_ratio", "inhibited % (first 6)"),
    ("ablation_auc", "ablation AUC"),
    ("num_parameters", "parameters"),
    ("train_time_s", "training time (s)"),
)
"""(key of a row, header) of the per-run table."""

AGGREGATED = ("final_top1", "best_top1", "inhibited_ratio", "ablation_auc", "train_time_s")
"""Row keys averaged (mean ± std over seeds) per model."""


@dataclass
class Comparison:
    """What :func:`compare_runs` wrote: the rows, the per-model aggregates and file paths."""

    out_dir: Path
    rows: list[dict[str, Any]]
    aggregate: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (empty if the file does not exist).

    Raises:
        ValueError: for a line that is not a JSON object.
    """
    if not path.is_file():
        return []
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i}: not a JSON line: {err}") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object")
        records.append(rec)
    return records


def count_parameters(run_dir: Path, config: dict[str, Any]) -> int | None:
    """Number of learnable parameters: the model of ``config`` is built (untrained) to know
    which entries of the checkpoint's model state are parameters (not buffers), and their
    sizes are summed from the checkpoint. ``None`` when the run has no checkpoint."""
    ckpt_path = next((run_dir / n for n in ("last.pt", "best.pt") if (run_dir / n).is_file()), None)
    if ckpt_path is None:
        return None
    ckpt = load_checkpoint(ckpt_path)
    cfg = config_from_dict(ckpt["config"], source=f"{ckpt_path} config")
    model = build_model(cfg, cfg.num_classes or 10)
    names = {n for n, _ in model.named_parameters()}
    return sum(t.numel() for n, t in ckpt["model"].items() if n in names)


def read_run(run_dir: str | os.PathLike[str], label: str | None = None) -> dict[str, Any]:
    """One row of the comparison for a run directory (see :data:`COLUMNS`), plus the
    ``epochs``/``test_top1`` curve and the analysis' per-layer ratios and ablation curve
    (``None`` without ``analysis/analysis.json``).

    Raises:
        FileNotFoundError: if ``run_dir`` is not a directory with a ``config.yaml``.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no run directory at {run}")
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} has no config.yaml; is it a cenet run directory?")
    config = read_yaml_config(run / "config.yaml")
    all_records = read_metrics(run / "metrics.jsonl")
    records = [r for r in all_records if r.get("test_top1") is not None]
    top1 = [float(r["test_top1"]) for r in records]
    times = [r.get("epoch_time_s") for r in all_records]
    analysis_path = run / "analysis" / "analysis.json"
    analysis = (
        json.loads(analysis_path.read_text(encoding="utf-8")) if analysis_path.is_file() else None
    )
    return {
        "label": label or run.name,
        "run_dir": str(run),
        "model": config.get("model"),
        "seed": config.get("seed"),
        "final_top1": top1[-1] if top1 else None,
        "best_top1": max(top1) if top1 else None,
        "inhibited_ratio": 100 * analysis["inhibited"]["ratio"] if analysis else None,
        "ablation_auc": analysis["ablation"]["random"]["area"] if analysis else None,
        "num_parameters": count_parameters(run, config),
        "train_time_s": sum(t for t in times if t is not None) if times else None,
        "has_analysis": analysis is not None,
        "curve": {"epoch": [int(r["epoch"]) for r in records], "test_top1": top1},
        "inhibited_layers": (
            {k: v["ratio"] for k, v in analysis["inhibited"]["layers"].items()}
            if analysis
            else None
        ),
        "ablation": analysis["ablation"]["random"] if analysis else None,
    }


def _group_name(row: dict[str, Any], sweep: str | None) -> str:
    return str(row["model"]) if sweep is None else f"{row['model']} {sweep}={row['sweep']}"


def aggregate(rows: Sequence[dict[str, Any]], sweep: str | None = None) -> list[dict[str, Any]]:
    """Per model (in first-seen order), or per (model, swept value) with ``sweep``:
    ``{"model", "runs", "seeds", key: {"mean", "std", "n"} | None}`` for each key of
    :data:`AGGREGATED` (std unbiased over the runs that have the value, 0.0 for one; ``None``
    when no run has it)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_group_name(row, sweep), []).append(row)
    out = []
    for model, group in groups.items():
        entry: dict[str, Any] = {
            "model": model,
            "runs": len(group),
            "seeds": [r["seed"] for r in group],
        }
        for key in AGGREGATED:
            values = [float(r[key]) for r in group if r[key] is not None]
            entry[key] = (
                None
                if not values
                else {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "n": len(values),
                }
            )
        out.append(entry)
    return out


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, dict):
        return f"{value['mean']:.2f} ± {value['std']:.2f} (n={value['n']})"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def render_markdown(
    rows: Sequence[dict[str, Any]],
    agg: Sequence[dict[str, Any]],
    figures: dict[str, Path],
    sweep: str | None = None,
) -> str:
    """The text of ``comparison.md``: the per-run table, the per-model table and the
    figures (by file name)."""
    lines = [
        "# Comparison of runs",
        "",
        "## Runs",
        "",
        "| " + " | ".join(h for _, h in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    missing = [r["label"] for r in rows if not r["has_analysis"]]
    if missing:
        lines += [
            "",
            f"No analysis/analysis.json for {', '.join(missing)} (run `cenet analyze` "
            "first); their analysis columns show -.",
        ]
    heads = ["model", "runs", "seeds"] + [h for k, h in COLUMNS if k in AGGREGATED]
    lines += [
        "",
        "## Per model (mean ± std over seeds)" if sweep is None
        else f"## Per model and {sweep} (mean ± std over seeds)",
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "---|" * len(heads),
    ]
    for a in agg:
        cells = [a["model"], str(a["runs"]), ", ".join(map(str, a["seeds"]))]
        cells += [_cell(a[k]) for k in AGGREGATED]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Figures", ""]
    lines += [f"![{k}]({p.name})\n" for k, p in figures.items()]
    return "\n".join(lines)


def _sweep_figures(rows: Sequence[dict[str, Any]], sweep: str, out_dir: Path) -> dict[str, Path]:
    """Final top-1 and inhibited ratio against the swept value, mean over seeds, per model."""
    figures = {}
    for key, name, ylabel in (
        ("final_top1", "top1", "final test top-1 (%)"),
        ("inhibited_ratio", "inhibited", "inhibited channels (%)"),
    ):
        series: dict[str, dict[float, list[float]]] = {}
        for row in rows:
            if row[key] is not None:
                points = series.setdefault(str(row["model"]), {})
                points.setdefault(float(row["sweep"]), []).append(float(row[key]))
        if series:
            means = {m: {v: statistics.fmean(ys) for v, ys in p.items()} for m, p in series.items()}
            figures[f"{name}_vs_{sweep}"] = plots.sweep_plot(
                means,
                out_dir / f"{name}_vs_{sweep}.png",
                xlabel=sweep,
                ylabel=ylabel,
                title=f"{ylabel[0].upper()}{ylabel[1:]} against {sweep}",
            )
    return figures


def compare_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str] = "comparison",
    labels: Sequence[str] | None = None,
    sweep: str | None = None,
) -> Comparison:
    """Compare runs and write ``comparison.json``, ``comparison.md`` and the overlaid figures
    into ``out``.

    With ``sweep`` (a key of the runs' ``config.yaml``, e.g. ``label_noise`` or
    ``weight_decay``), runs are averaged per (model, value) and two more figures plot the
    final top-1 and, for analyzed runs, the inhibited ratio against that value, one line per
    model (CE paper Fig. 4b, d, e).

    Raises:
        ValueError: for no run, a number of labels different from the number of runs, or a
            ``sweep`` key missing from a run's config.
        FileNotFoundError: for a path that is not a run directory.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    names = list(labels) if labels else [Path(r).name for r in run_dirs]
    if not labels and len(set(names)) < len(names):
        names = [f"{n} ({i})" for i, n in enumerate(names, 1)]
    rows = [read_run(r, n) for r, n in zip(run_dirs, names, strict=True)]
    if sweep is not None:
        for row in rows:
            config = read_yaml_config(Path(row["run_dir"]) / "config.yaml")
            if sweep not in config:
                raise ValueError(
                    f"--sweep {sweep!r} is not a key of {row['run_dir']}/config.yaml; "
                    f"keys: {', '.join(sorted(config))}"
                )
            row["sweep"] = config[sweep]
    agg = aggregate(rows, sweep)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "top1": plots.top1_vs_epoch(
            {r["label"]: (r["curve"]["epoch"], r["curve"]["test_top1"]) for r in rows},
            out_dir / "top1_vs_epoch.png",
            title="Test top-1 during training",
        )
    }
    analyzed = [r for r in rows if r["has_analysis"]]
    if analyzed:
        figures["inhibited"] = plots.per_layer_lines(
            {r["label"]: list(r["inhibited_layers"].values()) for r in analyzed},
            out_dir / "inhibited_overlay.png",
            title="Inhibited channels per layer",
            ylabel="inhibited channels (%)",
            percent=True,
        )
        figures["ablation"] = plots.ablation_plot(
            {r["label"]: r["ablation"] for r in analyzed},
            out_dir / "ablation_overlay.png",
            title="Cumulative ablation (random, mean ± std)",
        )
    if sweep is not None:
        figures.update(_sweep_figures(rows, sweep, out_dir))
    json_path = out_dir / "comparison.json"
    json_path.write_text(
        json.dumps({"runs": rows, "per_model": agg}, indent=1) + "\n", encoding="utf-8"
    )
    md_path = out_dir / "comparison.md"
    md_path.write_text(render_markdown(rows, agg, figures, sweep), encoding="utf-8")
    return Comparison(out_dir, rows, agg, {"json": json_path, "markdown": md_path, **figures})
