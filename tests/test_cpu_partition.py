"""CPU partitions: core planning (isolated and shared splits), the broker's batch-boundary
hand-over, per-thread intra-op thread counts and affinity (real threads), and the engine on
the ``cpu`` backend."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from nova.core.nova_policy import NovaPolicy
from nova.cost.base import make_cost_model
from nova.cost.model_spec import get_model_spec
from nova.gpu.backend import CpuBackend
from nova.gpu.cpu_cores import CoreBroker, isolated_core_sets, shared_core_slices
from nova.gpu.cpu_threads import apply_cores, cores_for_block, team_thread_ids
from nova.gpu.sm_plan import plan_partition
from nova.types import STAGES, Partition, Stage

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
    assert broker.acquire(P, part).cores == (3,) and broker.acquire(D, part).cores == (3,)
    assert broker.isolated_sets(part) == {V: (3,), P: (3,), D: (3,)}


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
