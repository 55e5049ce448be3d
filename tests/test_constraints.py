"""nova.server.constraints: request fields -> grammar spec, prompt tools and tool-call mode."""

from __future__ import annotations

import json

import pytest

from nova.server.constraints import ToolMode, chat_constraints, completion_constraints
from nova.server.errors import OpenAIError
from nova.server.protocol import ChatCompletionRequest, CompletionRequest
from nova.tools.parsers import ArgumentsStream, HermesToolStream, Llama3JsonToolStream

TOOLS = [
    {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "b"}},
]


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], **kw}
    )


def test_no_constraints():
    c = chat_constraints(chat(), "hermes")
    assert c.grammar is None and c.tools == [] and c.tool_mode is None
    c = chat_constraints(chat(response_format={"type": "text"}), "hermes")
    assert c.grammar is None


def test_response_formats_and_structured_outputs():
    c = chat_constraints(chat(response_format={"type": "json_object"}), "hermes")
    assert (c.grammar.kind, json.loads(c.grammar.source)) == ("json_schema", {"type": "object"})
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    c = chat_constraints(chat(response_format=rf), "hermes")
    assert json.loads(c.grammar.source)["additionalProperties"] is False
    assert c.grammar_param == "response_format.json_schema.schema"
    no_schema = {"type": "json_schema", "json_schema": {"name": "n"}}
    assert (
        json.loads(chat_constraints(chat(response_format=no_schema), "hermes").grammar.source) == {}
    )
    for key, value, kind in (
        ("regex", "a+", "regex"),
        ("choice", ["x", "y"], "choice"),
        ("grammar", 'start: "z"', "grammar"),
        ("json", '{"type": "integer"}', "json_schema"),
        ("json_object", True, "json_schema"),
    ):
        c = chat_constraints(chat(structured_outputs={key: value}), "hermes")
        assert c.grammar.kind == kind and c.grammar_param == f"structured_outputs.{key}"
    c = completion_constraints(
        CompletionRequest.model_validate({"prompt": "x", "structured_outputs": {"regex": "a"}})
    )
    assert c.grammar.kind == "regex"


def test_tool_choice_modes():
    auto = chat_constraints(chat(tools=TOOLS), "hermes")
    assert [t.name for t in auto.tools] == ["a", "b"] and auto.grammar is None
    assert auto.tool_mode == ToolMode("hermes")
    assert isinstance(auto.tool_mode.new_stream(), HermesToolStream)
    none = chat_constraints(chat(tools=TOOLS, tool_choice="none"), "hermes")
    assert none.tools == [] and none.tool_mode is None  # not offered to the model
    req = chat_constraints(
        chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False), "llama3_json"
    )
    assert req.tool_mode == ToolMode("llama3_json", max_calls=1, forced=True)
    assert req.grammar.kind == "grammar" and '"parameters"' in req.grammar.source
    stream = req.tool_mode.new_stream()
    assert isinstance(stream, Llama3JsonToolStream) and stream.forced and stream.max_calls == 1
    named = chat_constraints(
        chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "b"}}), "hermes"
    )
    assert named.tool_mode.named == "b" and isinstance(
        named.tool_mode.new_stream(), ArgumentsStream
    )
    assert json.loads(named.grammar.source)["properties"] == {}


def test_auto_tools_with_a_json_format_allow_calls_or_the_answer():
    c = chat_constraints(chat(tools=TOOLS, response_format={"type": "json_object"}), "hermes")
    assert c.tool_mode == ToolMode("hermes")
    assert "| answer" in c.grammar.source and "<tool_call>" in c.grammar.source
    with pytest.raises(OpenAIError, match="only a JSON response format"):
        chat_constraints(chat(tools=TOOLS, structured_outputs={"regex": "a"}), "hermes")


def test_finish_reasons():
    assert ToolMode("hermes").finish_reason("stop", 2) == "tool_calls"
    assert ToolMode("hermes").finish_reason("stop", 0) == "stop"
    assert ToolMode("hermes").finish_reason("length", 1) == "length"
    assert ToolMode("hermes", named="a").finish_reason("stop", 1) == "stop"


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"tool_choice": "auto"}, None),  # auto without tools: fine, nothing to do
        ({"parallel_tool_calls": True}, "parallel_tool_calls"),
        ({"tool_choice": {"type": "function", "function": {"name": "a"}}}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "z"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "structured_outputs": {"regex": "a"}},
            "tool_choice",
        ),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
        ),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"json": "{oops"}}, "structured_outputs.json"),
        ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
    ],
)
def test_invalid_combinations_name_their_field(kw, param):
    if param is None:
        assert chat_constraints(chat(**kw), "hermes").tool_mode is None
        return
    with pytest.raises(OpenAIError) as err:
        chat_constraints(chat(**kw), "hermes")
    assert err.value.status == 400 and err.value.param == param


def test_the_parser_flag_lists_every_parser_and_overrides_detection():
    import argparse

    from nova.server.cli import add_serve_args
    from nova.server.config import TOOL_CALL_PARSERS, ServerConfig
    from nova.tools.parsers import TOOL_PARSERS

    assert set(TOOL_CALL_PARSERS) == {"auto", *TOOL_PARSERS}
    args = add_serve_args(argparse.ArgumentParser()).parse_args(
        ["--tool-call-parser", "llama3_json"]
    )
    assert ServerConfig.from_args(args).tool_call_parser == "llama3_json"
    with pytest.raises(ValueError, match="tool_call_parser"):
        ServerConfig(tool_call_parser="mistral")
