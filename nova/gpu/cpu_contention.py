"""How many of its cores Nova should run threads on while other processes use them (Linux).

Why: an OpenMP team of ``n`` threads meets at a barrier after every parallel region, and
libgomp's idle threads spin there before sleeping. On cores that other processes also use, the
OS deschedules one team thread while its partners spin for it, and every region waits for the
slowest. Measured here (``benchmarks/results/cpu_contention.md``): on the 2-core machine with
other jobs on both cores, one intra-op thread decodes faster than two, spinning or passive
(``docs/cpu.md``, "Contention"). Measured on a quiet machine the two threads win, so the count
has to follow the load.

``ContentionMonitor`` measures the other processes' CPU use on this process's cores: the busy
time ``/proc/stat`` reports for those cores, minus this process's own CPU time
(``os.times``), over the wall time between two samples (at most one sample per
``interval_s``, taken when a batch asks). ``usable_cores`` turns that into a thread count with
hysteresis. The CPU partition backend (``nova.gpu.backend.CpuBackend``) hands stage batches
cores from the first ``usable`` only.

Off Linux (no ``/proc/stat``) the monitor reports no contention and every core stays usable.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

_PROC_STAT = Path("/proc/stat")
# /proc/stat's per-core fields: user nice system idle iowait irq softirq steal (guest time is
# already inside user): busy = all but idle and iowait. Steal (another VM on the host core) is
# contention too.
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


@dataclass(slots=True, frozen=True)
class CpuSample:
    """One reading: the cores' busy seconds, this process's CPU seconds, the wall clock."""

    cores_busy_s: float
    own_cpu_s: float
    wall_s: float


def read_cores_busy_s(cores: Sequence[int], stat_text: str, ticks_per_s: float) -> float | None:
    """Busy seconds of ``cores`` since boot from the text of ``/proc/stat`` (None: a core's
    line is missing)."""
    wanted = {f"cpu{c}" for c in cores}
    total = 0.0
    found = 0
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if name not in wanted:
            continue
        fields = rest.split()
        total += sum(int(fields[i]) for i in _BUSY_FIELDS if i < len(fields))
        found += 1
    if found != len(wanted):
        return None
    return total / ticks_per_s


def others_cores(before: CpuSample, after: CpuSample) -> float:
    """Cores' worth of CPU that other processes used between two samples (>= 0)."""
    wall = after.wall_s - before.wall_s
    if wall <= 0.0:
        return 0.0
    busy = after.cores_busy_s - before.cores_busy_s
    own = after.own_cpu_s - before.own_cpu_s
    return max(0.0, (busy - own) / wall)


def usable_cores(
    total: int,
    others: float,
    current: int,
    down_margin: float = 0.5,
    up_margin: float = 0.75,
) -> int:
    """Cores to run threads on, given ``others`` cores' worth of other processes' use.

    Fewer when the free cores (``total - others``) fall ``down_margin`` below the current count
    (on 2 cores: others use half a core or more), more only when they rise ``up_margin`` above
    the next count (others below a quarter of a core): a sample's noise does not flip the
    count back and forth. Always at least one core."""
    free = total - others
    current = min(max(current, 1), total)
    if free < current - down_margin:
        return max(1, min(total, math.floor(free + down_margin)))
    if current < total and free >= current + up_margin:
        return min(total, max(current + 1, math.floor(free + 1.0 - up_margin)))
    return current


class ContentionMonitor:
    """The usable core count, re-measured at most once per ``interval_s`` when asked
    (thread-safe). ``read`` and ``clock`` are for tests."""

    def __init__(
        self,
        cores: Sequence[int],
        interval_s: float = 1.0,
        read: Callable[[], CpuSample | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cores = tuple(sorted(cores))
        self.interval_s = interval_s
        self.stale_after_s = max(3.0 * interval_s, 3.0)
        self._clock = clock
        self._read = read or self._read_proc
        self._lock = threading.Lock()
        self._last: CpuSample | None = None
        self._next_s = 0.0
        self.usable = len(self.cores)
        self.others = 0.0  # the last measurement (cores' worth)
        self.num_changes = 0
        try:
            self._ticks = float(os.sysconf("SC_CLK_TCK"))
        except (AttributeError, OSError, ValueError):
            self._ticks = 100.0

    def _read_proc(self) -> CpuSample | None:
        try:
            text = _PROC_STAT.read_text()
        except OSError:
            return None
        busy = read_cores_busy_s(self.cores, text, self._ticks)
        if busy is None:
            return None
        t = os.times()
        return CpuSample(busy, t.user + t.system, self._clock())

    def current(self) -> int:
        """The usable core count now (measures when ``interval_s`` has passed)."""
        now = self._clock()
        if now < self._next_s:
            return self.usable
        with self._lock:
            if now < self._next_s:
                return self.usable
            self._next_s = now + self.interval_s
            sample = self._read()
            if sample is None:
                return self.usable
            stale = self._last is not None and sample.wall_s - self._last.wall_s > (
                self.stale_after_s
            )
            if self._last is not None and not stale:
                # (a stale baseline, from before an idle stretch, only restarts the
                # measurement: what others did while no batch ran cost no batch anything)
                self.others = others_cores(self._last, sample)
                usable = usable_cores(len(self.cores), self.others, self.usable)
                if usable != self.usable:
                    self.usable = usable
                    self.num_changes += 1
            self._last = sample
            return self.usable
