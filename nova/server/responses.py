"""Response bodies of the OpenAI API: the JSON of a completed chat or text completion, and the
server-sent events of a streamed one (``data: <json>`` chunks, then ``data: [DONE]``)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from nova.server.constraints import ToolMode
from nova.server.errors import GenerationFailed, OpenAIError, generation_failed, internal_error
from nova.server.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from nova.server.prepare import Prepared
from nova.tools.parsers import ToolCall, ToolCallDelta, ToolCallStream
from nova.types import TokenLogprobs

log = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


@dataclass(slots=True)
class Piece:
    """Text (and tool-call deltas) to send for one choice of a request (possibly empty: a
    choice's first piece comes with its first token whatever its text); the last piece of a
    choice has its finish reason."""

    text: str
    finish_reason: str | None = None  # set on the last piece
    num_output_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # of this piece's tokens
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    index: int = 0  # the choice (0 .. n-1)
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served


@dataclass(slots=True)
class Collected:
    """One choice's whole (non-streamed) output."""

    text: str = ""
    finish_reason: str | None = None
    num_output_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)


@dataclass(slots=True)
class Choices:
    """A finished request's choices (``outputs[i]`` is choice i) and the prompt tokens the
    prefix cache served."""

    outputs: list[Collected]
    num_cached_tokens: int = 0

    @classmethod
    def empty(cls, n: int) -> Choices:
        return cls([Collected() for _ in range(n)])

    @property
    def num_output_tokens(self) -> int:
        return sum(c.num_output_tokens for c in self.outputs)


class ToolPieces:
    """Pieces -> pieces with tool calls parsed out of their text (``mode`` None: pieces pass
    through). Logprobs stay with the piece whose tokens they describe. One per choice."""

    def __init__(self, mode: ToolMode | None) -> None:
        self.mode = mode
        self.stream: ToolCallStream | None = mode.new_stream() if mode is not None else None

    @property
    def done(self) -> bool:
        """The last tool call allowed is complete: generation should end."""
        return self.stream is not None and self.stream.done

    def piece(self, raw: Piece) -> Piece:
        if self.stream is None:
            return raw
        parsed = self.stream.feed(raw.text)
        return Piece(
            parsed.content,
            raw.finish_reason,
            raw.num_output_tokens,
            raw.logprobs,
            parsed.tool_calls,
            raw.index,
            raw.num_cached_tokens,
        )

    def last(self, piece: Piece, finish: str | None) -> Piece:
        """``piece`` as the last one: the parser's held-back text, the finish reason."""
        if self.stream is None or self.mode is None:
            piece.finish_reason = finish
            return piece
        rest = self.stream.finish()
        piece.text += rest.content
        piece.tool_calls.extend(rest.tool_calls)
        piece.finish_reason = self.mode.finish_reason(finish, self.stream.num_calls)
        return piece


def image_sizes(p: Prepared) -> list[dict[str, int]] | None:
    """The extension field ``image_sizes``: each image as given and as the model saw it."""
    sizes = p.prompt.image_sizes
    if not sizes:
        return None
    return [
        {
            "width": s.width,
            "height": s.height,
            "resized_width": s.resized_width,
            "resized_height": s.resized_height,
        }
        for s in sizes
    ]


def usage(p: Prepared, num_output_tokens: int, num_cached_tokens: int = 0) -> dict[str, Any]:
    """The prompt once, the completions of all choices together."""
    return {
        "prompt_tokens": p.num_prompt_tokens,
        "completion_tokens": num_output_tokens,
        "total_tokens": p.num_prompt_tokens + num_output_tokens,
        "prompt_tokens_details": {"cached_tokens": num_cached_tokens},
    }


def sse_event(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# A text no request produces (a private-use character and NUL): marks where a chunk's text goes
TEXT_MARK = "\ue000\x00nova-text\x00\ue000"
_TEXT_MARK_JSON = json.dumps(TEXT_MARK, ensure_ascii=False)


def text_template(event: str) -> tuple[str, str] | None:
    """The event ``event`` (written with ``TEXT_MARK`` as its text) split around the JSON
    string of that text; None if the mark is not there exactly once."""
    parts = event.split(_TEXT_MARK_JSON)
    return (parts[0], parts[1]) if len(parts) == 2 else None


def response_head(p: Prepared, obj: str, model: str) -> dict[str, Any]:
    return {
        "id": p.request_id,
        "object": obj,
        "created": p.created,
        "model": model,
        "system_fingerprint": None,
    }


def chat_body(p: Prepared, model: str, c: Choices, texts: TokenTexts) -> dict[str, Any]:
    choices = []
    for i, out in enumerate(c.outputs):
        message: dict[str, Any] = {"role": "assistant", "content": out.text}
        if out.calls:
            message["content"] = out.text or None
            message["tool_calls"] = [call.as_openai() for call in out.calls]
        logprobs = chat_logprobs(out.logprobs, texts) if p.logprobs is not None else None
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": out.finish_reason,
            }
        )
    body = {
        **response_head(p, "chat.completion", model),
        "choices": choices,
        "usage": usage(p, c.num_output_tokens, c.num_cached_tokens),
    }
    sizes = image_sizes(p)
    if sizes is not None:
        body["image_sizes"] = sizes
    return body


def completion_body(p: Prepared, model: str, c: Choices, texts: TokenTexts) -> dict[str, Any]:
    choices = []
    for i, out in enumerate(c.outputs):
        logprobs = completion_logprobs(out.logprobs, texts)[0] if p.logprobs is not None else None
        choices.append(
            {"index": i, "text": out.text, "logprobs": logprobs, "finish_reason": out.finish_reason}
        )
    return {
        **response_head(p, "text_completion", model),
        "choices": choices,
        "usage": usage(p, c.num_output_tokens, c.num_cached_tokens),
    }


async def sse_events(
    p: Prepared,
    model: str,
    pieces: AsyncGenerator[Piece, None],
    on_rejected: Callable[[], None],
    texts: TokenTexts,
) -> AsyncGenerator[str, None]:
    """The events of a streamed response over ``pieces`` (closed when done). The first chunk
    goes out with the first token (a chat's carries the role and that token's text, and the
    ``image_sizes`` extension), never before: clients time the first token by it. An error
    after the stream started is sent as an error event followed by ``[DONE]``;
    ``on_rejected`` is called for a 4xx-style ``OpenAIError``."""
    chat = p.kind == "chat"
    head = response_head(p, "chat.completion.chunk" if chat else "text_completion", model)
    # completions' text_offset per choice: output characters before the chunk's tokens
    offsets = [0] * p.n

    # A text-only chunk in the middle of a choice (no logprobs, tool calls, finish reason or
    # running usage) differs from the next only in its text: its event is a per-choice
    # template around the JSON string of the text, byte for byte what ``general`` writes.
    plain = p.logprobs is None and not p.continuous_usage
    templates: dict[int, tuple[str, str] | None] = {}

    def chunk(
        text: str | None,
        finish: str | None,
        index: int,
        entries: list[TokenLogprobs] | None = None,
        first: bool = False,
        tool_calls: list[ToolCallDelta] | None = None,
    ) -> str:
        if plain and text is not None and finish is None and not first and not tool_calls:
            if index not in templates:
                templates[index] = text_template(general(TEXT_MARK, None, index))
            template = templates[index]
            if template is not None:
                return template[0] + json.dumps(text, ensure_ascii=False) + template[1]
        return general(text, finish, index, entries, first, tool_calls)

    def general(
        text: str | None,
        finish: str | None,
        index: int,
        entries: list[TokenLogprobs] | None = None,
        first: bool = False,
        tool_calls: list[ToolCallDelta] | None = None,
    ) -> str:
        logprobs: dict[str, Any] | None = None
        if p.logprobs is not None and entries is not None:
            if chat:
                logprobs = chat_logprobs(entries, texts)
            else:
                logprobs, offsets[index] = completion_logprobs(entries, texts, offsets[index])
        if chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = [d.as_openai() for d in tool_calls]
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {
                "index": index,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        obj = {**head, "choices": [choice]}
        if first and chat and p.prompt.image_sizes and not any(started):
            obj["image_sizes"] = image_sizes(p)
        if p.continuous_usage:
            obj["usage"] = usage(p, sum(counts), cached)
        elif p.include_usage:
            obj["usage"] = None
        return sse_event(obj)

    counts = [0] * p.n  # output tokens of each choice so far
    started = [False] * p.n  # the choice's first chunk (with its first token) was sent
    cached = 0  # prompt tokens the prefix cache served
    try:
        async with contextlib.aclosing(pieces) as ps:
            async for piece in ps:
                i = piece.index
                counts[i] = piece.num_output_tokens
                cached = max(cached, piece.num_cached_tokens)
                first = not started[i]
                if first or piece.text or piece.logprobs or piece.tool_calls:
                    # with tool calls and no text, a chat delta has no content
                    text = piece.text if piece.text or not piece.tool_calls else None
                    yield chunk(text, None, i, piece.logprobs, first, piece.tool_calls)
                    started[i] = True
                if piece.finish_reason is not None:
                    yield chunk(None if chat else "", piece.finish_reason, i)
    except OpenAIError as exc:
        on_rejected()
        yield sse_event(exc.body())
        yield SSE_DONE
        return
    except GenerationFailed as exc:
        yield sse_event(generation_failed(str(exc)).body())
        yield SSE_DONE
        return
    except Exception as exc:
        log.exception("stream of %s failed", p.request_id)
        yield sse_event(internal_error(exc).body())
        yield SSE_DONE
        return
    if p.include_usage:
        yield sse_event({**head, "choices": [], "usage": usage(p, sum(counts), cached)})
    yield SSE_DONE


class EngineStream(StreamingResponse):
    """A StreamingResponse that always closes its body generator (so the engine request is
    aborted if it has not finished) and then runs ``on_close``, however the response ends."""

    def __init__(self, body: AsyncGenerator[str, None], on_close: Callable[[], None]) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._body.aclose()
            finally:
                self._on_close()


async def wait_disconnect(request: Request) -> None:
    """Returns when the client has gone away (the request body has been read already)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return
    except Exception:  # noqa: BLE001 - a broken receive channel means the client is gone too
        return
