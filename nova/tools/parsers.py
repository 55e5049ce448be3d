"""Tool calls out of a model's text, incrementally: content and OpenAI ``tool_calls`` deltas.

A ``ToolCallStream`` is fed the output text piece by piece (``feed``) and finally ``finish``\\ ed;
each call returns a ``ParsedDelta``: content text and tool-call deltas (the first delta of a call
carries its index, id and function name, later ones argument fragments). The non-streamed
response is built by merging the same deltas, so streamed and non-streamed answers agree by
construction.

Formats (``TOOL_PARSERS``):

- ``hermes``: Hermes / Qwen2 / Qwen2.5 / Qwen-VL, and Nova's fallback prompt for templates
  without tools: ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``, any number of
  them; text before, between (if not only whitespace) or after the blocks is content.
- ``llama3_json``: Llama 3.1/3.2 JSON tool calling: the answer is a JSON object
  ``{"name": "f", "parameters": {...}}`` (several separated by ``;``); an answer that does not
  start with ``{`` is content.

A block that turns out not to be a tool call (not a JSON object with a string ``name``) is
content, unless part of it was already streamed as a call: then the rest of that block is
dropped and ``errors`` says why (only possible without a grammar, i.e. ``tool_choice: auto``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from nova.registry import Registry
from nova.tools.scan import WHITESPACE, CallScanner, ScanError

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def new_call_id() -> str:
    """An id in OpenAI's shape: ``call_`` and 24 hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolCallDelta:
    """One piece of tool call ``index``: ``id`` and ``name`` on its first piece only."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def as_openai(self) -> dict[str, object]:
        out: dict[str, object] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        function: dict[str, str] = {}
        if self.name is not None:
            function["name"] = self.name
        if self.arguments or self.name is not None:
            function["arguments"] = self.arguments
        out["function"] = function
        return out


@dataclass(slots=True)
class ParsedDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: ParsedDelta) -> None:
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


@dataclass(slots=True)
class ToolCall:
    """A complete call, merged from its deltas."""

    id: str
    name: str
    arguments: str

    def as_openai(self) -> dict[str, object]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def merge_tool_calls(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """The calls the deltas describe, in index order."""
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        call = calls.get(d.index)
        if call is None:
            call = calls[d.index] = ToolCall(d.id or "", d.name or "", "")
        call.arguments += d.arguments
    return [calls[i] for i in sorted(calls)]


class ToolCallStream:
    """Base of the per-request parsers. ``max_calls``: stop parsing after this many complete
    calls (``parallel_tool_calls: false``); ``done`` then tells the caller to end generation.
    ``forced``: a grammar makes the whole output calls, so a block cut off (``max_tokens``)
    before its function name is dropped rather than returned as content."""

    def __init__(
        self,
        max_calls: int | None = None,
        make_id: Callable[[], str] = new_call_id,
        forced: bool = False,
    ) -> None:
        self.max_calls = max_calls
        self.make_id = make_id
        self.forced = forced
        self.num_calls = 0  # calls started (their first delta sent)
        self.num_complete = 0
        self.errors: list[str] = []
        self._pending_ws = ""  # whitespace-only content, held until more content follows

    @property
    def done(self) -> bool:
        return self.max_calls is not None and self.num_complete >= self.max_calls

    def feed(self, text: str) -> ParsedDelta:
        raise NotImplementedError

    def finish(self) -> ParsedDelta:
        raise NotImplementedError

    # -- shared pieces -----------------------------------------------------------------------
    def _content(self, out: ParsedDelta, text: str) -> None:
        """Content, except trailing whitespace, which waits to see whether content follows
        (the newlines around tool-call blocks are not content). Independent of how the text
        was split into pieces."""
        body = text.rstrip(WHITESPACE)
        if body:
            out.content += self._pending_ws + body
            self._pending_ws = ""
        self._pending_ws += text[len(body) :]

    def _unfinished_block(self, out: ParsedDelta, index: int, text: str) -> None:
        """The output ended inside a block that never got its function name."""
        if self.forced:
            self.errors.append(f"tool call {index} was cut off before its function name")
        else:
            self._content(out, text)

    def _flush_pending(self, out: ParsedDelta) -> None:
        if self._pending_ws and self.num_calls == 0:
            out.content += self._pending_ws
        self._pending_ws = ""


class _CallState:
    """One call being scanned: what of it has been sent."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.scanner = CallScanner()
        self.sent_header = False
        self.sent_args = 0  # characters of the arguments text sent
        self.failed = False

    def advance(self, text: str, stream: ToolCallStream, out: ParsedDelta) -> None:
        """Scan ``text``; send the header once the name is known, then new argument text."""
        if self.failed:
            return
        try:
            self.scanner.feed(text)
        except ScanError as exc:
            self.failed = True
            stream.errors.append(f"tool call {self.index}: {exc}")
            return
        sc = self.scanner
        if sc.name is None:
            return
        if not self.sent_header:
            self.sent_header = True
            stream.num_calls += 1
            out.tool_calls.append(ToolCallDelta(self.index, stream.make_id(), sc.name, ""))
        args = sc.arguments_text()
        if sc.done and args is None:
            args = "{}"  # a call without arguments
        if args is not None and len(args) > self.sent_args:
            out.tool_calls.append(ToolCallDelta(self.index, arguments=args[self.sent_args :]))
            self.sent_args = len(args)
        if sc.done:
            stream.num_complete += 1


class HermesToolStream(ToolCallStream):
    """``<tool_call>{json}</tool_call>`` blocks amid content."""

    def __init__(
        self,
        max_calls: int | None = None,
        make_id: Callable[[], str] = new_call_id,
        forced: bool = False,
    ) -> None:
        super().__init__(max_calls, make_id, forced)
        self._mode = "content"  # content | call | after_call | skip
        self._buf = ""  # text not yet classified
        self._call: _CallState | None = None
        self._raw = ""  # the current block's text after its opening tag

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        self._buf += text
        while self._buf and not self.done:
            step = {
                "content": self._in_content,
                "call": self._in_call,
                "after_call": self._after_call,
                "skip": self._skip,
            }[self._mode]
            if not step(out):
                break
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        call = self._call
        if self._mode == "call" and call is not None:
            if call.sent_header:
                self.errors.append(f"tool call {call.index} is incomplete")
            else:  # never became a call
                self._unfinished_block(out, call.index, TOOL_CALL_OPEN + self._raw)
        elif self._mode == "content" and not self.done and self._buf:
            if self.forced and TOOL_CALL_OPEN.startswith(self._buf):
                self.errors.append(f"tool call {self.num_calls} was cut off in its opening tag")
            else:
                self._content(out, self._buf)
        self._call, self._buf, self._mode = None, "", "content"
        self._flush_pending(out)
        return out

    # Each step consumes from ``_buf``; False: it needs more text.
    def _in_content(self, out: ParsedDelta) -> bool:
        i = self._buf.find(TOOL_CALL_OPEN)
        if i >= 0:
            self._content(out, self._buf[:i])
            self._buf = self._buf[i + len(TOOL_CALL_OPEN) :]
            self._call, self._raw, self._mode = _CallState(self.num_calls), "", "call"
            return True
        hold = _partial_suffix(self._buf, TOOL_CALL_OPEN)  # may be the start of a tag
        self._content(out, self._buf[: len(self._buf) - hold])
        self._buf = self._buf[len(self._buf) - hold :]
        return False

    def _in_call(self, out: ParsedDelta) -> bool:
        call = self._call
        assert call is not None
        text, self._buf = self._buf, ""
        self._raw += text
        call.advance(text, self, out)
        sc = call.scanner
        if call.failed and call.sent_header:
            self._call, self._mode = None, "skip"  # the rest of this block is dropped
            return True
        if call.failed or (sc.done and not call.sent_header):
            if sc.done:
                self.errors.append(f"tool call {call.index} has no function name")
            # not a call: the tag is content, and the text after it is read again
            self._content(out, TOOL_CALL_OPEN)
            self._call, self._buf, self._mode = None, self._raw, "content"
            return True
        if sc.done:
            self._call, self._buf, self._mode = None, sc.rest, "after_call"
            return True
        return False

    def _after_call(self, out: ParsedDelta) -> bool:
        stripped = self._buf.lstrip(WHITESPACE)
        if stripped.startswith(TOOL_CALL_CLOSE):
            self._buf, self._mode = stripped[len(TOOL_CALL_CLOSE) :], "content"
            return True
        if TOOL_CALL_CLOSE.startswith(stripped):  # empty, or part of the closing tag
            self._buf = stripped
            return False
        self._buf, self._mode = stripped, "content"  # no closing tag: content follows
        return True

    def _skip(self, out: ParsedDelta) -> bool:
        i = self._buf.find(TOOL_CALL_CLOSE)
        if i >= 0:
            self._buf, self._mode = self._buf[i + len(TOOL_CALL_CLOSE) :], "content"
            return True
        self._buf = self._buf[len(self._buf) - _partial_suffix(self._buf, TOOL_CALL_CLOSE) :]
        return False


class Llama3JsonToolStream(ToolCallStream):
    """An answer that is one or more JSON calls (``;``-separated), or content."""

    def __init__(
        self,
        max_calls: int | None = None,
        make_id: Callable[[], str] = new_call_id,
        forced: bool = False,
    ) -> None:
        super().__init__(max_calls, make_id, forced)
        self._mode = "start"  # start | call | between | content
        self._buf = ""
        self._call: _CallState | None = None

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        if self.done:
            return out
        self._buf += text
        while self._buf and not self.done:
            if self._mode == "content":
                self._content(out, self._buf)
                self._buf = ""
            elif self._mode in ("start", "between"):
                stripped = self._buf.lstrip(WHITESPACE + (";" if self._mode == "between" else ""))
                if not stripped:
                    if self._mode == "start":
                        break  # leading whitespace: undecided yet
                    self._buf = ""
                    break
                if stripped[0] == "{":
                    self._buf = stripped
                    self._call = _CallState(self.num_calls)
                    self._mode = "call"
                else:
                    self._mode = "content"
            else:
                call = self._call
                assert call is not None
                text_in, self._buf = self._buf, ""
                call.advance(text_in, self, out)
                if call.failed or (call.scanner.done and not call.sent_header):
                    if call.sent_header:
                        self._mode, self._buf = "content", ""
                    else:  # not a call after all: the answer is content
                        self._mode = "content"
                        self._buf = call.scanner.text
                        if call.scanner.done:
                            self.errors.append(f"tool call {call.index} has no function name")
                    self._call = None
                elif call.scanner.done:
                    self._call = None
                    self._mode = "between"
                    self._buf = call.scanner.rest
                else:
                    break
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        call = self._call
        if call is not None and not call.sent_header:
            self._unfinished_block(out, call.index, call.scanner.text)
        elif call is not None:
            self.errors.append(f"tool call {call.index} is incomplete")
        elif self._buf and self._mode in ("start", "content"):
            self._content(out, self._buf)
        self._call, self._buf = None, ""
        self._flush_pending(out)
        return out


class ArgumentsStream(ToolCallStream):
    """``tool_choice`` naming a function: the grammar makes the model write only the
    arguments object, so the whole text is that call's arguments."""

    def __init__(self, function_name: str, make_id: Callable[[], str] = new_call_id) -> None:
        super().__init__(1, make_id, forced=True)
        self.function_name = function_name
        self._sent_header = False

    @property
    def done(self) -> bool:
        return False  # the grammar ends the call

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        if not self._sent_header:
            self._sent_header = True
            self.num_calls = 1
            out.tool_calls.append(ToolCallDelta(0, self.make_id(), self.function_name, ""))
        if text:
            out.tool_calls.append(ToolCallDelta(0, arguments=text))
        return out

    def finish(self) -> ParsedDelta:
        out = self.feed("") if not self._sent_header else ParsedDelta()
        self.num_complete = 1
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


TOOL_PARSERS: Registry[type[ToolCallStream]] = Registry("tool-call parser")
TOOL_PARSERS.add("hermes", HermesToolStream)
TOOL_PARSERS.add("llama3_json", Llama3JsonToolStream)
