"""The nova policy on a coarse device (a 2-core CPU): the decode_first mode it adds there, the
discipline that mode runs (decode sets drain before front work), that a cost model seeing the
device as one unit cannot offer spatial splits, and that GPUs keep their decision space."""

from __future__ import annotations

import itertools
import random

import pytest
from conftest import load_benchmark

from nova.core.nova_model import DECODE_FIRST, LoadEstimate, Mode
from nova.core.nova_policy import NovaPolicy
from nova.core.policy import StageLimits
from nova.cost.base import make_cost_model
from nova.cost.gpus import cpu_spec
from nova.cost.model_spec import get_model_spec
from nova.metrics import request_metrics, summarize
from nova.sim.simulator import SimArrival, Simulator
from nova.types import Stage

# the engine's setting for the demo model on this machine's 2 cores: the shipped CPU profile
# (one "SM") planned on the cpu backend's 2-core grid
_LIMITS = StageLimits(8, 4096, 64)
_IMAGE_TOKENS = 196  # the demo model's tokens per image


def _demo_cpu_policy(**kw) -> NovaPolicy:
    cost = make_cost_model("profiled", "cpu", "demo")
    return NovaPolicy(_LIMITS, cost, image_tokens=_IMAGE_TOKENS, sm_granularity_share=0.5, **kw)


def _burst(n: int = 64) -> list[SimArrival]:
    """``engine_latency``'s burst: 3 of 4 requests with a screenshot, 32 output tokens."""
    return [
        SimArrival(f"r{i}", 0.0, 35 if i % 4 == 3 else 54, 0 if i % 4 == 3 else 1, 32)
        for i in range(n)
    ]


def _run(policy, n: int = 64):
    cost = make_cost_model("profiled", "cpu", "demo")
    return Simulator(policy, cost, 4000, 16, _IMAGE_TOKENS).run(_burst(n))


def test_decode_first_labels_round_trip_and_need_a_vision_batch():
    mode = Mode.decode_first(8)
    assert mode.time_sliced and mode.label == "decode_first:8"
    assert Mode.parse("decode_first:8") == mode
    with pytest.raises(ValueError, match="vision_batch"):
        Mode.decode_first(0)
    with pytest.raises(ValueError, match="decode_first:VB"):
        Mode.parse("decode_first:1:2")


def test_a_two_core_cpu_is_coarse_and_a_one_unit_cost_model_offers_no_split():
    policy = _demo_cpu_policy()
    assert policy.num_sms == 2 and policy.coarse_device
    assert not policy.allow_spatial  # the profile prices half the cores like all of them
    assert policy.mode == Mode.decode_first(_LIMITS.max_vision_images)
    kinds = {p.mode.kind for p in policy.candidates(LoadEstimate(0.5, 0.75, 1.0, 50.0, 32.0))}
    assert DECODE_FIRST in kinds and "spatial" not in kinds


def test_a_cpu_roofline_prices_the_split_and_still_adds_decode_first():
    spec = get_model_spec("cogagent-9b")
    two = NovaPolicy(
        _LIMITS, make_cost_model("roofline", cpu_spec(2), spec), sm_granularity_share=0.5
    )
    assert two.coarse_device and two.allow_spatial
    kinds = {p.mode.kind for p in two.candidates(LoadEstimate(0.05, 1.0, 1.0, 150.0, 50.0))}
    assert {"spatial", DECODE_FIRST} <= kinds
    eight = NovaPolicy(
        _LIMITS, make_cost_model("roofline", cpu_spec(8), spec), sm_granularity_share=1 / 8
    )
    assert not eight.coarse_device  # decode can get 1 core of 8: the split is worth scoring
    assert all(
        p.mode.kind != DECODE_FIRST for p in eight.candidates(LoadEstimate(0.05, 1, 1, 150, 50))
    )


@pytest.mark.parametrize("gpu", ["a6000", "h100-sxm"])
def test_gpus_keep_their_decision_space(gpu):
    cost = make_cost_model("roofline", gpu, "cogagent-9b")
    policy = NovaPolicy(StageLimits(), cost, image_tokens=1600)
    assert not policy.coarse_device and policy.allow_spatial
    assert policy.mode.kind == "chunked"
    load = LoadEstimate(0.5, 1.0, 1.0, 150.0, 55.0)
    assert {p.mode.kind for p in policy.candidates(load)} == {"spatial", "chunked", "prefill_first"}


def test_decode_first_drains_each_decode_set_before_front_work():
    res = _run(_demo_cpu_policy(fixed_mode="decode_first:8"), n=24)
    decode = [b for b in res.batches if b.stage is Stage.DECODE]
    front = [b for b in res.batches if b.stage is not Stage.DECODE]
    assert decode and front
    for b in front:  # no front batch starts while a sequence waits to decode
        decoding = [
            r
            for r in res.requests
            if r.times.prefill_end_s is not None
            and r.times.prefill_end_s <= b.start_s
            and r.times.finish_s is not None
            and r.times.finish_s > b.start_s
        ]
        assert not decoding, (b.stage, b.start_s, [r.request_id for r in decoding])
    # time-sliced: batches never overlap
    ordered = sorted(res.batches, key=lambda b: b.start_s)
    assert all(a.end_s <= b.start_s + 1e-9 for a, b in itertools.pairwise(ordered))


def test_on_a_burst_the_cpu_policy_stays_decode_first_and_decode_steps_run_alone():
    policy = _demo_cpu_policy()
    res = _run(policy)
    assert {label for _, label in policy.mode_log} == {"decode_first:8"}
    chunked = _run(_demo_cpu_policy(fixed_mode="chunked:128"))

    def tpot_p50(r):
        return summarize([request_metrics(q) for q in r.requests], duration_s=r.end_s).tpot.p50

    # a decoding sequence's tokens come one plain decode step apart, never behind a prompt
    # chunk: its TPOT is below the fused steps' of the chunked mode nova used to start in
    assert tpot_p50(res) < tpot_p50(chunked)
    assert all(len(r.output_token_ids) == 32 for r in res.requests)


def _poisson(rate_rps: float, n: int, seed: int) -> list[SimArrival]:
    """Poisson arrivals of ``engine_latency``'s mix: ``benchmarks/decode_first_model.py``'s."""
    return load_benchmark("decode_first_model").arrivals(rate_rps, n, seed)


@pytest.mark.parametrize("rate_rps", [0.8, 1.3])
def test_the_decode_first_model_tracks_the_simulated_cycles(rate_rps):
    """decode_first runs gated cycles (a vision batch, a prefill batch, the decode set drained):
    its batches grow with the load. The model's mean latency stays within 25% of the
    simulator's running the same mode on the same profile, its tail within 0.7-1.6x the
    simulated p99 (an M/G/1 model with the decode steps as a fixed batch's service priced the
    mean at 7x and the capacity at a third of the cycles')."""
    policy = _demo_cpu_policy(fixed_mode="decode_first:8")
    cost = make_cost_model("profiled", "cpu", "demo")
    sim = Simulator(policy, cost, 4000, 16, _IMAGE_TOKENS, stages_take_turns=True)
    res = sim.run(_poisson(rate_rps, 300, 0))
    got = summarize([request_metrics(q) for q in res.requests], duration_s=res.end_s)
    pred = policy.model.predict(
        Mode.decode_first(8), LoadEstimate(rate_rps, 0.75, 1.0, 47.0, 32.0, 32.0)
    )
    assert 0.75 * got.e2e.mean <= pred.mean_latency_s <= 1.25 * got.e2e.mean
    assert 0.7 * got.e2e.p99 <= pred.tail_latency_s <= 1.6 * got.e2e.p99
    # the burst: 64 requests drain at about the cycles' capacity
    burst = Simulator(policy, cost, 4000, 16, _IMAGE_TOKENS, stages_take_turns=True).run(
        [
            SimArrival(f"b{i}", 1e-3 * i, 35 if i % 4 == 3 else 54, 0 if i % 4 == 3 else 1, 32)
            for i in range(64)
        ]
    )
    assert 0.75 <= pred.capacity_rps / (64 / burst.end_s) <= 1.25


def _stalling_burst(stall_seed: int) -> list[SimArrival]:
    """``engine_latency``'s burst as the engine sees it: 64 requests (3 of 4 with a
    screenshot, 32 output tokens) submitted within about 2.5 s, most 1 ms apart, some after a
    stall of 50-400 ms (the submitting thread waiting for the engine's)."""
    rng = random.Random(stall_seed)
    t, out = 0.0, []
    for i in range(64):
        t += 0.001 if rng.random() < 0.85 else rng.uniform(0.05, 0.4)
        image = i % 4 != 3
        out.append(SimArrival(f"r{i}", t, 54 if image else 35, 1 if image else 0, 32))
    return out


def test_provisional_switches_can_be_held_through_a_burst_on_the_cpu():
    """On the 2-core CPU (demo profile, stages taking turns) a burst whose submissions stall
    keeps nova on the bursty branch (no held rate: its gaps' squared CV is about 5), whose rate
    so far moves with every batch: with ``provisional_switch=any`` nova switches many times
    within the burst between ``decode_first:8`` and chunk budgets; with ``capacity`` only the
    capacity guard may switch, and on this burst it does not; with ``none`` nothing may."""
    cost = make_cost_model("profiled", "cpu", "demo")

    def run(**kw) -> NovaPolicy:
        policy = _demo_cpu_policy(**kw)
        sim = Simulator(policy, cost, 4000, 16, _IMAGE_TOKENS, stages_take_turns=True)
        sim.run(_stalling_burst(0))
        assert policy._plan_rate == 0.0  # the whole burst on the bursty branch
        return policy

    flapping = run(provisional_switch="any")
    assert flapping.num_switches >= 5
    for rule in ("capacity", "none"):
        held = run(provisional_switch=rule)
        assert held.num_switches == 0 and held.mode.label == "decode_first:8"
    with pytest.raises(ValueError, match="provisional_switch"):
        run(provisional_switch="sometimes")
