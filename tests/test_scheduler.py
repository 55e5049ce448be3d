"""The scheduler and policies, torch-free, fed with made-up stage results."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from nova.core.block_manager import BlockManager
from nova.core.policy import StageLimits, available_policies, make_policy
from nova.core.scheduler import RequestRejected, Scheduler
from nova.sampling_params import SamplingParams
from nova.types import ImageInput, Request, RequestEvent, RequestStatus, Stage, StageResult

EOS = 0


def test_core_is_torch_free():
    code = (
        "import sys, nova.core.scheduler, nova.core.policy, nova.types, nova.metrics; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def make_sched(policy="multi_stream", num_blocks=64, block_size=4, **limits) -> Scheduler:
    extra = {}
    if policy == "nova":
        from nova.cost.base import make_cost_model

        extra = {
            "cost_model": make_cost_model("roofline", "a6000", "cogagent-9b"),
            "image_tokens": 3,
        }
    return Scheduler(
        make_policy(policy, limits=StageLimits(**limits), **extra),
        BlockManager(num_blocks, block_size),
        eos_token_ids=(EOS,),
    )


def req(rid, n_prompt=5, max_tokens=4, images=0, priority=0, deadline_s=None) -> Request:
    return Request(
        rid,
        list(range(1, n_prompt + 1)),
        SamplingParams(max_tokens=max_tokens),
        [ImageInput(3, f"h{rid}{i}") for i in range(images)],
        priority,
        deadline_s,
    )


def finish(s: Scheduler, batch, now, token=7, failed=None):
    return s.complete(
        StageResult(
            batch,
            now,
            dict.fromkeys(batch.request_ids, token) if batch.stage is not Stage.VISION else {},
            failed or {},
        ),
        now,
    )


def test_stage_flow_and_timestamps():
    s = make_sched()
    r = req("a", images=1, max_tokens=2)
    s.add_request(r, 1.0)
    assert r.status is RequestStatus.WAITING_VISION
    assert s.schedule(Stage.PREFILL, 1.0) is None
    vb = s.schedule(Stage.VISION, 1.5)
    assert vb.request_ids == ["a"] and vb.num_images == 1
    assert s.schedule(Stage.VISION, 1.6) is None  # stage busy
    finish(s, vb, 2.0)
    pb = s.schedule(Stage.PREFILL, 2.5)
    assert pb.items[0].token_ids == tuple(range(1, 6)) and pb.items[0].num_cached_tokens == 0
    [ev] = finish(s, pb, 3.0, token=9)
    assert ev.new_token_ids == (9,) and not ev.finished and r.status is RequestStatus.DECODING
    db = s.schedule(Stage.DECODE, 3.0)
    assert db.items[0].token_ids == (9,) and db.items[0].num_cached_tokens == 5
    [ev] = finish(s, db, 3.5, token=11)
    assert ev.finished and ev.finish_reason == "length"
    t = r.times
    assert (
        t.arrival_s,
        t.vision_start_s,
        t.vision_end_s,
        t.prefill_start_s,
        t.prefill_end_s,
        t.token_s,
        t.finish_s,
    ) == (1.0, 1.5, 2.0, 2.5, 3.0, [3.0, 3.5], 3.5)
    assert s.block_manager.num_free_blocks == 64 and not s.has_unfinished()


def test_eos_and_stop_tokens_finish():
    s = make_sched()
    s.add_request(req("a", max_tokens=10), 0)
    [ev] = finish(s, s.schedule(Stage.PREFILL, 0), 1, token=EOS)
    assert ev.finished and ev.finish_reason == "stop"
    r = Request("b", [1, 2], SamplingParams(max_tokens=10, stop_token_ids=(5,)))
    s.add_request(r, 2)
    finish(s, s.schedule(Stage.PREFILL, 2), 3, token=4)
    [ev] = finish(s, s.schedule(Stage.DECODE, 3), 4, token=5)
    assert ev.finish_reason == "stop" and r.output_token_ids == [4, 5]


def test_ordering_fcfs_priority_deadline():
    s = make_sched(max_num_seqs=8)
    s.add_request(req("late-low", priority=1), 0.0)
    s.add_request(req("first"), 1.0)
    s.add_request(req("second", deadline_s=100.0), 2.0)
    s.add_request(req("urgent", deadline_s=1.0), 3.0)
    b = s.schedule(Stage.PREFILL, 3.0)
    # priority 0 before 1; among those, earliest absolute deadline first, then arrival
    assert b.request_ids == ["urgent", "second", "first", "late-low"]


def test_prefill_token_budget_and_head_of_line_admission():
    s = make_sched(num_blocks=6, block_size=4, max_prefill_tokens=12)
    s.add_request(req("a", n_prompt=8, max_tokens=1), 0)
    s.add_request(req("b", n_prompt=8, max_tokens=3), 1)
    pb = s.schedule(Stage.PREFILL, 1)
    assert pb.request_ids == ["a"]  # token budget 12: a + b would be 16
    finish(s, pb, 2)  # a is done (max_tokens=1)
    finish(s, s.schedule(Stage.PREFILL, 2), 3)  # b decodes, holding 2 of 6 blocks
    s.add_request(req("d", n_prompt=17), 4)  # needs 5 blocks, 4 free
    s.add_request(req("c", n_prompt=2), 5)  # would fit, but must not overtake d
    assert s.schedule(Stage.PREFILL, 5) is None
    assert s.block_manager.num_free_blocks == 4
    while s.block_manager.has_seq("b"):
        finish(s, s.schedule(Stage.DECODE, 6), 6)
    pb = s.schedule(Stage.PREFILL, 7)
    assert pb.request_ids == ["d"]  # alone: over the budget, but a batch takes at least one


def test_request_larger_than_cache_is_rejected():
    s = make_sched(num_blocks=4, block_size=4)
    with pytest.raises(RequestRejected, match="whole cache holds 16"):
        s.add_request(req("big", n_prompt=10, max_tokens=10), 0)
    assert not s.has_unfinished()


def test_decode_preempts_and_resumes_by_recompute():
    s = make_sched(num_blocks=5, block_size=2, max_num_seqs=8)
    for rid in ("a", "b"):
        s.add_request(req(rid, n_prompt=4, max_tokens=6), 0 if rid == "a" else 1)
    finish(s, s.schedule(Stage.PREFILL, 1), 2, token=3)  # a: 2 blocks, b: 2 blocks, 1 free
    db = s.schedule(Stage.DECODE, 2)  # both need 5 tokens = 3 blocks each: b is preempted
    assert db.request_ids == ["a"]
    b = s.state.requests["b"]
    assert b.status is RequestStatus.WAITING_PREFILL and b.num_preemptions == 1
    assert s.block_manager.num_tokens("a") == 5 and not s.block_manager.has_seq("b")
    finish(s, db, 3, token=4)
    s.block_manager.check_integrity()
    # a keeps decoding; b comes back when a finishes and recomputes prompt + its 1 output
    while "a" in s.state.requests:
        finish(s, s.schedule(Stage.DECODE, 4), 5, token=4)
    pb = s.schedule(Stage.PREFILL, 6)
    assert pb.request_ids == ["b"] and pb.items[0].token_ids == (1, 2, 3, 4, 3)
    finish(s, pb, 7, token=8)
    assert b.output_token_ids == [3, 8] and b.times.prefill_start_s == 1  # first prefill kept
    while s.has_unfinished():
        finish(s, s.schedule(Stage.DECODE, 8), 9)
    assert len(b.output_token_ids) == 6 and s.block_manager.num_free_blocks == 5


@pytest.mark.parametrize(
    "where",
    ["waiting_vision", "in_vision", "waiting_prefill", "in_prefill", "decoding", "in_decode"],
)
def test_abort_in_every_stage_frees_blocks(where):
    s = make_sched(num_blocks=16)
    r = req("a", images=1, max_tokens=5)
    s.add_request(r, 0)
    steps = [
        "waiting_vision",
        "in_vision",
        "waiting_prefill",
        "in_prefill",
        "decoding",
        "in_decode",
    ]
    running = None
    for step in steps:
        if step == "in_vision":
            running = s.schedule(Stage.VISION, 1)
        elif step == "waiting_prefill":
            finish(s, running, 2)
            running = None
        elif step == "in_prefill":
            running = s.schedule(Stage.PREFILL, 3)
        elif step == "decoding":
            finish(s, running, 4)
            running = None
        elif step == "in_decode":
            running = s.schedule(Stage.DECODE, 5)
        if step == where:
            break
    ev = s.abort("a", 6)
    assert ev.finished and ev.finish_reason == "abort" and r.status is RequestStatus.ABORTED
    assert s.abort("a", 6) is None  # only once
    if running is not None:  # blocks are freed when the in-flight batch completes
        events = finish(s, running, 7)
        assert events == []  # an aborted request emits nothing more
    assert s.block_manager.num_free_blocks == 16
    assert not s.has_unfinished()
    s.block_manager.check_integrity()


def test_failure_of_one_request_fails_only_it():
    s = make_sched()
    for rid in "abc":
        s.add_request(req(rid), 0)
    pb = s.schedule(Stage.PREFILL, 0)
    events = s.complete(StageResult(pb, 1, {"a": 5, "c": 5}, {"b": "boom"}), 1)
    by_id = {e.request_id: e for e in events}
    assert (
        by_id["b"].finished and by_id["b"].error == "boom" and by_id["b"].finish_reason == "error"
    )
    assert not by_id["a"].finished and not by_id["c"].finished
    assert not s.block_manager.has_seq("b")


def test_a_step_without_a_token_fails_only_that_request():
    """An executor that returns no token for one sequence of a step (prefill or a plain decode
    step, which ``complete`` applies on its own path) fails that request only."""
    s = make_sched()
    for rid in "abc":
        s.add_request(req(rid, max_tokens=5), 0)
    pb = s.schedule(Stage.PREFILL, 0)
    events = s.complete(StageResult(pb, 1, {"a": 5, "c": 5}), 1)
    by_id = {e.request_id: e for e in events}
    assert by_id["b"].finished and by_id["b"].error == "executor returned no token for prefill"
    db = s.schedule(Stage.DECODE, 1)
    assert db.request_ids == ["a", "c"]
    events = s.complete(StageResult(db, 2, {"c": 6}), 2)
    assert events == [
        RequestEvent("a", (), True, "error", "executor returned no token for decode"),
        RequestEvent("c", (6,), False),
    ]
    assert not s.block_manager.has_seq("a") and s.state.requests["c"].output_token_ids == [5, 6]
    assert "a" not in s.state.requests and not s.state.in_flight


def test_sequential_runs_one_stage_at_a_time_fcfs():
    s = make_sched("sequential")
    s.add_request(req("img", images=1), 0)
    s.add_request(req("txt"), 1)
    assert s.schedule(Stage.PREFILL, 1) is None  # the oldest request waits for vision
    vb = s.schedule(Stage.VISION, 1)
    assert vb is not None and s.schedule(Stage.PREFILL, 1) is None  # something runs
    finish(s, vb, 2)
    assert s.schedule(Stage.DECODE, 2) is None
    pb = s.schedule(Stage.PREFILL, 2)
    assert pb.request_ids == ["img", "txt"]


@pytest.mark.parametrize("policy", available_policies())
@pytest.mark.parametrize("seed", range(4))
def test_long_random_run_keeps_integrity_and_finishes_everything(policy, seed):
    rng = random.Random(seed)
    s = make_sched(policy, num_blocks=24, block_size=4, max_num_seqs=6, max_prefill_tokens=40)
    now = 0.0
    submitted, finished_ids, aborted_ids = [], [], []
    running = {}
    for step in range(2000):
        now += 0.01
        if step < 600 and rng.random() < 0.15:
            r = req(
                f"r{step}",
                n_prompt=rng.randint(1, 20),
                max_tokens=rng.randint(1, 30),
                images=rng.choice([0, 0, 1, 2]),
                priority=rng.choice([0, 0, 1]),
            )
            s.add_request(r, now)
            submitted.append(r)
        if rng.random() < 0.02 and s.state.requests:
            rid = rng.choice(list(s.state.requests))
            if s.abort(rid, now) is not None:
                aborted_ids.append(rid)
        for stage in Stage:
            if stage not in running:
                b = s.schedule(stage, now)
                if b is not None:
                    running[stage] = b
        if running:
            stage = rng.choice(list(running))
            b = running.pop(stage)
            tokens = {rid: rng.choice([EOS, 3, 4, 5, 6, 7, 8]) for rid in b.request_ids}
            failed = {rid: "injected" for rid in b.request_ids if rng.random() < 0.01}
            for ev in s.complete(
                StageResult(b, now, tokens if stage is not Stage.VISION else {}, failed), now
            ):
                if ev.finished:
                    finished_ids.append(ev.request_id)
        s.block_manager.check_integrity()
        if step > 600 and not s.has_unfinished():
            break
    assert not s.has_unfinished()
    assert len(finished_ids) == len(set(finished_ids))
    assert set(finished_ids) | set(aborted_ids) == {r.request_id for r in submitted}
    assert all(r.status.is_done for r in submitted)
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks
    for r in submitted:
        if r.status is RequestStatus.FINISHED:
            assert len(r.output_token_ids) <= r.sampling.max_tokens
            assert len(r.times.token_s) == len(r.output_token_ids)


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown policy 'nope'; choose one of"):
        make_policy("nope")


def test_engine_config_takes_policy_variants_and_names_a_bad_one():
    from nova.config import EngineConfig

    assert EngineConfig(policy="chunked_prefill[budget=2048]").policy.endswith("=2048]")
    with pytest.raises(ValueError, match="unknown policy 'nope'; choose one of"):
        EngineConfig(policy="nope")
    with pytest.raises(ValueError, match="no variant parameter 'x'; its parameters: budget"):
        EngineConfig(policy="chunked_prefill[x=1]")
    with pytest.raises(ValueError, match="malformed policy name"):
        EngineConfig(policy="chunked_prefill[budget")


def test_objects_built_through_slot_setters_equal_the_constructors_results():
    """The decode hot path builds items, events and batches through the slots' setters
    (``nova.core.scheduler._batch_item`` ...): equal to what the constructors build, field
    for field, defaults included."""
    import dataclasses
    import inspect

    from nova.core import scheduler as sched_mod
    from nova.types import Batch, BatchItem, ItemExtras, Partition, RequestEvent

    params = list(inspect.signature(sched_mod._batch_item).parameters.values())
    assert [(p.name, p.default) for p in params] == [
        (f.name, inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(BatchItem)
    ]
    assert sched_mod._batch_item("a", (7,), 12, (3, 4)) == BatchItem("a", (7,), 12, (3, 4))
    extras = ItemExtras(block_copies=((1, 2),))
    assert sched_mod._batch_item("b", (1, 2), 0, (5,), 1, False, extras) == BatchItem(
        "b", (1, 2), 0, (5,), 1, False, extras
    )
    for reason in (None, "length"):
        built = sched_mod._token_event("a", 7, reason)
        assert built == RequestEvent("a", (7,), reason is not None, reason)
    item = BatchItem("a", (7,), 12, (3, 4))
    part = Partition(0.5, 0.5, 0.5, name="p", isolated=True)
    args = (3, Stage.DECODE, (item,), part, 1.5, ("h",))
    assert sched_mod._batch(*args) == Batch(*args)
    # ... and the scheduler's own decode steps carry them
    s = make_sched()
    s.add_request(req("a", max_tokens=3), 0)
    finish(s, s.schedule(Stage.PREFILL, 0), 1)
    db = s.schedule(Stage.DECODE, 1)
    assert db == Batch(db.batch_id, Stage.DECODE, db.items, db.partition, 1, ())
    assert db.items == (BatchItem("a", (7,), 5, tuple(s.block_manager.block_table("a"))),)
    assert finish(s, db, 2) == [RequestEvent("a", (7,), False)]
