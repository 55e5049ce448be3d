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
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

_PR_SET_NAME = 15
_TASKS = Path("/proc/self/task")
_state = threading.local()
_names = iter(range(1 << 30))
_names_lock = threading.Lock()
T = TypeVar("T")


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


class TeamThread:
    """A thread that runs one stage's batches on given cores; its OpenMP team ends with it.

    Why batches run here and not in the stage worker: libgomp keeps a thread pool per thread
    that ever ran a parallel region, never shrinks a pool below its largest team, and counts
    every pool thread. Once the pools in the process hold more threads than there are cores,
    its idle threads stop spinning between parallel regions (``throttled`` spin count, 100
    spins) and every small op pays a futex wake-up: measured on 2 cores, 16 us -> 110 us for
    three small ops once a second 2-thread pool exists. Ending the thread is the only way to
    free its pool, so the backend retires a team thread whose pool is larger than the cores
    its stage now has, when the pools would otherwise exceed the cores (``CpuBackend``).
    """

    def __init__(self, name: str, apply: Callable[[Sequence[int]], object] | None = None) -> None:
        self._apply = apply or apply_cores  # (tests pass a recorder)
        self.pool_size = 1  # the largest team it ran (its pool holds pool_size - 1 threads)
        self.busy = False
        self._queue: queue.SimpleQueue[tuple[tuple[int, ...], Callable[[], Any], _Box] | None]
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def run(self, cores: Sequence[int], fn: Callable[[], T]) -> T:
        """``fn()`` on this thread with ``cores`` (waits for it; its exception is re-raised)."""
        cores = tuple(sorted(cores))
        self.pool_size = max(self.pool_size, len(cores))
        box = _Box()
        self.busy = True
        try:
            self._queue.put((cores, fn, box))
            box.done.wait()
        finally:
            self.busy = False
        if box.error is not None:
            raise box.error
        return box.value

    def retire(self) -> None:
        """End the thread (and its OpenMP pool) after anything already queued."""
        self._queue.put(None)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for a retired thread to end. A thread (and its OpenMP pool) still being torn
        down while the process exits can abort it ("terminate called without an active
        exception"), so whoever retires threads for good waits for them."""
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            cores, fn, box = item
            try:
                self._apply(cores)
                box.value = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box.error = exc
            finally:
                box.done.set()


class _Box:
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.value: Any = None


def run_in_fresh_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a thread of its own that ends afterwards, with it any OpenMP pool ``fn``'s
    parallel ops started (model loading on a CPU: see ``TeamThread``)."""
    team = TeamThread("nova-init")
    try:
        return team.run(available_cores(), fn)
    finally:
        team.retire()
        team.join()
