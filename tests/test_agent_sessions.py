"""The agent-session workload (sliding screenshot window, real PNGs changing a little per step),
its HTTP bodies (conversation, session id), and the simulator modelling both caches with the
engine's own scheduler code."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from nova.bench.payload import chat_body
from nova.core.policy import make_policy
from nova.cost.base import make_cost_model
from nova.sim.simulator import (
    FixedCostModel,
    PromptSegment,
    SimArrival,
    Simulator,
    arrivals_from_workload,
    request_segments,
)
from nova.types import Stage
from nova.workload import make_workload
from nova.workload.agent_sessions import SYSTEM_PROMPT


def test_steps_resend_the_history_and_slide_the_window():
    wl = make_workload("agent_sessions", num_sessions=2, steps_per_session=8, window=3, seed=4)
    assert wl.closed_loop and len(wl.requests) == 16
    for steps in wl.sessions().values():
        for s, r in enumerate(steps):
            assert r.step == s and (r.arrival_s is None) == (s > 0)
            assert r.turns[0].role == "system" and r.turns[0].text == SYSTEM_PROMPT
            shown = [t.image.revision for t in r.turns if t.image is not None]
            assert shown == list(range(max(0, s - 2), s + 1))  # the last 3 screenshots
            actions = [t.text for t in r.turns if t.role == "assistant"]
            assert actions == [t.text for t in steps[-1].turns if t.role == "assistant"][:s]
            assert r.images == tuple(t.image for t in r.turns if t.image is not None)
            assert len({img.seed for img in r.images}) == 1  # one session, one screen
    again = make_workload("agent_sessions", num_sessions=2, steps_per_session=8, window=3, seed=4)
    assert again == wl


def test_rate_and_request_count_for_eval_load_points():
    wl = make_workload("agent_sessions", rate_rps=2.0, num_requests=25, steps_per_session=5)
    assert len(wl.requests) == 25 and len(wl.sessions()) == 5
    with pytest.raises(ValueError, match="window"):
        make_workload("agent_sessions", window=0)


def test_bodies_carry_the_conversation_real_pngs_and_the_session():
    wl = make_workload(
        "agent_sessions", num_sessions=1, steps_per_session=3, image_width=200, image_height=360
    )
    bodies = [chat_body(r, "m") for r in wl.requests]
    assert all(b["user"] == wl.requests[0].session_id for b in bodies)

    def image_urls(body):
        return [
            p["image_url"]["url"]
            for m in body["messages"]
            if isinstance(m["content"], list)
            for p in m["content"]
            if p["type"] == "image_url"
        ]

    u0, u1, u2 = image_urls(bodies[0]), image_urls(bodies[1]), image_urls(bodies[2])
    assert len(u2) == 3 and u1 == u2[:2] and u0 == u2[:1]  # resent byte for byte
    assert len(set(u2)) == 3  # the screen changes from step to step
    png = base64.b64decode(u2[0].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    roles = [m["role"] for m in bodies[2]["messages"]]
    assert roles == ["system", "user", "user", "assistant", "user", "assistant", "user"]


def test_session_screenshots_change_a_little():
    import numpy as np

    from nova.screenshots import make_session_screenshot

    a = np.asarray(make_session_screenshot(7, 3, 360, 640))
    b = np.asarray(make_session_screenshot(7, 4, 360, 640))
    changed = (a != b).any(-1).mean()
    assert 0 < changed < 0.1
    assert (np.asarray(make_session_screenshot(7, 3, 360, 640)) == a).all()


def test_segments_key_text_and_images_by_content():
    wl = make_workload("agent_sessions", num_sessions=1, steps_per_session=3, window=5)
    s1, s2 = (request_segments(r) for r in wl.requests[1:3])
    assert s2[: len(s1)] == s1  # step 3 extends step 2 while no screenshot left the window
    assert sum(seg.num_tokens for seg in s2 if not seg.image) == wl.requests[2].num_text_tokens
    assert [seg.key for seg in s2 if seg.image] == [
        img.content_key for img in wl.requests[2].images
    ]


def _session_sim(caches: bool, encoder_bytes: int, check: bool = False):
    wl = make_workload("agent_sessions", num_sessions=3, steps_per_session=8, seed=1)
    cost = make_cost_model("roofline", "h100-sxm", "qwen2.5-vl-7b")
    sim = Simulator(
        make_policy("multi_stream"),
        cost,
        4096,
        16,
        400,
        check_invariants=check,
        prefix_caching=caches,
        encoder_cache_bytes=encoder_bytes,
        embed_bytes_per_token=2 * 3584,
    )
    return sim.run(arrivals_from_workload(wl)), wl


def test_simulator_models_both_caches():
    on, wl = _session_sim(True, 1 << 30, check=True)
    off, _ = _session_sim(False, 0)
    images = sum(len(r.images) for r in wl.requests)
    vision_on = [b for b in on.batches if b.stage is Stage.VISION]
    # every step brings one new screen: each request still visits vision, for that image only
    assert sum(len(b.request_ids) for b in vision_on) == len(wl.requests)
    vision_s = [
        sum(b.end_s - b.start_s for b in r.batches if b.stage is Stage.VISION) for r in (on, off)
    ]
    assert vision_s[0] < 0.5 * vision_s[1]
    assert on.encoder_cache_queried_images == images
    assert on.encoder_cache_hit_images == images - len(wl.requests)  # one new screen a step
    assert on.prefix_cache_hit_tokens > 0 and off.prefix_cache_hit_tokens == 0

    def mean_ttft(res):
        from nova.metrics import request_metrics

        return sum(request_metrics(r).ttft_s for r in res.requests) / len(res.requests)

    assert mean_ttft(on) < 0.8 * mean_ttft(off)
    for r in on.requests:  # usage's cached tokens: whole blocks, never the whole prompt
        assert r.num_cached_prompt_tokens % 16 == 0
        assert r.num_cached_prompt_tokens < len(r.prompt_token_ids)


def test_arrivals_without_segments_share_nothing():
    sim = Simulator(
        make_policy("multi_stream"),
        FixedCostModel(),
        256,
        16,
        32,
        prefix_caching=True,
        encoder_cache_bytes=1 << 20,
    )
    arrivals = [SimArrival(f"r{i}", 0.1 * i, 100, 1, 4) for i in range(10)]
    res = sim.run(arrivals)
    assert res.prefix_cache_hit_tokens == 0 and res.encoder_cache_hit_images == 0
    # with segments, equal keys are shared
    seg = (PromptSegment("sys", 64), PromptSegment("img", image=True), PromptSegment("q", 5))
    shared = [dataclasses.replace(a, segments=seg) for a in arrivals]
    sim2 = Simulator(
        make_policy("multi_stream"), FixedCostModel(), 256, 16, 32, encoder_cache_bytes=1 << 20
    )
    res2 = sim2.run(shared)
    assert res2.prefix_cache_hit_tokens > 0 and res2.encoder_cache_hit_images > 0
