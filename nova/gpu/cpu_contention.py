"""How many of its cores Nova should run threads on while other processes compete for them.

Why: an OpenMP team of ``n`` threads meets at a barrier after every parallel region, and
libgomp's idle threads spin there before sleeping. On cores that other processes also want, the
OS deschedules one team thread while its partners spin for it, and every region waits for the
slowest. Measured here (``benchmarks/results/cpu_contention.md``): on the 2-core machine with a
busy process on each core, one intra-op thread decodes faster than two, spinning or passive
(``docs/cpu.md``, "Contention"). On a quiet machine the two threads win, so the count has to
follow the load.

What is measured: the share of its batches' wall time that a batch's team thread spent on a
core (``time.thread_time`` over wall time, per batch, only for batches that ran with no other
stage of this process beside them). A thread that only runs is descheduled when, and only when,
something the OS ranks at least as high wants its core. The CPU other processes merely *use*
is not the signal: an idle-priority or ``nice``d job fills the cycles Nova leaves free and
yields them back at once, and counting it (as this module did before, from ``/proc/stat``)
made Nova give a core away to it, which that job then filled, which kept Nova on one core.

``next_usable`` turns the share into a core count: fewer when the share falls below
``1 - 0.5 / (usable + 1)`` (halfway between an uncontended team, share 1, and one competing
with one other busy thread, ``usable / (usable + 1)``); back up by probing: after a sample at
the reduced count that shows no descheduling, the next batches run on one core more, and if
that sample shows contention again the wait before the next probe doubles (to at most
``MAX_PROBE_WAIT`` samples), so a persistent competitor costs one contended sample per probe
and probes grow rare. A count found before an idle spell (no batch for ``IDLE_REPROBE_S``) is
stale, since the competitor may have gone (a benchmark client that was starting up, say): the
first batch after it probes all cores, and the probe's sample decides as any probe does.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

# Samples at the reduced count to wait before the next probe, at most (each sample is at least
# ``interval_s``): a persistent competitor costs one contended sample per this many.
MAX_PROBE_WAIT = 32
# A sample's share is judged only over at least this much batch wall time (seconds): one short
# batch's ratio is mostly timer and scheduling noise.
MIN_SAMPLE_WALL_S = 0.2
# No batch for this long (seconds): the reduced count is stale, and the next batch probes all
# cores. The first wave of a served benchmark otherwise sometimes ran its whole first prefill
# on one core, on a count judged while the benchmark's client was starting up (scratch traces;
# docs/cpu.md, "A wave of requests").
IDLE_REPROBE_S = 2.0


def contended_below(usable: int) -> float:
    """The on-core share under which ``usable`` threads count as contended: halfway between
    1 (alone) and ``usable / (usable + 1)`` (one more busy thread than cores)."""
    return 1.0 - 0.5 / (usable + 1)


@dataclass(slots=True, frozen=True)
class ProbeState:
    """The count, and the probing schedule: ``wait`` samples to go before the next probe,
    ``backoff`` the wait after a failed one, ``probing`` whether the count was just raised."""

    usable: int
    wait: int = 0
    backoff: int = 1
    probing: bool = False


def next_usable(total: int, state: ProbeState, share: float) -> ProbeState:
    """The next state after a sample whose batches were on a core ``share`` of their wall
    time (0..1) at ``state.usable`` cores of ``total``."""
    usable = min(max(state.usable, 1), total)
    if share < contended_below(usable):
        if usable == 1:
            return ProbeState(1, state.wait, state.backoff, False)
        # about the cores' worth the team really had, at least one fewer
        fewer = max(1, min(usable - 1, math.floor(usable * share + 0.5)))
        backoff = min(MAX_PROBE_WAIT, 2 * state.backoff) if state.probing else state.backoff
        return ProbeState(fewer, backoff, backoff, False)
    if usable < total:
        if state.wait > 0:
            return ProbeState(usable, state.wait - 1, state.backoff, False)
        return ProbeState(usable + 1, 0, state.backoff, True)
    # all cores, uncontended: a probe that holds resets the backoff
    return ProbeState(usable, 0, 1 if state.probing else state.backoff, False)


class ContentionMonitor:
    """The usable core count, re-judged at most once per ``interval_s`` (thread-safe).

    Batches report their wall and team-thread CPU time (``record``); ``current`` judges the
    batches recorded since the last judgement once ``interval_s`` has passed and they span at
    least ``MIN_SAMPLE_WALL_S`` of wall time. ``clock`` is for tests."""

    def __init__(
        self,
        num_cores: int,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if num_cores < 1:
            raise ValueError(f"num_cores must be >= 1, got {num_cores}")
        self.total = num_cores
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = ProbeState(num_cores)
        self._next_s = 0.0
        self._wall_s = 0.0
        self._cpu_s = 0.0
        self._last_record_s = clock()
        self.share = 1.0  # the last judged sample's on-core share
        self.num_changes = 0

    @property
    def usable(self) -> int:
        return self._state.usable

    def record(self, wall_s: float, cpu_s: float) -> None:
        """A batch that ran alone: ``wall_s`` long, its team thread on a core ``cpu_s``."""
        if wall_s <= 0.0:
            return
        with self._lock:
            self._wall_s += wall_s
            self._cpu_s += min(cpu_s, wall_s)
            self._last_record_s = self._clock()

    def current(self) -> int:
        """The usable core count now (judges a new sample when one is due)."""
        now = self._clock()
        if now - self._last_record_s >= IDLE_REPROBE_S and self._state.usable < self.total:
            with self._lock:
                self._reprobe_after_idle(now)
        if now < self._next_s:
            return self._state.usable
        with self._lock:
            if now < self._next_s or self._wall_s < MIN_SAMPLE_WALL_S:
                return self._state.usable
            self._next_s = now + self.interval_s
            self.share = self._cpu_s / self._wall_s
            self._wall_s = self._cpu_s = 0.0
            before = self._state.usable
            self._state = next_usable(self.total, self._state, self.share)
            if self._state.usable != before:
                self.num_changes += 1
            return self._state.usable

    def _reprobe_after_idle(self, now: float) -> None:
        """(Under the lock.) All cores again, as a probe: a failed one backs off as usual."""
        if now - self._last_record_s < IDLE_REPROBE_S or self._state.usable == self.total:
            return  # another thread got here first
        self._state = ProbeState(self.total, 0, self._state.backoff, True)
        self._wall_s = self._cpu_s = 0.0
        self._last_record_s = now
        self.num_changes += 1


class TimedCall(Generic[T]):
    """Wall and thread-CPU time of a call, taken on the thread that runs it."""

    __slots__ = ("cpu_s", "wall_s")

    def __init__(self) -> None:
        self.wall_s = 0.0
        self.cpu_s = 0.0

    def wrap(self, fn: Callable[[], T]) -> Callable[[], T]:
        def timed() -> T:
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn()
            finally:
                self.cpu_s = time.thread_time() - c0
                self.wall_s = time.perf_counter() - w0

        return timed
