"""Fewer intra-op threads while other processes use the cores: the measurement
(``/proc/stat`` minus this process's CPU time), the hysteresis, and the CPU backend's grants."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

import pytest

from nova.gpu.cpu_contention import (
    ContentionMonitor,
    CpuSample,
    others_cores,
    read_cores_busy_s,
    usable_cores,
)
from nova.gpu.cpu_cores import CoreBroker
from nova.types import Partition, Stage

STAT = """cpu  900 0 300 5000 10 0 5 0 0 0
cpu0 100 0 50 2000 5 0 2 3 0 0
cpu1 200 10 40 2000 5 1 3 0 0 0
cpu2 600 0 210 1000 0 0 0 0 0 0
intr 12345
"""


def test_busy_time_of_the_processs_cores_from_proc_stat():
    # busy = user + nice + system + irq + softirq + steal; idle and iowait are not busy
    assert read_cores_busy_s((0,), STAT, 100.0) == pytest.approx((100 + 50 + 2 + 3) / 100)
    assert read_cores_busy_s((0, 1), STAT, 100.0) == pytest.approx((155 + 254) / 100)
    assert read_cores_busy_s((0, 7), STAT, 100.0) is None  # a core it cannot see


def test_others_use_is_the_cores_busy_time_minus_ours():
    a = CpuSample(cores_busy_s=10.0, own_cpu_s=3.0, wall_s=100.0)
    b = CpuSample(cores_busy_s=13.0, own_cpu_s=4.0, wall_s=102.0)
    assert others_cores(a, b) == pytest.approx(1.0)  # 3 s busy, 1 s of it ours, over 2 s
    assert others_cores(b, b) == 0.0
    assert others_cores(a, CpuSample(10.5, 4.0, 101.0)) == 0.0  # never negative


@pytest.mark.parametrize(
    ("total", "others", "current", "expected"),
    [
        (2, 0.0, 2, 2),
        (2, 0.4, 2, 2),  # a little background: keep both
        (2, 0.6, 2, 1),  # half a core busy elsewhere: one thread
        (2, 1.8, 2, 1),
        (2, 0.3, 1, 1),  # not yet quiet enough to go back
        (2, 0.2, 1, 2),
        (16, 3.0, 16, 13),
        (16, 1.0, 13, 15),
        (16, 15.5, 16, 1),
    ],
)
def test_usable_cores_with_hysteresis(total, others, current, expected):
    assert usable_cores(total, others, current) == expected


def test_the_monitor_measures_at_most_once_per_interval():
    now = [0.0]
    samples = iter(
        [
            CpuSample(0.0, 0.0, 0.0),
            CpuSample(3.0, 1.0, 1.0),  # others: 2 cores' worth
            CpuSample(3.2, 2.0, 2.0),  # quiet again (others 0)
        ]
    )
    reads = []

    def read():
        reads.append(now[0])
        return next(samples)

    mon = ContentionMonitor((0, 1), interval_s=1.0, read=read, clock=lambda: now[0])
    assert mon.current() == 2  # the first sample only sets the baseline
    now[0] = 0.5
    assert mon.current() == 2 and len(reads) == 1  # within the interval: no reading
    now[0] = 1.0
    assert mon.current() == 1 and mon.others == pytest.approx(2.0)
    now[0] = 2.0
    assert mon.current() == 2 and mon.num_changes == 2
    assert reads == [0.0, 1.0, 2.0]


def test_an_idle_stretch_only_restarts_the_measurement():
    """Another process busy while no batch ran (a client starting up, say) does not cost the
    next batch a core: a baseline older than three intervals is replaced, not compared with."""
    now = [0.0]
    samples = iter(
        [CpuSample(0.0, 0.0, 0.0), CpuSample(10.0, 0.0, 10.0), CpuSample(10.1, 1.0, 11.0)]
    )
    mon = ContentionMonitor(
        (0, 1), interval_s=1.0, read=lambda: next(samples), clock=lambda: now[0]
    )
    assert mon.current() == 2
    now[0] = 10.0
    assert mon.current() == 2  # 10 s of others' use while idle: stale, not counted
    now[0] = 11.0
    assert mon.current() == 2 and mon.num_changes == 0


def test_the_broker_grants_only_the_usable_cores():
    usable = [4]
    broker = CoreBroker((0, 1, 2, 3), lambda: usable[0])
    shared = Partition.shared()
    assert broker.acquire(Stage.DECODE, shared).cores == (0, 1, 2, 3)
    broker.release(Stage.DECODE)
    usable[0] = 1
    decode = broker.acquire(Stage.DECODE, shared)
    prefill = broker.acquire(Stage.PREFILL, shared)
    assert decode.cores == (0,) and prefill.cores == (0,) and prefill.time_shared
    broker.release(Stage.DECODE)
    broker.release(Stage.PREFILL)
    # an isolated partition is capped too: the usable cores split between the running stages
    usable[0] = 2
    iso = Partition(0.5, 0.5, 0.5, isolated=True)
    broker.acquire(Stage.DECODE, iso)
    b = broker.acquire(Stage.PREFILL, iso)
    broker.release(Stage.DECODE)  # (a stage's split settles at its next batch)
    a = broker.acquire(Stage.DECODE, iso)
    assert set(a.cores) | set(b.cores) <= {0, 1} and not set(a.cores) & set(b.cores)


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
    reason="reads /proc/stat and needs two cores",
)
def test_the_monitor_sees_other_processes_on_the_cores():
    """Two busy processes pinned to this process's first two cores: the real monitor (on
    ``/proc/stat``) reports more than a core's worth of others' use and drops to one core."""
    cores = tuple(sorted(os.sched_getaffinity(0)))[:2]
    mon = ContentionMonitor(cores, interval_s=0.0)
    ctx = mp.get_context("spawn")
    hogs = [ctx.Process(target=_spin, args=(4.0,)) for _ in cores]
    for h in hogs:
        h.start()
    try:
        for h, core in zip(hogs, cores, strict=True):
            os.sched_setaffinity(h.pid, {core})
        time.sleep(0.5)  # (the spawned interpreters start)
        mon.current()
        time.sleep(1.5)
        assert mon.current() == 1
        assert mon.others > 1.0
    finally:
        for h in hogs:
            h.terminate()
            h.join()
