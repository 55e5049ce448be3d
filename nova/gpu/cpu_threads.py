"""Running the calling thread's PyTorch work on a set of cores (Linux).

What a CPU partition changes for a stage worker thread, at a batch boundary:

- its intra-op thread count (``torch.set_num_threads``). With the OpenMP backend (PyTorch's
  Linux wheels) the count is per calling thread: each worker thread that runs a parallel op
  owns its own OpenMP team, sized by that thread's setting (checked by
  ``tests/test_cpu_partition.py``, which reads ``torch.get_num_threads()`` in three threads);
- its CPU affinity (``os.sched_setaffinity(0, ...)``, the calling thread only), and that of the
  OpenMP threads its team already started. Those inherit the worker's OS thread name, which
  this module sets to a name of its own per worker (``prctl(PR_SET_NAME)``), so they are found
  by name in ``/proc/self/task``. Threads started later inherit the worker's affinity.

Nothing is changed when the cores stay the same. On a platform without ``sched_setaffinity``
only the thread count is set.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_NAME = 15
_TASKS = Path("/proc/self/task")
_state = threading.local()
_names = iter(range(1 << 30))
_names_lock = threading.Lock()


def available_cores() -> tuple[int, ...]:
    """The cores this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def _set_os_thread_name(name: str) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _thread_name() -> str | None:
    """This thread's OS name for finding its OpenMP threads (set once per thread)."""
    name = getattr(_state, "name", "unset")
    if name == "unset":
        with _names_lock:
            n = next(_names)
        name = f"nova-omp-{n}"
        _state.name = name if _set_os_thread_name(name) else None
    return _state.name


def team_thread_ids(name: str, own_tid: int) -> list[int]:
    """Thread ids in this process named ``name`` other than ``own_tid`` (the OpenMP threads a
    worker started inherit its name)."""
    out: list[int] = []
    try:
        entries = list(_TASKS.iterdir())
    except OSError:
        return out
    for entry in entries:
        try:
            tid = int(entry.name)
            if tid != own_tid and (entry / "comm").read_text().strip() == name:
                out.append(tid)
        except (OSError, ValueError):
            continue
    return out


def current_cores() -> tuple[int, ...] | None:
    """The cores last applied in this thread (None: never)."""
    return getattr(_state, "cores", None)


def apply_cores(cores: Sequence[int]) -> bool:
    """Run this thread's PyTorch work on ``cores`` with ``len(cores)`` intra-op threads;
    False if nothing changed."""
    import torch

    cores = tuple(sorted(cores))
    if not cores:
        raise ValueError("apply_cores needs at least one core")
    if current_cores() == cores:
        return False
    torch.get_num_threads()  # PyTorch sets a thread's count lazily on first use: do it first
    if torch.get_num_threads() != len(cores):
        torch.set_num_threads(len(cores))
    if hasattr(os, "sched_setaffinity"):
        name = _thread_name()
        os.sched_setaffinity(0, cores)
        if name is not None:
            for tid in team_thread_ids(name, threading.get_native_id()):
                with contextlib.suppress(OSError):  # the thread may have exited meanwhile
                    os.sched_setaffinity(tid, cores)
    _state.cores = cores
    return True


@contextmanager
def cores_for_block(cores: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Run the enclosed work of this thread on ``cores``; restore the previous affinity and
    thread count afterwards (for measurements: ``nova profile`` on a share of the cores)."""
    import torch

    before_threads = torch.get_num_threads()
    before_cores = current_cores()
    before_mask = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ()
    apply_cores(cores)
    try:
        yield tuple(sorted(cores))
    finally:
        restore = before_cores or before_mask
        if restore:
            apply_cores(restore)
        torch.set_num_threads(before_threads)
        _state.cores = before_cores
