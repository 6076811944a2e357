"""``cenet bench``: the CE paper's Table 1 (parameters, GFLOPs, CPU and GPU inference time of
BN, SE and CE networks) measured on this machine, with GCT beside them and four ways of running
each network in eval: eager, ``torch.compile``, fused (:func:`cenet.deploy.fuse`) and ONNX
Runtime.

Every latency is a ratio to the BN network of the same architecture run the same way
(fused CE over fused BN, ONNX Runtime CE over ONNX Runtime BN, ...). How it measures:

- the networks are fresh (random weights) with their running statistics calibrated by one
  training-mode forward of random images with momentum 1 (:func:`calibrate`), so that eval
  activations have the scale trained ones have rather than growing with depth;
- for each backend in turn, an architecture's networks take turns within every round (every
  other round in reverse order), so that a change of load on a shared machine hits them
  alike; each runner is called once when built (compilation, ONNX Runtime's first run), then
  ``warmup`` untimed rounds, then ``repeats`` timed rounds; the latency is the median,
  "paired" the median of the per-round ratios;
- eval runs under ``torch.inference_mode()``, where the CE block uses its native eval operator
  ``cenet::ce_eval`` on the CPU (:func:`cenet.kernels.active_isa`);
- multiply-adds: one 1×3×S×S image under ``torch.utils.flop_counter.FlopCounterMode``,
  MACs = FLOPs / 2, with the kernels as they run (``cenet::ce_eval``'s registered formula counts
  what the reference path's ``bmm``/``mm`` count: C·g per position and the gate's two layers).

The result is a JSON-able dict (:func:`run_bench`); :mod:`cenet.deploy.bench_report` renders it
as Markdown and writes ``table1.md``/``table1.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import cenet
from cenet.deploy.bench_backends import (
    BACKENDS,
    build_runners,
    export_fused,
    ort_session,
    ort_skip_reason,
)
from cenet.deploy.bench_models import (
    ARCHITECTURES,
    PAPER_TABLE1,
    VARIANTS,
    calibrate,
    count_macs,
    count_params,
    parse_backends,
    parse_batch_sizes,
    reference_of,
    select_models,
)
from cenet.deploy.bench_report import load_average
from cenet.train.allocator import keep_freed_memory

log = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES", "BACKENDS", "BenchConfig", "PAPER_TABLE1", "VARIANTS", "calibrate",
    "count_macs", "count_params", "parse_backends", "parse_batch_sizes", "reference_of",
    "run_bench", "select_models", "time_rounds",
]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What :func:`run_bench` measures (the options of ``cenet bench``).

    Attributes:
        models: registered names or glob patterns; None: every variant of
            :data:`ARCHITECTURES` that is registered.
        batch_sizes: batch sizes to time (each a separate table).
        backends: a subset of :data:`BACKENDS`, in order.
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch (and ONNX Runtime intra-op) threads; None: torch's current number.
        repeats, warmup: timed and untimed rounds.
        image_size: input height and width.
        channels_last: run the torch backends on channels-last maps.
        calibrate: fill the running statistics first (:func:`calibrate`).
        reuse_memory: keep freed memory in the process for reuse
            (:func:`cenet.train.allocator.keep_freed_memory`, process-wide and for good), so
            large activations are not page-faulted anew in every forward.
        profile: top operators to list per network from ``torch.profiler`` (0: no profile).
        command: the command line, for the header.
    """

    models: tuple[str, ...] | None = None
    batch_sizes: tuple[int, ...] = (1, 32)
    backends: tuple[str, ...] = BACKENDS
    device: str = "cpu"
    threads: int | None = None
    repeats: int = 7
    warmup: int = 2
    image_size: int = 224
    channels_last: bool = True
    calibrate: bool = True
    reuse_memory: bool = True
    profile: int = 0
    command: str = ""


def _device_check(device: str) -> torch.device:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda: CUDA is not available here (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); "
            "run on a machine with an NVIDIA GPU or use --device cpu"
        )
    return torch.device(device)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_rounds(runners: dict[Any, Callable[[], Any]], *, warmup: int, repeats: int,
                sync: Callable[[], None] = lambda: None,
                loads: list[float] | None = None) -> dict[Any, list[float]]:
    """Seconds of each runner's call in each of ``repeats`` timed rounds after ``warmup``
    untimed ones; the runners take turns within a round, every other round in reverse.
    ``loads``, if given, receives the 1-minute load average after each timed round."""
    keys = list(runners)
    times: dict[Any, list[float]] = {k: [] for k in keys}
    for r in range(warmup + repeats):
        for key in keys if r % 2 else keys[::-1]:
            start = time.perf_counter()
            runners[key]()
            sync()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[key].append(elapsed)
        if loads is not None and r >= warmup and (avg := load_average()):
            loads.append(avg[0])
    return times


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ValueError(f"--threads must be at least 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Measure ``config`` and return the result (see :mod:`cenet.deploy.bench_report` for its
    layout and rendering).

    Raises:
        ValueError: for an unknown model, an unusable device, bad settings.
    """
    from cenet.deploy.bench_report import machine_header

    device = _device_check(config.device)
    if config.repeats < 1 or config.warmup < 0 or config.image_size < 8:
        raise ValueError("--repeats must be >= 1, --warmup >= 0 and --image-size >= 8")
    groups, notes = select_models(config.models)
    if config.reuse_memory and not keep_freed_memory():
        notes.append("freed memory could not be kept for reuse (no glibc mallopt)")
    backends = list(config.backends)
    if "onnx" in backends and (reason := ort_skip_reason(device)):
        backends.remove("onnx")
        notes.append(f"onnx: skipped ({reason})")
    import torch._dynamo

    with _threads(config.threads) as threads, \
            torch._dynamo.config.patch(recompile_limit=64):
        header = {**machine_header(device, threads, config.command), "round_loads": []}
        result: dict[str, Any] = {
            "header": header,
            "settings": {**dataclasses.asdict(config), "threads": threads,
                         "backends": backends},
            "notes": notes, "models": {}, "latency": [], "profile": {},
            "paper_table1": PAPER_TABLE1,
        }
        with tempfile.TemporaryDirectory(prefix="cenet-bench-") as tmp:
            for ref, members in groups.items():
                _run_group(config, device, threads, ref, members, backends, Path(tmp), result)
        result["header"]["load_average_after"] = load_average()
    return result


def _run_group(config: BenchConfig, device: torch.device, threads: int, ref: str,
               members: list[str], backends: list[str], tmp: Path,
               result: dict[str, Any]) -> None:
    """Build, count and time one architecture's networks (``ref`` first)."""
    from cenet.deploy import fuse

    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    models, fused, sessions = {}, {}, {}
    for name in members:
        log.info("%s: building%s", name, ", calibrating" if config.calibrate else "")
        torch.manual_seed(0)
        model = cenet.create_model(name).to(device)
        if config.calibrate:
            calibrate(model, config.image_size, device=device)
        model.eval()
        fused[name] = fuse(model)
        entry = {"reference": ref, "params": count_params(model),
                 "fused_params": count_params(fused[name]),
                 "macs": count_macs(model, config.image_size, device),
                 "fused_macs": count_macs(fused[name], config.image_size, device),
                 "folded": len(fused[name].folded)}
        result["models"][name] = entry
        if "onnx" in backends:
            log.info("%s: exporting the fused network to ONNX", name)
            try:
                path = export_fused(fused[name], tmp / f"{name}.onnx", config.image_size)
                sessions[name] = ort_session(path, threads=threads, device=device)
            except Exception as err:  # noqa: BLE001 - noted, the other backends go on
                log.warning("%s: ONNX export failed (%s)", name, err)
                result["notes"].append(f"{name} onnx: export failed ({type(err).__name__}: "
                                       f"{str(err).strip().splitlines()[0] if str(err) else ''})")
        models[name] = model.to(memory_format=fmt)
        fused[name] = fused[name].to(memory_format=fmt)
    base = result["models"][ref]
    for name in members:
        entry = result["models"][name]
        entry["macs_ratio"] = entry["macs"] / base["macs"]
        entry["fused_macs_ratio"] = entry["fused_macs"] / base["fused_macs"]
        entry["fused_macs_ratio_to_eval"] = entry["fused_macs"] / base["macs"]

    for batch in config.batch_sizes:
        gen = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 3, config.image_size, config.image_size, generator=gen)
        x = x.to(device).contiguous(memory_format=fmt)
        with torch.inference_mode():
            runners, skipped = build_runners(members, backends, models, fused, sessions, x)
            for (name, backend), why in skipped.items():
                result["notes"].append(f"{name} {backend} batch {batch}: skipped ({why})")
            log.info("%s group, batch %d: %d runners, %d + %d rounds", ref, batch,
                     len(runners), config.warmup, config.repeats)
            times = {}
            for backend in backends:  # one backend at a time: no thread pool meets another
                times.update(time_rounds(
                    {k: fn for k, fn in runners.items() if k[1] == backend},
                    warmup=config.warmup, repeats=config.repeats, sync=_sync(device),
                    loads=result["header"]["round_loads"]))
            if config.profile:
                from cenet.deploy.bench_report import profile_ops

                for (name, backend), fn in runners.items():
                    if backend in ("eager", "fused"):
                        result["profile"][f"{name} {backend} batch {batch}"] = profile_ops(
                            fn, top=config.profile, device=device)
        for (name, backend), runs in times.items():
            ref_runs = times.get((ref, backend))
            row = {"model": name, "reference": ref, "batch_size": batch, "backend": backend,
                   "median_s": statistics.median(runs), "min_s": min(runs), "runs_s": runs,
                   "ratio": None, "min_ratio": None, "paired_ratio": None}
            if ref_runs:
                row["ratio"] = row["median_s"] / statistics.median(ref_runs)
                row["min_ratio"] = row["min_s"] / min(ref_runs)
                row["paired_ratio"] = statistics.median(
                    t / t0 for t, t0 in zip(runs, ref_runs, strict=True))
            result["latency"].append(row)
        del runners
        torch._dynamo.reset()
    del models, fused, sessions
    gc.collect()
