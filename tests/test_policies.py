"""Each policy's decisions on constructed states, and properties over random workloads."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nova.core.block_manager import BlockManager
from nova.core.policy import StageLimits, available_policies, make_policy
from nova.core.scheduler import Scheduler
from nova.sampling_params import SamplingParams
from nova.sim.simulator import FixedCostModel, SimArrival, Simulator
from nova.types import ImageInput, Request, RequestStatus, Stage, StageResult


def roofline():
    from nova.cost.base import make_cost_model

    return make_cost_model("roofline", "a6000", "cogagent-9b")


def make(policy: str, num_blocks=256, block_size=4, **kw) -> Scheduler:
    if policy == "nova":
        kw.setdefault("cost_model", roofline())
        kw.setdefault("image_tokens", 4)
    return Scheduler(
        make_policy(policy, limits=StageLimits(max_num_seqs=8), **kw),
        BlockManager(num_blocks, block_size),
    )


def req(rid, n=6, images=0, max_tokens=4):
    return Request(
        rid,
        [1] * (n + 4 * images),
        SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        [ImageInput(4, rid)] * images,
    )


def done(s: Scheduler, batch, t):
    toks = (
        {it.request_id: 5 for it in batch.items if it.sample}
        if batch.stage is not Stage.VISION
        else {}
    )
    return s.complete(StageResult(batch, t, toks), t)


# -- pf_limit ---------------------------------------------------------------------------------
def test_pf_limit_prefers_prefill_but_bounds_the_streak():
    s = make("pf_limit", max_consecutive_prefills=2)
    s.add_request(req("a"), 0)
    done(s, s.schedule(Stage.PREFILL, 0), 1)  # streak 1; a decodes now
    s.add_request(req("p"), 1)
    assert s.schedule(Stage.DECODE, 1) is None  # prefill first while under the limit
    b = s.schedule(Stage.PREFILL, 1)
    assert b.request_ids == ["p"]
    assert s.schedule(Stage.DECODE, 1) is None  # time-sliced: nothing beside a running batch
    done(s, b, 2)  # streak 2 == limit
    s.add_request(req("q"), 2)
    assert s.schedule(Stage.PREFILL, 2) is None  # the limit: decode must go now
    done(s, s.schedule(Stage.DECODE, 2), 3)  # streak reset
    assert s.schedule(Stage.PREFILL, 3).request_ids == ["q"]


# -- chunked_prefill --------------------------------------------------------------------------
def test_chunked_prefill_mixes_decode_and_chunks_under_budget():
    s = make("chunked_prefill", token_budget=8)
    s.add_request(req("d", n=3, max_tokens=10), 0)
    done(s, s.schedule(Stage.PREFILL, 0), 1)  # d is decoding
    s.add_request(req("long", n=20), 1)
    b = s.schedule(Stage.PREFILL, 1)
    kinds = {it.request_id: it for it in b.items}
    assert kinds["d"].token_ids == (5,) and kinds["d"].sample  # one decode token rides along
    assert len(kinds["long"].token_ids) == 7 and not kinds["long"].sample  # budget 8 - 1 decode
    assert b.num_tokens == 8
    done(s, b, 2)
    long = next(r for r in s.state.requests.values() if r.request_id == "long")
    assert long.num_computed_tokens == 7 and long.status is RequestStatus.WAITING_PREFILL
    while long.status is RequestStatus.WAITING_PREFILL:
        b = s.schedule(Stage.PREFILL, 3)
        assert b.num_tokens <= 8
        done(s, b, 3)
    assert long.num_computed_tokens == 20 and len(long.output_token_ids) == 1
    s.block_manager.check_integrity()


def test_chunked_prefill_encodes_images_inline_before_the_first_chunk():
    s = make("chunked_prefill")
    s.add_request(req("img", images=1), 0)
    assert s.schedule(Stage.PREFILL, 0) is None
    vb = s.schedule(Stage.VISION, 0)
    assert vb.request_ids == ["img"] and s.schedule(Stage.PREFILL, 0) is None  # time-sliced


def test_chunked_prefill_encodes_the_images_its_next_step_reaches():
    # budget 32, no decode: a (14 tokens) and b (14) fit the step, c (14) gets 4 tokens of it,
    # d is not reached. vLLM V1 encodes a, b and c before that step's forward.
    s = make("chunked_prefill", token_budget=32, num_blocks=512)
    for i, rid in enumerate("abcd"):
        s.add_request(req(rid, n=10, images=1), 0.001 * i)
    vb = s.schedule(Stage.VISION, 0.01)
    assert vb.request_ids == ["a", "b", "c"]
    done(s, vb, 1)
    b = s.schedule(Stage.PREFILL, 1)
    assert [it.request_id for it in b.items] == ["a", "b", "c"] and b.num_tokens == 32
    done(s, b, 2)
    # a and b decode now (2 of the budget), c has 10 tokens left: d (14) gets the other 20
    vb = s.schedule(Stage.VISION, 2)
    assert vb.request_ids == ["d"]
    done(s, vb, 3)
    b = s.schedule(Stage.PREFILL, 3)
    assert sorted(it.request_id for it in b.items) == ["a", "b", "c", "d"]
    assert b.num_tokens == 2 + 10 + 14
    s.block_manager.check_integrity()


def test_chunked_prefill_runs_the_fused_step_first_when_the_head_fills_it():
    s = make("chunked_prefill", token_budget=8, num_blocks=512)
    s.add_request(req("long", n=20), 0)
    s.add_request(req("img", images=1), 0.001)
    assert s.schedule(Stage.VISION, 0.01) is None  # long's 20 tokens fill the budget of 8
    b = s.schedule(Stage.PREFILL, 0.01)
    assert [it.request_id for it in b.items] == ["long"] and b.num_tokens == 8


def test_chunked_prefill_encoder_step_stays_within_the_encoder_budget():
    # images of 24 tokens against a budget of 16: the encoder budget is max(16, 24) = one image
    # a step, however far the token budget reaches (max_vision_images caps it as well)
    s = Scheduler(
        make_policy("chunked_prefill", limits=StageLimits(max_num_seqs=8), token_budget=16),
        BlockManager(512, 4),
    )
    for i, rid in enumerate("ab"):
        s.add_request(
            Request(rid, [1] * 26, SamplingParams(max_tokens=2), [ImageInput(24, rid)]), 0.001 * i
        )
    assert s.schedule(Stage.VISION, 0.01).request_ids == ["a"]
    t = make("chunked_prefill", token_budget=64, num_blocks=512)
    t.policy.limits = StageLimits(max_num_seqs=8, max_vision_images=2)
    for i, rid in enumerate("abc"):
        t.add_request(req(rid, n=2, images=1), 0.001 * i)
    assert t.schedule(Stage.VISION, 0.01).request_ids == ["a", "b"]


# -- static_partition -------------------------------------------------------------------------
def test_static_partition_runs_stages_concurrently_on_a_fixed_split():
    s = make("static_partition")
    s.add_request(req("img", images=1), 0)
    s.add_request(req("txt"), 0)
    vb, pb = s.schedule(Stage.VISION, 0), s.schedule(Stage.PREFILL, 0)
    assert vb is not None and pb is not None
    assert (vb.partition.vision, vb.partition.prefill, vb.partition.decode) == (0.4, 0.4, 0.2)


# -- nova (more in tests/test_nova_policy.py) ---------------------------------------------------
def test_nova_needs_a_cost_model():
    with pytest.raises(ValueError, match="needs a cost model"):
        make_policy("nova")


def test_nova_never_coruns_vision_and_prefill_and_prefers_prefill():
    s = make("nova", fixed_mode="spatial:12:12:1")
    s.add_request(req("img", images=1), 0)
    s.add_request(req("txt"), 0.1)
    assert s.schedule(Stage.VISION, 0.1) is None  # prefill waiting: it goes first
    pb = s.schedule(Stage.PREFILL, 0.1)
    assert pb.request_ids == ["txt"]
    assert s.schedule(Stage.VISION, 0.1) is None  # prefill runs: vision waits
    done(s, pb, 0.5)
    vb = s.schedule(Stage.VISION, 0.5)
    assert vb is not None and s.schedule(Stage.PREFILL, 0.5) is None
    # decode co-runs with vision on its own slice, the compute stage on the exact rest
    db = s.schedule(Stage.DECODE, 0.5)
    assert db is not None
    assert round(db.partition.decode * 84) == 12 and round(vb.partition.vision * 84) == 72


# -- properties over random workloads ----------------------------------------------------------
arrival_st = st.lists(
    st.tuples(
        st.floats(0, 2.0),
        st.integers(1, 30),
        st.integers(0, 2),
        st.integers(1, 12),
        st.integers(0, 1),
    ),
    min_size=1,
    max_size=25,
)


@pytest.mark.parametrize("policy", available_policies())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=arrival_st, num_blocks=st.integers(24, 200))
def test_no_policy_starves_a_stage_or_exceeds_kv(policy, spec, num_blocks):
    arrivals = [
        SimArrival(f"r{i}", t, n, imgs, out, priority=prio)
        for i, (t, n, imgs, out, prio) in enumerate(sorted(spec))
    ]
    kw = {}
    if policy == "nova":
        kw = {"cost_model": _ScaledRoofline(), "image_tokens": 4}
    pol = make_policy(policy, limits=StageLimits(max_num_seqs=6, max_prefill_tokens=64), **kw)
    cost = (
        _ScaledRoofline()
        if policy == "nova"
        else FixedCostModel({Stage.VISION: 0.03, Stage.PREFILL: 0.02, Stage.DECODE: 0.01})
    )
    sim = Simulator(
        pol,
        cost,
        num_kv_blocks=num_blocks,
        block_size=4,
        image_tokens=4,
        check_invariants=True,
        work_fn=_work,
    )
    res = sim.run(arrivals)  # raises if the policy ever stalls with work left
    assert len(res.requests) == len(arrivals)
    for r in res.requests:  # every stage served every request, fully
        assert r.status is RequestStatus.FINISHED
        assert len(r.output_token_ids) == r.sampling.max_tokens
        assert (r.times.vision_end_s is not None) == bool(r.images)
    assert sim.scheduler.block_manager.num_free_blocks == num_blocks


def _work(batch):
    from nova.cost.base import StageWork

    return StageWork.from_batch(batch)


class _ScaledRoofline:
    """The A6000 roofline on tiny shapes (fast enough for property tests)."""

    def __init__(self) -> None:
        self.inner = roofline()

    def time_s(self, work, sm_share, co_running=(), isolated=True):
        return self.inner.time_s(work, sm_share, co_running, isolated)

    def gpu(self):
        return self.inner.gpu()


def test_batch_plan_init_sets_every_field_to_its_declared_default():
    """``BatchPlan`` writes its ``__init__`` out (the slots' setters: a plan is built per step);
    its parameters are the declared fields, with the declared defaults, and it stays a frozen,
    hashable value."""
    import dataclasses
    import inspect

    from nova.core.policy import BatchPlan

    params = list(inspect.signature(BatchPlan.__init__).parameters.values())[1:]
    declared = dataclasses.fields(BatchPlan)
    assert [p.name for p in params] == [f.name for f in declared]
    assert [p.default for p in params] == [
        inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default for f in declared
    ]
    plan = BatchPlan(Stage.PREFILL, ("a", "b"), max_tokens=5, chunked=True)
    assert (plan.stage, plan.request_ids, plan.max_requests, plan.max_tokens) == (
        Stage.PREFILL,
        ("a", "b"),
        None,
        5,
    )
    assert (plan.max_images, plan.chunked, plan.decode_ids) == (None, True, ())
    assert plan == BatchPlan(Stage.PREFILL, ("a", "b"), None, 5, None, True)
    assert hash(plan) == hash(BatchPlan(Stage.PREFILL, ("a", "b"), max_tokens=5, chunked=True))
    assert dataclasses.replace(plan, max_tokens=6).max_tokens == 6
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.max_tokens = 7  # type: ignore[misc]
