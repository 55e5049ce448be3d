"""nova.tools: the incremental tool-call parsers, forced-call grammars and template rendering."""

from __future__ import annotations

import itertools
import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nova.structured import GrammarError
from nova.tools.grammar import FunctionTool, arguments_grammar, call_schema, required_grammar
from nova.tools.parsers import (
    TOOL_PARSERS,
    ArgumentsStream,
    HermesToolStream,
    Llama3JsonToolStream,
    ParsedDelta,
    merge_tool_calls,
)
from nova.tools.render import (
    call_text,
    detect_parser,
    fallback_messages,
    template_renders_tools,
)

WEATHER = FunctionTool(
    "get_weather",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "Weather in a city",
)
CLICK = FunctionTool(
    "click",
    {
        "type": "object",
        "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["x", "y"],
    },
)


def run(stream, text: str, cuts: list[int]) -> tuple[str, list[dict], ParsedDelta]:
    """Feed ``text`` split at ``cuts``; returns content, merged calls and all deltas."""
    out = ParsedDelta()
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(text)), len(text)]
    for a, b in itertools.pairwise(bounds):
        out.extend(stream.feed(text[a:b]))
    out.extend(stream.finish())
    calls = [c.as_openai() for c in merge_tool_calls(out.tool_calls)]
    return out.content, calls, out


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


HERMES_TWO_CALLS = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "days": [1, {"a": "]"}]}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "click", "arguments": {"x": 3, "y": 4}}\n</tool_call>\n'
)


def test_hermes_two_calls_and_content():
    content, calls, deltas = run(HermesToolStream(make_id=ids()), HERMES_TWO_CALLS, [])
    assert content == "Let me check."
    assert calls == [
        {
            "id": "call_0",
            "type": "function",
            "function": {
                "name": "get_weather",
                "arguments": '{"city": "Pa\\"ris}", "days": [1, {"a": "]"}]}',
            },
        },
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "click", "arguments": '{"x": 3, "y": 4}'},
        },
    ]
    for c in calls:
        json.loads(c["function"]["arguments"])
    # the first delta of a call carries id and name, and precedes its arguments
    first = deltas.tool_calls[0].as_openai()
    assert first == {
        "index": 0,
        "id": "call_0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, len(HERMES_TWO_CALLS)), max_size=40))
def test_hermes_parse_does_not_depend_on_how_the_text_is_split(cuts):
    whole = run(HermesToolStream(make_id=ids()), HERMES_TWO_CALLS, [])[:2]
    assert run(HermesToolStream(make_id=ids()), HERMES_TWO_CALLS, cuts)[:2] == whole


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(
        [
            "plain answer with a < sign and <tool_ inside\n\n",
            "x <tool_call>not json</tool_call> y",
            '<tool_call>{"no_name": 1}</tool_call> after',
            '<tool_call>\n{"name": "f", "arguments": {"a": 1',
            'a <tool_call>{"arguments": {"k": [1]}, "name": "f"}</tool_call> b',
            "</tool_call> stray closing tag",
        ]
    ),
    st.lists(st.integers(0, 60), max_size=20),
)
def test_hermes_odd_text_is_split_independent(text, cuts):
    assert (
        run(HermesToolStream(make_id=ids()), text, cuts)[:2]
        == run(HermesToolStream(make_id=ids()), text, [])[:2]
    )


def test_hermes_text_that_is_not_a_call_stays_content():
    s = HermesToolStream(make_id=ids())
    content, calls, _ = run(s, "x <tool_call>not json</tool_call> y", [])
    assert content == "x <tool_call>not json</tool_call> y" and calls == []
    assert s.errors and "expected '{'" in s.errors[0]
    content, calls, _ = run(HermesToolStream(), '<tool_call>{"no_name": 1}</tool_call>', [])
    assert content == '<tool_call>{"no_name": 1}</tool_call>' and calls == []


def test_hermes_arguments_before_name_are_sent_after_it():
    text = '<tool_call>{"arguments": {"k": [1]}, "name": "f"}</tool_call>'
    _, calls, deltas = run(HermesToolStream(make_id=ids()), text, [])
    assert calls[0]["function"] == {"name": "f", "arguments": '{"k": [1]}'}
    assert deltas.tool_calls[0].name == "f"


def test_an_incomplete_call_keeps_what_was_sent_and_says_so():
    s = HermesToolStream(make_id=ids())
    _, calls, _ = run(s, '<tool_call>\n{"name": "f", "arguments": {"a": 1', [])
    assert calls[0]["function"] == {"name": "f", "arguments": '{"a": 1'}
    assert s.errors == ["tool call 0 is incomplete"]


def test_a_forced_block_cut_off_before_its_name_is_dropped():
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n\n<tool_call>\n{"na'
    auto = HermesToolStream(make_id=ids())
    content, calls, _ = run(auto, text, [])
    assert content == '\n\n<tool_call>\n{"na' and len(calls) == 1
    forced = HermesToolStream(make_id=ids(), forced=True)
    content, calls, _ = run(forced, text, [])
    assert content == "" and len(calls) == 1
    assert forced.errors == ["tool call 1 was cut off before its function name"]
    forced = HermesToolStream(make_id=ids(), forced=True)
    content, calls, _ = run(forced, text[: text.rindex("<tool_call>") + 6], [])
    assert content == "" and len(calls) == 1  # cut inside the opening tag
    assert forced.errors == ["tool call 1 was cut off in its opening tag"]
    llama = Llama3JsonToolStream(make_id=ids(), forced=True)
    assert run(llama, '{"na', [])[:2] == ("", [])


def test_max_calls_stops_after_the_first_call():
    s = HermesToolStream(max_calls=1, make_id=ids())
    out = s.feed(HERMES_TWO_CALLS)
    assert s.done
    assert [c.name for c in merge_tool_calls(out.tool_calls)] == ["get_weather"]


def test_arguments_stream_streams_fragments_under_one_header():
    s = ArgumentsStream("click", make_id=ids())
    content, calls, deltas = run(s, '{"x": 1, "y": 2}', [3, 9])
    assert content == ""
    assert calls == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "click", "arguments": '{"x": 1, "y": 2}'},
        }
    ]
    assert [d.arguments for d in deltas.tool_calls] == ["", '{"x', '": 1, ', '"y": 2}']


@pytest.mark.parametrize(
    ("text", "content", "names"),
    [
        (' {"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}', "", ["f", "g"]),
        ("The answer is 4.", "The answer is 4.", []),
        ('{"foo": 1}', '{"foo": 1}', []),
        ('{"name": "f", "parameters": {"a": "}"}}', "", ["f"]),
    ],
)
def test_llama3_json(text, content, names):
    got_content, calls, _ = run(Llama3JsonToolStream(make_id=ids()), text, [])
    assert got_content == content
    assert [c["function"]["name"] for c in calls] == names
    for c in calls:
        json.loads(c["function"]["arguments"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 80), max_size=20))
def test_llama3_json_is_split_independent(cuts):
    text = ' {"name": "f", "parameters": {"a": [1, "x;y"]}}; {"name": "g", "parameters": {}}'
    assert (
        run(Llama3JsonToolStream(make_id=ids()), text, cuts)[:2]
        == run(Llama3JsonToolStream(make_id=ids()), text, [])[:2]
    )


def test_parsers_are_registered():
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json"}
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        TOOL_PARSERS.lookup("mistral")


# -- grammars -------------------------------------------------------------------------------------
def test_call_schema_accepts_exactly_calls_to_declared_tools():
    schema = call_schema([WEATHER, CLICK], "arguments")
    jsonschema.validate({"name": "click", "arguments": {"x": 1, "y": 2}}, schema)
    for bad in (
        {"name": "click", "arguments": {"city": "Paris"}},
        {"name": "open", "arguments": {}},
        {"name": "click", "arguments": {"x": 1, "y": 2}, "extra": 1},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_call_schema_hoists_defs_and_rejects_conflicts():
    a = FunctionTool(
        "a", {"$defs": {"P": {"type": "integer"}}, "properties": {"p": {"$ref": "#/$defs/P"}}}
    )
    b = FunctionTool(
        "b", {"$defs": {"P": {"type": "integer"}}, "properties": {"q": {"$ref": "#/$defs/P"}}}
    )
    schema = call_schema([a, b], "arguments")
    assert schema["$defs"] == {"P": {"type": "integer"}}
    jsonschema.validate({"name": "a", "arguments": {"p": 3}}, schema)
    clash = FunctionTool("c", {"$defs": {"P": {"type": "string"}}, "properties": {}})
    with pytest.raises(GrammarError, match="'a' and 'c' both define \\$defs/P"):
        call_schema([a, clash], "arguments")


def test_required_grammar_shapes():
    hermes = required_grammar([WEATHER, CLICK], "hermes").source
    assert hermes.startswith('start: call ("\\n" call)*\n')
    assert 'call: "<tool_call>\\n" %json' in hermes
    assert required_grammar([WEATHER], "hermes", parallel=False).source.startswith("start: call\n")
    llama = required_grammar([WEATHER], "llama3_json").source
    assert '"parameters"' in llama and "<tool_call>" not in llama
    combined = required_grammar([WEATHER], "hermes", answer_schema={"type": "object"}).source
    assert "| answer" in combined and "answer: %json" in combined
    with pytest.raises(GrammarError, match="no grammar"):
        required_grammar([WEATHER], "mistral")
    assert json.loads(arguments_grammar(CLICK).source)["required"] == ["x", "y"]
    assert json.loads(arguments_grammar(FunctionTool("noargs")).source) == {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }


# -- templates ------------------------------------------------------------------------------------
QWEN_LIKE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}"
    "{% endfor %}</tools>\nReturn <tool_call></tool_call><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
)
LLAMA3_LIKE = (
    "{%- if tools %}{{ '<|start_header_id|>user<|end_header_id|>' }}Respond with "
    '{"name": function name, "parameters": dictionary}{% for t in tools %}{{ t | tojson }}'
    "{% endfor %}<|eot_id|>{%- endif %}{%- for m in messages %}{{ m.content }}<|eot_id|>"
    "{%- endfor %}"
)
PLAIN = "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"


def test_template_detection():
    assert template_renders_tools(QWEN_LIKE) and template_renders_tools(LLAMA3_LIKE)
    assert not template_renders_tools(PLAIN) and not template_renders_tools(None)
    assert detect_parser(QWEN_LIKE) == "hermes"
    assert detect_parser(LLAMA3_LIKE) == "llama3_json"
    assert detect_parser(PLAIN) == "hermes"  # Nova's fallback prompt is Hermes-style


def test_fallback_renders_tools_calls_and_results_as_text():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": "18C", "tool_call_id": "c1"},
        {"role": "tool", "content": "sunny", "tool_call_id": "c2"},
    ]
    out = fallback_messages(messages, [WEATHER])
    assert out[0]["role"] == "system"
    assert "<tools>" in out[0]["content"] and '"name": "get_weather"' in out[0]["content"]
    assert out[2] == {
        "role": "assistant",
        "content": call_text("get_weather", {"city": "Paris"}),
    }
    assert out[2]["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    # consecutive tool results: one user turn
    assert out[3] == {
        "role": "user",
        "content": "<tool_response>\n18C\n</tool_response>\n"
        "<tool_response>\nsunny\n</tool_response>",
    }
    assert len(out) == 4
    # an existing system message keeps its text and gets the tools after it
    sys_out = fallback_messages(
        [{"role": "system", "content": "Be brief."}, *messages[:1]], [WEATHER]
    )
    assert sys_out[0]["content"].startswith("Be brief.\n\n") and "<tools>" in sys_out[0]["content"]
    assert fallback_messages(messages[:1], []) == messages[:1]


def test_the_forced_call_layout_matches_the_fallback_history_layout():
    """A call the grammar forced, once sent back in the history, renders the same text."""
    text = call_text("click", {"x": 1, "y": 2})
    _, calls, _ = run(HermesToolStream(make_id=ids()), text, [])
    assert calls[0]["function"] == {"name": "click", "arguments": '{"x": 1, "y": 2}'}
