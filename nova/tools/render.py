"""Tools and tool-call history into a chat template, and which call format a model uses.

A template that renders tools (it reads the ``tools`` variable: Qwen2/2.5, Hermes, Llama 3.1)
gets them as OpenAI function dicts, and the history as OpenAI messages with each assistant
``tool_calls[].function.arguments`` turned from a JSON string into a dict (templates write it
with ``tojson``; a string would be encoded twice).

A template that does not (the demo model's SmolLM2 template) would drop the tools silently;
instead Nova renders them itself, in the Hermes format its parser reads
(``fallback_messages``): a system block listing the functions and how to call them, earlier
calls as ``<tool_call>`` blocks in the assistant's text, and tool results as user turns in
``<tool_response>`` blocks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from nova.tools.grammar import FunctionTool

FALLBACK_INSTRUCTIONS = (
    "You can call functions to help answer. Their signatures, one JSON object per line, are "
    "inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> tags, one block per call:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": <arguments as a JSON object>}}\n'
    "</tool_call>\n"
    "Function results come back inside <tool_response></tool_response> tags."
)


def template_renders_tools(chat_template: str | None) -> bool:
    """Whether the Jinja chat template reads the ``tools`` variable."""
    if not chat_template:
        return False
    import jinja2
    import jinja2.meta

    try:
        ast = jinja2.Environment().parse(chat_template)
    except jinja2.TemplateSyntaxError:
        return "tools" in chat_template
    return "tools" in jinja2.meta.find_undeclared_variables(ast)


def detect_parser(chat_template: str | None) -> str:
    """The tool-call format of a model, from its chat template: ``llama3_json`` for Llama 3.x
    templates (they ask for ``"parameters"`` and end turns with ``<|eot_id|>``), else
    ``hermes`` (Qwen2/2.5, Hermes, and Nova's own fallback prompt)."""
    template = chat_template or ""
    llama3 = "<|eot_id|>" in template and ("<|python_tag|>" in template or "parameters" in template)
    if llama3 and template_renders_tools(template) and "<tool_call>" not in template:
        return "llama3_json"
    return "hermes"


def call_text(name: str, arguments: Any) -> str:
    """A call as the Hermes format writes it (the layout the tool grammar forces)."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def fallback_messages(
    messages: Sequence[dict[str, Any]], tools: Sequence[FunctionTool]
) -> list[dict[str, Any]]:
    """``messages`` (already in template shape, tool-call arguments as dicts) rewritten for a
    template without tool support; ``tools`` (may be empty) listed in the system turn."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        role = msg.get("role")
        if role == "tool":
            block = f"<tool_response>\n{_text(msg.get('content'))}\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        if role == "assistant" and msg.get("tool_calls"):
            text = _text(msg.get("content"))
            calls = [
                call_text(c["function"]["name"], c["function"]["arguments"])
                for c in msg["tool_calls"]
            ]
            out.append(
                {"role": "assistant", "content": "\n".join([t for t in [text] if t] + calls)}
            )
            continue
        out.append({k: v for k, v in msg.items() if k != "tool_calls"})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        listing = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)
        block = FALLBACK_INSTRUCTIONS.format(tools=listing)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": _text(out[0].get("content")) + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")
