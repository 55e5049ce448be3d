"""The service behind the routes: admission (at most ``max_queue`` unfinished requests),
preparation, generation through the ``EngineClient`` with stop strings applied, and the
response (JSON, or SSE for a streamed request). A request whose client goes away is aborted in
the engine, which frees its KV blocks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from nova.engine.client import EngineClient
from nova.metrics import RequestMetrics
from nova.server.config import ServerConfig
from nova.server.errors import (
    ClientGone,
    GenerationFailed,
    OpenAIError,
    bad_request,
    generation_failed,
)
from nova.server.logprobs import TokenTexts
from nova.server.metrics import ServerMetrics
from nova.server.middleware import ARRIVAL_SCOPE_KEY
from nova.server.prepare import Prepared, RequestPreparer
from nova.server.responses import (
    Choices,
    EngineStream,
    Piece,
    ToolPieces,
    chat_body,
    completion_body,
    sse_events,
    wait_disconnect,
)
from nova.server.stops import StopMatcher
from nova.tools.parsers import ToolCallDelta, merge_tool_calls
from nova.types import RequestRejected


class Admission:
    """Counts requests accepted and not yet finished; thread-safe (test clients may drive the
    app from more than one event loop)."""

    def __init__(self, max_queue: int | None) -> None:
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self.num_unfinished = 0

    def try_acquire(self) -> bool:
        with self._lock:
            if self.max_queue is not None and self.num_unfinished >= self.max_queue:
                return False
            self.num_unfinished += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.num_unfinished -= 1


class NovaService:
    def __init__(self, client: EngineClient, config: ServerConfig) -> None:
        self.client = client
        self.config = config
        self.admission = Admission(config.max_queue)
        self.metrics = ServerMetrics(client, self.admission)
        self.preparer = RequestPreparer(client, config, self.metrics.prepare.observe)
        self.max_model_len = self.preparer.max_model_len
        self.created = int(time.time())
        self.token_texts = TokenTexts(client.processor.tokenizer)

    def admit(self) -> None:
        """Take an admission slot, or raise 503 with Retry-After."""
        if not self.admission.try_acquire():
            raise OpenAIError(
                503,
                f"the server is at its limit of {self.config.max_queue} unfinished requests; "
                "retry later",
                "server_error",
                code="overloaded",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )

    async def serve(self, prepare: Callable[[], Awaitable[Prepared]], request: Request) -> Response:
        """Admit, prepare (``prepare()``, called once admitted) and handle one request; the
        admission slot is released here if preparing fails, else by ``handle``."""
        self.admit()
        try:
            p = await prepare()
        except BaseException:
            self.admission.release()
            raise
        arrival = request.scope.get(ARRIVAL_SCOPE_KEY)
        if arrival is not None:
            p = dataclasses.replace(p, arrival=arrival)
        return await self.handle(p, request)

    # -- generation -----------------------------------------------------------------------
    async def run(self, p: Prepared) -> AsyncGenerator[Piece, None]:
        """Engine deltas -> pieces per choice (stop strings applied, then tool calls parsed out
        when the request has tools): one per delta that brought tokens (its text may be empty:
        held back by a possible stop string, a partial character or a possible tool call), and
        a last one per choice with the finish reason. Records the outcome (finished when every
        choice finished)."""
        matchers = [StopMatcher(p.stops) for _ in range(p.n)]
        tools = [ToolPieces(p.tool_mode) for _ in range(p.n)]
        done = [False] * p.n  # the choice's last piece was yielded
        num_ok = 0  # choices that finished (stop, length, a stop string, the last tool call)
        outcome = "aborted"
        final: RequestMetrics | None = None
        extra: dict[str, Any] = {"n": p.n} if p.n > 1 else {}
        if p.arrival is not None:
            extra["arrival"] = p.arrival
        gen = self.client.generate(
            p.prompt, p.sampling, p.request_id, p.priority, p.deadline_s, **extra
        )
        try:
            async with contextlib.aclosing(gen) as deltas:
                async for d in deltas:
                    i = d.index
                    if d.new_token_ids:
                        self.metrics.generation_tokens.inc(len(d.new_token_ids))
                    if d.finished and i == 0:
                        final = d.metrics
                    if done[i]:
                        continue  # draining after our abort, for the final metrics
                    matcher = matchers[i]
                    text = matcher.feed(d.text_delta, armed=d.num_output_tokens > p.min_tokens)
                    finish: str | None = None
                    if matcher.stopped:
                        if p.include_stop_str and matcher.matched:
                            text += matcher.matched
                        finish = "stop"
                    elif d.finished:
                        if d.finish_reason == "error":
                            outcome = "failed"
                            raise GenerationFailed(d.error or "the engine failed this request")
                        text += matcher.flush()
                        finish = d.finish_reason
                    raw = Piece(
                        text, None, d.num_output_tokens, d.logprobs, [], i, d.num_cached_tokens
                    )
                    piece = tools[i].piece(raw)
                    if finish is None and tools[i].done:
                        finish = "stop"  # the last tool call allowed (parallel_tool_calls false)
                    if finish is not None:
                        done[i] = True
                        # a stop string or the last allowed call: we end the choice here
                        ours = matcher.stopped or not d.finished
                        num_ok += ours or finish in ("stop", "length")
                        if num_ok == p.n:
                            outcome = "finished"
                        if not d.finished:
                            await self.client.abort(d.request_id)
                        yield tools[i].last(piece, finish)
                    elif piece.text or d.new_token_ids or piece.tool_calls:
                        yield piece
        except RequestRejected as exc:
            outcome = "rejected"
            raise bad_request(str(exc), "max_tokens", "context_length_exceeded") from exc
        finally:
            if outcome != "rejected":  # a rejection is counted where the 400 is answered
                self.metrics.prompt_tokens.inc(p.num_prompt_tokens)
                self.metrics.observe_final(outcome, final)

    async def collect(self, p: Prepared) -> Choices:
        """The whole answer: each choice's pieces' text, logprobs and tool calls merged (so a
        non-streamed answer is exactly what the stream of the same output would send)."""
        out = Choices.empty(p.n)
        texts: list[list[str]] = [[] for _ in range(p.n)]
        calls: list[list[ToolCallDelta]] = [[] for _ in range(p.n)]
        async with contextlib.aclosing(self.run(p)) as pieces:
            async for piece in pieces:
                i = piece.index
                texts[i].append(piece.text)
                calls[i].extend(piece.tool_calls)
                choice = out.outputs[i]
                choice.logprobs.extend(piece.logprobs)
                out.num_cached_tokens = max(out.num_cached_tokens, piece.num_cached_tokens)
                if piece.finish_reason is not None:
                    choice.finish_reason = piece.finish_reason
                    choice.num_output_tokens = piece.num_output_tokens
        for choice, text, delta in zip(out.outputs, texts, calls):
            choice.text = "".join(text)
            choice.calls = merge_tool_calls(delta)
        return out

    async def collect_unless_gone(self, p: Prepared, request: Request) -> Choices:
        work = asyncio.ensure_future(self.collect(p))
        watch = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        if work.cancelled():
            raise ClientGone()
        return work.result()

    # -- responses ------------------------------------------------------------------------
    async def handle(self, p: Prepared, request: Request) -> Response:
        """Run a prepared request; owns one admission slot and releases it when done."""
        model = self.config.served_model_name
        if p.stream:
            events = sse_events(p, model, self.run(p), self.metrics.rejected, self.token_texts)
            return EngineStream(events, self.admission.release)
        try:
            choices = await self.collect_unless_gone(p, request)
        except ClientGone:
            return Response(status_code=499)
        except GenerationFailed as exc:
            raise generation_failed(str(exc)) from exc
        finally:
            self.admission.release()
        build = chat_body if p.kind == "chat" else completion_body
        return JSONResponse(build(p, model, choices, self.token_texts))
