"""Qwen2.5-VL served over HTTP: a tiny random checkpoint with a tiny byte-level tokenizer and a
Qwen-style chat template, through the OpenAI-compatible server and the engine (dynamic
resolution, several images of different sizes, M-RoPE), against the engine alone; and the
server's pixel limits turning an out-of-range image into a 400 while other requests go on."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
from conftest import (
    QWEN_VL_IMAGE_TOKEN_ID,
    QWEN_VL_VISION_END_ID,
    QWEN_VL_VISION_START_ID,
    png_data_url,
    save_byte_level_tokenizer,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_tokenizer(path) -> None:
    """The Qwen specials at the ids the tiny config uses (image 300, vision start/end 301/302)."""
    specials = {
        "<|image_pad|>": QWEN_VL_IMAGE_TOKEN_ID,
        "<|vision_start|>": QWEN_VL_VISION_START_ID,
        "<|vision_end|>": QWEN_VL_VISION_END_ID,
        "<|video_pad|>": 303,
    }
    save_byte_level_tokenizer(path, specials, CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def qwen_server(tiny_qwen_vl_dirs, tmp_path_factory):
    import shutil

    from nova.config import EngineConfig
    from nova.engine.async_engine import AsyncEngine
    from nova.server.app import create_app
    from nova.server.config import ServerConfig
    from nova.server.testing import ServerThread

    model_dir = tmp_path_factory.mktemp("qwen-served") / "qwen2.5-vl"
    shutil.copytree(tiny_qwen_vl_dirs["qwen2.5-vl"], model_dir)
    save_tiny_tokenizer(model_dir)
    # The server's limit (20 tokens' worth of pixels) is below the checkpoint's (40).
    engine = AsyncEngine(
        EngineConfig(
            model=str(model_dir),
            num_kv_blocks=256,
            policy="chunked_prefill",
            max_pixels=SERVER_MAX_PIXELS,
            min_pixels=28 * 28 * 4,
        )
    )
    app = create_app(engine, ServerConfig(served_model_name="tiny-qwen"))
    with ServerThread(app) as srv:
        yield engine, srv
    engine.shutdown()


SERVER_MAX_PIXELS = 28 * 28 * 20


def _chat(text: str, urls: list[str]) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def test_two_images_of_different_sizes_over_http_equal_the_engine(qwen_server):
    from nova.models.inputs import load_image
    from nova.sampling_params import SamplingParams

    engine, srv = qwen_server
    urls = [png_data_url(120, 90, 1), png_data_url(64, 150, 2), png_data_url(300, 300, 5)]
    body = {
        "model": "tiny-qwen",
        "messages": _chat("click the red button", urls),
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=srv.base_url, timeout=120, trust_env=False) as http:
        resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    # The same prompt straight through the engine, images decoded the same way.
    images = [load_image(base64.b64decode(u.split(",", 1)[1])) for u in urls]
    hf_messages = [
        {
            "role": "user",
            "content": [{"type": "image"}] * 3 + [{"type": "text", "text": "click the red button"}],
        }
    ]
    prompt = engine.processor.from_chat(hf_messages, images)
    counts = list(prompt.image_token_counts)
    assert len(counts) == 3 and counts[0] != counts[1]  # dynamic resolution: sizes differ
    # 300x300 would be 40 tokens under the checkpoint's limit; the server caps it at 20.
    assert 16 <= counts[2] <= 20
    assert prompt.token_ids.count(QWEN_VL_IMAGE_TOKEN_ID) == sum(counts)
    assert out["usage"]["prompt_tokens"] == len(prompt.token_ids)
    assert out["usage"]["completion_tokens"] == 12

    async def alone():
        ids: list[int] = []
        async for d in engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True)):
            ids += d.new_token_ids
        return ids

    ref = asyncio.run(alone())
    assert out["choices"][0]["message"]["content"] == engine.processor.decode(ref)


def test_image_outside_the_servers_pixel_limits_is_a_400_and_serving_goes_on(qwen_server):
    _, srv = qwen_server
    # A 1000x28 strip fits the checkpoint's max_pixels (31360) but cannot shrink under the
    # server's (15680): each side stays >= 28 px.
    bad = {
        "model": "tiny-qwen",
        "messages": _chat("hi", [png_data_url(1000, 28, 3)]),
        "max_tokens": 4,
    }
    good = {
        "model": "tiny-qwen",
        "messages": _chat("hi", [png_data_url(56, 56, 4)]),
        "max_tokens": 4,
    }
    with httpx.Client(base_url=srv.base_url, timeout=120, trust_env=False) as http:
        r = http.post("/v1/chat/completions", json=bad)
        assert r.status_code == 400, r.text
        assert "pixels" in r.text.lower()
        r2 = http.post("/v1/chat/completions", json=good)
        assert r2.status_code == 200, r2.text


def test_per_request_pixel_limits_resize_that_requests_images(qwen_server):
    """mm_processor_kwargs bounds one request's resize (within the server's limits); the
    response's image_sizes extension gives each image as sent and as the model saw it."""
    engine, srv = qwen_server
    url = png_data_url(300, 300, 5)

    def ask(**extra):
        body = {"messages": _chat("where?", [url]), "max_tokens": 2, "temperature": 0, **extra}
        with httpx.Client(base_url=srv.base_url, timeout=120, trust_env=False) as http:
            return http.post("/v1/chat/completions", json=body)

    served = ask()
    small = ask(mm_processor_kwargs={"max_pixels": 28 * 28 * 9})
    assert served.status_code == 200 and small.status_code == 200, small.text
    big, few = served.json(), small.json()
    assert big["image_sizes"][0]["width"] == 300 and big["image_sizes"][0]["height"] == 300
    seen = few["image_sizes"][0]
    assert seen["resized_width"] * seen["resized_height"] <= 28 * 28 * 9
    assert (seen["resized_width"], seen["resized_height"]) == (84, 84)
    sizing = engine.processor.sizing
    assert (big["image_sizes"][0]["resized_width"], big["image_sizes"][0]["resized_height"]) == (
        sizing.resize(300, 300)
    )
    # fewer pixels, fewer image tokens in the prompt
    assert few["usage"]["prompt_tokens"] < big["usage"]["prompt_tokens"]
    # beyond the server's own limits: a 400 naming the field
    for kw in (
        {"max_pixels": SERVER_MAX_PIXELS * 2},
        {"min_pixels": 10},
        {"min_pixels": 5000, "max_pixels": 4000},
    ):
        r = ask(mm_processor_kwargs=kw)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "mm_processor_kwargs"


def test_image_sizes_in_the_first_streamed_chunk(qwen_server):
    _, srv = qwen_server
    body = {
        "messages": _chat("where?", [png_data_url(120, 90, 1)]),
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
    }
    with (
        httpx.Client(base_url=srv.base_url, timeout=120, trust_env=False) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    import json

    first = json.loads(lines[0])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert first["image_sizes"][0]["width"] == 120 and first["image_sizes"][0]["height"] == 90
    assert all("image_sizes" not in json.loads(x) for x in lines[1:-1])
