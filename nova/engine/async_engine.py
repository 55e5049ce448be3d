"""The asyncio API the HTTP server uses: ``AsyncEngine.generate(...)`` yields output deltas as
tokens are produced; ``abort(request_id)``. Cancelling the consuming task aborts the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nova.config import EngineConfig
from nova.engine.core import NovaEngine
from nova.metrics import RequestMetrics, request_metrics
from nova.models.inputs import PromptInput
from nova.sampling_params import SamplingParams
from nova.types import Request, RequestEvent


@dataclass(slots=True)
class OutputDelta:
    request_id: str
    new_token_ids: list[int]
    text_delta: str  # "" when the model has no tokenizer
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    num_output_tokens: int = 0
    metrics: RequestMetrics | None = None  # set on the final delta


class _Detokenizer:
    """Incremental text: decode all tokens, emit what was added; hold back an incomplete
    multi-byte character (shown as U+FFFD) until the next token completes it."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.emitted = ""

    def delta(self, token_ids: list[int], final: bool) -> str:
        if self.processor.tokenizer is None:
            return ""
        text = self.processor.decode(token_ids)
        if text.endswith("\ufffd") and not final:
            return ""
        # If decoding all tokens rewrote text already emitted (a merge across the boundary),
        # what was sent cannot be taken back: emit what follows its length.
        out = text[len(self.emitted) :]
        self.emitted = text
        return out


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, nova: NovaEngine | None = None) -> None:
        self.nova = nova or NovaEngine(config)
        self.nova.start()

    @property
    def processor(self):
        return self.nova.processor

    def shutdown(self) -> None:
        self.nova.stop()

    async def generate(
        self,
        prompt: PromptInput,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        deadline_s: float | None = None,
    ) -> AsyncIterator[OutputDelta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[RequestEvent, Request]] = asyncio.Queue()

        def listener(ev: RequestEvent, req: Request) -> None:  # worker thread
            loop.call_soon_threadsafe(queue.put_nowait, (ev, req))

        req = self.nova.submit(prompt, sampling, request_id, priority, deadline_s, listener)
        detok = _Detokenizer(self.nova.processor)
        finished = False
        try:
            while not finished:
                ev, req = await queue.get()
                finished = ev.finished
                tokens = list(req.output_token_ids)
                yield OutputDelta(
                    request_id=ev.request_id,
                    new_token_ids=list(ev.new_token_ids),
                    text_delta=detok.delta(tokens, finished),
                    finished=finished,
                    finish_reason=ev.finish_reason,
                    error=ev.error,
                    num_output_tokens=len(tokens),
                    metrics=request_metrics(req) if finished else None,
                )
        finally:
            if not finished:  # the consumer went away (client disconnect, cancellation)
                self.nova.engine.abort(req.request_id)

    async def abort(self, request_id: str) -> bool:
        return self.nova.engine.abort(request_id)
