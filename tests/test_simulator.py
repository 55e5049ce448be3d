"""The simulator runs the real scheduler and policies on a virtual clock."""

from __future__ import annotations

import heapq
import itertools
import math
import time

import pytest

from nova.core.block_manager import BlockManager
from nova.core.policy import StageLimits, available_policies, make_policy
from nova.core.scheduler import Scheduler
from nova.engine.loop import EngineLoop
from nova.executor.fake import FakeExecutor
from nova.sampling_params import SamplingParams
from nova.sim.simulator import (
    DONE_EPS,
    SIM_TOKEN,
    TIME_EPS_S,
    BatchRecord,
    FixedCostModel,
    SimArrival,
    SimResult,
    Simulator,
)
from nova.types import STAGES, ImageInput, Request, RequestStatus, Stage, StageResult

DUR = {Stage.VISION: 0.06, Stage.PREFILL: 0.04, Stage.DECODE: 0.02}
IMAGE_TOKENS = 4


def _sim(policy: str, arrivals, num_blocks=256, durations=DUR):
    sim = Simulator(
        make_policy(policy, limits=StageLimits(max_num_seqs=8)),
        FixedCostModel(durations),
        num_kv_blocks=num_blocks,
        block_size=4,
        image_tokens=IMAGE_TOKENS,
        work_fn=lambda b: b,
    )
    return sim.run(arrivals)


def _trace():
    return [
        SimArrival(f"r{i}", t, 6 + i, i % 2, 3 + i % 3)
        for i, t in enumerate([0.0, 0.013, 0.151, 0.252, 0.395, 0.47, 0.71, 0.79])
    ]


@pytest.mark.parametrize("policy", [p for p in available_policies() if p != "nova"])
def test_every_policy_finishes_everything(policy):
    res = _sim(policy, _trace())
    assert len(res.requests) == 8
    assert all(r.status is RequestStatus.FINISHED for r in res.requests)
    assert all(len(r.output_token_ids) == r.sampling.max_tokens for r in res.requests)


def test_stages_that_take_turns_run_one_batch_at_a_time_decode_first():
    def run(turns: bool):
        sim = Simulator(
            make_policy("multi_stream", limits=StageLimits(max_num_seqs=8)),
            FixedCostModel(DUR),
            num_kv_blocks=256,
            block_size=4,
            image_tokens=IMAGE_TOKENS,
            work_fn=lambda b: b,
            stages_take_turns=turns,
        )
        return sim.run(_trace())

    split, turns = run(False), run(True)
    assert all(r.status is RequestStatus.FINISHED for r in turns.requests)

    def overlaps(res):
        recs = sorted(res.batches, key=lambda b: b.start_s)
        return sum(b.start_s < a.end_s - 1e-12 for a, b in itertools.pairwise(recs))

    assert overlaps(split) > 0 and overlaps(turns) == 0  # multi_stream co-runs unless turns
    # decode first: a prefill batch's sequences decode before any other front batch runs
    recs = sorted(turns.batches, key=lambda b: b.start_s)
    after_prefill = [b.stage for a, b in itertools.pairwise(recs) if a.stage is Stage.PREFILL]
    assert after_prefill and set(after_prefill) == {Stage.DECODE}


def test_sequential_timeline_is_exact():
    # one request with an image: vision 0.06, prefill 0.04, then 2 decode steps of 0.02
    res = _sim("sequential", [SimArrival("a", 0.5, 3, 1, 3)])
    [r] = res.requests
    t = r.times
    assert (t.arrival_s, t.vision_start_s, t.vision_end_s, t.prefill_end_s) == pytest.approx(
        (0.5, 0.5, 0.56, 0.6)
    )
    assert t.token_s == pytest.approx([0.6, 0.62, 0.64]) and t.finish_s == pytest.approx(0.64)


def test_closed_loop_sessions_wait_for_answers():
    arrivals = [
        SimArrival("s0-0", 0.0, 5, 0, 2, session_id="s0"),
        SimArrival("s0-1", None, 5, 0, 2, session_id="s0", think_time_s=1.0),
        SimArrival("s0-2", None, 5, 0, 2, session_id="s0", think_time_s=0.5),
    ]
    res = _sim("multi_stream", arrivals)
    r0, r1, r2 = res.requests
    assert r1.times.arrival_s == pytest.approx(r0.times.finish_s + 1.0)
    assert r2.times.arrival_s == pytest.approx(r1.times.finish_s + 0.5)


def test_tight_kv_cache_preempts_and_still_finishes():
    arrivals = [SimArrival(f"r{i}", 0.001 * i, 10, 0, 30) for i in range(12)]
    res = _sim("multi_stream", arrivals, num_blocks=40)
    assert res.num_preemptions > 0
    assert all(
        r.status is RequestStatus.FINISHED and len(r.output_token_ids) == 30 for r in res.requests
    )


# The threaded-engine parity test runs on a stretched clock: durations and arrivals x3, so
# arrivals sit >= 30 ms from every batch boundary and per-batch overheads are small beside the
# durations (at x1, 10 ms margins lost to thread jitter once on a loaded 2-core machine).
PARITY_SCALE = 3.0
PARITY_DUR = {s: d * PARITY_SCALE for s, d in DUR.items()}


def _engine_decisions(policy: str, arrivals) -> dict[Stage, list[tuple[str, ...]]]:
    sched = Scheduler(make_policy(policy, limits=StageLimits(max_num_seqs=8)), BlockManager(256, 4))
    ex = FakeExecutor(1000, PARITY_DUR)
    engine = EngineLoop(sched, ex)
    with engine:
        t0 = time.monotonic()
        for a in arrivals:
            time.sleep(max(0.0, a.arrival_s - (time.monotonic() - t0)))
            engine.add_request(
                Request(
                    a.request_id,
                    [1] * (a.num_text_tokens + a.num_images * IMAGE_TOKENS),
                    SamplingParams(max_tokens=a.max_tokens, ignore_eos=True),
                    [ImageInput(IMAGE_TOKENS, "h")] * a.num_images,
                )
            )
        assert engine.wait_idle(timeout_s=60)
    return {s: [tuple(b.request_ids) for b in ex.batches if b.stage is s] for s in Stage}


@pytest.mark.parametrize("policy", ["multi_stream", "sequential"])
def test_parity_engine_with_fake_executor_vs_simulator(policy):
    """Same trace, same durations: the real threaded engine and the simulator make the same
    batching decisions (arrivals sit >= 10 ms x PARITY_SCALE away from every batch boundary, so
    thread timing jitter cannot reorder them)."""
    margin = 0.01 * PARITY_SCALE
    arrivals = [
        SimArrival(
            a.request_id, a.arrival_s * PARITY_SCALE, a.num_text_tokens, a.num_images, a.max_tokens
        )
        for a in _trace()
    ]
    for _ in range(50):  # nudge arrivals that race a batch end in the simulated schedule
        sim = _sim(policy, arrivals, durations=PARITY_DUR)
        ends = [b.end_s for b in sim.batches]
        clash = [
            i
            for i, a in enumerate(arrivals)
            if i and min(abs(a.arrival_s - e) for e in ends) < margin
        ]
        if not clash:
            break
        i = clash[0]
        arrivals[i] = SimArrival(
            arrivals[i].request_id,
            arrivals[i].arrival_s + 0.7 * margin,
            arrivals[i].num_text_tokens,
            arrivals[i].num_images,
            arrivals[i].max_tokens,
        )
    assert not clash
    engine = _engine_decisions(policy, arrivals)
    for stage in Stage:
        assert engine[stage] == sim.decisions(stage), stage


# -- the fast event loop decides exactly like the straightforward one ------------------------------
def reference_run(sim: Simulator, arrivals) -> SimResult:
    """The oracle for ``Simulator.run``: the straightforward event loop. After every event it
    asks every idle stage for a batch and recomputes every running batch's rate from the cost
    model (no stage skipped, nothing memoized); otherwise the same rules (a batch keeps the
    share it started with, arrivals within ``TIME_EPS_S`` join an event, a closed-loop step is
    sent ``think_time_s`` after its session's previous step finished)."""
    sched = sim.scheduler
    seq = itertools.count()
    heap: list = []
    by_session: dict[str, list[SimArrival]] = {}
    for a in arrivals:
        if a.arrival_s is not None:
            heapq.heappush(heap, (a.arrival_s, next(seq), a))
        else:
            by_session.setdefault(a.session_id, []).append(a)
    session_of = {a.request_id: a.session_id for a in arrivals if a.session_id}
    requests, records = [], []
    running: dict[Stage, list] = {}  # stage -> [batch, work, remaining, rate]
    t = 0.0
    changed = False
    while True:
        started = changed
        for stage in STAGES:
            if stage not in running:
                batch = sched.schedule(stage, t)
                if batch is not None:
                    running[stage] = [batch, sim.work_fn(batch), 1.0, 0.0]
                    started = True
        if started:
            for stage, r in running.items():
                part = r[0].partition
                others = [
                    (o[1], o[0].partition.share(s)) for s, o in running.items() if s is not stage
                ]
                duration = sim.cost.time_s(r[1], part.share(stage), others, part.isolated)
                r[3] = 1.0 / max(duration, 1e-9)
        changed = False
        next_done = min((t + r[2] / r[3] for r in running.values()), default=math.inf)
        t_next = min(next_done, heap[0][0] if heap else math.inf)
        if t_next == math.inf:
            assert not sched.has_unfinished(), "the reference loop stalled"
            break
        for r in running.values():
            r[2] -= r[3] * (t_next - t)
        t = t_next
        for stage in [s for s, r in running.items() if r[2] <= DONE_EPS]:
            batch = running.pop(stage)[0]
            changed = True
            tokens = {it.request_id: SIM_TOKEN for it in batch.items if it.sample}
            events = sched.complete(
                StageResult(batch, t, tokens if stage is not Stage.VISION else {}), t
            )
            records.append(
                BatchRecord(
                    stage, batch.start_s, t, tuple(batch.request_ids), batch.partition.share(stage)
                )
            )
            for ev in events:
                sid = session_of.get(ev.request_id)
                if ev.finished and by_session.get(sid):
                    nxt = by_session[sid].pop(0)
                    heapq.heappush(heap, (t + nxt.think_time_s, next(seq), nxt))
        if sim.check_invariants:
            sched.block_manager.check_integrity()
        while heap and heap[0][0] <= t + TIME_EPS_S:
            _, _, a = heapq.heappop(heap)
            req = sim.make_request(a)
            sched.add_request(req, max(t, a.arrival_s if a.arrival_s is not None else t))
            requests.append(req)
    return SimResult(requests, records, t, sched.state.num_preemptions)


def _run(sim: Simulator, arrivals, reference: bool) -> SimResult:
    return reference_run(sim, arrivals) if reference else sim.run(arrivals)


def _paper_sim(policy: str, kv_blocks: int | None = None):
    from nova.cost.base import make_cost_model
    from nova.cost.model_spec import get_model_spec
    from nova.sim.eval import EXPERIMENTS, build_policy, num_kv_blocks

    exp = EXPERIMENTS["paper-a6000"]
    spec = get_model_spec(exp.model)
    cost = make_cost_model("roofline", exp.gpu, spec)
    return Simulator(
        build_policy(policy, exp, cost, spec),
        cost,
        kv_blocks or num_kv_blocks(cost, spec, 16),
        16,
        spec.image_tokens,
    )


def _paper_workloads():
    from nova.workload import make_workload

    return {
        "poisson-0.8": (make_workload("poisson", rate_rps=0.8, num_requests=50, seed=11), None),
        # 213 blocks hold two ~1700-token prompts but not their outputs too: preemptions
        "bursty-tight-kv": (
            make_workload("bursty", rate_rps=1.5, num_requests=40, seed=12, burstiness=0.3),
            213,
        ),
        "sessions": (
            make_workload("gui_sessions", num_sessions=5, steps_per_session=4, seed=13),
            None,
        ),
    }


def _outcome(res):
    batches = [(b.stage, b.start_s, b.end_s, b.request_ids, b.share) for b in res.batches]
    requests = [
        (
            r.request_id,
            r.status,
            r.times.arrival_s,
            r.times.vision_end_s,
            r.times.prefill_end_s,
            tuple(r.times.token_s),
            r.num_preemptions,
        )
        for r in res.requests
    ]
    return batches, requests, res.num_preemptions, res.end_s


@pytest.mark.parametrize("policy", available_policies())
def test_fast_loop_makes_the_reference_loops_decisions(policy):
    """Same seeded workloads, every policy: the fast loop (stages that cannot get a batch are not
    asked, cost-model answers memoized per shape) and the reference loop (every idle stage asked
    after every event, every rate recomputed) produce identical batches, times and preemptions."""
    from nova.sim.simulator import arrivals_from_workload

    preempted = 0
    for name, (wl, kv) in _paper_workloads().items():
        arrivals = arrivals_from_workload(wl)
        fast = _outcome(_paper_sim(policy, kv).run(arrivals))
        ref = _outcome(reference_run(_paper_sim(policy, kv), arrivals))
        assert len(fast[0]) > len(arrivals), name  # it really simulated something
        assert fast == ref, name
        preempted += fast[2]
    assert preempted > 0  # the tight cache exercised preemption too


@pytest.mark.parametrize("policy", ["multi_stream", "nova"])
def test_the_cost_memo_changes_no_decision(policy):
    """``memoize_costs=False`` (every rate asked of the cost model) decides exactly like the
    default: the memo keys (``shape_key``, shares, mode) determine the answers."""
    from nova.sim.simulator import arrivals_from_workload

    wl, kv = _paper_workloads()["bursty-tight-kv"]
    arrivals = arrivals_from_workload(wl)
    memo = _paper_sim(policy, kv)
    plain = _paper_sim(policy, kv)
    plain.memoize_costs = False
    assert _outcome(memo.run(arrivals)) == _outcome(plain.run(arrivals))


@pytest.mark.parametrize("policy", [p for p in available_policies() if p != "nova"])
def test_fast_loop_matches_reference_with_priorities_and_deadlines(policy):
    arrivals = [
        SimArrival(
            f"r{i}",
            0.011 * i,
            6 + i % 5,
            i % 3 % 2,
            2 + i % 4,
            priority=i % 3 - 1,
            deadline_s=None if i % 4 else 0.05 * (i % 7 + 1),
        )
        for i in range(30)
    ]
    runs = []
    for reference in (False, True):
        sim = Simulator(
            make_policy(policy, limits=StageLimits(max_num_seqs=4)),
            FixedCostModel(DUR),
            num_kv_blocks=30,
            block_size=4,
            image_tokens=IMAGE_TOKENS,
        )
        runs.append(_outcome(_run(sim, arrivals, reference)))
    assert runs[0] == runs[1]


def test_cost_model_gets_the_partitions_isolation_flag():
    """The simulator asks the cost model in the mode the batch's partition declares
    (``Partition.isolated``), whatever the partition's display name."""
    from nova.types import Partition

    class Recording(FixedCostModel):
        def time_s(self, work, sm_share, co_running=(), isolated=True):
            seen.add((work.stage, sm_share, isolated))
            return super().time_s(work, sm_share, co_running, isolated)

    assert not Partition.shared().isolated
    for policy, isolated in (("multi_stream", False), ("static_partition", True)):
        seen: set = set()
        sim = Simulator(
            make_policy(policy), Recording(DUR), num_kv_blocks=64, block_size=4, image_tokens=4
        )
        sim.run(_trace())
        assert seen and {mode for _, _, mode in seen} == {isolated}, policy
    part = make_policy("static_partition").partition(None, 0.0)
    assert part.isolated and (part.vision, part.prefill, part.decode) == (0.4, 0.4, 0.2)


def test_stages_taking_turns_serve_the_front_stage_holding_the_earliest_request():
    """On a device whose stages take turns (a 2-core CPU), after decode the front stage holding
    the earliest request goes, as the engine's turns go (``CoreBroker.rank_turn``): r1's
    prefill (arrived first) before r2's vision, though vision ran less recently."""
    from nova.cost.base import make_cost_model

    cost = make_cost_model("profiled", "cpu", "demo")
    arrivals = [
        SimArrival("r0", 0.0, 400, 0, 8),  # a long prompt: r1 and r2 arrive during it
        SimArrival("r1", 0.01, 35, 0, 8),
        SimArrival("r2", 0.02, 54, 1, 8),
    ]
    sim = Simulator(make_policy("multi_stream"), cost, 4000, 16, 196, stages_take_turns=True)
    res = sim.run(arrivals)
    assert res.decisions(Stage.PREFILL) == [("r0",), ("r1",), ("r2",)]
    assert res.decisions(Stage.VISION) == [("r2",)]
    start_s = {(b.stage, b.request_ids): b.start_s for b in res.batches}
    assert start_s[(Stage.PREFILL, ("r1",))] < start_s[(Stage.VISION, ("r2",))]
