"""Keep freed tensor memory in the process (glibc ``mallopt``), so large activations are reused
instead of being mapped, page-faulted and zeroed anew at every step.

On a 2-core VM a training step of a CIFAR network can spend a large part of its time in page
faults of freshly ``mmap``-ed activations; serving every allocation from the heap and never
trimming it cut a training step of ``cifar_vgg11_ce`` at width 0.5 from 515 ms to 374 ms
(docs/benchmarks.md, "Two speed settings of the main configuration").
The same effect is had without code with the environment variables ``MALLOC_MMAP_MAX_=0``
and ``MALLOC_TRIM_THRESHOLD_=2147483647``. The price is that the process keeps its peak
memory until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
#: glibc's largest mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``): 32 MiB
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024


def keep_freed_memory(*, top_pad: int = 512 * 1024 * 1024) -> bool:
    """Tune glibc malloc so that freed blocks stay in the heap for reuse: no allocation is
    served by ``mmap`` (M_MMAP_MAX = 0, also for blocks over the 32 MiB threshold maximum) and
    the heap is never trimmed.

    Returns:
        True if glibc accepted the settings; False where there is no glibc (macOS, musl,
        Windows) or it refused, in which case nothing changed.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD),
            (_M_MMAP_MAX, 0),
            (_M_TRIM_THRESHOLD, 2**31 - 1),
            (_M_TOP_PAD, top_pad),
        )
    )
    logger.debug("glibc mallopt tuning %s", "applied" if ok else "refused")
    return ok
