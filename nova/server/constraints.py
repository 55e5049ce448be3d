"""What a request constrains its output to, and how tool calls are read out of it.

From a request body: ``response_format`` (``text``, ``json_object``, ``json_schema``), vLLM's
``structured_outputs`` extension (exactly one of ``json``, ``regex``, ``choice``, ``grammar``,
``json_object``), and ``tools`` / ``tool_choice`` / ``parallel_tool_calls``, to

- a ``GrammarSpec`` (or None): compiled on the preparation pool, enforced by the engine;
- the tools the prompt lists (none for ``tool_choice: "none"``: the model is not offered them);
- a ``ToolMode`` (or None): how the service parses tool calls out of the text.

``tool_choice``: ``none`` -> no tools in the prompt, no parsing; ``auto`` (the default with
tools) -> tools in the prompt, calls parsed when the model writes them (combined with a
``response_format``: the grammar allows either calls or the JSON answer); ``required`` ->
a grammar forces one or more calls (one when ``parallel_tool_calls`` is false) in the model's
own format; a named function -> a grammar forces that function's arguments object. Invalid
combinations are a 400 naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nova.server.errors import COMBINATION_CODE, OpenAIError, bad_request
from nova.structured.spec import GrammarError, GrammarSpec
from nova.tools.grammar import FunctionTool, arguments_grammar, required_grammar
from nova.tools.parsers import TOOL_PARSERS, ArgumentsStream, ToolCallStream

if TYPE_CHECKING:
    from nova.server.protocol import ChatCompletionRequest, CompletionRequest


@dataclass(frozen=True, slots=True)
class ToolMode:
    """How tool calls are read from one request's output."""

    parser: str  # a TOOL_PARSERS name
    named: str | None = None  # tool_choice named this function: the text is its arguments
    max_calls: int | None = None  # parallel_tool_calls false: 1
    forced: bool = False  # required / named: a grammar makes the output a call

    def new_stream(self, make_id: Callable[[], str] | None = None) -> ToolCallStream:
        kw: dict[str, Any] = {} if make_id is None else {"make_id": make_id}
        if self.named is not None:
            return ArgumentsStream(self.named, **kw)
        return TOOL_PARSERS.lookup(self.parser)(self.max_calls, forced=self.forced, **kw)

    def finish_reason(self, engine_reason: str | None, num_calls: int) -> str | None:
        """OpenAI's finish reason: ``tool_calls`` when the answer is calls (a named function:
        ``stop``, as OpenAI answers)."""
        if engine_reason == "stop" and num_calls > 0 and self.named is None:
            return "tool_calls"
        return engine_reason


@dataclass(slots=True)
class Constraints:
    grammar: GrammarSpec | None = None
    grammar_param: str | None = None  # the field a compile error is reported against
    tools: list[FunctionTool] = field(default_factory=list)  # listed in the prompt
    tool_mode: ToolMode | None = None


def _spec(make: Callable[[], GrammarSpec], param: str) -> GrammarSpec:
    try:
        return make()
    except GrammarError as exc:
        raise bad_request(str(exc), param, "invalid_grammar") from exc


def _format_spec(body: ChatCompletionRequest | CompletionRequest) -> tuple[GrammarSpec, str] | None:
    """The grammar of ``response_format`` / ``structured_outputs``, and its field."""
    rf, so = body.response_format, body.structured_outputs
    if rf is not None and so is not None and rf.type != "text":
        raise bad_request(
            "response_format and structured_outputs cannot both constrain the output",
            "structured_outputs",
            COMBINATION_CODE,
        )
    if so is not None:
        given = [
            k
            for k, v in (
                ("json", so.json_),
                ("regex", so.regex),
                ("choice", so.choice),
                ("grammar", so.grammar),
                ("json_object", so.json_object or None),
            )
            if v is not None
        ]
        if len(given) != 1:
            raise bad_request(
                "structured_outputs needs exactly one of json, regex, choice, grammar, "
                f"json_object; got {given or 'none'}",
                "structured_outputs",
                COMBINATION_CODE,
            )
        kind = given[0]
        param = f"structured_outputs.{kind}"
        if so.json_ is not None:
            schema = so.json_
            return _spec(lambda: GrammarSpec.json_schema(schema), param), param
        if so.regex is not None:
            regex = so.regex
            return _spec(lambda: GrammarSpec.regex(regex), param), param
        if so.choice is not None:
            choice = so.choice
            return _spec(lambda: GrammarSpec.choice(choice), param), param
        if so.grammar is not None:
            grammar = so.grammar
            return _spec(lambda: GrammarSpec.grammar(grammar), param), param
        return GrammarSpec.json_object(), param
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return GrammarSpec.json_object(), "response_format"
    param = "response_format.json_schema.schema"
    schema_or_any = rf.json_schema.json_schema
    if schema_or_any is None:  # no schema: any JSON value
        return _spec(lambda: GrammarSpec.json_schema({}), param), param
    return _spec(lambda: GrammarSpec.json_schema(schema_or_any), param), param


def completion_constraints(body: CompletionRequest) -> Constraints:
    found = _format_spec(body)
    if found is None:
        return Constraints()
    return Constraints(grammar=found[0], grammar_param=found[1])


def chat_constraints(body: ChatCompletionRequest, parser: str) -> Constraints:
    """``parser``: the served model's tool-call format (``TOOL_PARSERS`` name)."""
    found = _format_spec(body)
    tools = [
        FunctionTool(t.function.name, t.function.parameters, t.function.description)
        for t in body.tools or []
    ]
    names = [t.name for t in tools]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise bad_request(f"tools define {dupes} more than once", "tools", COMBINATION_CODE)
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools:
        if choice not in ("none", "auto") or body.parallel_tool_calls is not None:
            raise bad_request(
                "tool_choice and parallel_tool_calls need tools",
                "tool_choice" if body.tool_choice is not None else "parallel_tool_calls",
                COMBINATION_CODE,
            )
        out = Constraints()
        if found is not None:
            out.grammar, out.grammar_param = found
        return out
    max_calls = 1 if body.parallel_tool_calls is False else None
    if choice == "none":
        out = Constraints()
        if found is not None:
            out.grammar, out.grammar_param = found
        return out
    if choice == "auto":
        out = Constraints(tools=tools, tool_mode=ToolMode(parser, max_calls=max_calls))
        if found is not None:
            answer = _answer_schema(found[0], found[1])
            out.grammar = _spec(
                lambda: required_grammar(tools, parser, max_calls is None, answer), "tools"
            )
            out.grammar_param = found[1]
        return out
    if found is not None:
        raise bad_request(
            f"tool_choice {_choice_label(choice)} forces a tool call; it cannot be combined "
            f"with {found[1].split('.')[0]}",
            "tool_choice",
            COMBINATION_CODE,
        )
    if choice == "required":
        grammar = _spec(lambda: required_grammar(tools, parser, max_calls is None), "tools")
        return Constraints(
            grammar,
            "tools",
            tools,
            ToolMode(parser, max_calls=max_calls, forced=True),
        )
    name = choice.function.name  # a named function
    if name not in names:
        raise bad_request(
            f"tool_choice names function {name!r}, which is not among the tools {names}",
            "tool_choice.function.name",
            COMBINATION_CODE,
        )
    tool = tools[names.index(name)]
    grammar = _spec(lambda: arguments_grammar(tool), "tools")
    return Constraints(grammar, "tools", tools, ToolMode(parser, named=name, forced=True))


def _answer_schema(spec: GrammarSpec, param: str) -> dict[str, Any]:
    if spec.kind != "json_schema":
        raise bad_request(
            "with tools and tool_choice auto, only a JSON response format can be combined "
            f"(got {param})",
            param,
            COMBINATION_CODE,
        )
    schema: dict[str, Any] = json.loads(spec.source)
    return schema


def _choice_label(choice: object) -> str:
    return repr(choice) if isinstance(choice, str) else "naming a function"


def grammar_error(exc: GrammarError, param: str | None) -> OpenAIError:
    return bad_request(str(exc), param, "invalid_grammar")
