"""The CE block's native CPU kernels, built once per machine and instruction set (ISA).

The CE block's heavy steps multiply many small channel-group matrices (g × g, g ≤ 64) with long
feature rows (H·W positions), where PyTorch's batched GEMMs reach a fraction of the CPU's
speed. C++ loops do them instead (``block_ops.cpp``; the training operator ``ce_operator.cpp``
and the whole training step ``ce_step.cpp``), compiled with :mod:`torch.utils.cpp_extension`
(a C++ compiler and ninja; about 30-60 s per ISA, once per machine, cached in
``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).

ISAs: on x86-64 ``"generic"`` (``-march=x86-64``, SSE2), ``"avx2"`` (``-march=x86-64-v3``)
and ``"avx512"`` (``-march=x86-64-v4``); on aarch64 ``"generic"`` (``-march=armv8-a``, NEON).
Each build registers its ops as ``torch.ops.cenet_kernels_<isa>``, so several load side by side
(the tests run every path). The layers use the widest ISA the CPU runs (:func:`default_isa`);
when the build fails, a RuntimeWarning says why and the CE block takes its pure-PyTorch path.

Ops of a build (:func:`ops`; float32/float64 CPU tensors of one dtype, NCHW-contiguous):

- ``ce_step(Tensor x, int group_size, Tensor theta, Tensor fc1, Tensor ln_w, Tensor ln_b,
  Tensor fc2, float eps_bd, float eps_ir, float ln_eps, int num_iters) -> Tensor[]``: the
  ``"ce"``-mode training step (see ``ce_step.cpp``), returning Y and what its backward needs;
- ``ce_step_backward(Tensor grad, Tensor x, Tensor fc1, Tensor ln_w, Tensor fc2,
  Tensor[] saved) -> Tensor[]``: dX, dθ, dfc1, dln_w, dln_b, dfc2;
- ``ce_eval(Tensor x, Tensor w, Tensor fc1, Tensor ln_w, Tensor ln_b, float ln_eps,
  Tensor fc2, Tensor scale, int group_size, Tensor(a!) out) -> ()``: the eval block;
- ``stream_threshold(int bytes) -> int`` (:func:`stream_threshold`).

Environment: ``CENET_KERNELS=0`` turns the kernels off (nothing is built);
``CENET_CPU_ISA=generic|avx2|avx512`` picks the ISA; ``CENET_KERNELS_REBUILD=1`` retries a
build that failed in an earlier process (failures are remembered until the sources change).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import threading
from collections.abc import Iterator
from typing import Any

import torch

from cenet.kernels import _build

__all__ = ["active_isa", "build_error", "cpu_capability", "default_isa", "info",
           "is_available", "ops", "stream_threshold", "supported_isas", "use_isa"]

_lock = threading.RLock()
_results: dict[str, str | None] = {}  # ISA -> None (loaded) or why its build failed
_UNSET = object()
_forced: Any = _UNSET  # inside use_isa: the ISA name, or None (kernels off)


def cpu_capability() -> str:
    """The CPU capability torch dispatches its own kernels for: "AVX512", "AVX2", "DEFAULT",
    ... (:func:`torch.backends.cpu.get_cpu_capability`; ``ATEN_CPU_CAPABILITY`` lowers it)."""
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """The ISAs this CPU runs, widest first: on x86-64 ("avx512", "avx2", "generic") as
    :func:`cpu_capability` and the CPU's flags allow ("avx512" only with capability "AVX512");
    on aarch64 and others ("generic",)."""
    return _build.machine_isas(cpu_capability())


def _valid_isas() -> tuple[str, ...]:
    return tuple(_build.isa_flags())


def _check_isa(isa: str, what: str) -> str:
    """``isa`` if this CPU runs it; ValueError naming the choices otherwise."""
    valid, supported = _valid_isas(), supported_isas()
    if isa not in valid:
        raise ValueError(f"{what}: unknown instruction set {isa!r}; the CE kernels build "
                         f"{', '.join(valid)} on {_build.arch()}")
    if isa not in supported:
        raise ValueError(f"{what}: this CPU (torch capability {cpu_capability()}) does not run "
                         f"{isa!r}; it supports {', '.join(supported)}")
    return isa


def default_isa() -> str:
    """The ISA the layers use: ``CENET_CPU_ISA`` if set, else the widest this CPU runs.

    Raises:
        ValueError: if ``CENET_CPU_ISA`` names no ISA of this architecture, or one this CPU
            does not run (the message lists the valid and the supported choices).
    """
    env = os.environ.get("CENET_CPU_ISA", "").strip()
    if not env:
        return supported_isas()[0]
    return _check_isa(env.lower(), f"CENET_CPU_ISA={env}")


def _enabled() -> bool:
    return os.environ.get("CENET_KERNELS", "1").strip() != "0"


def _load(isa: str) -> bool:
    """Build (once per process; cpp_extension caches it on disk) and load ``isa``'s kernels."""
    with _lock:
        if isa not in _results:
            _results[isa] = _build.build(isa)
        return _results[isa] is None


def _selected() -> str | None:
    """The ISA the layers would use now, before any build: None when turned off."""
    if not _enabled():
        return None
    if _forced is not _UNSET:
        return _forced
    return default_isa()


def is_available(isa: str | None = None) -> bool:
    """True if the kernels of ``isa`` (default: the ISA the layers would use, see
    :func:`use_isa` and :func:`default_isa`) are built and loaded, building them on the first
    call in a process. False when ``CENET_KERNELS=0``, inside ``use_isa(None)`` (for the
    default), for an ISA this CPU does not run, or when the build failed (never raises for
    that: :func:`build_error` says why).

    Raises:
        ValueError: for an unknown ISA name, or an invalid ``CENET_CPU_ISA``.
    """
    if isa is None:
        isa = _selected()
        return isa is not None and _load(isa)
    if isa not in _valid_isas():
        _check_isa(isa, "is_available")
    return _enabled() and isa in supported_isas() and _load(isa)


def active_isa() -> str | None:
    """The ISA whose kernels the layers use now (building them on the first call), or None:
    kernels off (``CENET_KERNELS=0``, ``use_isa(None)``) or their build failed.

    Raises:
        ValueError: for an invalid ``CENET_CPU_ISA``.
    """
    isa = _selected()
    return isa if isa is not None and _load(isa) else None


@contextlib.contextmanager
def use_isa(isa: str | None) -> Iterator[None]:
    """Within the block, :func:`ops`, :func:`active_isa` and :func:`is_available` refer to
    ``isa``; None turns the kernels off (the layers take the pure-PyTorch path). For tests and
    benchmarks; process-wide (not per thread); blocks nest.

    Raises:
        ValueError: if this CPU does not run ``isa`` or no such ISA exists.
    """
    global _forced
    if isa is not None:
        _check_isa(isa, "use_isa")
    previous, _forced = _forced, isa
    try:
        yield
    finally:
        _forced = previous


def _why_not(isa: str | None) -> str:
    if not _enabled():
        return "the kernels are turned off (CENET_KERNELS=0)"
    if isa is None:
        return "the kernels are turned off (inside cenet.kernels.use_isa(None))"
    if isa not in supported_isas():
        return f"this CPU does not run {isa!r}"
    return f"their build for {isa} failed:\n{_results.get(isa)}"


def ops(isa: str | None = None) -> Any:
    """The ops of ``isa``'s build (default: the active ISA), ``torch.ops.cenet_kernels_<isa>``:
    ``ce_step``, ``ce_step_backward``, ``ce_eval``, ``stream_threshold``.

    Raises:
        RuntimeError: if those kernels are not available (turned off, or the build failed).
        ValueError: for an unknown ISA name, or an invalid ``CENET_CPU_ISA``.
    """
    name = active_isa() if isa is None else isa
    if name is None or not is_available(name):
        raise RuntimeError("cenet's CPU kernels are not available: "
                           + _why_not(_selected() if isa is None else isa))
    return getattr(torch.ops, _build.extension_name(name))


def build_error(isa: str | None = None) -> str | None:
    """Why the build of ``isa`` (default: the ISA the layers would use) failed: the tail of the
    compiler's output (its last 30 lines), or a sentence such as "no C++ compiler found";
    None if it succeeded or was not attempted (``CENET_KERNELS=0``). Attempts the build if
    this process has not yet.

    Raises:
        ValueError: for an unknown ISA name, or an invalid ``CENET_CPU_ISA``.
    """
    if isa is None:
        isa = _forced if _forced not in (_UNSET, None) else default_isa()
    elif isa not in _valid_isas():
        _check_isa(isa, "build_error")
    if not _enabled() or isa not in supported_isas():
        return None
    _load(isa)
    return _results.get(isa)


def stream_threshold(nbytes: int | None = None) -> int:
    """The output size in bytes from which the active ISA's kernels write their output with
    non-temporal stores (bypassing the caches, for outputs that would evict their own inputs):
    by default half the last-level cache the machine reports, at least 12 MiB. Each ISA's
    build keeps its own threshold.

    Args:
        nbytes: a new threshold (0: every output), or None to leave it.

    Returns:
        The threshold before the call.

    Raises:
        RuntimeError: if the kernels are not available (see :func:`ops`).
        ValueError: if ``nbytes`` is negative.
    """
    if nbytes is not None and nbytes < 0:
        raise ValueError(f"nbytes must be >= 0 (or None to read the threshold), got {nbytes}")
    return int(ops().stream_threshold(-1 if nbytes is None else nbytes))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cenet_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("cenet")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _cuda_devices() -> list[str]:
    try:
        if not torch.cuda.is_available():
            return []
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a broken driver: report no devices
        return []


def info() -> dict[str, Any]:
    """What the kernels run on, for bug reports (``cenet info``); builds the kernels if this
    process has not yet. Never raises for a failed build or an invalid ``CENET_CPU_ISA``.

    Returns:
        A dict, in display order: ``torch``, ``cenet`` (versions), ``python``, ``machine``
        (platform.machine()), ``cpu`` (model name), ``cpu_capability``, ``supported_isas``
        (tuple), ``active_isa`` (str or None), ``kernels_active`` (bool), ``kernels_note``
        (why they are off, or None), ``build_error`` (str or None), ``torch_threads`` (int),
        ``cuda_devices`` (list of names).
    """
    note = error = active = None
    try:
        active = active_isa()
        if active is None:
            selected = _selected()
            note = _why_not(selected).split(":\n", 1)[0]
            if selected is not None:
                error = _results.get(selected)
    except ValueError as err:
        note = str(err)
    return {
        "torch": torch.__version__,
        "cenet": _cenet_version(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_capability": cpu_capability(),
        "supported_isas": supported_isas(),
        "active_isa": active,
        "kernels_active": active is not None,
        "kernels_note": note,
        "build_error": error,
        "torch_threads": torch.get_num_threads(),
        "cuda_devices": _cuda_devices(),
    }
