"""Building and loading the native CPU kernels, one build per instruction set (ISA).

Each ISA's build compiles the C++ sources of this folder with a fixed ``-march`` (never
``-march=native``) into the extension ``cenet_kernels_<isa>``, whose ops are registered as
``torch.ops.cenet_kernels_<isa>``. :mod:`torch.utils.cpp_extension` caches the build in
``$TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions/<python>_<accelerator>/``) by
extension name and flags, so a cache copied to another machine holds code for the ISA its name
says, and is loaded there only if that machine's CPU runs it.

A failed build leaves a marker file in the build directory, keyed by the ISA, a hash of the
sources, the torch version and the tools found; later processes read the error from it
instead of building again, until one of these changes or ``CENET_KERNELS_REBUILD=1`` is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

_log = logging.getLogger("cenet.kernels")

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "block_ops.cpp", HERE / "ce_operator.cpp", HERE / "ce_step.cpp")
HEADERS = (HERE / "cenet_kernels.h",)

_X86_ISAS = {"avx512": "-march=x86-64-v4", "avx2": "-march=x86-64-v3", "generic": "-march=x86-64"}
_ARM_ISAS = {"generic": "-march=armv8-a"}
# What x86-64-v3 / -v4 code may use beyond what torch's capability check looks at, as
# /proc/cpuinfo names them (abm: LZCNT).
_X86_FLAGS = {
    "avx2": {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "xsave"},
    "avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}
_CAPABILITY_ISAS = {"AVX512": ("avx512", "avx2", "generic"), "AVX2": ("avx2", "generic")}
# How many lines of the compiler's output build_error keeps.
ERROR_LINES = 30
NO_COMPILER = "no C++ compiler found (looked for $CXX, c++, g++)"
NO_NINJA = "ninja not found (pip install ninja)"


def arch() -> str:
    """"x86_64", "aarch64" or the machine name platform reports (lower case)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def isa_flags() -> dict[str, str | None]:
    """ISA name -> its -march flag for this architecture, widest first. Other architectures
    than x86-64 and aarch64 have one, "generic", built without -march."""
    machine = arch()
    if machine == "x86_64":
        return dict(_X86_ISAS)
    if machine == "aarch64":
        return dict(_ARM_ISAS)
    return {"generic": None}


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def machine_isas(capability: str) -> tuple[str, ...]:
    """The ISAs this CPU runs, widest first, from torch's CPU capability ("AVX512", "AVX2",
    "DEFAULT", ...) and, where /proc/cpuinfo lists them, the CPU's flags."""
    flags = isa_flags()
    if arch() != "x86_64":
        return tuple(flags)
    isas = _CAPABILITY_ISAS.get(capability, ("generic",))
    cpu = _cpu_flags()
    if cpu is not None:  # every x86-64-v3 feature for avx2, and v4's on top for avx512
        ok = {"generic": True, "avx2": _X86_FLAGS["avx2"] <= cpu}
        ok["avx512"] = ok["avx2"] and _X86_FLAGS["avx512"] <= cpu
        isas = tuple(isa for isa in isas if ok[isa])
    return isas


def extension_name(isa: str) -> str:
    return f"cenet_kernels_{isa}"


def cflags(isa: str) -> list[str]:
    """The compiler flags of ``isa``'s build (besides cpp_extension's own)."""
    march = isa_flags()[isa]
    return ["-O3", *([march] if march else []), "-fno-math-errno", "-fopenmp",
            f"-DCENET_NS={extension_name(isa)}"]


def find_compiler() -> str | None:
    """The C++ compiler cpp_extension will run: $CXX, else c++, else g++ (None: none found)."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx.split()[0])
    return shutil.which("c++") or shutil.which("g++")


def find_ninja() -> str | None:
    """ninja on PATH, or the one the ninja package installed (a venv's bin/ that is not on
    PATH when its python is run directly)."""
    found = shutil.which("ninja")
    if found:
        return found
    candidates = [Path(sys.executable).parent / "ninja"]
    with contextlib.suppress(Exception):
        import ninja  # the PyPI package

        candidates.insert(0, Path(ninja.BIN_DIR) / "ninja")
    return next((str(p) for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def _build_root() -> Path:
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    return Path(cpp_extension.get_default_build_root())


def build_directory(isa: str) -> Path:
    """Where cpp_extension builds ``isa``'s extension (created if missing)."""
    from torch.utils import cpp_extension

    try:
        return Path(cpp_extension._get_build_directory(extension_name(isa), False))
    except Exception:  # noqa: BLE001 - a private helper: fall back to the documented root
        path = _build_root() / extension_name(isa)
        path.mkdir(parents=True, exist_ok=True)
        return path


def build_key(isa: str, compiler: str | None, ninja: str | None) -> str:
    """Hash of what a build's outcome depends on: the sources, flags, torch and the tools."""
    h = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for part in (isa, *cflags(isa), torch.__version__, str(compiler), str(ninja)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _marker(directory: Path, key: str) -> Path:
    return directory / f"cenet_build_failed-{key}.txt"


_NINJA_LINE = re.compile(r"^\[\d+/\d+\] ")


def compiler_error(message: str, compiler: str | None) -> str:
    """The last ERROR_LINES lines of the compiler's own output in a cpp_extension build error
    (ninja's progress lines, the command lines and its closing line left out)."""
    text = message.split(": ", 1)[1] if message.startswith("Error building extension") else message
    names = {"c++", "g++", "gcc", "cc", "clang++", "clang"}
    if compiler:
        names |= {compiler, os.path.basename(compiler)}
    kept = []
    for line in text.splitlines():
        stripped = line.strip()
        first = stripped.split(" ", 1)[0]
        if (not stripped or _NINJA_LINE.match(stripped) or stripped.startswith("FAILED:")
                or stripped.startswith("ninja: ") or first in names
                or os.path.basename(first) in names):
            continue
        kept.append(line.rstrip())
    if not kept:
        kept = [line.rstrip() for line in text.strip().splitlines()]
    return "\n".join(kept[-ERROR_LINES:])


@contextlib.contextmanager
def _quiet_cpp_extension() -> Iterator[None]:
    """cpp_extension logs a CUDA warning when imported on a machine without CUDA (and ABI
    notes when it builds): up to errors only, while this block runs."""
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ext_log.setLevel(level)


@contextlib.contextmanager
def _tool_environment(compiler: str, ninja: str) -> Iterator[None]:
    """PATH with ninja's folder, and CXX set when only g++ was found (cpp_extension runs c++)."""
    saved = {k: os.environ.get(k) for k in ("PATH", "CXX")}
    path = os.environ.get("PATH", "")
    ninja_dir = os.path.dirname(ninja)
    if ninja_dir not in path.split(os.pathsep):
        os.environ["PATH"] = ninja_dir + (os.pathsep + path if path else "")
    if not os.environ.get("CXX") and not shutil.which("c++"):
        os.environ["CXX"] = compiler
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _up_to_date(directory: Path, isa: str) -> bool:
    """The extension's library exists and is newer than every source (a load, not a build)."""
    lib = directory / f"{extension_name(isa)}.so"
    try:
        built = lib.stat().st_mtime
        return all(p.stat().st_mtime <= built for p in (*SOURCES, *HEADERS))
    except OSError:
        return False


def _warn_failure(isa: str, cause: str, earlier: bool) -> None:
    march = isa_flags()[isa] or "no -march"
    when = "failed to build in an earlier run" if earlier else "could not be built"
    detail = cause if cause in (NO_COMPILER, NO_NINJA) else f"the compiler reported:\n{cause}"
    warnings.warn(
        f"cenet: the CPU kernels for {isa} ({march}) {when}: {detail}\n"
        "The CE block uses its slower pure-PyTorch path instead. "
        + ("The build is not retried until the sources or torch change; set "
           "CENET_KERNELS_REBUILD=1 to retry (CENET_KERNELS=0 turns the kernels off)."),
        RuntimeWarning,
        stacklevel=5,
    )


def build(isa: str) -> str | None:
    """Build (or load from the cache) and load ``isa``'s kernels into this process.

    Returns:
        None on success, else the cause of the failure (the compiler's error text); a
        RuntimeWarning has then been issued.
    """
    compiler, ninja = find_compiler(), find_ninja()
    with _quiet_cpp_extension():
        directory = build_directory(isa)
    key = build_key(isa, compiler, ninja)
    marker = _marker(directory, key)
    if os.environ.get("CENET_KERNELS_REBUILD", "0") not in ("", "0"):
        marker.unlink(missing_ok=True)
    elif marker.is_file():
        cause = marker.read_text(encoding="utf-8", errors="replace").strip() or "unknown error"
        _warn_failure(isa, cause, earlier=True)
        return cause
    cause = None
    if compiler is None:
        cause = NO_COMPILER
    elif ninja is None:
        cause = NO_NINJA
    else:
        cause = _compile_and_load(isa, directory, compiler, ninja)
    if cause is None:
        for stale in directory.glob("cenet_build_failed-*.txt"):
            stale.unlink(missing_ok=True)
        return None
    with contextlib.suppress(OSError):
        marker.write_text(cause + "\n", encoding="utf-8")
    _warn_failure(isa, cause, earlier=False)
    return cause


def _compile_and_load(isa: str, directory: Path, compiler: str, ninja: str) -> str | None:
    name = extension_name(isa)
    if not _up_to_date(directory, isa):
        _log.info("building cenet's CPU kernels for %s (%s), once per machine, ~30-60 s", isa,
                  isa_flags()[isa] or "no -march")
    start = time.perf_counter()
    try:
        with _quiet_cpp_extension(), _tool_environment(compiler, ninja):
            from torch.utils import cpp_extension

            cpp_extension.load(
                name=name,
                sources=[str(p) for p in SOURCES],
                extra_cflags=cflags(isa),
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
    except Exception as err:  # noqa: BLE001 - any failure: the reference path takes over
        text = str(err).strip() or repr(err)
        return compiler_error(text, compiler) if "Error building extension" in text else (
            f"{type(err).__name__}: " + "\n".join(text.splitlines()[-ERROR_LINES:]))
    _log.debug("cenet's CPU kernels for %s ready in %.1f s", isa, time.perf_counter() - start)
    return None
