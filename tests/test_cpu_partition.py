"""CPU partitions: core planning (isolated and shared splits), the broker's batch-boundary
hand-over, per-thread intra-op thread counts and affinity (real threads), and the engine on
the ``cpu`` backend."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from nova.core.block_manager import BlockManager
from nova.core.nova_policy import NovaPolicy
from nova.core.policy import make_policy
from nova.core.scheduler import Scheduler
from nova.cost.base import make_cost_model
from nova.cost.model_spec import get_model_spec
from nova.engine.loop import EngineLoop
from nova.executor.fake import FakeExecutor
from nova.gpu.backend import CpuBackend
from nova.gpu.cpu_cores import CoreBroker, isolated_core_sets, shared_core_slices
from nova.gpu.cpu_threads import apply_cores, cores_for_block, team_thread_ids
from nova.gpu.sm_plan import plan_partition
from nova.sampling_params import SamplingParams
from nova.types import STAGES, Partition, Request, Stage

# the nova policy scores its modes with a real cost model (its candidates come from it)
_CPU_COST = make_cost_model("roofline", "cpu", get_model_spec("cogagent-9b"))

V, P, D = Stage.VISION, Stage.PREFILL, Stage.DECODE
HAS_AFFINITY = hasattr(os, "sched_setaffinity")
CORES = tuple(sorted(os.sched_getaffinity(0))) if HAS_AFFINITY else ()


# -- planning (plain logic) ----------------------------------------------------------------------
def test_shared_split_is_even_and_decode_sits_on_top():
    cores = tuple(range(8))
    assert shared_core_slices([D], cores) == {D: (cores, False)}
    split = shared_core_slices([D, P], cores)
    assert split[P] == ((0, 1, 2, 3), False) and split[D] == ((4, 5, 6, 7), False)
    three = shared_core_slices([V, P, D], cores)  # 8 = 3 + 3 + 2: the remainder to decode first
    assert [len(three[s][0]) for s in (V, P, D)] == [2, 3, 3]
    assert sorted(c for s in three for c in three[s][0]) == list(cores)  # disjoint, all used


def test_more_stages_than_cores_time_share():
    two = shared_core_slices([V, P, D], (0, 1))
    assert two[D] == ((1,), False)  # decode keeps a core of its own
    assert two[V] == ((0,), True) and two[P] == ((0,), True)
    one = shared_core_slices([P, D], (5,))
    assert one == {D: ((5,), True), P: ((5,), True)}
    assert shared_core_slices([D], (5,)) == {D: ((5,), False)}


def test_partitions_that_do_not_fit_time_share():
    broker = CoreBroker([3])
    part = Partition(0.001, 0.001, 1.0, name="nova", isolated=True)
    assert broker.plan(part) is None  # two groups, one core
    assert broker.acquire(P, part).cores == (3,)
    waiter = _Acquirer(broker, D, part)  # one core: decode takes its turn after prefill's batch
    assert waiter.waiting()
    broker.release(P)
    assert waiter.granted().cores == (3,)
    assert broker.isolated_sets(part) == {V: (3,), P: (3,), D: (3,)}


def _wait_until(cond, within_s: float = 2.0) -> None:
    end = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.001)


class _Acquirer:
    """``broker.acquire(stage, part)`` on its own thread (it may block for a turn)."""

    def __init__(self, broker: CoreBroker, stage: Stage, part: Partition) -> None:
        self.broker, self.stage = broker, stage
        self.out: list = []
        self.thread = threading.Thread(
            target=lambda: self.out.append(broker.acquire(stage, part)), daemon=True
        )
        self.thread.start()

    def waiting(self, within_s: float = 2.0) -> bool:
        """True once the thread waits for a turn (False if it was granted at once)."""
        end = time.monotonic() + within_s
        while time.monotonic() < end:
            with self.broker._lock:
                if self.stage in self.broker._waiting:
                    return True
            if self.out:
                return False
            time.sleep(0.001)
        raise AssertionError("the acquiring thread neither waited nor was granted")

    def granted(self, within_s: float = 2.0):
        self.thread.join(within_s)
        assert self.out, f"{self.stage} was not granted within {within_s} s"
        return self.out[0]


def test_on_two_cores_stages_take_turns_decode_first():
    now = [100.0]
    broker = CoreBroker((0, 1), clock=lambda: now[0], decode_grace_s=0.02)
    shared = Partition.shared()
    assert broker.acquire(P, shared).cores == (0, 1)
    vision = _Acquirer(broker, V, shared)  # asks first
    assert vision.waiting()
    decode = _Acquirer(broker, D, shared)
    assert decode.waiting()  # a 1-core split each would be no faster than turns
    broker.release(P)
    assert decode.granted().cores == (0, 1)  # decode first, every core
    assert vision.waiting(0.05) and set(broker.running()) == {D}
    broker.release(D)
    time.sleep(0.05)  # (real time passes; the injected clock does not)
    assert vision.waiting(0.01)  # within decode's grace: decode's next step may come
    assert broker.acquire(D, shared).cores == (0, 1)  # and it does, ahead of vision
    broker.release(D)
    now[0] += 0.021  # decode stays away past its grace: vision's turn
    assert vision.granted().cores == (0, 1)
    assert not broker.running()[V].time_shared and broker.turns_waited == 2
    assert broker.release(V)  # a turn is a batch alone


def test_after_a_prefill_batch_decode_goes_before_a_waiting_front_stage():
    now = [0.0]
    broker = CoreBroker((0, 1), clock=lambda: now[0], decode_grace_s=0.02)
    shared = Partition.shared()
    broker.acquire(P, shared)
    vision = _Acquirer(broker, V, shared)
    assert vision.waiting()
    broker.release(P)  # its sequences' first decode step is being dispatched
    time.sleep(0.05)
    assert vision.waiting(0.01)
    assert broker.acquire(D, shared).cores == (0, 1)
    broker.release(D)
    now[0] += 0.03
    assert vision.granted().cores == (0, 1)
    broker.release(V)
    broker.acquire(V, shared)  # a vision batch ending gives no grace: prefill goes at once
    prefill = _Acquirer(broker, P, shared)
    assert prefill.waiting()
    broker.release(V)
    assert prefill.granted().cores == (0, 1)


def test_waiting_for_a_turn_takes_no_cores():
    broker = CoreBroker((0, 1), clock=lambda: 0.0, decode_grace_s=0.0)
    shared = Partition.shared()
    broker.acquire(P, shared)
    done = threading.Event()
    t = threading.Thread(target=lambda: (broker.wait_turn(D, shared), done.set()), daemon=True)
    t.start()
    assert not done.wait(0.05)  # prefill's batch runs
    broker.release(P)
    assert done.wait(2) and not broker.running()  # decode may start now; nothing taken yet
    t.join()
    broker.wait_turn(V, shared)  # nothing running: at once
    # a stage that had its turn and then found nothing to run lets the next one in line go
    broker.acquire(D, shared)
    looked = threading.Event()
    first = threading.Thread(
        target=lambda: (broker.wait_turn(P, shared), looked.set()), daemon=True
    )
    first.start()
    _wait_until(lambda: P in broker._waiting)
    vision = _Acquirer(broker, V, shared)  # behind prefill
    assert vision.waiting()
    broker.release(D)
    assert looked.wait(2)  # prefill's turn; it takes nothing
    assert vision.granted().cores == (0, 1)
    first.join()
    broker.release(V)
    four = CoreBroker((0, 1, 2, 3))
    iso = Partition(0.5, 0.5, 0.5, isolated=True)
    four.acquire(P, iso)
    four.wait_turn(D, iso)  # an isolated plan that fits: its own cores, no turns


def test_decode_declining_its_turn_ends_the_front_stages_wait_for_it():
    broker = CoreBroker((0, 1), clock=lambda: 0.0, decode_grace_s=0.02)  # the clock stands
    shared = Partition.shared()
    broker.acquire(D, shared)
    vision = _Acquirer(broker, V, shared)
    assert vision.waiting()
    broker.release(D)
    time.sleep(0.05)
    assert vision.waiting(0.01)  # decode's grace, which on this clock never runs out
    broker.decline_turn(P)  # (only decode's declining counts)
    assert vision.waiting(0.01)
    broker.decline_turn(D)  # decode's worker found nothing to run (e.g. the policy's choice)
    assert vision.granted().cores == (0, 1)


def test_the_front_stage_holding_the_earliest_request_goes_first():
    broker = CoreBroker((0, 1), clock=lambda: 0.0, decode_grace_s=0.0)
    shared = Partition.shared()
    broker.rank_turn(V, (0, math.inf, 2.0))
    broker.rank_turn(P, (0, math.inf, 1.0))
    broker.acquire(D, shared)
    vision = _Acquirer(broker, V, shared)
    assert vision.waiting()
    prefill = _Acquirer(broker, P, shared)  # asks after vision, holds the earlier request
    assert prefill.waiting()
    broker.release(D)
    assert prefill.granted().cores == (0, 1)
    assert vision.waiting(0.05)
    broker.release(P)
    assert vision.granted().cores == (0, 1)
    broker.release(V)
    # unranked (no queue): after the ranked, then in the order they asked
    broker.rank_turn(P, None)
    broker.acquire(D, shared)
    prefill, vision = _Acquirer(broker, P, shared), None
    assert prefill.waiting()
    vision = _Acquirer(broker, V, shared)
    assert vision.waiting()
    broker.release(D)
    assert vision.granted().cores == (0, 1)  # ranked: before prefill, which asked first
    broker.release(V)
    assert prefill.granted().cores == (0, 1)
    broker.release(P)


def test_a_stage_ranked_ahead_gets_the_grace_to_ask_then_the_others_go():
    now = [0.0]
    broker = CoreBroker((0, 1), clock=lambda: now[0], decode_grace_s=0.02)
    shared = Partition.shared()
    broker.rank_turn(V, (0, math.inf, 2.0))
    broker.rank_turn(P, (0, math.inf, 1.0))  # e.g. the requests vision's last batch handed it
    vision = _Acquirer(broker, V, shared)  # vision's worker asks again at once
    assert vision.waiting()
    assert vision.waiting(0.05)  # prefill's grace to ask (the clock stands)
    prefill = _Acquirer(broker, P, shared)
    assert prefill.granted().cores == (0, 1)  # it came: it goes first
    broker.rank_turn(P, None)  # its batch took its requests
    broker.release(P)
    broker.decline_turn(D)  # (no decode to come back after it)
    assert vision.granted().cores == (0, 1)
    broker.release(V)
    now[0] += 0.03
    broker.rank_turn(P, (0, math.inf, 0.5))  # ranked ahead again, its worker never asks
    vision = _Acquirer(broker, V, shared)
    assert vision.waiting()
    now[0] += 0.021  # its grace ran out
    with broker._lock:
        broker._lock.notify_all()
    assert vision.granted().cores == (0, 1)
    broker.release(V)
    broker.rank_turn(P, (0, math.inf, 0.25))  # ahead again; its worker asks, finds nothing
    vision = _Acquirer(broker, V, shared)
    assert vision.waiting()
    broker.decline_turn(P)  # (the policy planned no prefill batch): vision need not wait
    assert vision.granted().cores == (0, 1)
    broker.release(V)


def test_more_cores_split_until_a_stage_would_get_fewer_than_the_minimum():
    broker = CoreBroker((0, 1, 2, 3))  # MIN_SPLIT_CORES = 2
    shared = Partition.shared()
    assert broker.acquire(D, shared).cores == (0, 1, 2, 3)
    assert broker.acquire(P, shared).cores == (0, 1)  # 2 each: split
    vision = _Acquirer(broker, V, shared)  # a third would get 1 core: it waits
    assert vision.waiting()
    broker.release(P)
    broker.release(D)
    assert vision.granted().cores == (0, 1, 2, 3)
    broker.release(V)
    loose = CoreBroker((0, 1), min_split_cores=1)  # 1: always split (the old behaviour)
    assert loose.acquire(D, shared).cores == (0, 1)
    assert loose.acquire(P, shared).cores == (0,)
    third = loose.acquire(V, shared)  # more stages than cores: they share a core, no turns
    assert third.cores == (0,) and third.time_shared
    strict = CoreBroker((0, 1))
    strict.acquire(D, shared)
    # tools that time stages side by side co-run as asked
    assert strict.acquire(P, shared, take_turns=False).cores == (0,)
    with pytest.raises(ValueError, match="min_split_cores"):
        CoreBroker((0, 1), min_split_cores=0)


@pytest.mark.parametrize("num_cores", [2, 3, 8, 16])
def test_nova_partitions_get_disjoint_cores(num_cores):
    cores = tuple(range(100, 100 + num_cores))
    policy = NovaPolicy(cost_model=_CPU_COST, sm_granularity_share=1 / num_cores)
    for part in policy.partition_set():
        plan = plan_partition(part, CoreBroker(cores).grid)
        sets = isolated_core_sets(plan, cores)
        assert all(sets[s] and set(sets[s]) <= set(cores) for s in STAGES)
        group_sets = [sets[stages[0]] for stages, _ in plan.groups]
        for stages, _ in plan.groups:  # the stages of a group share its cores
            assert all(sets[s] == sets[stages[0]] for s in stages)
        used = [c for g in group_sets for c in g]
        assert len(used) == len(set(used))  # co-running groups get disjoint cores
        if plan.stage_sms(D) is not None:
            assert max(sets[D]) == cores[-1]  # decode from the top
        for s in STAGES:
            assert len(sets[s]) == (plan.stage_sms(s) or num_cores)


def test_broker_hands_over_at_batch_boundaries():
    broker = CoreBroker([0, 1, 2, 3])
    shared = Partition.shared()
    assert broker.acquire(D, shared).cores == (0, 1, 2, 3)  # alone: every core
    assert broker.acquire(P, shared).cores == (0, 1)  # decode still holds its batch's cores
    broker.release(D)
    assert broker.acquire(D, shared).cores == (2, 3)  # its next batch: the split
    broker.release(P)
    broker.release(D)
    assert broker.acquire(D, shared).cores == (0, 1, 2, 3)
    assert broker.last[P].cores == (0, 1) and set(broker.running()) == {D}
    iso = Partition(0.5, 0.5, 0.25, isolated=True)
    assert broker.acquire(P, iso).cores == (0, 1) and broker.acquire(D, iso).cores == (3,)


def test_a_broker_needs_cores():
    with pytest.raises(ValueError, match="at least one core"):
        CoreBroker([])


def test_cpu_backend_prepares_and_reports_what_it_granted():
    backend = CpuBackend(cores=range(4))
    backend._apply = lambda cores: None
    policy = NovaPolicy(cost_model=_CPU_COST, sm_granularity_share=backend.grid.share_step)
    backend.prepare(policy.partition_set())
    created = backend.created()
    assert created and all(g.granted_source == "affinity" for g in created)
    assert all(g.granted_sms == g.requested_sms for g in created)
    assert "4 cores" in backend.describe()


def test_batches_run_on_team_threads_that_keep_openmp_pools_within_the_cores():
    backend = CpuBackend(cores=(0, 1))
    applied = []
    backend._apply = lambda cores: applied.append((threading.get_native_id(), cores))
    shared = Partition.shared()
    me = threading.get_native_id()

    def where(stream):
        assert stream is None
        return threading.get_native_id()

    vision_tid = backend.run(V, shared, where)
    assert vision_tid != me and applied[-1] == (vision_tid, (0, 1))
    assert backend.run(V, shared, where) == vision_tid  # the same thread, batch after batch
    # decode alone on both cores: vision's idle 2-thread pool would make 3 pool threads on
    # 2 cores, so vision's team thread is retired first
    decode_tid = backend.run(D, shared, where)
    assert decode_tid != vision_tid and set(backend._teams) == {D}
    with pytest.raises(ZeroDivisionError):  # a batch's exception reaches the caller
        backend.run(D, shared, lambda stream: 1 / 0)
    assert backend.run(D, shared, where) == decode_tid
    assert not backend.broker.running()
    started = backend.num_team_threads_started
    backend.close()
    assert not backend._teams and started == 2


def test_on_two_cores_a_batch_waits_for_the_running_one_then_gets_every_core():
    backend = CpuBackend(cores=(0, 1))
    backend._apply = lambda cores: None
    shared = Partition.shared()
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def long_prefill(stream):
        started.set()
        release.wait()
        order.append("prefill")

    t = threading.Thread(target=backend.run, args=(P, shared, long_prefill))
    t.start()
    started.wait()
    out: list = []
    d = threading.Thread(target=lambda: out.append(backend.run(D, shared, lambda s: "decode")))
    d.start()
    time.sleep(0.05)
    assert not out  # decode waits for prefill's batch instead of running beside it on 1 core
    release.set()
    t.join()
    d.join(5)
    assert out == ["decode"] and order == ["prefill"]
    assert backend.broker.last[D].cores == (0, 1) and backend.broker.turns_waited == 1
    assert "down to 2 cores each" in backend.describe()
    backend.close()


def test_a_team_thread_whose_pool_outgrew_its_cores_is_replaced():
    backend = CpuBackend(cores=(0, 1, 2, 3))
    backend._apply = lambda cores: None
    shared = Partition.shared()
    tid = lambda stream: threading.get_native_id()  # noqa: E731
    wide = backend.run(P, shared, tid)  # prefill alone: a 4-thread pool
    hold, release = threading.Event(), threading.Event()

    def long_decode(stream):
        hold.set()
        release.wait()

    t = threading.Thread(target=backend.run, args=(D, shared, long_decode))
    t.start()
    hold.wait()  # decode alone: all 4 cores (a 4-thread pool), and it keeps them mid-batch
    # prefill's next batch gets half: its 4-thread pool beside decode's would make 1 + 3 + 3
    # pooled threads on 4 cores; it needs 2 threads, so a fresh team thread takes the batch
    narrow = backend.run(P, shared, tid)
    release.set()
    t.join()
    assert narrow != wide and backend._teams[P].pool_size == 2
    assert backend.broker.last[P].cores == (0, 1) and backend.broker.last[D].cores == (0, 1, 2, 3)
    backend.close()


# -- the thread mechanics (real threads) ---------------------------------------------------------
def _in_thread(fn):
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_intra_op_thread_count_is_per_thread():
    main_before = torch.get_num_threads()
    barrier = threading.Barrier(2)

    def worker(n):
        def fn():
            apply_cores(CORES[:n] if CORES else tuple(range(n)))
            barrier.wait()  # both set before either reads
            x = torch.randn(256, 256)
            (x @ x).sum()
            return torch.get_num_threads()

        return fn

    results = {}
    threads = [
        threading.Thread(target=lambda n=n: results.__setitem__(n, worker(n)()))
        for n in (1, max(1, len(CORES)))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {1: 1, max(1, len(CORES)): max(1, len(CORES))}
    assert torch.get_num_threads() == main_before


@pytest.mark.skipif(not HAS_AFFINITY or len(CORES) < 2, reason="needs 2 cores and affinity")
def test_affinity_moves_the_worker_and_its_openmp_threads():
    def fn():
        apply_cores(CORES[:2])
        x = torch.randn(512, 512)
        for _ in range(3):
            (x @ x).sum()  # starts this thread's OpenMP team
        me = threading.get_native_id()
        name = Path(f"/proc/self/task/{me}/comm").read_text().strip()
        team = team_thread_ids(name, me)
        changed = apply_cores(CORES[1:2])
        again = apply_cores(CORES[1:2])
        return (
            name,
            team,
            changed,
            again,
            os.sched_getaffinity(0),
            {t: os.sched_getaffinity(t) for t in team},
            torch.get_num_threads(),
        )

    main_mask = os.sched_getaffinity(0)
    name, team, changed, again, mask, team_masks, threads = _in_thread(fn)
    assert name.startswith("nova-omp-") and team  # the team inherited the worker's name
    assert changed and not again  # nothing is redone when the cores stay the same
    assert mask == {CORES[1]} and threads == 1
    assert all(m == {CORES[1]} for m in team_masks.values())
    assert os.sched_getaffinity(0) == main_mask  # the test's own thread is untouched


@pytest.mark.skipif(not HAS_AFFINITY, reason="needs sched_setaffinity")
def test_cores_for_block_restores_the_thread():
    def fn():
        before = (os.sched_getaffinity(0), torch.get_num_threads())
        with cores_for_block(CORES[:1]) as cores:
            inside = (os.sched_getaffinity(0), torch.get_num_threads(), cores)
        return before, inside, (os.sched_getaffinity(0), torch.get_num_threads())

    before, inside, after = _in_thread(fn)
    assert inside == ({CORES[0]}, 1, CORES[:1])
    assert after == before


# -- the engine on the cpu backend ---------------------------------------------------------------
@pytest.mark.parametrize("policy", ["multi_stream", "nova", "sequential"])
def test_engine_runs_stage_workers_on_cpu_partitions(tiny_dirs, policy):
    from nova.config import EngineConfig
    from nova.engine.llm_engine import LLMEngine
    from nova.models.inputs import PromptInput
    from nova.sampling_params import SamplingParams

    main_state = (os.sched_getaffinity(0) if HAS_AFFINITY else None, torch.get_num_threads())
    # (the nova policy's roofline cost model wants a vision tower: the tiny LLaVA)
    model = tiny_dirs["llava-clip" if policy == "nova" else "llama"]
    engine = LLMEngine(EngineConfig(model=str(model), policy=policy, num_kv_blocks=64))
    assert engine.partition_backend.name == "cpu" and engine.partition_backend.enforces_limits
    prompts = [PromptInput([1, 5, 6, 7]), PromptInput([1, 9, 10]), PromptInput([1, 4])]
    reqs = engine.run_all(prompts, SamplingParams(max_tokens=4))
    assert all(len(r.output_token_ids) == 4 for r in reqs)
    granted = engine.executor.granted_sms
    assert {P, D} <= set(granted)
    assert all(1 <= n <= engine.partition_backend.grid.num_sms for n in granted.values())
    assert not engine.partition_backend.broker.running()  # every batch released its cores
    assert (os.sched_getaffinity(0) if HAS_AFFINITY else None, torch.get_num_threads()) == (
        main_state
    )


# -- the engine loop waits for a stage's turn before it plans the batch --------------------------
class _GatedTurns(FakeExecutor):
    """Prefill's turn comes only when the test opens the gate."""

    def __init__(self) -> None:
        super().__init__(1000)
        self.asked, self.gate = threading.Event(), threading.Event()

    def wait_turn(self, stage: Stage) -> None:
        if stage is P and not self.gate.is_set():
            self.asked.set()
            assert self.gate.wait(10)


def test_a_batch_is_planned_after_the_stage_got_its_turn_with_what_queued_meanwhile():
    sched = Scheduler(make_policy("multi_stream"), BlockManager(64, 4))
    ex = _GatedTurns()
    loop = EngineLoop(sched, ex, arrival_wait_s=0.0)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    with loop:
        loop.add_request(Request("r0", [1] * 6, params))
        assert ex.asked.wait(10)  # prefill's worker has work and waits for its turn
        loop.add_request(Request("r1", [2] * 6, params))
        loop.add_request(Request("r2", [3] * 6, params))
        ex.gate.set()
        assert loop.wait_idle(timeout_s=10)
    prefill = [b for b in ex.batches if b.stage is P]
    assert prefill[0].request_ids == ["r0", "r1", "r2"]  # not r0 alone, planned before the wait


class _RankedTurns(FakeExecutor):
    """Records the ranks the engine loop gives the front stages."""

    ranks_turns = True

    def __init__(self) -> None:
        super().__init__(1000)
        self.ranks: list[tuple[Stage, tuple[float, ...] | None]] = []

    def rank_turn(self, stage: Stage, rank: tuple[float, ...] | None) -> None:
        self.ranks.append((stage, rank))


def test_the_engine_loop_ranks_the_front_stages_by_their_earliest_request():
    sched = Scheduler(make_policy("multi_stream"), BlockManager(64, 4))
    ex = _RankedTurns()
    loop = EngineLoop(sched, ex, arrival_wait_s=0.0)
    loop.add_request(Request("r0", [1] * 6, SamplingParams(max_tokens=2, ignore_eos=True)))
    arrival_s = sched.state.requests["r0"].arrival_s
    assert ex.ranks[-2:] == [(V, None), (P, (0, math.inf, arrival_s))]
    loop.add_request(Request("r1", [2] * 6, SamplingParams(max_tokens=2, ignore_eos=True)))
    assert ex.ranks[-1] == (P, (0, math.inf, arrival_s))  # still r0, the earlier
    loop.abort("r0")
    assert ex.ranks[-1] == (P, (0, math.inf, sched.state.requests["r1"].arrival_s))
    with loop:
        assert loop.wait_idle(timeout_s=10)
    assert ex.ranks[-2:] == [(V, None), (P, None)]  # re-ranked as batches completed
    # without turns on the device the loop ranks nothing
    plain = FakeExecutor(1000)
    plain.rank_turn = lambda *a: pytest.fail("ranked without turns")  # type: ignore[method-assign]
    EngineLoop(Scheduler(make_policy("multi_stream"), BlockManager(64, 4)), plain).add_request(
        Request("r2", [1] * 6, SamplingParams(max_tokens=2))
    )


def test_the_engine_default_is_the_measured_minimum():
    from nova.config import EngineConfig
    from nova.gpu.cpu_cores import MIN_SPLIT_CORES

    assert EngineConfig().cpu_min_split_cores == MIN_SPLIT_CORES
