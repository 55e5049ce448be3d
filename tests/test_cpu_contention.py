"""Fewer intra-op threads while other processes use the cores: the measurement
(on-core share of the batches), the probing, and the CPU backend's grants."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

import pytest

from nova.gpu.backend import CpuBackend
from nova.gpu.cpu_contention import (
    IDLE_REPROBE_S,
    MAX_PROBE_WAIT,
    ContentionMonitor,
    ProbeState,
    TimedCall,
    contended_below,
    next_usable,
)
from nova.gpu.cpu_cores import CoreBroker
from nova.types import Partition, Stage


def test_the_contention_threshold_lies_between_alone_and_one_competitor():
    for n in (1, 2, 4, 8, 64):
        assert n / (n + 1) < contended_below(n) < 1.0
    assert contended_below(2) == pytest.approx(1 - 0.5 / 3)


@pytest.mark.parametrize(
    ("total", "usable", "share", "expected"),
    [
        (2, 2, 0.99, 2),  # alone on its cores: keep both
        (2, 2, 0.9, 2),
        (2, 2, 0.67, 1),  # a busy thread beside the team (3 on 2 cores): one core
        (2, 2, 0.5, 1),
        (16, 16, 0.5, 8),  # about the cores' worth it had
        (16, 16, 0.94, 15),  # one competitor: at least one fewer
        (16, 16, 0.99, 16),
        (2, 1, 0.5, 1),  # never below one core
    ],
)
def test_fewer_cores_when_descheduled(total, usable, share, expected):
    assert next_usable(total, ProbeState(usable), share).usable == expected


def test_probing_back_up_backs_off_while_the_competitor_stays():
    """At the reduced count an uncontended sample leads to a probe one core up; a probe that
    is contended again doubles the wait before the next one, up to ``MAX_PROBE_WAIT``; a probe
    that holds resets it."""
    state = next_usable(2, ProbeState(2), 0.6)
    assert (state.usable, state.wait) == (1, 1)
    waits = []
    for _ in range(8):
        state = next_usable(2, state, 1.0)  # alone on the one core
        while state.usable == 1:
            state = next_usable(2, state, 1.0)
        assert state.probing and state.usable == 2
        state = next_usable(2, state, 0.6)  # the probe is contended
        waits.append(state.wait)
    assert waits == [2, 4, 8, 16, 32, 32, 32, 32] and MAX_PROBE_WAIT == 32
    while state.usable == 1:
        state = next_usable(2, state, 1.0)
    state = next_usable(2, state, 0.99)  # the competitor left: the probe holds
    assert state.usable == 2 and state.backoff == 1 and not state.probing
    assert next_usable(2, state, 0.6).wait == 1


def test_the_monitor_judges_recorded_batches_at_most_once_per_interval():
    now = [0.0]
    mon = ContentionMonitor(2, interval_s=1.0, clock=lambda: now[0])
    mon.record(0.1, 0.05)
    assert mon.current() == 2  # too little batch time to judge
    mon.record(0.4, 0.2)  # descheduled half the time
    assert mon.current() == 1 and mon.share == pytest.approx(0.5)
    mon.record(1.0, 1.0)
    now[0] = 0.5
    assert mon.current() == 1  # within the interval: not judged
    now[0] = 1.0
    assert mon.current() == 1 and mon.share == pytest.approx(1.0)  # waits one sample
    mon.record(1.0, 1.0)
    now[0] = 2.0
    assert mon.current() == 2 and mon.num_changes == 2  # the probe


def test_a_count_found_before_an_idle_spell_is_probed_again():
    now = [0.0]
    mon = ContentionMonitor(2, interval_s=1.0, clock=lambda: now[0])
    mon.record(0.4, 0.2)
    assert mon.current() == 1  # contended
    now[0] = IDLE_REPROBE_S * 0.9
    assert mon.current() == 1  # not idle long enough: the count holds
    now[0] = IDLE_REPROBE_S * 1.5  # no batch since 0.0 for longer than IDLE_REPROBE_S
    assert mon.current() == 2 and mon.num_changes == 2  # all cores, as a probe
    mon.record(0.4, 0.2)  # the probe's sample is contended again
    now[0] += 1.0
    assert mon.current() == 1
    mon.record(0.4, 0.4)
    now[0] += 1.0
    # the failed probe doubled the wait: one uncontended sample is not enough to go back up
    assert mon.current() == 1


def test_timed_call_measures_on_the_thread_that_runs():
    import threading

    timed: TimedCall[int] = TimedCall()
    fn = timed.wrap(lambda: (_spin(0.05), 7)[1])
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    assert out == [7] and timed.wall_s >= 0.05 and 0.0 < timed.cpu_s <= timed.wall_s + 1e-3


def test_the_broker_says_whether_a_batch_ran_alone():
    broker = CoreBroker((0, 1), min_split_cores=1)  # (split: stages may run side by side)
    shared = Partition.shared()
    broker.acquire(Stage.DECODE, shared)
    assert broker.release(Stage.DECODE)
    broker.acquire(Stage.DECODE, shared)
    broker.acquire(Stage.PREFILL, shared)  # starts beside decode
    assert not broker.release(Stage.PREFILL)
    assert not broker.release(Stage.DECODE)  # prefill ran beside it for a while
    broker.acquire(Stage.DECODE, shared)
    assert broker.release(Stage.DECODE)


def test_the_backend_records_only_batches_that_ran_alone():
    mon = ContentionMonitor(2, interval_s=0.0)
    backend = CpuBackend(cores=(0, 1), monitor=mon)
    backend._apply = lambda cores: None
    try:
        backend.run(Stage.DECODE, Partition.shared(), lambda _: _spin(0.05))
        assert mon._wall_s >= 0.05 and mon._cpu_s > 0.0
    finally:
        backend.close()


def test_the_broker_grants_only_the_usable_cores():
    usable = [4]
    broker = CoreBroker((0, 1, 2, 3), lambda: usable[0], min_split_cores=1)
    shared = Partition.shared()
    assert broker.acquire(Stage.DECODE, shared).cores == (0, 1, 2, 3)
    broker.release(Stage.DECODE)
    usable[0] = 1
    # (one usable core: the stages would take turns; take_turns=False shows the split)
    decode = broker.acquire(Stage.DECODE, shared)
    prefill = broker.acquire(Stage.PREFILL, shared, take_turns=False)
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


def _engine_like(mon: ContentionMonitor, seconds: float) -> float:
    """Busy batches of 50 ms (one spinning thread: two Python threads would share the GIL),
    recorded as the CPU backend does; returns their on-core share over the whole run."""
    end = time.monotonic() + seconds
    wall = cpu = 0.0
    while time.monotonic() < end:
        timed: TimedCall[None] = TimedCall()
        timed.wrap(lambda: _spin(0.05))()
        mon.record(timed.wall_s, timed.cpu_s)
        mon.current()
        wall, cpu = wall + timed.wall_s, cpu + timed.cpu_s
    return cpu / wall


def _spin_at_idle_priority(seconds: float) -> None:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    _spin(seconds)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux scheduling classes and two cores",
)
@pytest.mark.parametrize(("hog", "expected"), [(_spin, 1), (_spin_at_idle_priority, 2)])
def test_the_monitor_yields_to_competitors_not_to_idle_jobs(hog, expected):
    """A busy thread on two cores with a busy process pinned to each core: at the same
    priority the thread is descheduled (3 threads on 2 cores) and the monitor drops to one
    core; at idle priority (a job that only uses what is left) it is not, and keeps both."""
    cores = tuple(sorted(os.sched_getaffinity(0)))[:2]
    mon = ContentionMonitor(2, interval_s=0.3)
    ctx = mp.get_context("spawn")
    hogs = [ctx.Process(target=hog, args=(6.0,)) for _ in cores]
    old = os.sched_getaffinity(0)
    for h in hogs:
        h.start()
    try:
        for h, core in zip(hogs, cores, strict=True):
            os.sched_setaffinity(h.pid, {core})
        os.sched_setaffinity(0, set(cores))
        time.sleep(0.8)  # (the spawned interpreters start)
        share = _engine_like(mon, 2.0)
        if expected == 1:
            assert share < contended_below(2) and mon.num_changes >= 1
        else:
            assert share > contended_below(2)
    finally:
        os.sched_setaffinity(0, old)
        for h in hogs:
            h.terminate()
            h.join()
