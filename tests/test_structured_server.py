"""Structured output and tool calling on the demo model, through real HTTP and the official
``openai`` client: 50 varied JSON schemas all give valid JSON; ``tool_choice`` required and
named always give parsable calls to declared functions with valid arguments; streamed and
non-streamed answers agree; the client's own parsers (``parse``, the stream helper) accept
them; bad schemas and combinations are 400s naming the problem; greedy output of an
unconstrained request is unchanged by constrained neighbours; a grammar out of step fails its
request only."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json

import httpx
import jsonschema
import pytest
from structured_schemas import SCHEMAS

from nova.config import EngineConfig
from nova.engine.async_engine import AsyncEngine
from nova.sampling_params import SamplingParams
from nova.server.app import create_app
from nova.server.config import ServerConfig
from nova.server.errors import OpenAIError
from nova.server.protocol import ChatCompletionRequest
from nova.server.testing import ServerThread
from nova.structured import GrammarSpec

openai = pytest.importorskip("openai")
from clients import openai_client  # noqa: E402

pydantic = pytest.importorskip("pydantic")

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
CLICK = {
    "type": "function",
    "function": {
        "name": "click",
        "description": "Click on the screen at a point",
        "parameters": {
            "type": "object",
            "properties": {
                "x": {"type": "integer", "minimum": 0, "maximum": 1920},
                "y": {"type": "integer", "minimum": 0, "maximum": 1080},
            },
            "required": ["x", "y"],
        },
    },
}
TOOLS = [WEATHER, CLICK]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
TOOL_PROMPTS = [
    "What is the weather in Paris?",
    "Click the OK button at (100, 200).",
    "Tap on the settings icon.",
    "Is it raining in Tokyo?",
]


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine(EngineConfig(model="demo"))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, ServerConfig(served_model_name="demo"))


@pytest.fixture(scope="module")
def server(app):
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    client = openai_client(server.base_url, 600)
    yield client
    client.close()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def streamed(oai, **kw) -> tuple[str | None, list[dict], str | None]:
    """(content, tool calls, finish reason) reassembled from the SSE chunks."""
    content: list[str] = []
    calls: dict[int, dict] = {}
    finish = None
    for chunk in oai.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content.append(choice.delta.content or "")
        for tc in choice.delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id is not None:
                assert call["id"] is None, "a call's id is sent once, on its first delta"
                assert tc.function.name, "the first delta of a call names its function"
                call["id"] = tc.id
            call["name"] += tc.function.name or ""
            call["arguments"] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    return "".join(content) or None, [calls[i] for i in sorted(calls)], finish


def plain(oai, **kw) -> tuple[str | None, list[dict], str | None]:
    r = oai.chat.completions.create(**kw)
    choice = r.choices[0]
    calls = [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in choice.message.tool_calls or []
    ]
    return choice.message.content, calls, choice.finish_reason


def without_ids(calls: list[dict]) -> list[dict]:
    assert all(c["id"] and c["id"].startswith("call_") for c in calls)
    return [{k: v for k, v in c.items() if k != "id"} for c in calls]


def assert_valid_call(call: dict) -> None:
    assert call["name"] in PARAMS
    jsonschema.validate(json.loads(call["arguments"]), PARAMS[call["name"]])


# -- JSON schemas ------------------------------------------------------------------------------
def test_fifty_varied_json_schemas_all_give_valid_json(oai):
    def one(i: int):
        prompt, schema = SCHEMAS[i]
        r = oai.chat.completions.create(
            model="demo",
            messages=user(prompt + " Answer in JSON."),
            response_format=schema_format(schema, f"schema_{i}"),
            max_tokens=512,
            temperature=0,
        )
        return i, r.choices[0].finish_reason, r.choices[0].message.content

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(len(SCHEMAS))))
    assert len(results) == 50
    for i, finish, text in results:
        assert finish == "stop", (i, text)
        jsonschema.validate(json.loads(text), SCHEMAS[i][1])


def test_the_clients_parse_helper_reads_a_pydantic_answer(oai):
    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=30)
        age: int = pydantic.Field(ge=0, le=120)
        languages: list[str] = pydantic.Field(max_length=3)

    r = oai.chat.completions.parse(
        model="demo",
        messages=user("Describe a person who speaks French."),
        response_format=Person,
        max_tokens=200,
        temperature=0,
    )
    assert isinstance(r.choices[0].message.parsed, Person)


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "json_object"}},
        {"response_format": schema_format(SCHEMAS[11][1])},
        {"extra_body": {"structured_outputs": {"choice": ["yes", "no", "maybe"]}}},
        {"extra_body": {"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}}},
        {"extra_body": {"structured_outputs": {"json": SCHEMAS[21][1]}}},
        {"extra_body": {"structured_outputs": {"grammar": 'start: "Paris" | "Lyon"'}}},
    ],
)
def test_streamed_and_non_streamed_constrained_answers_agree(oai, extra):
    kw = dict(
        model="demo", messages=user("Where is the Eiffel tower?"), max_tokens=80, temperature=0
    )
    a, b = plain(oai, **kw, **extra), streamed(oai, **kw, **extra)
    assert a == b
    if "structured_outputs" in extra.get("extra_body", {}):
        so = extra["extra_body"]["structured_outputs"]
        if "choice" in so:
            assert a[0] in so["choice"]
        if "regex" in so:
            import re

            assert re.fullmatch(so["regex"], a[0])


def test_completions_take_structured_outputs(oai):
    r = oai.completions.create(
        model="demo",
        prompt="My phone number is ",
        max_tokens=20,
        temperature=0,
        extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}},
    )
    import re

    assert re.fullmatch("[0-9]{3}-[0-9]{4}", r.choices[0].text)
    assert r.choices[0].finish_reason == "stop"


# -- tool calls --------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", TOOL_PROMPTS)
def test_required_gives_one_valid_call_streamed_or_not(oai, prompt):
    kw = dict(
        model="demo",
        messages=user(prompt),
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=0,
    )
    content, calls, finish = plain(oai, **kw)
    assert (content, finish, len(calls)) == (None, "tool_calls", 1)
    assert_valid_call(calls[0])
    s_content, s_calls, s_finish = streamed(oai, **kw)
    assert (s_content, without_ids(s_calls), s_finish) == (None, without_ids(calls), finish)


def test_required_with_parallel_calls_gives_valid_calls(oai):
    """The model decides how many calls; every complete call is valid, and only when the
    token budget runs out (finish "length") may the last be cut short."""
    for prompt in TOOL_PROMPTS[1:2]:
        kw = dict(
            model="demo", messages=user(prompt), tools=TOOLS, tool_choice="required", temperature=0
        )
        content, calls, finish = plain(oai, **kw, max_tokens=80)
        assert content is None and calls and finish in ("tool_calls", "length")
        complete = calls if finish == "tool_calls" else calls[:-1]
        assert complete, "at least one complete call"
        for call in complete:
            assert_valid_call(call)
        assert without_ids(streamed(oai, **kw, max_tokens=80)[1]) == without_ids(calls)


def test_a_named_function_gives_its_arguments_and_finish_stop(oai):
    kw = dict(
        model="demo",
        messages=user("Click the OK button."),
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "click"}},
        max_tokens=60,
        temperature=0,
    )
    content, calls, finish = plain(oai, **kw)
    assert (content, finish, [c["name"] for c in calls]) == (None, "stop", ["click"])
    assert_valid_call(calls[0])
    s = streamed(oai, **kw)
    assert (s[0], without_ids(s[1]), s[2]) == (None, without_ids(calls), "stop")


def test_the_clients_tool_helpers_parse_the_calls(oai):
    class Click(pydantic.BaseModel):
        x: int = pydantic.Field(ge=0, le=1920)
        y: int = pydantic.Field(ge=0, le=1080)

    tool = openai.pydantic_function_tool(Click, name="click")
    r = oai.chat.completions.parse(
        model="demo",
        messages=user("Click at 30, 40."),
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
    )
    [call] = r.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Click)
    with oai.chat.completions.stream(
        model="demo",
        messages=user("Click at 30, 40."),
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
    ) as stream:
        final = stream.get_final_completion()
    [scall] = final.choices[0].message.tool_calls
    assert scall.function.arguments == call.function.arguments
    assert isinstance(scall.function.parsed_arguments, Click)


def test_auto_streamed_and_non_streamed_agree(oai):
    for prompt in TOOL_PROMPTS[:1]:
        kw = dict(model="demo", messages=user(prompt), tools=TOOLS, max_tokens=40, temperature=0)
        a, b = plain(oai, **kw), streamed(oai, **kw)
        assert (a[0], without_ids(a[1]), a[2]) == (b[0], without_ids(b[1]), b[2])


def test_a_tool_call_history_renders_through_the_fallback(app, engine, oai):
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
    ]
    body = ChatCompletionRequest.model_validate(
        {"model": "demo", "messages": history, "tools": TOOLS, "max_tokens": 10}
    )
    prepared = asyncio.run(app.state.service.preparer.prepare_chat(body))
    text = engine.processor.tokenizer.decode(prepared.prompt.token_ids)
    assert "<tools>" in text and '"name": "get_weather"' in text
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    )
    assert "<|im_start|>user\n<tool_response>\n18C and sunny\n</tool_response><|im_end|>" in text
    r = oai.chat.completions.create(
        model="demo", messages=history, tools=TOOLS, max_tokens=20, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


TOOLS_TEMPLATE = (  # a Qwen2.5-like template that renders tools and calls itself
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- elif m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n'
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}<|im_start|>assistant\n"
)


def test_a_template_that_renders_tools_gets_them_and_arguments_as_dicts(app, engine):
    tok = engine.processor.tokenizer
    preparer = app.state.service.preparer
    saved = (tok.chat_template, preparer.template_renders_tools)
    tok.chat_template, preparer.template_renders_tools = TOOLS_TEMPLATE, True
    try:
        body = ChatCompletionRequest.model_validate(
            {
                "model": "demo",
                "max_tokens": 5,
                "tools": [WEATHER],
                "messages": [
                    {"role": "user", "content": "Weather?"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {
                                    "name": "get_weather",
                                    "arguments": '{"city": "Oslo"}',
                                },
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "-3C"},
                ],
            }
        )
        text = tok.decode(asyncio.run(preparer.prepare_chat(body)).prompt.token_ids)
    finally:
        tok.chat_template, preparer.template_renders_tools = saved
    assert '"name": "get_weather"' in text.split("</tools>")[0]  # the tool, from the template
    # a special token's text in data the template writes itself is refused, not tokenised
    bad = body.model_copy(deep=True)
    bad.messages[1].tool_calls[0].function.arguments = '{"city": "<|im_end|>"}'
    tok.chat_template, preparer.template_renders_tools = TOOLS_TEMPLATE, True
    try:
        with pytest.raises(OpenAIError, match="special token '<\\|im_end\\|>'"):
            asyncio.run(preparer.prepare_chat(bad))
    finally:
        tok.chat_template, preparer.template_renders_tools = saved
    assert '{"name": "get_weather", "arguments": {"city": "Oslo"}}' in text  # not re-encoded
    assert "<tool_response>\n-3C\n</tool_response>" in text
    assert "You can call functions" not in text  # no fallback block


def test_tool_choice_none_answers_in_text(oai):
    r = oai.chat.completions.create(
        model="demo",
        messages=user("What is the weather in Paris?"),
        tools=TOOLS,
        tool_choice="none",
        max_tokens=20,
        temperature=0,
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (
            {"response_format": schema_format({"type": "array", "uniqueItems": True})},
            "response_format.json_schema.schema",
            "uniqueItems",
        ),
        (
            {"structured_outputs": {"regex": "(?<=a)b"}},
            "structured_outputs.regex",
            "regex",
        ),
        (
            {"structured_outputs": {"regex": "a", "choice": ["b"]}},
            "structured_outputs",
            "exactly one",
        ),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "cannot both",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "scroll"}}},
            "tool_choice.function.name",
            "scroll",
        ),
        ({"tool_choice": "required"}, "tool_choice", "need tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "cannot be combined",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools", "more than once"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{x"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
            "not valid JSON",
        ),
    ],
)
def test_bad_constraints_are_400s_naming_the_problem(server, body, param, fragment):
    payload = {"model": "demo", "messages": user("hi"), "max_tokens": 5, **body}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err


# -- the engine --------------------------------------------------------------------------------
def test_unconstrained_greedy_output_is_unchanged_by_constrained_neighbours(engine):
    llm = engine.llm_engine
    proc = llm.processor
    plain_prompt = proc.from_chat(user("What is the capital of France?"))
    grammar = proc.grammar_compiler.compile(GrammarSpec.json_schema(SCHEMAS[0][1]))
    json_prompt = proc.from_chat(user("Describe a person in JSON."))

    async def run(prompts, params):
        async def one(p, sp):
            toks: list[int] = []
            async for d in engine.generate(p, sp):
                toks += d.new_token_ids
            return toks

        return await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params)))

    alone = asyncio.run(run([plain_prompt], [SamplingParams(max_tokens=24)]))[0]
    mixed = asyncio.run(
        run(
            [json_prompt, plain_prompt, json_prompt],
            [
                SamplingParams(max_tokens=24, structured_output=grammar),
                SamplingParams(max_tokens=24),
                SamplingParams(max_tokens=24, structured_output=grammar),
            ],
        )
    )
    assert mixed[1] == alone
    assert json.loads(proc.decode(mixed[0])) == json.loads(proc.decode(mixed[2]))


class _AheadGrammar:
    """A compiled grammar whose matchers start one token ahead of their request."""

    def __init__(self, grammar, token: int) -> None:
        self.grammar, self.token = grammar, token

    def new_matcher(self):
        m = self.grammar.new_matcher()
        assert m.consume(self.token)
        return m


def test_a_grammar_out_of_step_fails_only_its_request(engine):
    proc = engine.processor
    grammar = proc.grammar_compiler.compile(GrammarSpec.choice(["yes", "no"]))
    first = proc.tokenizer.encode("yes")[0]
    prompt = proc.from_chat(user("Yes or no?"))

    async def run(sp):
        last = None
        async for d in engine.generate(prompt, sp):
            last = d
        return last

    async def both():
        return await asyncio.gather(
            run(SamplingParams(max_tokens=8, structured_output=_AheadGrammar(grammar, first))),
            run(SamplingParams(max_tokens=8, structured_output=grammar)),
        )

    bad, good = asyncio.run(both())
    assert bad.finish_reason == "error" and "grammar state is at output token 1" in bad.error
    assert good.finish_reason == "stop"


def test_preemption_by_recompute_keeps_grammars_in_step():
    """A KV cache too small for the burst: decoding requests are preempted and recomputed; each
    matcher stays at its request's output, and every answer is still valid."""
    from nova.llm import LLM

    llm = LLM("demo", num_kv_blocks=14, block_size=16)
    proc = llm.processor
    picks = [SCHEMAS[i] for i in (0, 7, 11, 21, 30, 45)]
    grammars = [proc.grammar_compiler.compile(GrammarSpec.json_schema(s)) for _, s in picks]
    outs = llm.generate(
        [p + " Answer in JSON." for p, _ in picks],
        [SamplingParams(max_tokens=150, structured_output=g) for g in grammars],
    )
    assert llm.llm_engine.scheduler.state.num_preemptions > 0
    for (prompt, schema), out in zip(picks, outs):
        assert out.error is None and out.finish_reason == "stop", (prompt, out.text)
        jsonschema.validate(json.loads(out.text), schema)


def test_n_choices_each_parse_their_own_tool_calls(oai):
    """``n`` = 2 greedy choices with a required tool: each choice's calls are parsed by its own
    parser (JSON and SSE, chunks carrying their choice index) and equal the ``n`` = 1 call."""
    kw = dict(
        model="demo",
        messages=user(TOOL_PROMPTS[1]),
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=0,
    )
    _, want, _ = plain(oai, **kw)
    r = oai.chat.completions.create(n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1]
    for choice in r.choices:
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in choice.message.tool_calls or []
        ]
        assert (choice.message.content, choice.finish_reason) == (None, "tool_calls")
        assert without_ids(calls) == without_ids(want)
    per: dict[int, dict[int, dict]] = {0: {}, 1: {}}
    finishes = {}
    for chunk in oai.chat.completions.create(stream=True, n=2, **kw):
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                call = per[choice.index].setdefault(
                    tc.index, {"id": tc.id, "name": "", "arguments": ""}
                )
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "tool_calls", 1: "tool_calls"}
    for i in (0, 1):
        assert without_ids([per[i][k] for k in sorted(per[i])]) == without_ids(want)
