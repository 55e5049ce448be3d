"""The host allocator on a CPU device: keep freed activation memory instead of unmapping it.

glibc serves allocations above its mmap threshold (128 KiB, raised adaptively up to 32 MiB) with
fresh ``mmap`` s and returns heap tops above its trim threshold to the OS, so a forward's large
temporaries (a prefill's ``[tokens, intermediate]`` activations: megabytes per op) are page-
faulted in again on every forward. Measured with ``benchmarks/cpu_hotpath.py`` (bf16, 64 x 100-
token prompts, 2 threads, real-time priority so other jobs did not interfere; two runs each,
interleaved): prefill 3.18-3.71 s -> 2.20-2.22 s, decode step 57.7-59.9 ms -> 54.8-55.8 ms with
the thresholds below. vLLM-CPU recommends preloading tcmalloc for the same reason.

``keep_freed_host_memory()`` raises glibc's mmap and trim thresholds for the process (the
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables do the same at
start-up). Freed memory stays with the process, up to its peak use. ``NOVA_KEEP_MALLOC=1``
leaves the allocator alone. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 1 << 30  # allocations below this come from the heap (an int: < 2 GiB)
TRIM_THRESHOLD_BYTES = 1 << 30  # heap tops below this stay mapped
TOP_PAD_BYTES = 64 << 20  # heap grows in steps of this much beyond the request

_done = False


def keep_freed_host_memory() -> bool:
    """Tune glibc's malloc for repeated large temporaries (once per process); True if set."""
    global _done
    if _done or os.environ.get("NOVA_KEEP_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (_M_TOP_PAD, TOP_PAD_BYTES),
        )
    )
    _done = ok
    if ok:
        log.info("host allocator: freed activation memory is kept (glibc mallopt)")
    return ok
