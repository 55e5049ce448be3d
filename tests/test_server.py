"""The OpenAI-compatible server on the demo model, through real HTTP (uvicorn on 127.0.0.1 in a
thread) and the official ``openai`` client: chat (plain, streamed, with an image), completions,
stop strings, usage, every bad input answered 400 (401 without the key), overload 503 with
Retry-After, client disconnects freeing KV blocks, and Prometheus metrics."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import pytest

from nova.config import EngineConfig
from nova.engine.async_engine import AsyncEngine
from nova.sampling_params import SamplingParams
from nova.screenshots import make_screenshot
from nova.server.app import create_app
from nova.server.config import ServerConfig
from nova.server.testing import ServerThread

openai = pytest.importorskip("openai")
from clients import http_client, openai_client  # noqa: E402

pytestmark = pytest.mark.slow

FRANCE = "What is the capital of France?"
MAX_PIXELS = 640 * 640
MAX_IMAGES = 2


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def blank_png_url(width: int, height: int) -> str:
    from PIL import Image

    return png_data_url(Image.new("RGB", (width, height), (255, 255, 255)))


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine(EngineConfig(model="demo"))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(
        engine,
        ServerConfig(
            served_model_name="demo", max_image_pixels=MAX_PIXELS, max_images_per_request=MAX_IMAGES
        ),
    )
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with http_client(server.base_url, 60) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server):
    client = openai_client(server.base_url, 60)
    yield client
    client.close()


def wait_engine_idle(engine, timeout_s: float = 15.0) -> None:
    """Until no request is live and every KV block is free (fails the test otherwise)."""
    llm_engine = engine.llm_engine
    bm = llm_engine.scheduler.block_manager
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with llm_engine.loop._cond:
            idle = not llm_engine.scheduler.has_unfinished() and bm.num_free_blocks == bm.num_blocks
        if idle:
            return
        time.sleep(0.02)
    raise AssertionError(
        f"engine not idle: live {list(llm_engine.scheduler.state.requests)}, "
        f"free blocks {bm.num_free_blocks}/{bm.num_blocks}"
    )


def reference_tokens(engine, messages, images=None, max_tokens=32) -> list[int]:
    """Greedy output of the same prompt straight through the engine (no HTTP)."""
    prompt = engine.processor.from_chat(messages, images or [])

    async def go():
        out: list[int] = []
        async for d in engine.generate(prompt, SamplingParams(max_tokens=max_tokens)):
            out += d.new_token_ids
        return out

    return asyncio.run(go())


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# --------------------------------------------------------------------------------------------
# The official client
# --------------------------------------------------------------------------------------------


def test_models_and_health(oai, http):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert http.get("/health").json() == {"status": "ok"}


def test_chat_plain_answers_and_counts_usage(oai, engine):
    messages = [{"role": "user", "content": FRANCE}]
    resp = oai.chat.completions.create(
        model="demo", messages=messages, max_tokens=32, temperature=0
    )
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    ref = reference_tokens(engine, messages)
    assert engine.processor.decode(ref) == choice.message.content
    u = resp.usage
    assert u.prompt_tokens == len(engine.processor.from_chat(messages).token_ids)
    assert u.completion_tokens == len(ref)  # EOS included, as vLLM counts it
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_stream_matches_plain_and_reports_usage(oai):
    messages = [{"role": "user", "content": FRANCE}]
    plain = oai.chat.completions.create(
        model="demo", messages=messages, max_tokens=32, temperature=0
    )
    chunks = list(
        oai.chat.completions.create(
            model="demo",
            messages=messages,
            max_tokens=32,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == plain.usage.completion_tokens
    assert last.usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_with_image_counts_image_tokens(oai, engine):
    shot = make_screenshot(3, 360, 640)
    content = [image_part(png_data_url(shot)), {"type": "text", "text": "Tap the OK button."}]
    resp = oai.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0
    )
    assert resp.choices[0].finish_reason in ("stop", "length")
    hf = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Tap the OK button."}],
        }
    ]
    expected = engine.processor.from_chat(hf, [shot]).token_ids
    text_only = engine.processor.from_chat(
        [{"role": "user", "content": "Tap the OK button."}]
    ).token_ids
    assert resp.usage.prompt_tokens == len(expected)
    assert resp.usage.prompt_tokens >= len(text_only) + engine.processor.num_image_tokens
    assert 1 <= resp.usage.completion_tokens <= 8
    ref = reference_tokens(engine, hf, [shot], max_tokens=8)
    assert resp.usage.completion_tokens == len(ref)


def test_stop_strings_trim_text_plain_and_streamed(oai):
    kw = dict(
        model="demo", messages=[{"role": "user", "content": FRANCE}], max_tokens=32, temperature=0
    )
    first = oai.chat.completions.create(**kw)
    full = first.choices[0].message.content
    assert "Paris" in full
    cut = full.index("Paris")
    resp = oai.chat.completions.create(**kw, stop=["Paris", "never-appears"])
    assert resp.choices[0].message.content == full[:cut]
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens < first.usage.completion_tokens
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in oai.chat.completions.create(**kw, stop="Paris", stream=True)
        if c.choices
    )
    assert streamed == full[:cut]
    # a stop string that is one token ('.') also goes to the engine as a stop token id
    dot = oai.chat.completions.create(**kw, stop=["."])
    assert dot.choices[0].message.content == full[: full.index(".")]
    assert dot.choices[0].finish_reason == "stop"


def test_completions_text_and_token_ids(oai, engine):
    resp = oai.completions.create(
        model="demo", prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert resp.object == "text_completion"
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 4
    ids = engine.processor.tokenizer("The capital of France is")["input_ids"]
    by_ids = oai.completions.create(model="demo", prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == resp.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    chunks = list(
        oai.completions.create(model="demo", prompt=ids, max_tokens=4, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == resp.choices[0].text


def test_seeded_sampling_is_reproducible(oai):
    kw = dict(
        model="demo",
        messages=[{"role": "user", "content": "Write a word."}],
        max_tokens=8,
        temperature=1.0,
        top_p=0.9,
        seed=1234,
        extra_body={"top_k": 50},
    )
    a = oai.chat.completions.create(**kw).choices[0].message.content
    b = oai.chat.completions.create(**kw).choices[0].message.content
    assert a == b


# --------------------------------------------------------------------------------------------
# Bad input: 400 with an OpenAI error body, and the server keeps serving
# --------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]
NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"this is not a png at all").decode()

BAD_CHAT = {
    "invalid JSON": ('{"messages": [', None, "json"),
    "body not an object": ("[1, 2]", None, "object"),
    "messages missing": ({"model": "demo"}, "messages", "required"),
    "messages empty": ({"messages": []}, "messages", "at least 1"),
    "messages wrong type": ({"messages": "hi"}, "messages", "list"),
    "max_tokens string": ({"messages": USER, "max_tokens": "5"}, "max_tokens", "integer"),
    "temperature string": ({"messages": USER, "temperature": "hot"}, "temperature", "number"),
    "temperature too high": ({"messages": USER, "temperature": 7}, "temperature", "2"),
    "stream not bool": ({"messages": USER, "stream": 1}, "stream", "boolean"),
    "unknown role": (
        {"messages": [{"role": "robot", "content": "x"}]},
        "messages[0].role",
        "robot",
    ),
    "role missing": ({"messages": [{"content": "x"}]}, "messages[0].role", "role"),
    "content wrong type": (
        {"messages": [{"role": "user", "content": 5}]},
        "messages[0].content",
        "valid",
    ),
    "unknown part type": (
        {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        "messages[0].content[0].type",
        "audio",
    ),
    "user without content": ({"messages": [{"role": "user"}]}, "messages[0].content", "required"),
    "bad base64": (
        {"messages": [{"role": "user", "content": [image_part("data:image/png;base64,%%%not")]}]},
        "messages",
        "base64",
    ),
    "not an image": (
        {"messages": [{"role": "user", "content": [image_part(NOT_AN_IMAGE)]}]},
        "messages",
        "could not be decoded",
    ),
    "image too large": (
        {"messages": [{"role": "user", "content": [image_part(blank_png_url(700, 700))]}]},
        "messages",
        "exceeds the limit",
    ),
    "too many images": (
        {"messages": [{"role": "user", "content": [image_part(blank_png_url(8, 8))] * 3}]},
        "messages",
        "limit is 2",
    ),
    "remote media disabled": (
        {"messages": [{"role": "user", "content": [image_part("http://127.0.0.1:9/x.png")]}]},
        "messages",
        "allow-remote-media",
    ),
    "local file disabled": (
        {"messages": [{"role": "user", "content": [image_part("file:///etc/hostname")]}]},
        "messages",
        "allowed-local-media-path",
    ),
    "prompt over context": (
        {"messages": [{"role": "user", "content": "hello " * 9000}]},
        "messages",
        "context length",
    ),
    "max_tokens zero": (
        {"messages": USER, "max_tokens": 0},
        "max_tokens",
        "greater than or equal to 1",
    ),
    "max_tokens negative": (
        {"messages": USER, "max_tokens": -3},
        "max_tokens",
        "greater than or equal to 1",
    ),
    "max_tokens over context": (
        {"messages": USER, "max_tokens": 10**9},
        "max_tokens",
        "context length",
    ),
    "n=0": ({"messages": USER, "n": 0}, "n", "greater than or equal to 1"),
    "n too large": ({"messages": USER, "n": 10**6}, "n", "less than or equal to 16"),
    "logprobs: 0": ({"messages": USER, "logprobs": 0}, "logprobs", "boolean"),
    "top_logprobs: false": (
        {"messages": USER, "logprobs": True, "top_logprobs": False},
        "top_logprobs",
        "integer",
    ),
    "top_logprobs without logprobs": (
        {"messages": USER, "top_logprobs": 2},
        "top_logprobs",
        "logprobs",
    ),
    "top_logprobs over 20": (
        {"messages": USER, "logprobs": True, "top_logprobs": 21},
        "top_logprobs",
        "less than or equal to 20",
    ),
    "presence_penalty": ({"messages": USER, "presence_penalty": 2.5}, "presence_penalty", "2"),
    "repetition_penalty zero": (
        {"messages": USER, "repetition_penalty": 0},
        "repetition_penalty",
        "greater than 0",
    ),
    "logit_bias key": ({"messages": USER, "logit_bias": {"abc": 1}}, "logit_bias.abc", "pattern"),
    "logit_bias value": ({"messages": USER, "logit_bias": {"5": 101}}, "logit_bias.5", "100"),
    "logit_bias out of vocabulary": (
        {"messages": USER, "logit_bias": {"999999": 1}},
        "logit_bias",
        "vocabulary",
    ),
    "stop_token_ids out of vocabulary": (
        {"messages": USER, "stop_token_ids": [49153]},
        "stop_token_ids",
        "vocabulary",
    ),
    "min_tokens over max_tokens": (
        {"messages": USER, "min_tokens": 5, "max_tokens": 2},
        "min_tokens",
        "max_tokens",
    ),
    "audio output": (
        {"messages": USER, "audio": {"voice": "alloy", "format": "wav"}},
        "audio",
        "none",
    ),
    "audio modality": (
        {"messages": USER, "modalities": ["text", "audio"]},
        "modalities[1]",
        "text",
    ),
    "reasoning_effort": (
        {"messages": USER, "reasoning_effort": "high"},
        "reasoning_effort",
        "none",
    ),
    "web_search_options": (
        {"messages": USER, "web_search_options": {}},
        "web_search_options",
        "none",
    ),
    "skip_special_tokens false": (
        {"messages": USER, "skip_special_tokens": False},
        "skip_special_tokens",
        "true",
    ),
    "mm_processor_kwargs on a fixed-size model": (
        {"messages": USER, "mm_processor_kwargs": {"max_pixels": 50000}},
        "mm_processor_kwargs",
        "dynamic-resolution",
    ),
    "mm_processor_kwargs unknown key": (
        {"messages": USER, "mm_processor_kwargs": {"size": 5}},
        "mm_processor_kwargs.size",
        "extra",
    ),
    "text beyond what the context can hold": (
        {"messages": [{"role": "user", "content": "x" * 3_000_000}]},
        "messages",
        "characters",
    ),
    "stream_options without stream": (
        {"messages": USER, "stream_options": {"include_usage": True}},
        "stream_options",
        "stream",
    ),
    "empty stop string": ({"messages": USER, "stop": [""]}, "stop[0]", "at least 1 character"),
    "lone surrogate": (
        '{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
        "messages[0].content",
        "unicode",
    ),
}

BAD_COMPLETION = {
    "batched prompts": ({"prompt": ["a", "b"]}, "prompt", "at most 1"),
    "token id out of range": ({"prompt": [1, 2, 10**7]}, "prompt", "vocabulary"),
    "empty token list": ({"prompt": []}, "prompt", "at least 1"),
    "empty prompt": ({"prompt": ""}, "prompt", "at least 1"),
    "logprobs over 20": ({"prompt": "hi", "logprobs": 21}, "logprobs", "20"),
    "logprobs: false": ({"prompt": "hi", "logprobs": False}, "logprobs", "integer"),
    "prompt wrong type": ({"prompt": {"x": 1}}, "prompt", "list of token ids"),
    "echo": ({"prompt": "hi", "echo": True}, "echo", "false"),
    "best_of": ({"prompt": "hi", "best_of": 3}, "best_of", "less than or equal to 1"),
}


def _post(http, path, body):
    if isinstance(body, str):
        return http.post(
            path,
            content=body.encode("utf-8", "surrogatepass"),
            headers={"content-type": "application/json"},
        )
    return http.post(path, json=body)


def _assert_openai_400(resp, param, needle):
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert needle.lower() in err["message"].lower(), err["message"]


@pytest.mark.parametrize("name", list(BAD_CHAT))
def test_bad_chat_input_is_400(http, name):
    body, param, needle = BAD_CHAT[name]
    _assert_openai_400(_post(http, "/v1/chat/completions", body), param, needle)


@pytest.mark.parametrize("name", list(BAD_COMPLETION))
def test_bad_completion_input_is_400(http, name):
    body, param, needle = BAD_COMPLETION[name]
    _assert_openai_400(_post(http, "/v1/completions", body), param, needle)


def test_bad_input_in_a_stream_request_is_400_before_streaming(http):
    body = {"messages": [{"role": "user", "content": [image_part(NOT_AN_IMAGE)]}], "stream": True}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400 and resp.headers["content-type"].startswith("application/json")


def test_server_still_serves_after_bad_inputs(http, engine):
    for body, _, _ in list(BAD_CHAT.values())[:8]:
        _post(http, "/v1/chat/completions", body)
    resp = http.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": FRANCE}],
            "max_tokens": 24,
            "temperature": 0,
        },
    )
    assert resp.status_code == 200 and "Paris" in resp.json()["choices"][0]["message"]["content"]
    wait_engine_idle(engine)


def test_unknown_path_and_method_use_the_error_body(http):
    resp = http.get("/v1/nope")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    resp = http.get("/v1/chat/completions")
    assert resp.status_code == 405 and "error" in resp.json()


# --------------------------------------------------------------------------------------------
# Auth, overload, local files
# --------------------------------------------------------------------------------------------


def test_api_key_required_on_v1_only(engine):
    app = create_app(engine, ServerConfig(served_model_name="demo", api_key="sekret"))

    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            no_key = await c.post("/v1/chat/completions", json={"messages": USER})
            bad_json_no_key = await c.post(
                "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}
            )
            wrong = await c.get("/v1/models", headers={"Authorization": "Bearer nope"})
            right = await c.get("/v1/models", headers={"Authorization": "Bearer sekret"})
            health = await c.get("/health")
            metrics = await c.get("/metrics")
            return no_key, bad_json_no_key, wrong, right, health, metrics

    no_key, bad_json_no_key, wrong, right, health, metrics = asyncio.run(go())
    for resp in (no_key, bad_json_no_key, wrong):
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
        assert resp.json()["error"]["type"] == "invalid_request_error"
        assert resp.headers["www-authenticate"] == "Bearer"
    assert right.status_code == 200 and health.status_code == 200 and metrics.status_code == 200
    spec = app.openapi()
    assert spec["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]

    with ServerThread(app) as srv:  # and through the official client
        bad = openai_client(srv.base_url, api_key="nope")
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="demo", messages=USER, max_tokens=2)
        good = openai_client(srv.base_url, api_key="sekret")
        assert (
            good.chat.completions.create(
                model="demo", messages=USER, max_tokens=2
            ).usage.completion_tokens
            >= 1
        )


def test_overload_is_503_with_retry_after(engine):
    app = create_app(engine, ServerConfig(served_model_name="demo", max_queue=1, retry_after_s=2))
    long_body = {
        "messages": [{"role": "user", "content": "Count to one hundred."}],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        ServerThread(app) as srv,
        httpx.Client(base_url=srv.base_url, timeout=60, trust_env=False) as c,
    ):
        with c.stream("POST", "/v1/chat/completions", json=long_body) as first:
            assert first.status_code == 200
            first_lines = first.iter_lines()  # keep it: dropping the iterator closes the stream
            next(first_lines)  # the request is in flight
            second = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
            assert second.status_code == 503, second.text
            assert second.headers["retry-after"] == "2"
            assert second.json()["error"]["code"] == "overloaded"
        # the first request's stream was closed: its slot comes back
        deadline = time.monotonic() + 10
        while app.state.service.admission.num_unfinished and time.monotonic() < deadline:
            time.sleep(0.02)
        ok = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
        assert ok.status_code == 200
        samples = metric_samples(c.get("/metrics").text)
        assert samples[("nova_requests_total", (("outcome", "rejected"),))] >= 1
    wait_engine_idle(engine)


def test_local_files_only_under_the_allowed_directory(engine, tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 48), (10, 200, 30)).save(allowed / "shot.png")
    outside = tmp_path / "secret.png"
    Image.new("RGB", (64, 48), (200, 10, 30)).save(outside)
    (allowed / "link.png").symlink_to(outside)
    app = create_app(
        engine, ServerConfig(served_model_name="demo", allowed_local_media_path=str(allowed))
    )

    def body(url):
        return {
            "messages": [
                {"role": "user", "content": [image_part(url), {"type": "text", "text": "?"}]}
            ],
            "max_tokens": 2,
        }

    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            return [
                await c.post("/v1/chat/completions", json=body(u))
                for u in (
                    f"file://{allowed}/shot.png",
                    f"file://{outside}",
                    f"file://{allowed}/link.png",
                    f"file://{allowed}/../secret.png",
                    f"file://{allowed}/missing.png",
                )
            ]

    ok, out, link, dotdot, missing = asyncio.run(go())
    assert ok.status_code == 200, ok.text
    for resp in (out, link, dotdot):
        assert resp.status_code == 400 and "outside the allowed" in resp.json()["error"]["message"]
    assert missing.status_code == 400 and "not found" in missing.json()["error"]["message"]


def test_remote_media_refuses_loopback_even_when_allowed(engine):
    app = create_app(engine, ServerConfig(served_model_name="demo", allow_remote_media=True))

    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            return await c.post(
                "/v1/chat/completions",
                json={
                    "messages": [
                        {"role": "user", "content": [image_part("http://127.0.0.1:9/shot.png")]}
                    ]
                },
            )

    resp = asyncio.run(go())
    assert resp.status_code == 400 and "non-public" in resp.json()["error"]["message"]


# --------------------------------------------------------------------------------------------
# Disconnects free the request's KV blocks
# --------------------------------------------------------------------------------------------


def test_disconnect_mid_stream_aborts_and_frees_blocks(server, engine, http):
    wait_engine_idle(engine)
    bm = engine.llm_engine.scheduler.block_manager
    before = metric_samples(http.get("/metrics").text)
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 500,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(base_url=server.base_url, timeout=60, trust_env=False) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as resp,
    ):
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]  # role chunk, a few tokens (with blank lines)
        assert any('"content"' in line for line in got)
        assert bm.num_free_blocks < bm.num_blocks  # it holds KV blocks now
        # leaving the block closes the connection mid-stream
    wait_engine_idle(engine)
    after = metric_samples(http.get("/metrics").text)
    key = ("nova_requests_total", (("outcome", "aborted"),))
    assert after[key] == before[key] + 1


def test_disconnect_during_a_non_streamed_request_aborts_it(server, engine):
    wait_engine_idle(engine)
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 500,
        "ignore_eos": True,
    }
    with (
        httpx.Client(base_url=server.base_url, timeout=0.8, trust_env=False) as c,
        pytest.raises(httpx.ReadTimeout),
    ):
        c.post("/v1/chat/completions", json=body)
    t0 = time.monotonic()
    wait_engine_idle(engine, timeout_s=10)
    assert time.monotonic() - t0 < 10  # aborted, not run to its 500 tokens (~25 s)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def test_metrics_parse_and_move_as_requests_finish(http, engine):
    from prometheus_client.parser import text_string_to_metric_families

    text = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "nova_requests",
        "nova_ttft_seconds",
        "nova_tpot_seconds",
        "nova_e2e_seconds",
        "nova_queue_seconds",
        "nova_stage_seconds",
        "nova_requests_in_stage",
        "nova_kv_cache_usage_ratio",
        "nova_sm_share",
        "nova_prompt_tokens",
        "nova_generation_tokens",
        "nova_prepare_seconds",
    ):
        assert name in families, name
    before = metric_samples(text)
    fin = ("nova_requests_total", (("outcome", "finished"),))
    resp = http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": FRANCE}], "max_tokens": 6, "temperature": 0},
    )
    usage = resp.json()["usage"]
    after = metric_samples(http.get("/metrics").text)
    assert after[fin] == before.get(fin, 0.0) + 1
    assert (
        after[("nova_e2e_seconds_count", ())] == before.get(("nova_e2e_seconds_count", ()), 0.0) + 1
    )
    assert (
        after[("nova_ttft_seconds_count", ())]
        == before.get(("nova_ttft_seconds_count", ()), 0.0) + 1
    )
    assert (
        after[("nova_prompt_tokens_total", ())] - before.get(("nova_prompt_tokens_total", ()), 0.0)
        == usage["prompt_tokens"]
    )
    assert (
        after[("nova_generation_tokens_total", ())]
        - before.get(("nova_generation_tokens_total", ()), 0.0)
        == usage["completion_tokens"]
    )
    assert (
        after[("nova_stage_seconds_count", (("stage", "prefill"),))]
        == before.get(("nova_stage_seconds_count", (("stage", "prefill"),)), 0.0) + 1
    )
    assert (
        after[("nova_prepare_seconds_count", ())]
        == before.get(("nova_prepare_seconds_count", ()), 0.0) + 1
    )
    assert after[("nova_prepare_seconds_sum", ())] > before.get(
        ("nova_prepare_seconds_sum", ()), 0.0
    )
    assert after[("nova_sm_share", (("stage", "decode"),))] == 1.0
    assert 0.0 <= after[("nova_kv_cache_usage_ratio", ())] <= 1.0
    for stage in ("vision", "prefill", "decode"):
        assert after[("nova_requests_in_stage", (("stage", stage),))] == 0
    bad = http.post("/v1/chat/completions", json={"messages": []})
    assert bad.status_code == 400
    rej = ("nova_requests_total", (("outcome", "rejected"),))
    assert metric_samples(http.get("/metrics").text)[rej] == after[rej] + 1


def test_metrics_see_requests_in_flight(server, engine, http):
    body = {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 60,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(base_url=server.base_url, timeout=60, trust_env=False) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as resp,
    ):
        lines = resp.iter_lines()
        for _ in range(4):
            next(lines)
        s = metric_samples(http.get("/metrics").text)
        assert s[("nova_requests_in_stage", (("stage", "decode"),))] == 1
        assert s[("nova_kv_cache_usage_ratio", ())] > 0
        assert s[("nova_server_unfinished_requests", ())] == 1
        rest = [json.loads(line[5:]) for line in lines if line.startswith("data: {")]
    assert rest[-1]["choices"][0]["finish_reason"] == "length"
    wait_engine_idle(engine)


def test_oversized_bodies_are_413(engine):
    app = create_app(engine, ServerConfig(served_model_name="demo", max_request_bytes=2000))
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()

    async def chunks():
        for k in range(0, len(big), 1000):
            yield big[k : k + 1000]

    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            declared = await c.post(
                "/v1/chat/completions", content=big, headers={"content-type": "application/json"}
            )
            streamed = await c.post(
                "/v1/chat/completions",
                content=chunks(),
                headers={"content-type": "application/json"},
            )
            small = await c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1})
            return declared, streamed, small

    declared, streamed, small = asyncio.run(go())
    for resp in (declared, streamed):
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    assert small.status_code == 200
