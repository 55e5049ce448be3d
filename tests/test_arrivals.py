"""An idle engine waits for the requests a front end announced, so that a burst starts in one
batch (``nova.engine.arrivals``): the hold rule, the count, the loop, and the server's side."""

from __future__ import annotations

import threading
import time

import pytest

from nova.core.block_manager import BlockManager
from nova.core.policy import StageLimits, make_policy
from nova.core.scheduler import Scheduler
from nova.engine.arrivals import ArrivalHold, Arrivals, Successors
from nova.engine.loop import EngineLoop
from nova.executor.fake import FakeExecutor
from nova.sampling_params import SamplingParams
from nova.types import Request, Stage

# -- the hold rule --------------------------------------------------------------------------


def test_hold_waits_only_while_idle_with_work_queued_and_requests_on_their_way():
    hold = ArrivalHold(0.05)
    assert hold.wait_s(1.0, pending=0, idle=True, queued=True) == 0.0
    assert hold.wait_s(1.0, pending=2, idle=False, queued=True) == 0.0
    assert hold.wait_s(1.0, pending=2, idle=True, queued=False) == 0.0
    assert hold.num_holds == 0
    assert hold.wait_s(1.0, pending=2, idle=True, queued=True) == pytest.approx(0.05)
    assert hold.wait_s(1.03, pending=1, idle=True, queued=True) == pytest.approx(0.02)
    assert hold.wait_s(1.06, pending=1, idle=True, queued=True) == 0.0  # at most max_wait_s
    assert hold.wait_s(1.07, pending=1, idle=True, queued=True) == 0.0  # still the same wait
    assert hold.num_holds == 1
    assert hold.wait_s(1.08, pending=1, idle=False, queued=True) == 0.0  # busy: the wait ends
    assert hold.wait_s(2.0, pending=1, idle=True, queued=True) == pytest.approx(0.05)  # anew
    assert hold.num_holds == 2


def test_hold_waits_while_requests_keep_coming_in_within_the_quiet_gap():
    hold = ArrivalHold(0.05, quiet_s=0.005)
    # nothing announced, but the last request came in 1 ms ago: a burst may still be arriving
    assert hold.wait_s(1.000, pending=0, idle=True, queued=True, last_arrival_s=0.999) == (
        pytest.approx(0.004)
    )
    assert hold.wait_s(1.006, pending=0, idle=True, queued=True, last_arrival_s=0.999) == 0.0
    # a steady trickle 2 ms apart is still bounded by max_wait_s from the first hold
    hold = ArrivalHold(0.05, quiet_s=0.005)
    t = 2.0
    while hold.wait_s(t, pending=0, idle=True, queued=True, last_arrival_s=t - 0.001) > 0:
        t += 0.002
    assert t == pytest.approx(2.05, abs=0.003)
    assert (
        ArrivalHold(0.0, quiet_s=0.005).wait_s(
            1.0, pending=0, idle=True, queued=True, last_arrival_s=1.0
        )
        == 0.0
    )  # off: no quiet wait either


def test_hold_waits_for_recent_answers_successors_within_its_bound():
    hold = ArrivalHold(0.05, quiet_s=0.005)
    # nothing announced, the last arrival long ago, but two answers' successors are due
    assert hold.wait_s(1.0, pending=0, idle=True, queued=True, due=2) == pytest.approx(0.05)
    assert hold.wait_s(1.03, pending=0, idle=True, queued=True, due=1) == pytest.approx(0.02)
    assert hold.wait_s(1.03, pending=0, idle=True, queued=True, due=0) == 0.0
    assert hold.wait_s(2.0, pending=0, idle=True, queued=True, due=1) == pytest.approx(0.05)
    assert hold.wait_s(2.06, pending=0, idle=True, queued=True, due=1) == 0.0  # bounded
    assert ArrivalHold(0.0).wait_s(1.0, pending=0, idle=True, queued=True, due=3) == 0.0


def test_successors_count_answers_not_yet_followed_by_a_request():
    s = Successors(0.05, lockstep_share=0.0)  # (held without evidence: see the lock-step tests)
    assert s.due(0.0) == 0
    s.arrived(0.0)  # (no answer out yet: not a successor)
    s.finished(1.000)
    s.finished(1.001)
    assert s.due(1.002) == 0  # no successor has come yet: nothing is waited for
    s.arrived(1.010)
    assert s.due(1.011) == 1  # one has: the other is due
    s.arrived(1.020)
    assert s.due(1.021) == 0
    s.arrived(1.022)  # more arrivals than answers: none due, not negative
    assert s.due(1.023) == 0
    s.finished(2.0)
    s.finished(2.0)
    s.arrived(2.005)
    assert s.due(2.01) == 1
    assert s.due(2.06) == 0  # out of the window: no longer expected
    s.finished(3.0)
    s.finished(3.0)
    s.arrived(3.1)  # after the window: not a successor, no wave begun
    assert s.due(3.1) == 0
    off = Successors(0.0)
    off.finished(1.0)
    assert off.due(1.0) == 0


def _step(s: Successors, t: float, answers: int, delays_s: list[float]) -> None:
    """``answers`` finish at ``t``; requests arrive ``delays_s`` after it."""
    for _ in range(answers):
        s.finished(t)
    for d in delays_s:
        s.arrived(t + d)


def test_successors_are_waited_for_only_while_waves_come_in_lock_step():
    s = Successors(0.15)  # 75% of the last 8 waves complete within 0.15 s
    _step(s, 1.0, 4, [0.02, 0.03, 0.05])  # a wave: three followed, one not yet
    assert not s.lockstep and s.due(1.06) == 0  # no wave seen through yet: not held
    s.arrived(1.08)  # the wave completes
    assert s.lockstep
    _step(s, 1.5, 4, [])  # a client that stopped: no wave, no evidence
    s.due(1.9)
    assert s.lockstep
    _step(s, 2.0, 4, [0.01])
    assert s.due(2.02) == 3  # held for the other three
    s.due(2.5)  # they never came: 1 wave of 2 complete, below 75%
    assert not s.lockstep
    _step(s, 3.0, 4, [0.01])
    assert s.due(3.02) == 0  # not held any more
    for k in range(6):  # lock-step again: 6 of the last 8 waves complete
        _step(s, 5.0 + k, 4, [0.01, 0.02, 0.03, 0.04])
    assert s.lockstep


def test_a_request_that_led_its_wave_by_a_step_waits_for_the_others():
    """One request of a lock-step wave got its answer a step (50 ms) before the other three
    (it was prefilled alone); its successor is in before their answers land, and once they do
    it waits for their successors, so the wave starts together again."""
    s = Successors(0.15)
    _step(s, 1.0, 4, [0.01, 0.02, 0.03, 0.04])  # one complete wave: lock-step seen
    _step(s, 2.0, 1, [0.01])  # the leader: answered, followed at once
    assert s.due(2.02) == 0  # nothing else out yet
    _step(s, 2.05, 3, [])  # the other three land a step later
    assert s.due(2.06) == 3
    for d in (0.02, 0.03, 0.04):
        s.arrived(2.05 + d)
    assert s.due(2.1) == 0 and s.lockstep  # a complete wave of four


def test_agents_that_think_between_steps_are_not_waited_for():
    """Answers land in pairs; each agent's next step comes after an exponential think time of
    mean 0.5 s, mostly later than the 150 ms window: the engine, checking 100 ms after the
    answers (events in time order), holds after at most a few of 200 pairs."""
    import random

    rng = random.Random(0)
    s = Successors(0.15)
    held = 0
    for k in range(200):
        t = 10.0 * k
        _step(s, t, 2, [])
        delays = sorted(rng.expovariate(1 / 0.5) for _ in range(2))
        for d in delays:
            if d < 0.1:
                s.arrived(t + d)
        held += s.due(t + 0.1) > 0
        for d in delays:
            if d >= 0.1:
                s.arrived(t + d)
    assert held <= 5 and not s.lockstep


def test_hold_of_zero_never_waits_and_a_negative_one_is_refused():
    assert ArrivalHold(0.0).wait_s(0.0, pending=5, idle=True, queued=True) == 0.0
    with pytest.raises(ValueError, match="max_wait_s"):
        ArrivalHold(-0.01)


def test_arrivals_count_settles_once_per_request_and_wakes_a_waiter():
    cond = threading.Condition()
    arrivals = Arrivals(cond)
    a, b = arrivals.expect(), arrivals.expect()
    assert arrivals.pending == 2
    woke = threading.Event()

    def waiter() -> None:
        with cond:
            while arrivals.pending == 2:
                cond.wait(timeout=5)
        woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    a.done()
    a.done()  # idempotent
    t.join(timeout=5)
    assert woke.is_set() and arrivals.pending == 1
    b.done()
    assert arrivals.pending == 0


# -- the loop -------------------------------------------------------------------------------


def _loop(wait_s: float, successor_hold: bool = True) -> tuple[EngineLoop, FakeExecutor]:
    sched = Scheduler(
        make_policy("chunked_prefill", limits=StageLimits(max_num_seqs=16)), BlockManager(64, 4)
    )
    ex = FakeExecutor(1000, {Stage.PREFILL: 0.001, Stage.DECODE: 0.001})
    return EngineLoop(sched, ex, arrival_wait_s=wait_s, successor_hold=successor_hold), ex


def _req(i: int) -> Request:
    return Request(f"r{i}", [i + 1] * 6, SamplingParams(max_tokens=3, ignore_eos=True))


def _first_batch_ids(ex: FakeExecutor) -> list[str]:
    return ex.batches[0].request_ids


def test_an_idle_loop_starts_a_burst_in_one_batch_once_the_last_request_is_in():
    loop, ex = _loop(wait_s=30.0)  # longer than the test: only the arrivals end the wait
    with loop:
        first, second = loop.arrivals.expect(), loop.arrivals.expect()
        loop.add_request(_req(0))
        first.done()
        time.sleep(0.2)
        assert ex.batches == []  # the second request is still on its way
        loop.add_request(_req(1))
        second.done()
        assert loop.wait_idle(timeout_s=10)
    assert _first_batch_ids(ex) == ["r0", "r1"]


def test_the_wait_is_bounded_when_an_announced_request_never_comes():
    loop, ex = _loop(wait_s=0.1)
    with loop:
        lost = loop.arrivals.expect()  # never submitted, never done
        t0 = time.monotonic()
        loop.add_request(_req(0))
        assert loop.wait_idle(timeout_s=10)
        waited = time.monotonic() - t0
        lost.done()
    assert _first_batch_ids(ex) == ["r0"]
    assert 0.1 <= waited < 5.0


def test_without_announcements_or_with_the_wait_off_the_loop_starts_at_once():
    for wait_s, announce in ((30.0, False), (0.0, True)):
        loop, ex = _loop(wait_s)
        with loop:
            pending = loop.arrivals.expect() if announce else None
            loop.add_request(_req(0))
            assert loop.wait_idle(timeout_s=10)  # a 30 s wait would time this out
            if pending is not None:
                pending.done()
        assert _first_batch_ids(ex) == ["r0"]


def test_a_busy_loop_does_not_wait_for_announced_requests():
    loop, ex = _loop(wait_s=30.0)  # a wait while busy would stall the run past its timeout
    ex.delay_s[Stage.DECODE] = 0.02
    finished: list[str] = []

    def listener(ev, req) -> None:
        if ev.finished:
            finished.append(ev.request_id)

    with loop:
        loop.add_request(
            Request("long", [7] * 6, SamplingParams(max_tokens=40, ignore_eos=True)),
            listener=listener,
        )
        deadline = time.monotonic() + 10
        while loop.scheduler.state.num_in_stage(Stage.DECODE) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        pending = loop.arrivals.expect()  # on its way (never comes) while "long" decodes
        loop.add_request(_req(1), listener=listener)
        assert loop.wait_idle(timeout_s=10)
        pending.done()
    assert finished == ["r1", "long"]  # admitted beside the running decode, not held


def _finish_then(loop: EngineLoop, ids: list[int]) -> None:
    """Run ``ids`` to completion on ``loop`` (their answers out)."""
    for i in ids:
        loop.add_request(_req(i))
    assert loop.wait_idle(timeout_s=10)


def test_lock_step_successors_start_in_one_batch():
    """Two requests answered together: the first successor waits for the second (a client
    stepping N agents together), which a 30 s bound leaves to the arrival alone to end."""
    loop, ex = _loop(wait_s=30.0)
    with loop:
        _finish_then(loop, [0, 1])
        # before a wave of successors was seen through it does not hold: the first
        # successor runs alone while it learns that this client steps in lock-step
        done = len(ex.batches)
        loop.add_request(_req(2))
        assert loop.wait_idle(timeout_s=10)  # a 30 s hold would time this out
        assert ex.batches[done].request_ids == ["r2"]
        loop.add_request(_req(3))
        assert loop.wait_idle(timeout_s=10)
        for i in (4, 6, 8):  # whole waves followed
            loop.add_request(_req(i))
            loop.add_request(_req(i + 1))
            assert loop.wait_idle(timeout_s=10)
        done = len(ex.batches)
        loop.add_request(_req(10))
        time.sleep(0.2)
        assert len(ex.batches) == done  # the second answer's successor is still due
        loop.add_request(_req(11))
        assert loop.wait_idle(timeout_s=10)
    assert ex.batches[done].request_ids == ["r10", "r11"]


def test_a_lone_clients_next_request_is_not_held():
    """One answer, one successor: it starts at once (a 30 s wait would time the run out)."""
    loop, ex = _loop(wait_s=30.0)
    with loop:
        _finish_then(loop, [0])
        done = len(ex.batches)
        loop.add_request(_req(1))
        assert loop.wait_idle(timeout_s=10)
    assert ex.batches[done].request_ids == ["r1"]


def test_with_the_successor_hold_off_a_successor_starts_at_once():
    """As in the lock-step test, but ``successor_hold=False`` (``--no-successor-hold``): the
    first successor runs alone (a 30 s hold would time the run out); the announced-request
    hold is still on."""
    loop, ex = _loop(wait_s=30.0, successor_hold=False)
    with loop:
        _finish_then(loop, [0, 1])
        done = len(ex.batches)
        loop.add_request(_req(2))
        assert loop.wait_idle(timeout_s=10)
        assert ex.batches[done].request_ids == ["r2"]
        first, second = loop.arrivals.expect(), loop.arrivals.expect()
        loop.add_request(_req(3))
        first.done()
        time.sleep(0.2)
        assert len(ex.batches) == done + 1 + 2  # r2's prefill and decode; r3 still held
        loop.add_request(_req(4))
        second.done()
        assert loop.wait_idle(timeout_s=10)
    assert ex.batches[done + 3].request_ids == ["r3", "r4"]
