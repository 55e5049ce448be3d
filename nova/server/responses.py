"""Response bodies of the OpenAI API: the JSON of a completed chat or text completion, and the
server-sent events of a streamed one (``data: <json>`` chunks, then ``data: [DONE]``)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from nova.server.errors import GenerationFailed, OpenAIError, generation_failed, internal_error
from nova.server.prepare import Prepared

log = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


@dataclass(slots=True)
class Piece:
    """Text to send for one choice of a request; the last piece of a choice has its finish
    reason."""

    text: str
    finish_reason: str | None = None  # set on the last piece
    num_output_tokens: int = 0
    index: int = 0  # the choice (0 .. n-1)
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served


@dataclass(slots=True)
class Choices:
    """A finished request's choices (index i of each list is choice i)."""

    texts: list[str]
    finish_reasons: list[str | None]
    num_output_tokens: list[int]
    num_cached_tokens: int = 0

    @classmethod
    def empty(cls, n: int) -> Choices:
        return cls([""] * n, [None] * n, [0] * n)

    def add(self, piece: Piece) -> None:
        i = piece.index
        self.texts[i] += piece.text
        if piece.finish_reason is not None:
            self.finish_reasons[i] = piece.finish_reason
            self.num_output_tokens[i] = piece.num_output_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, piece.num_cached_tokens)


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


def response_head(p: Prepared, obj: str, model: str) -> dict[str, Any]:
    return {
        "id": p.request_id,
        "object": obj,
        "created": p.created,
        "model": model,
        "system_fingerprint": None,
    }


def chat_body(p: Prepared, model: str, c: Choices) -> dict[str, Any]:
    return {
        **response_head(p, "chat.completion", model),
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            for i, (text, finish) in enumerate(zip(c.texts, c.finish_reasons))
        ],
        "usage": usage(p, sum(c.num_output_tokens), c.num_cached_tokens),
    }


def completion_body(p: Prepared, model: str, c: Choices) -> dict[str, Any]:
    return {
        **response_head(p, "text_completion", model),
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            for i, (text, finish) in enumerate(zip(c.texts, c.finish_reasons))
        ],
        "usage": usage(p, sum(c.num_output_tokens), c.num_cached_tokens),
    }


async def sse_events(
    p: Prepared,
    model: str,
    pieces: AsyncGenerator[Piece, None],
    on_rejected: Callable[[], None],
) -> AsyncGenerator[str, None]:
    """The events of a streamed response over ``pieces`` (closed when done). An error after the
    stream started is sent as an error event followed by ``[DONE]``; ``on_rejected`` is called
    for a 4xx-style ``OpenAIError``."""
    chat = p.kind == "chat"
    head = response_head(p, "chat.completion.chunk" if chat else "text_completion", model)

    def chunk(text: str | None, finish: str | None, index: int = 0, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {
                "index": index,
                "text": text or "",
                "logprobs": None,
                "finish_reason": finish,
            }
        obj = {**head, "choices": [choice]}
        if p.include_usage:
            obj["usage"] = None
        return sse_event(obj)

    if chat:
        for i in range(p.n):
            yield chunk("", None, i, role=True)
    collected = Choices.empty(p.n)
    try:
        async with contextlib.aclosing(pieces) as ps:
            async for piece in ps:
                collected.add(
                    Piece(
                        "",
                        piece.finish_reason,
                        piece.num_output_tokens,
                        piece.index,
                        piece.num_cached_tokens,
                    )
                )
                if piece.text:
                    yield chunk(piece.text, None, piece.index)
                if piece.finish_reason is not None:
                    yield chunk(None if chat else "", piece.finish_reason, piece.index)
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
        used = usage(p, sum(collected.num_output_tokens), collected.num_cached_tokens)
        yield sse_event({**head, "choices": [], "usage": used})
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
