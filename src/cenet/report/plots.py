"""Matplotlib figures of the analyses (Agg backend, PNG at 120 dpi, each figure closed after
saving). Every function writes one PNG to ``path`` and returns ``path`` as a
:class:`~pathlib.Path`; none of them prints or shows anything."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

DPI = 120
"""Resolution of every saved figure."""


def _save(fig: plt.Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _many_lines(ax: plt.Axes) -> None:
    """20 distinct colours (tab20), so that up to 20 overlaid runs stay apart."""
    ax.set_prop_cycle(color=plt.cm.tab20.colors)


def _legend(ax: plt.Axes, n: int) -> None:
    """A legend inside the axes for a few lines, beside them for many."""
    if n > 6:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    elif n:
        ax.legend(fontsize=8)


def _short(key: str, width: int = 18) -> str:
    return key if len(key) <= width else "…" + key[-(width - 1) :]


def inhibited_bar(
    ratios: Mapping[str, float], path: str | os.PathLike[str], *, threshold: float, title: str
) -> Path:
    """Bar chart of the inhibited-channel ratio (percent) of each rectified output, in
    execution order (CE paper Fig. 1b, 4c)."""
    keys = list(ratios)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(keys) + 2), 3.6))
    ax.bar(range(len(keys)), [100 * ratios[k] for k in keys], color="tab:blue")
    ax.set_xticks(range(len(keys)), [_short(k) for k in keys], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("rectified output (execution order)")
    ax.set_ylabel(f"inhibited channels (%; mean |x| < {threshold:g})")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    return _save(fig, path)


def gamma_beta_hist(
    gamma: Sequence[float], beta: Sequence[float], path: str | os.PathLike[str], *, title: str
) -> Path:
    """Histograms of the normalization layers' γ (weight) and β (bias), pooled over layers,
    with the paper's thresholds γ = 0.1 and β = 0 marked (CE paper Tables 6, 9)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, values, name, mark in ((a1, gamma, "γ (weight)", 0.1), (a2, beta, "β (bias)", 0.0)):
        ax.hist(list(values), bins=40, color="tab:gray")
        ax.axvline(mark, color="tab:red", linestyle="--", label=f"{mark:g}")
        ax.set_xlabel(f"{name} value (unitless)")
        ax.set_ylabel("channels (count)")
        ax.set_title(f"{name}")
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def ablation_plot(
    curves: Mapping[str, Mapping], path: str | os.PathLike[str], *, title: str
) -> Path:
    """Top-1 (percent) against the ablated fraction of channels, one line per curve (label ->
    :meth:`cenet.analysis.AblationCurve.to_dict`), with a ±1 std band (Morcos et al. 2018;
    CE paper Fig. 1c, 7)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    _many_lines(ax)
    for label, c in curves.items():
        r = list(c["ratios"])
        mean = [100 * (v or 0.0) for v in c["mean"]]
        std = [100 * (v or 0.0) for v in c["std"]]
        (line,) = ax.plot(r, mean, marker="o", markersize=3, label=label)
        ax.fill_between(
            r,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            color=line.get_color(),
            alpha=0.2,
        )
    ax.set_xlabel("fraction of channels ablated (ratio)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    _legend(ax, len(curves))
    return _save(fig, path)


def magnitude_heatmaps(
    maps: Mapping[str, Sequence[Sequence[float]]], path: str | os.PathLike[str], *, title: str
) -> Path:
    """One heatmap per (H, W) channel magnitude map (ℓ2 norm across channels, batch mean;
    CE paper Fig. 3), side by side, each with its colour bar."""
    n = max(1, len(maps))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    for ax, (label, m) in zip(axes[0], maps.items(), strict=False):
        im = ax.imshow(m, cmap="viridis")
        fig.colorbar(im, ax=ax, label="‖x_ij‖₂ across channels (activation units)")
        ax.set_xlabel("column j (pixels)")
        ax.set_ylabel("row i (pixels)")
        ax.set_title(label, fontsize=9)
    fig.suptitle(title)
    return _save(fig, path)


def per_layer_lines(
    series: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str,
    ylabel: str,
    xlabel: str = "layer index (execution order)",
    percent: bool = False,
) -> Path:
    """One line per series (label -> values by layer index); values multiplied by 100 when
    ``percent``. Used for the channel correlation per layer (CE paper Fig. 5) and the
    overlaid inhibited ratios of several runs."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    _many_lines(ax)
    for label, values in series.items():
        ys = [float("nan") if v is None else (100 * v if percent else v) for v in values]
        ax.plot(range(len(ys)), ys, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend(ax, len(series))
    return _save(fig, path)


def top1_vs_epoch(
    series: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    path: str | os.PathLike[str],
    *,
    title: str,
) -> Path:
    """Test top-1 (percent, as in ``metrics.jsonl``) against the epoch, one line per run."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    _many_lines(ax)
    for label, (epochs, top1) in series.items():
        ax.plot(list(epochs), list(top1), marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    _legend(ax, len(series))
    return _save(fig, path)


def sweep_plot(
    series: Mapping[str, Mapping[float, float]],
    path: str | os.PathLike[str],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """One line per model through its (swept value, measurement) points, sorted by value;
    a log x axis when the values are positive and span more than a factor of 20.

    Args:
        series: model label → {swept value: measurement (in the units of ``ylabel``)}.
        path: PNG file to write (parent directories are created).

    Returns:
        The path written.
    """
    fig, ax = plt.subplots(figsize=(6, 3.8))
    if len(series) <= 10:  # one line per model: ten fully distinct colours
        ax.set_prop_cycle(color=plt.cm.tab10.colors)
    else:
        _many_lines(ax)
    values = [v for pts in series.values() for v in pts]
    for label, pts in series.items():
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", markersize=4, label=label)
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend(ax, len(series))
    return _save(fig, path)
