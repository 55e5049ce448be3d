"""The asyncio engine a front end talks to: ``AsyncEngine`` implements
``nova.engine.client.EngineClient`` over an ``LLMEngine`` whose loop it starts.

``generate(...)`` yields output deltas as tokens are produced; ``abort(request_id)``. Closing
or cancelling the consuming iterator before the last delta aborts the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from nova.config import EngineConfig
from nova.engine.arrivals import ExpectedRequest
from nova.engine.client import EngineDescription, EngineSnapshot, OutputDelta
from nova.engine.delivery import LoopDelivery
from nova.engine.detokenizer import IncrementalDetokenizer
from nova.engine.llm_engine import LLMEngine
from nova.metrics import request_metrics
from nova.models.inputs import InputProcessor, PromptInput
from nova.sampling_params import GenerationDefaults, SamplingParams
from nova.types import Request, RequestEvent

__all__ = ["AsyncEngine", "OutputDelta"]


class AsyncEngine:
    def __init__(
        self, config: EngineConfig | None = None, llm_engine: LLMEngine | None = None
    ) -> None:
        self.llm_engine = llm_engine or LLMEngine(config)
        self.llm_engine.start()
        # the event loop requests are being served on (the last one seen; a request keeps the
        # delivery of its own loop)
        self._delivery: LoopDelivery | None = None

    def delivery(self, loop: asyncio.AbstractEventLoop) -> LoopDelivery:
        """The delivery of engine events to ``loop`` (one wake-up per burst of events)."""
        if self._delivery is None or self._delivery.loop is not loop:
            self._delivery = LoopDelivery(loop)
        return self._delivery

    # -- EngineClient ------------------------------------------------------------------------
    @property
    def processor(self) -> InputProcessor:
        return self.llm_engine.processor

    @property
    def max_model_len(self) -> int:
        return self.llm_engine.max_model_len

    @property
    def sampling_defaults(self) -> GenerationDefaults:
        return self.llm_engine.sampling_defaults

    def check_admissible(self, num_prompt_tokens: int, max_tokens: int) -> None:
        self.llm_engine.check_admissible(num_prompt_tokens, max_tokens)

    def is_healthy(self) -> bool:
        return self.llm_engine.is_healthy()

    def snapshot(self) -> EngineSnapshot:
        return self.llm_engine.snapshot()

    def expect_request(self) -> ExpectedRequest:
        return self.llm_engine.loop.arrivals.expect()

    def describe(self) -> EngineDescription:
        return self.llm_engine.describe()

    async def generate(
        self,
        prompt: PromptInput,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        deadline_s: float | None = None,
        n: int = 1,
        arrival: ExpectedRequest | None = None,
    ) -> AsyncGenerator[OutputDelta, None]:
        delivery = self.delivery(asyncio.get_running_loop())
        queue: asyncio.Queue[tuple[RequestEvent, Request]] = asyncio.Queue()

        def listener(ev: RequestEvent, req: Request) -> None:  # worker thread
            delivery.post(queue, (ev, req))

        try:
            reqs = self.llm_engine.submit_group(
                prompt, sampling, request_id, priority, deadline_s, listener, n
            )
        finally:
            if arrival is not None:  # submitted (or rejected): no longer on its way
                arrival.done()
        index = {r.request_id: i for i, r in enumerate(reqs)}
        detoks = [IncrementalDetokenizer(self.llm_engine.processor) for _ in reqs]
        unfinished = set(index)
        try:
            while unfinished:
                ev, req = await queue.get()
                i = index[ev.request_id]
                finished = ev.finished
                if finished:
                    unfinished.discard(ev.request_id)
                new_tokens = list(ev.new_token_ids)
                text = detoks[i].push(new_tokens, finished)  # keeps the output's tokens, in order
                yield OutputDelta(
                    request_id=ev.request_id,
                    new_token_ids=new_tokens,
                    text_delta=text,
                    finished=finished,
                    finish_reason=ev.finish_reason,
                    error=ev.error,
                    num_output_tokens=len(detoks[i].token_ids),
                    metrics=request_metrics(req) if finished else None,
                    index=i,
                    num_cached_tokens=req.num_cached_prompt_tokens,
                    logprobs=list(ev.logprobs),
                )
        finally:
            # the consumer went away (client disconnect, cancellation): abort what still runs
            for rid in unfinished:
                self.llm_engine.abort(rid)

    async def abort(self, request_id: str) -> bool:
        return self.llm_engine.abort(request_id)

    # -- lifecycle (the owner's, not a front end's) ------------------------------------------
    def shutdown(self) -> None:
        self.llm_engine.stop()
