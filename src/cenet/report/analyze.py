"""The analysis of one trained run (CE paper Sec. 5.2, appendix F and G): measurements, figures
and a report.

:func:`analyze_run` loads a checkpoint with its stored config, rebuilds the model and the test
loader, runs the measurements of :mod:`cenet.analysis` and writes into the output directory
(default ``RUN_DIR/analysis/``):

- ``analysis.json``: every number (see :func:`analyze_model` for the keys);
- ``inhibited.png``, ``norm_params.png``, ``ablation.png``, ``magnitude.png``,
  ``correlation.png`` (and ``gct.png`` when the model has GCT layers);
- ``report.md`` or ``report.html``: the figures and tables of the key numbers.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cenet.analysis import (
    ablation_curve,
    channel_correlations,
    channel_magnitude_map,
    evaluate_top1,
    gct_parameters,
    inhibited_channels,
    norm_parameter_conditions,
)
from cenet.analysis._common import iter_images, to_jsonable
from cenet.layers import ChannelEquilibrium, GatedChannelTransformation
from cenet.report import plots
from cenet.train.evaluate import load_for_eval

FIRST_N = 6
"""The inhibited ratio is averaged over the first six rectified outputs (paper appendix G)."""

ABLATION_INDEX = 2
"""Default ablated output: the third measured output (paper appendix G: "the output in the
third layer")."""

FORMATS = ("md", "html")

FIGURES = {
    "inhibited": "inhibited.png",
    "norm_params": "norm_params.png",
    "ablation": "ablation.png",
    "magnitude": "magnitude.png",
    "correlation": "correlation.png",
    "gct": "gct.png",
}
"""Figure key -> file name in the output directory."""


@dataclass
class AnalysisReport:
    """What :func:`analyze_run` wrote: the output directory, the analysis (as in
    ``analysis.json``) and the paths of the files written (key -> path)."""

    out_dir: Path
    analysis: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def resolve_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """The checkpoint to analyze and the run directory it belongs to (``None`` for a bare file
    outside a run directory): ``RUN_DIR/best.pt`` for a run directory (``last.pt`` when there
    is no ``best.pt``), else the file itself.

    Raises:
        FileNotFoundError: if ``path`` does not exist or a run directory has no checkpoint.
    """
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name, p
        raise FileNotFoundError(f"run directory {p} has no best.pt or last.pt")
    if not p.exists():
        raise FileNotFoundError(f"no run directory or checkpoint at {p}")
    run_dir = p.parent if (p.parent / "config.yaml").is_file() else None
    return p, run_dir


def load_for_analysis(
    checkpoint: str | os.PathLike[str],
    *,
    data: str | None = None,
    threads: int | None = None,
    device: str | None = None,
) -> tuple[nn.Module, Iterable, dict[str, Any], dict[str, Any]]:
    """Rebuild the model of a checkpoint from its stored config (as
    :func:`cenet.train.evaluate_checkpoint` does), load its weights and build the test loader.

    Returns:
        ``(model, test_loader, config dict, {"epoch", "global_step"})``.

    Raises:
        FileNotFoundError: if the checkpoint does not exist.
        CheckpointError: for an unreadable checkpoint, an invalid stored config, or weights
            that do not fit the model.
    """
    model, test_loader, cfg, ckpt, _ = load_for_eval(
        checkpoint, data=data, threads=threads, device=device
    )
    model = model.to(memory_format=torch.contiguous_format)
    meta = {"epoch": int(ckpt["epoch"]), "global_step": int(ckpt["global_step"])}
    return model, test_loader, cfg.to_dict(), meta


def _exact(names: Sequence[str]):
    wanted = set(names)
    return lambda name, _module: name in wanted


def _has(model: nn.Module, kind: type[nn.Module] | tuple[type[nn.Module], ...]) -> bool:
    return any(isinstance(m, kind) for m in model.modules())


def analyze_model(
    model: nn.Module,
    loader: Iterable,
    *,
    max_batches: int | None = None,
    threshold: float = 1e-2,
    layers: Sequence[str] | None = None,
    ablation_layers: Sequence[str] | None = None,
    ablation_repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Run every measurement of the CE paper's analyses (Sec. 5.2) on ``model`` over the first
    ``max_batches`` batches of ``loader`` (all when ``None``) and return a JSON-serializable dict:

    - ``test``: ``{"top1": percent, "num_samples"}`` of the analyzed subset;
    - ``inhibited``: :class:`~cenet.analysis.InhibitedChannels` (``ratio`` = mean over the
      first six measured outputs) plus ``first_n``;
    - ``norm_params``: γ/β conditions of the BatchNorm layers (all normalization layers when
      there is no BatchNorm), plus the pooled ``gamma`` and ``beta`` values;
    - ``ablation``: ``{"layers", "random", "importance"}`` curves (top-1 as a fraction in
      [0, 1]; ``area`` = AUC normalized by the ratio range);
    - ``magnitude``: ``{label: (H, W) map}`` after the first BN (and the first CE if any);
    - ``correlation``: ``{key: mean |off-diagonal correlation|}`` per measured output;
    - ``gct``: per GCT module ``stats`` of α, γ, β, or ``None`` without GCT layers.

    ``layers`` / ``ablation_layers`` are name globs; default every rectifier, and the third
    rectified output (the output of the third conv layer of VGG) for the ablation.

    Raises:
        ValueError: for an empty loader, a selection matching nothing, or invalid settings.
    """
    spec = list(layers) if layers else None
    top1 = evaluate_top1(model, loader, max_batches=max_batches)
    inhibited = inhibited_channels(
        model, loader, layers=spec, threshold=threshold, first_n=FIRST_N, max_batches=max_batches
    )
    norm_kind = _BatchNorm if _has(model, _BatchNorm) else None
    norms = norm_parameter_conditions(model, layers=norm_kind)
    modules = dict(model.named_modules())
    gamma: list[float] = []
    beta: list[float] = []
    for name in norms.layers:
        m = modules[name]
        gamma += m.weight.detach().flatten().cpu().tolist()
        beta += m.bias.detach().flatten().cpu().tolist()

    if ablation_layers:
        ab_spec: Any = list(ablation_layers)
    else:
        keys = list(inhibited.layers)
        ab_spec = _exact([keys[min(ABLATION_INDEX, len(keys) - 1)].split(":")[0]])
    random_curve = ablation_curve(
        model,
        loader,
        layers=ab_spec,
        order="random",
        repeats=ablation_repeats,
        seed=seed,
        max_batches=max_batches,
    )
    importance_curve = ablation_curve(
        model, loader, layers=ab_spec, order="importance", max_batches=max_batches
    )

    images, _ = next(iter_images(loader, torch.device("cpu"), 1))
    magnitude = (
        {"after first BN": channel_magnitude_map(model, images, layer=_BatchNorm)}
        if _has(model, _BatchNorm)
        else {}
    )
    if _has(model, ChannelEquilibrium):
        magnitude["after first CE"] = channel_magnitude_map(model, images, layer=ChannelEquilibrium)
    correlation = channel_correlations(model, loader, layers=spec, max_batches=max_batches)
    gct = None
    if _has(model, GatedChannelTransformation):
        gct = {k: {"stats": v.stats} for k, v in gct_parameters(model).items()}

    return to_jsonable(
        {
            "test": {"top1": 100.0 * top1, "num_samples": inhibited.num_samples},
            "inhibited": {**inhibited.to_dict(), "first_n": FIRST_N},
            "norm_params": {**norms.to_dict(), "gamma": gamma, "beta": beta},
            "ablation": {
                "layers": list(random_curve.num_channels),
                "random": random_curve.to_dict(),
                "importance": importance_curve.to_dict(),
            },
            "magnitude": magnitude,
            "correlation": correlation,
            "gct": gct,
        }
    )


def write_figures(analysis: dict[str, Any], out_dir: Path, *, name: str) -> dict[str, Path]:
    """Write the PNG figures of ``analysis`` into ``out_dir``; returns key -> path (see
    :data:`FIGURES`)."""
    files: dict[str, Path] = {}
    inh = analysis["inhibited"]
    files["inhibited"] = plots.inhibited_bar(
        {k: v["ratio"] for k, v in inh["layers"].items()},
        out_dir / FIGURES["inhibited"],
        threshold=inh["threshold"],
        title=f"Inhibited channels per layer — {name}",
    )
    norms = analysis["norm_params"]
    files["norm_params"] = plots.gamma_beta_hist(
        norms["gamma"],
        norms["beta"],
        out_dir / FIGURES["norm_params"],
        title=f"Normalization γ and β ({len(norms['layers'])} layers) — {name}",
    )
    ab = analysis["ablation"]
    files["ablation"] = plots.ablation_plot(
        {
            f"random ({len(ab['random']['accuracy'])} repeats, mean ± std)": ab["random"],
            "importance (least active first)": ab["importance"],
        },
        out_dir / FIGURES["ablation"],
        title=f"Cumulative ablation of {', '.join(ab['layers'])} — {name}",
    )
    if analysis["magnitude"]:
        files["magnitude"] = plots.magnitude_heatmaps(
            analysis["magnitude"],
            out_dir / FIGURES["magnitude"],
            title=f"Channel magnitude map — {name}",
        )
    files["correlation"] = plots.per_layer_lines(
        {name: list(analysis["correlation"].values())},
        out_dir / FIGURES["correlation"],
        title="Mean |off-diagonal channel correlation| per layer",
        ylabel="mean |correlation| (unitless)",
    )
    if analysis["gct"]:
        files["gct"] = plots.per_layer_lines(
            {
                "γ mean": [v["stats"]["gamma"]["mean"] for v in analysis["gct"].values()],
                "β mean": [v["stats"]["beta"]["mean"] for v in analysis["gct"].values()],
                "α mean": [v["stats"]["alpha"]["mean"] for v in analysis["gct"].values()],
            },
            out_dir / FIGURES["gct"],
            title=f"GCT parameters per layer — {name}",
            ylabel="mean parameter value (unitless)",
            xlabel="GCT layer index",
        )
    return files


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _tables(analysis: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the report's tables."""
    inh, norms, ab = analysis["inhibited"], analysis["norm_params"], analysis["ablation"]
    src = analysis.get("source", {})
    summary = [
        ["model", str(src.get("model", "-"))],
        ["checkpoint", f"{src.get('checkpoint', '-')} (epoch {src.get('epoch', '-')})"],
        [
            "test top-1 (analyzed subset)",
            f"{_fmt(analysis['test']['top1'])} % on {analysis['test']['num_samples']} images",
        ],
        [
            f"inhibited ratio (mean of first {len(inh['averaged'])} outputs)",
            f"{_fmt(100 * inh['ratio'])} %",
        ],
        [
            "γ: \\|γ\\| < 0.1 / γ < 0.1 (pooled)",
            f"{_fmt(100 * norms['overall']['gamma_small'])} % / "
            f"{_fmt(100 * norms['overall']['gamma_below'])} %",
        ],
        ["β ≤ 0 (pooled)", f"{_fmt(100 * norms['overall']['beta_nonpositive'])} %"],
        [
            f"ablation AUC, random ({', '.join(ab['layers'])})",
            f"{_fmt(ab['random']['area'], '.4f')}",
        ],
        ["ablation AUC, importance order", f"{_fmt(ab['importance']['area'], '.4f')}"],
    ]
    corr = analysis["correlation"]
    per_layer = [
        [
            k,
            str(v["num_channels"]),
            str(v["num_inhibited"]),
            _fmt(100 * v["ratio"]),
            _fmt(corr.get(k), ".3f"),
        ]
        for k, v in inh["layers"].items()
    ]
    r = ab["random"]
    curve = [
        [_fmt(x), f"{_fmt(100 * m)} ± {_fmt(100 * s)}", _fmt(100 * i)]
        for x, m, s, i in zip(
            r["ratios"], r["mean"], r["std"], ab["importance"]["mean"], strict=True
        )
    ]
    tables = [
        ("Key numbers", ["quantity", "value"], summary),
        (
            "Per layer",
            ["output", "channels", "inhibited", "inhibited %", "mean abs corr"],
            per_layer,
        ),
        ("Ablation curve", ["ratio", "random top-1 % (mean ± std)", "importance top-1 %"], curve),
    ]
    if analysis["gct"]:
        tables.append(
            (
                "GCT parameters",
                ["layer", "α mean", "γ mean", "γ std", "β mean"],
                [
                    [
                        k,
                        _fmt(v["stats"]["alpha"]["mean"], ".3f"),
                        _fmt(v["stats"]["gamma"]["mean"], ".3f"),
                        _fmt(v["stats"]["gamma"]["std"], ".3f"),
                        _fmt(v["stats"]["beta"]["mean"], ".3f"),
                    ]
                    for k, v in analysis["gct"].items()
                ],
            )
        )
    return tables


def render_report(analysis: dict[str, Any], files: dict[str, Path], fmt: str) -> str:
    """The text of ``report.md`` (``fmt="md"``) or ``report.html``: tables of the key numbers
    and the figures, referenced by file name (relative to the output directory)."""
    title = f"Analysis of {analysis.get('source', {}).get('model', 'a model')}"
    tables = _tables(analysis)
    if fmt == "md":
        lines = [f"# {title}", ""]
        for name, header, rows in tables:
            lines += [
                f"## {name}",
                "",
                "| " + " | ".join(header) + " |",
                "|" + "---|" * len(header),
            ]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
        lines += ["## Figures", ""]
        lines += [f"![{key}]({path.name})" + "\n" for key, path in files.items()]
        return "\n".join(lines)
    e = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for name, header, rows in tables:
        parts.append(
            f"<h2>{e(name)}</h2><table border='1'><tr>"
            + "".join(f"<th>{e(h)}</th>" for h in header)
            + "</tr>"
        )
        parts += [
            "<tr>" + "".join(f"<td>{e(c.replace(chr(92), ''))}</td>" for c in row) + "</tr>"
            for row in rows
        ]
        parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    parts += [f"<p><img src='{e(p.name)}' alt='{e(k)}'></p>" for k, p in files.items()]
    parts.append("</body></html>")
    return "\n".join(parts)


def analyze_run(
    path: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    data: str | None = None,
    threads: int | None = None,
    max_batches: int | None = None,
    ablation_repeats: int = 5,
    threshold: float = 1e-2,
    layers: Sequence[str] | None = None,
    ablation_layers: Sequence[str] | None = None,
    fmt: str = "md",
) -> AnalysisReport:
    """Analyze the checkpoint of a run directory (its ``best.pt``) or a checkpoint file and
    write ``analysis.json``, the figures and ``report.<fmt>`` into ``out`` (default
    ``RUN_DIR/analysis/``, or ``analysis/`` next to a bare checkpoint file).

    Raises:
        FileNotFoundError: for a missing run directory or checkpoint.
        CheckpointError: for an unreadable checkpoint.
        ValueError: for invalid settings (unknown format, non-positive batches or repeats,
            negative threshold, a layer glob matching nothing).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; valid formats are {FORMATS}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"--batches must be a positive int, got {max_batches}")
    if ablation_repeats < 1:
        raise ValueError(f"--ablation-repeats must be a positive int, got {ablation_repeats}")
    if not threshold >= 0:
        raise ValueError(f"--threshold must be >= 0, got {threshold}")
    ckpt_path, run_dir = resolve_checkpoint(path)
    out_dir = Path(out) if out is not None else (run_dir or ckpt_path.parent) / "analysis"
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output {out_dir} exists and is not a directory")
    model, loader, cfg, meta = load_for_analysis(ckpt_path, data=data, threads=threads)
    analysis = analyze_model(
        model,
        loader,
        max_batches=max_batches,
        threshold=threshold,
        layers=layers,
        ablation_layers=ablation_layers,
        ablation_repeats=ablation_repeats,
        seed=cfg["seed"],
    )
    analysis = {
        "source": {
            "checkpoint": str(ckpt_path),
            "run_dir": str(run_dir) if run_dir else None,
            "model": cfg["model"],
            "seed": cfg["seed"],
            "epoch": meta["epoch"],
            "global_step": meta["global_step"],
            "max_batches": max_batches,
            "num_parameters": sum(p.numel() for p in model.parameters()),
        },
        **analysis,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_figures(analysis, out_dir, name=cfg["model"])
    json_path = out_dir / "analysis.json"
    json_path.write_text(json.dumps(analysis, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    report_path = out_dir / f"report.{fmt}"
    report_path.write_text(render_report(analysis, files, fmt), encoding="utf-8")
    return AnalysisReport(out_dir, analysis, {"json": json_path, "report": report_path, **files})
