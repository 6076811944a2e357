"""The header, the profile and the Markdown/JSON output of ``cenet bench``
(:func:`cenet.deploy.bench.run_bench`).

The result (``table1.json``) is one object: ``header`` (machine, versions, date, command,
commit, load average), ``settings`` (the :class:`~cenet.deploy.bench.BenchConfig` as run),
``notes`` (skipped networks and backends), ``models`` (per network: ``reference`` (its BN
network), ``params``, ``fused_params``, ``macs``, ``fused_macs``, ``macs_ratio``,
``fused_macs_ratio`` (fused over the fused BN network), ``folded``), ``latency`` (per
network, batch size and backend: ``median_s``, ``min_s``, ``runs_s``, ``ratio`` (median over
the BN network's median with the same backend), ``min_ratio`` (fastest over fastest),
``paired_ratio`` (median of the per-round ratios)), ``profile`` and ``paper_table1``; the
header's ``round_loads`` are the 1-minute load averages after each timed round.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cenet.deploy.bench_backends import BACKENDS

_CONV_OPS = ("convolution", "conv2d", "mkldnn_convolution", "_convolution")


def _git_commit() -> str | None:
    """The short commit of the checkout cenet is imported from ("+ local changes" when tracked
    files differ from it), or None outside a git checkout."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_header(device: torch.device, threads: int, command: str) -> dict[str, Any]:
    """What the table was measured on: CPU model and capability, the CE kernels' ISA, versions,
    threads, GPU, date, command line, commit, load average."""
    from cenet import kernels

    info = kernels.info()
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "cpu": info["cpu"], "cpu_capability": info["cpu_capability"],
        "ce_kernels": info["active_isa"] or f"off ({info['kernels_note']}): PyTorch reference",
        "torch": torch.__version__, "onnxruntime": ort_version, "cenet": info["cenet"],
        "python": info["python"], "threads": threads, "device": device.type,
        "gpu": gpu, "cuda_devices": info["cuda_devices"],
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "commit": _git_commit(), "load_average_before": load_average(),
    }


def profile_ops(fn: Callable[[], Any], *, top: int, device: torch.device,
                runs: int = 3) -> dict[str, Any]:
    """``torch.profiler`` over ``runs`` calls of ``fn``: the total self CPU time per call and the
    ``top`` operators by self CPU time (name, calls per run, ms per run, share)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    fn()
    with profile(activities=activities) as prof:
        for _ in range(runs):
            fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    conv = sum(e.self_cpu_time_total for e in events if e.key.split("::")[-1] in _CONV_OPS)
    return {
        "runs": runs, "total_ms": total / 1e3 / runs, "conv_share": conv / total if total else 0,
        "ops": [{"op": e.key, "calls": e.count / runs, "ms": e.self_cpu_time_total / 1e3 / runs,
                 "share": e.self_cpu_time_total / total} for e in events[:top]],
    }


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def _cell(row: dict[str, Any] | None) -> list[str]:
    if row is None or row["ratio"] is None:
        return ["–" if row is None else _ms(row["median_s"]), "–", "–"]
    return [_ms(row["median_s"]), f"{row['ratio']:.2f}", f"{row['min_ratio']:.2f}"]


def _table(head: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(head))]
    return ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def render_markdown(result: dict[str, Any]) -> str:
    """The result as Markdown: header, notes, counts, one latency table per batch size, the
    paper's Table 1 for the architectures measured, and the profile if any."""
    h, s = result["header"], result["settings"]
    load = lambda v: "?" if not v else f"{v[0]:.2f}"  # noqa: E731
    lines = [
        "## Table 1 on this machine (`cenet bench`)", "",
        f"- machine: {h['cpu']} (capability {h['cpu_capability']}), CE kernels: "
        f"{h['ce_kernels']}, {h['threads']} threads, GPU: {h['gpu'] or 'none'}"
        + (f" (device {h['device']})" if h["device"] != "cpu" else ""),
        f"- torch {h['torch']}, onnxruntime {h['onnxruntime'] or 'not installed'}, cenet "
        f"{h['cenet']}, commit {h['commit'] or 'unknown'}",
        f"- {h['date']}, load average {load(h['load_average_before'])} before, "
        f"{max(h.get('round_loads') or [0]):.2f} at most after a timed round, "
        f"{load(h.get('load_average_after'))} after",
        f"- command: `{h['command']}`" if h["command"] else "- command: (API call)",
        f"- eval at {s['image_size']}×{s['image_size']}, "
        f"{'channels-last' if s['channels_last'] else 'NCHW'}, torch.inference_mode; median "
        f"of {s['repeats']} rounds after {s['warmup']} warm-up rounds, the networks of an "
        "architecture taking turns within each round, one backend after another; running "
        "statistics "
        + ("calibrated on one random batch" if s["calibrate"] else "as initialized")
        + ("; freed memory kept for reuse" if s.get("reuse_memory") else "; fresh memory"),
        "- eager: the eval model; compile: torch.compile (inductor) of it; fused: "
        "cenet.deploy.fuse; onnx: the fused model in ONNX Runtime; ms: median; × BN: over "
        "the BN network's median with the same backend; min × BN: fastest run over the BN "
        "network's fastest (contention only adds time); paired ratios in table1.json",
        "- MACs: FlopCounterMode FLOPs / 2, one 1×3×S×S image (convolutions, matrix "
        "products, cenet::ce_eval)",
    ]
    lines += [f"- note: {n}" for n in result["notes"]]
    lines += ["", "Parameters and multiply-adds:", ""]
    rows = []
    for name, m in result["models"].items():
        ref = result["models"][m["reference"]]
        rows.append([name, f"{m['params'] / 1e6:.3f}", f"{m['params'] / ref['params']:.3f}",
                     f"{m['macs'] / 1e9:.3f}", f"{m['macs_ratio']:.3f}",
                     f"{m['fused_macs'] / 1e9:.3f}", f"{m['fused_macs_ratio']:.3f}",
                     str(m["folded"])])
    lines += _table(["model", "params M", "× BN", "GMACs", "× BN", "fused GMACs", "× BN",
                     "maps folded"], rows)
    backends = [b for b in BACKENDS if b in s["backends"]]
    index = {(r["model"], r["batch_size"], r["backend"]): r for r in result["latency"]}
    for batch in s["batch_sizes"]:
        lines += ["", f"Latency, batch {batch} (ms per forward):", ""]
        rows = [[name, *(c for b in backends for c in _cell(index.get((name, batch, b))))]
                for name in result["models"]]
        lines += _table(["model", *(c for b in backends for c in (f"{b} ms", "× BN", "min × BN"))],
                        rows)
    refs = {m["reference"] for m in result["models"].values()}
    paper = {n: v for n, v in result["paper_table1"].items() if n.split("_")[0] in refs}
    if paper:
        lines += ["", "The paper's Table 1 (batch 32; CPU: Xeon E5-2682 v4, GPU: GTX 1080 Ti):",
                  ""]
        rows = []
        for name, v in paper.items():
            ref = result["paper_table1"][name.split("_")[0]]
            rows.append([name, f"{v['gflops']:.2f}", f"{v['gflops'] / ref['gflops']:.3f}",
                         f"{v['cpu_s']:.2f}", f"{v['cpu_s'] / ref['cpu_s']:.2f}",
                         f"{v['gpu_s']:.3f}", f"{v['gpu_s'] / ref['gpu_s']:.2f}"])
        lines += _table(["model", "GFLOPs", "× BN", "CPU s", "× BN", "GPU s", "× BN"], rows)
    for key, prof in result.get("profile", {}).items():
        lines += ["", f"Profile, {key}: {prof['total_ms']:.1f} ms self CPU time per forward, "
                  f"convolutions {100 * prof['conv_share']:.1f} %:", ""]
        rows = [[o["op"], f"{o['calls']:g}", f"{o['ms']:.2f}", f"{100 * o['share']:.1f}"]
                for o in prof["ops"]]
        lines += _table(["operator", "calls", "ms", "%"], rows)
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``table1.md`` and ``table1.json`` into ``out_dir`` (created); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "table1.md", out / "table1.json"
    md.write_text(render_markdown(result), encoding="utf-8")
    js.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    return md, js
