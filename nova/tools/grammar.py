"""Grammars that force tool calls (``tool_choice``: ``required`` or a named function), in the
model's own call format, so the parser that reads free (``auto``) calls reads forced ones too.

- ``hermes``: one ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` block per
  call, blocks separated by a newline (one block when ``parallel_tool_calls`` is false);
- ``llama3_json``: one ``{"name": ..., "parameters": {...}}`` object;
- a named function: only that function's arguments object (the response names the function).

Each call is a JSON schema (``anyOf`` over the tools, the name a ``const``) inlined in a Lark
grammar (llguidance's ``%json``). ``$defs``/``definitions`` of the tools' parameter schemas are
hoisted to the top of that schema so their ``$ref``\\ s resolve; two tools defining the same name
differently is an error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nova.structured.spec import JSON_OPTIONS, GrammarError, GrammarSpec, generation_schema

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
# Top-level keys of the arguments key per format.
ARGUMENTS_KEY = {"hermes": "arguments", "llama3_json": "parameters"}


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """A function the model may call: its name and JSON schema of arguments."""

    name: str
    parameters: dict[str, Any] | None = None
    description: str | None = None

    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else EMPTY_PARAMETERS

    def as_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters_schema()
        return {"type": "function", "function": function}


def arguments_grammar(tool: FunctionTool) -> GrammarSpec:
    """A named function: the model writes only its arguments object."""
    return GrammarSpec.json_schema(tool.parameters_schema())


def call_schema(tools: Sequence[FunctionTool], arguments_key: str) -> dict[str, Any]:
    """JSON schema of one call to any of ``tools`` (closed objects, layout options set)."""
    if not tools:
        raise GrammarError("no tools to call")
    defs: dict[str, dict[str, Any]] = {"$defs": {}, "definitions": {}}
    owners: dict[tuple[str, str], str] = {}
    branches = []
    for tool in tools:
        params = dict(tool.parameters_schema())
        for key in ("$defs", "definitions"):
            for name, sub in (params.pop(key, None) or {}).items():
                seen = defs[key].get(name)
                if seen is not None and seen != sub:
                    raise GrammarError(
                        f"tools {owners[(key, name)]!r} and {tool.name!r} both define "
                        f"{key}/{name} differently"
                    )
                defs[key][name] = sub
                owners[(key, name)] = tool.name
        branches.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, arguments_key: params},
                "required": ["name", arguments_key],
            }
        )
    schema: dict[str, Any] = {"x-guidance": JSON_OPTIONS}
    schema.update({k: v for k, v in defs.items() if v})
    if len(branches) == 1:
        schema.update(branches[0])
    else:
        schema["anyOf"] = branches
    return generation_schema(schema)


def required_grammar(
    tools: Sequence[FunctionTool],
    parser: str,
    parallel: bool = True,
    answer_schema: dict[str, Any] | None = None,
) -> GrammarSpec:
    """Calls to ``tools`` in ``parser``'s format (several when ``parallel``, hermes only).
    ``answer_schema``: also allow, instead of calls, a JSON answer matching it (``auto`` with
    a ``response_format``)."""
    if parser not in ARGUMENTS_KEY:
        raise GrammarError(f"no grammar for tool-call format {parser!r}")
    call = json.dumps(call_schema(tools, ARGUMENTS_KEY[parser]), ensure_ascii=False)
    if parser == "hermes":
        rules = [f'call: "<tool_call>\\n" %json {call} "\\n</tool_call>"']
        calls = 'call ("\\n" call)*' if parallel else "call"
    else:
        rules = [f"call: %json {call}"]
        calls = "call"
    if answer_schema is not None:
        answer = dict(generation_schema(answer_schema))
        answer.setdefault("x-guidance", JSON_OPTIONS)
        rules.append(f"answer: %json {json.dumps(answer, ensure_ascii=False)}")
        calls = f"{calls} | answer"
    return GrammarSpec.grammar("\n".join([f"start: {calls}", *rules]) + "\n")
