"""A request the engine fails (executor fault) is a 500 with an OpenAI error body (in-band
error event when streaming), counted as failed; other requests and later ones are served."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from nova.config import EngineConfig
from nova.engine.async_engine import AsyncEngine
from nova.engine.llm_engine import LLMEngine
from nova.server.app import create_app
from nova.server.config import ServerConfig
from nova.server.testing import build_tiny_chat_model
from nova.types import Stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    model_dir = build_tiny_chat_model(tmp_path_factory.mktemp("faulty") / "m", max_model_len=128)
    fault = {"on": False}

    def hook(stage, request_id):
        if fault["on"] and stage is Stage.DECODE:
            raise RuntimeError("injected decode fault")

    config = EngineConfig(model=str(model_dir), num_kv_blocks=64)
    engine = AsyncEngine(config, llm_engine=LLMEngine(config, fault_hook=hook))
    yield engine, fault
    engine.shutdown()


def test_engine_failure_is_500_and_counted(faulty):
    engine, fault = faulty
    app = create_app(engine, ServerConfig(served_model_name="tiny"))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "ignore_eos": True}

    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            fault["on"] = True
            plain = await c.post("/v1/chat/completions", json=body)
            stream = await c.post("/v1/chat/completions", json=dict(body, stream=True))
            fault["on"] = False
            good = await c.post("/v1/chat/completions", json=body)
            metrics = (await c.get("/metrics")).text
            return plain, stream, good, metrics

    plain, stream, good, metrics = asyncio.run(go())
    assert plain.status_code == 500
    err = plain.json()["error"]
    assert err["type"] == "server_error" and "injected decode fault" in err["message"]
    assert stream.status_code == 200  # headers were sent before the failure
    events = [
        line[len("data: ") :] for line in stream.text.splitlines() if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    assert "injected decode fault" in json.loads(events[-2])["error"]["message"]
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 6
    assert 'nova_requests_total{outcome="failed"} 2.0' in metrics
    bm = engine.llm_engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("workers", [1, 2])
def test_requests_are_prepared_in_parallel_up_to_preprocess_workers(faulty, workers):
    """Preparation (image decode, preprocessing, tokenisation) runs on a pool of
    ``preprocess_workers`` threads: two requests whose preparation takes 0.3 s overlap with 2
    workers and queue one behind the other with 1."""
    import threading
    import time

    engine, _ = faulty
    proc = engine.processor
    intervals: list[tuple[float, float]] = []
    lock = threading.Lock()
    real = proc.from_chat

    def slow_from_chat(messages, images=None):
        t0 = time.monotonic()
        time.sleep(0.3)
        out = real(messages, images)
        with lock:
            intervals.append((t0, time.monotonic()))
        return out

    app = create_app(engine, ServerConfig(served_model_name="tiny", preprocess_workers=workers))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "ignore_eos": True}

    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            return await asyncio.gather(
                *(c.post("/v1/chat/completions", json=body) for _ in range(2))
            )

    proc.from_chat = slow_from_chat
    try:
        responses = asyncio.run(go())
    finally:
        del proc.from_chat  # back to the class's method
    assert [r.status_code for r in responses] == [200, 200]
    (_a0, a1), (b0, _b1) = sorted(intervals)
    overlapped = b0 < a1
    assert overlapped == (workers > 1)
