"""The caches and ``n`` through the HTTP server on tiny random VLMs with tiny byte-level
tokenizers: greedy answers equal with the caches on and off (Qwen2-VL, Qwen2.5-VL, LLaVA; text,
one image, several images), ``usage.prompt_tokens_details.cached_tokens``, the Prometheus
counters and the memory report; ``n`` choices (JSON and SSE)."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from conftest import (
    IMAGE_TOKEN_ID,
    QWEN_VL_IMAGE_TOKEN_ID,
    QWEN_VL_VISION_END_ID,
    png_data_url,
    save_byte_level_tokenizer,
)
from conftest import QWEN_VL_VISION_START_ID as VSTART

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def template(image_text: str) -> str:
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image_text + "{% elif c['type'] == 'text' %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def model_dir(kind: str, tiny_dirs, tiny_qwen_vl_dirs, root):
    from transformers import CLIPImageProcessor

    out = root / kind
    if kind.startswith("qwen"):
        shutil.copytree(tiny_qwen_vl_dirs[kind], out)
        specials = {
            "<|image_pad|>": QWEN_VL_IMAGE_TOKEN_ID,
            "<|vision_start|>": VSTART,
            "<|vision_end|>": QWEN_VL_VISION_END_ID,
        }
        save_byte_level_tokenizer(out, specials, template(QWEN_IMAGE))
    else:
        shutil.copytree(tiny_dirs[kind], out)
        save_byte_level_tokenizer(out, {"<image>": IMAGE_TOKEN_ID}, template("<image>"))
        CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def servers(tiny_dirs, tiny_qwen_vl_dirs, tmp_path_factory):
    """kind -> {"on": (engine, server), "off": ...}, built when first asked for."""
    from nova.config import EngineConfig
    from nova.engine.async_engine import AsyncEngine
    from nova.server.app import create_app
    from nova.server.config import ServerConfig
    from nova.server.testing import ServerThread

    root = tmp_path_factory.mktemp("cache-served")
    built: dict[str, dict] = {}
    stack = []

    def get(kind: str) -> dict:
        if kind not in built:
            path = model_dir(kind, tiny_dirs, tiny_qwen_vl_dirs, root)
            built[kind] = {}
            for mode, caches in (("on", True), ("off", False)):
                engine = AsyncEngine(
                    EngineConfig(
                        model=str(path),
                        block_size=4,
                        num_kv_blocks=512,
                        prefix_caching=caches,
                        encoder_cache_bytes=(1 << 24) if caches else 0,
                    )
                )
                srv = ServerThread(create_app(engine, ServerConfig(served_model_name="tiny")))
                srv.start()
                stack.append((engine, srv))
                built[kind][mode] = (engine, srv)
        return built[kind]

    yield get
    for engine, srv in stack:
        srv.stop()
        engine.shutdown()


SYSTEM = {"role": "system", "content": "You are a GUI agent. Answer with one action."}


def conversation() -> list[list[dict]]:
    a, b, c = png_data_url(100, 60, 1), png_data_url(60, 100, 2), png_data_url(100, 60, 3)

    def user(url: str | None, text: str) -> dict:
        parts = [{"type": "image_url", "image_url": {"url": url}}] if url else []
        return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}

    s1 = [SYSTEM, user(a, "Open the settings.")]
    s2 = [*s1, {"role": "assistant", "content": "click(10, 20)"}, user(b, "Next?")]
    s3 = [*s1, {"role": "assistant", "content": "click(10, 20)"}, user(c, "Next?")]
    return [s1, s2, s3, [SYSTEM, user(None, "hello")], s2]


def chat(srv, messages, **extra) -> dict:
    body = {"messages": messages, "max_tokens": 5, "temperature": 0, "ignore_eos": True, **extra}
    r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def counter(srv, name: str) -> float:
    text = httpx.get(srv.base_url + "/metrics", timeout=30).text
    line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
    return float(line.split()[-1])


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl", "llava-clip"])
def test_greedy_answers_equal_with_caches_on_and_off(servers, kind):
    s = servers(kind)
    (eng_on, on), (_, off) = s["on"], s["off"]
    answers: dict[str, list[str]] = {"on": [], "off": []}
    cached: dict[str, list[int]] = {"on": [], "off": []}
    for messages in conversation():
        for mode, srv in (("on", on), ("off", off)):
            body = chat(srv, messages)
            answers[mode].append(body["choices"][0]["message"]["content"])
            cached[mode].append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert answers["on"] == answers["off"]
    assert cached["off"] == [0] * 5
    assert cached["on"][1] > 0 and cached["on"][4] > cached["on"][1]
    assert counter(on, "nova_prefix_cache_hit_tokens_total") > 0
    assert counter(on, "nova_encoder_cache_hit_images_total") >= 3
    assert counter(off, "nova_encoder_cache_queried_images_total") == 0
    assert counter(on, "nova_memory_encoder_cache_bytes") == 1 << 24
    assert any("encoder cache" in line for line in eng_on.describe().memory_lines)


def test_n_choices_share_the_prompt_and_equal_n_1(servers):
    on = servers("qwen2.5-vl")["on"][1]
    messages = conversation()[1]
    one = chat(on, messages)
    three = chat(on, messages, n=3)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    want = one["choices"][0]["message"]["content"]
    assert all(c["message"]["content"] == want for c in three["choices"])
    u = three["usage"]
    assert u["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt counted once
    assert u["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    # logprobs per choice (a fork's first token's too): greedy choices, the same entries
    lp_one = chat(on, messages, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]
    lp_two = chat(on, messages, n=2, logprobs=True, top_logprobs=2)["choices"]
    assert len(lp_one["content"]) == 5
    for c in lp_two:
        got = c["logprobs"]["content"]
        assert [e["token"] for e in got] == [e["token"] for e in lp_one["content"]]
        assert [len(e["top_logprobs"]) for e in got] == [2] * 5
        assert [e["logprob"] for e in got] == pytest.approx(
            [e["logprob"] for e in lp_one["content"]], abs=1e-4
        )
    # streamed: every chunk names its choice; each choice gets a role chunk and a finish
    body = {
        "messages": messages,
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    texts, roles, finishes, usage, firsts = ["", ""], set(), {}, None, []
    with httpx.stream("POST", on.base_url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj["choices"]:
                i = ch["index"]
                if ch["delta"].get("role"):
                    roles.add(i)
                    firsts.append(ch["delta"].get("content"))
                texts[i] += ch["delta"].get("content") or ""
                if ch["finish_reason"]:
                    finishes[i] = ch["finish_reason"]
    assert roles == {0, 1} and finishes == {0: "length", 1: "length"}
    # each choice's role chunk comes with its first token's text (which may be empty)
    assert len(firsts) == 2 and all(f is not None and want.startswith(f) for f in firsts)
    assert texts == [want, want]
    assert usage["completion_tokens"] == 2 * one["usage"]["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0


def test_n_choices_each_follow_the_grammar_and_their_own_seed(servers):
    """Every fork gets its own grammar state and generator: sampled choices differ in order of
    their seeds, and each is one of the schema's values."""
    on = servers("qwen2.5-vl")["on"][1]
    fmt = {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "schema": {"type": "string", "enum": ["yes", "no", "maybe", "later"]},
        },
    }
    body = chat(
        on, conversation()[0], n=4, temperature=1.0, seed=7, max_tokens=20, response_format=fmt
    )
    got = [c["message"]["content"] for c in body["choices"]]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop"] * 4
    assert all(json.loads(g) in ("yes", "no", "maybe", "later") for g in got), got
    # choice i samples with seed + i: choice 1 of seed 7 is choice 0 of seed 8
    alone = chat(on, conversation()[0], temperature=1.0, seed=8, max_tokens=20, response_format=fmt)
    assert alone["choices"][0]["message"]["content"] == got[1]


def test_image_sizes_of_an_encoder_cache_hit(servers):
    """An image the encoder cache had is never decoded; its sizes (the ``image_sizes``
    extension) are still those of the first request that sent it, and off equals on."""
    (_, on), (_, off) = servers("qwen2-vl")["on"], servers("qwen2-vl")["off"]
    url = png_data_url(90, 50, 11)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "Where?"},
            ],
        }
    ]
    hits = counter(on, "nova_encoder_cache_hit_images_total")
    first, second = chat(on, messages), chat(on, messages)
    assert counter(on, "nova_encoder_cache_hit_images_total") == hits + 1
    assert first["image_sizes"] == second["image_sizes"] == chat(off, messages)["image_sizes"]
    assert first["image_sizes"][0]["width"] == 90 and first["image_sizes"][0]["height"] == 50
