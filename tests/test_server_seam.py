"""The server talks to the engine through ``EngineClient`` only: the whole HTTP API runs over a
small fake client that has the Protocol's members and nothing else (any reach inside an engine
would be an AttributeError), and ``AsyncEngine`` has every member the Protocol names."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from typing_extensions import get_protocol_members

from nova.engine.arrivals import Arrivals, ExpectedRequest
from nova.engine.async_engine import AsyncEngine
from nova.engine.client import (
    EngineClient,
    EngineDescription,
    EngineSnapshot,
    OutputDelta,
    PromptProcessor,
)
from nova.models.inputs import PromptInput
from nova.sampling_params import GenerationDefaults, SamplingParams
from nova.server.app import create_app
from nova.server.config import ServerConfig
from nova.server.testing import ServerThread
from nova.types import RequestRejected, Stage

CONTEXT_TOKENS = 64
KV_CAPACITY_TOKENS = 48  # the fake's admission rule: prompt + max_tokens must fit this


class CharProcessor:
    """A ``PromptProcessor`` without a model: one token per character (its code point)."""

    tokenizer = None
    image_processor = None
    grammar_compiler = None  # no tokenizer: no structured output
    vocab_size = 0x110000
    max_token_chars = 1
    hash_images = False

    def image_key(self, data, min_pixels=None, max_pixels=None) -> str:
        raise AssertionError("the fake caches nothing: preparation must not key images")

    def cached_image(self, key):
        return None

    def from_chat(self, messages, images=None, image_limits=None) -> PromptInput:
        return self.from_text("".join(str(m["content"]) for m in messages), images)

    def from_text(self, prompt, images=None) -> PromptInput:
        return PromptInput([ord(c) for c in prompt])

    def from_token_ids(self, token_ids, images=None) -> PromptInput:
        return PromptInput(list(token_ids))


class FakeClient:
    """An ``EngineClient``: answers each prompt with its characters reversed, one per delta.
    Its state is private; its public members are exactly the Protocol's."""

    def __init__(self) -> None:
        self._processor = CharProcessor()
        self._healthy = True
        self._live: set[str] = set()
        self._aborted: list[str] = []
        self._num_requests = 0
        self._arrivals = Arrivals(threading.Condition())
        self._pending_at_submit: list[int] = []  # announced requests still on their way

    @property
    def max_model_len(self) -> int:
        return CONTEXT_TOKENS

    @property
    def processor(self) -> PromptProcessor:
        return self._processor

    @property
    def sampling_defaults(self) -> GenerationDefaults:
        return GenerationDefaults()

    def check_admissible(self, num_prompt_tokens: int, max_tokens: int) -> None:
        if num_prompt_tokens + max_tokens > KV_CAPACITY_TOKENS:
            raise RequestRejected(f"needs {num_prompt_tokens + max_tokens} tokens of KV cache")

    def is_healthy(self) -> bool:
        return self._healthy

    def snapshot(self) -> EngineSnapshot:
        return EngineSnapshot(
            {Stage.VISION: 0, Stage.PREFILL: 1, Stage.DECODE: len(self._live)},
            0.25,
            7,
            {Stage.VISION: 0.5, Stage.PREFILL: 0.5, Stage.DECODE: 1.0},
            3,
            memory_bytes={"kv_cache_bytes": 4096, "kv_cache_blocks": 8},
            granted_sms={Stage.DECODE: 2},
        )

    def describe(self) -> EngineDescription:
        return EngineDescription("fake", "Reverser", CONTEXT_TOKENS, 8, 16, "fake", ("ok",), "none")

    async def generate(
        self,
        prompt: PromptInput,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        deadline_s: float | None = None,
        n: int = 1,
        arrival: ExpectedRequest | None = None,
    ):
        sampling = sampling or SamplingParams()
        self._pending_at_submit.append(self._arrivals.pending)
        if arrival is not None:
            arrival.done()
        self.check_admissible(len(prompt.token_ids), sampling.max_tokens)
        self._num_requests += 1
        rid = request_id or f"fake-{self._num_requests}"
        out = list(reversed(prompt.token_ids))[: sampling.max_tokens]
        reason = "length" if len(out) == sampling.max_tokens else "stop"
        self._live.add(rid)
        try:
            for i, tok in enumerate(out):
                await asyncio.sleep(0)
                if rid not in self._live:
                    yield OutputDelta(rid, [], "", True, "abort", num_output_tokens=i)
                    return
                last = i == len(out) - 1
                if last:
                    self._live.discard(rid)
                yield OutputDelta(
                    rid, [tok], chr(tok), last, reason if last else None, num_output_tokens=i + 1
                )
        finally:
            self._live.discard(rid)

    def expect_request(self) -> ExpectedRequest:
        return self._arrivals.expect()

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._live:
            return False
        self._live.discard(request_id)
        self._aborted.append(request_id)
        return True


def public_members(obj: object) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


PROTOCOL_MEMBERS = set(get_protocol_members(EngineClient))


def test_the_fake_has_exactly_the_protocols_members():
    expected = {
        "max_model_len",
        "processor",
        "sampling_defaults",
        "check_admissible",
        "is_healthy",
        "snapshot",
        "describe",
        "expect_request",
        "generate",
        "abort",
    }
    assert expected == PROTOCOL_MEMBERS
    fake = FakeClient()
    assert public_members(fake) == PROTOCOL_MEMBERS
    assert isinstance(fake, EngineClient)
    assert isinstance(fake.processor, PromptProcessor)


def test_async_engine_implements_the_protocol():
    missing = {m for m in PROTOCOL_MEMBERS if not hasattr(AsyncEngine, m)}
    assert not missing


@pytest.fixture(scope="module")
def fake():
    return FakeClient()


@pytest.fixture(scope="module")
def http(fake):
    app = create_app(fake, ServerConfig(served_model_name="fake"))
    with (
        ServerThread(app) as srv,
        httpx.Client(base_url=srv.base_url, timeout=30, trust_env=False) as client,
    ):
        yield client


def test_models_and_health_come_from_the_client(http, fake):
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "fake"
    assert models["data"][0]["max_model_len"] == CONTEXT_TOKENS
    assert http.get("/health").json() == {"status": "ok"}
    fake._healthy = False
    try:
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "engine stopped"
    finally:
        fake._healthy = True


def test_completion_runs_through_the_client(http):
    r = http.post("/v1/completions", json={"prompt": "abcdef", "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == "fedc"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 4,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_streamed_chat_with_a_stop_string_aborts_in_the_client(http, fake):
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "0123456789"}],
            "max_tokens": 10,
            "stream": True,
            "stop": ["54"],
        },
    ) as r:
        assert r.status_code == 200
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "9876"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    rid = chunks[0]["id"]
    assert rid in fake._aborted  # the rest of the request was aborted in the engine


def test_generation_requests_are_announced_until_the_engine_has_them(http, fake):
    """Each generation request is announced before its body is read and is done once
    submitted, whatever the outcome: nothing stays pending for an idle engine to wait on."""
    fake._pending_at_submit.clear()
    ok = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
    assert ok.status_code == 200
    assert fake._pending_at_submit == [1]  # itself, until submitted
    bad = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": -1})  # 400, never
    assert bad.status_code == 400  # submitted: settled when the response ends
    rejected = http.post("/v1/completions", json={"prompt": "abcdef", "max_tokens": 50})
    assert rejected.status_code == 400  # rejected at submission
    http.get("/v1/models")  # not a generation request: never announced
    assert fake._arrivals.pending == 0


def test_the_clients_admission_rule_answers_400(http):
    r = http.post("/v1/completions", json={"prompt": "abcdef", "max_tokens": 50})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert "KV cache" in err["message"]


def test_metrics_read_the_clients_snapshot(http):
    text = http.get("/metrics").text
    assert "nova_kv_cache_usage_ratio 0.25" in text
    assert "nova_kv_cache_free_blocks 7.0" in text
    assert 'nova_sm_share{stage="vision"} 0.5' in text
    assert 'nova_requests_in_stage{stage="prefill"} 1.0' in text
    assert "nova_preemptions_total 3.0" in text
    assert "nova_memory_kv_cache_bytes 4096.0" in text
    assert 'nova_sm_granted{stage="decode"} 2.0' in text


def test_the_server_imports_neither_the_engine_nor_torch():
    import subprocess
    import sys

    code = (
        "import sys, nova.server.app; "
        "inside = [m for m in ('nova.engine.llm_engine', 'nova.engine.loop', "
        "'nova.engine.async_engine', 'nova.executor.torch_executor', 'torch') "
        "if m in sys.modules]; "
        "assert not inside, inside"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_invalid_utf8_body_is_a_400_that_says_so(http):
    r = http.post(
        "/v1/completions",
        content=b'{"prompt": "ab\xff\xfe", "max_tokens": 2}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_utf8" and "UTF-8" in err["message"] and "0xff" in err["message"]
    assert http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200
