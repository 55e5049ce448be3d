"""The service behind the routes: admission (at most ``max_queue`` unfinished requests),
preparation, generation through the ``EngineClient`` with stop strings applied, and the
response (JSON, or SSE for a streamed request). A request whose client goes away is aborted in
the engine, which frees its KV blocks."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator

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
from nova.server.metrics import ServerMetrics
from nova.server.prepare import Prepared, RequestPreparer
from nova.server.responses import (
    Choices,
    EngineStream,
    Piece,
    chat_body,
    completion_body,
    sse_events,
    wait_disconnect,
)
from nova.server.stops import StopMatcher
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

    # -- generation -----------------------------------------------------------------------
    async def run(self, p: Prepared) -> AsyncGenerator[Piece, None]:
        """Engine deltas -> text pieces per choice (stop strings applied to each); records the
        outcome (finished when every choice finished)."""
        matchers = [StopMatcher(p.stops) for _ in range(p.n)]
        done = [False] * p.n  # the choice's last piece was yielded
        num_ok = 0  # choices that finished (stop, length, or a stop string)
        outcome = "aborted"
        final: RequestMetrics | None = None
        extra = {"n": p.n} if p.n > 1 else {}
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
                    text = matcher.feed(d.text_delta)
                    cached = d.num_cached_tokens
                    if matcher.stopped:
                        done[i] = True
                        num_ok += 1
                        if not d.finished:
                            await self.client.abort(d.request_id)
                        yield Piece(text, "stop", d.num_output_tokens, i, cached)
                    elif d.finished:
                        done[i] = True
                        if d.finish_reason == "error":
                            outcome = "failed"
                            raise GenerationFailed(d.error or "the engine failed this request")
                        num_ok += d.finish_reason in ("stop", "length")
                        reason = d.finish_reason
                        yield Piece(text + matcher.flush(), reason, d.num_output_tokens, i, cached)
                    elif text:
                        yield Piece(text, None, d.num_output_tokens, i, cached)
            outcome = "finished" if num_ok == p.n else "aborted"
        except RequestRejected as exc:
            outcome = "rejected"
            raise bad_request(str(exc), "max_tokens", "context_length_exceeded") from exc
        finally:
            if outcome != "rejected":  # a rejection is counted where the 400 is answered
                self.metrics.prompt_tokens.inc(p.num_prompt_tokens)
                self.metrics.observe_final(outcome, final)

    async def collect(self, p: Prepared) -> Choices:
        out = Choices.empty(p.n)
        async with contextlib.aclosing(self.run(p)) as pieces:
            async for piece in pieces:
                out.add(piece)
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
            events = sse_events(p, model, self.run(p), self.metrics.rejected)
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
        return JSONResponse(build(p, model, choices))
