"""The offline API: ``LLM(...).generate(inputs)`` runs a list of requests through the concurrent
three-stage engine and returns their outputs in input order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nova.config import EngineConfig
from nova.engine.llm_engine import LLMEngine
from nova.metrics import RequestMetrics, request_metrics
from nova.models.inputs import InputProcessor, PromptInput
from nova.sampling_params import SamplingParams
from nova.types import Request

# str: a user message (chat template applied); dict: {"prompt": str} raw text, or
# {"messages": [...]} a chat, or {"prompt_token_ids": [...]}, each with optional "images";
# PromptInput: already tokenised.
PromptLike = str | dict[str, Any] | PromptInput


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str | None
    finish_reason: str | None
    error: str | None
    metrics: RequestMetrics


class LLM:
    def __init__(self, model: str = "demo", **kwargs: Any) -> None:
        fault_hook = kwargs.pop("fault_hook", None)
        self.config = EngineConfig(model=model, **kwargs)
        self.llm_engine = LLMEngine(self.config, fault_hook=fault_hook)

    @property
    def processor(self) -> InputProcessor:
        return self.llm_engine.processor

    def to_prompt(self, item: PromptLike) -> PromptInput:
        proc = self.llm_engine.processor
        if isinstance(item, PromptInput):
            return item
        if isinstance(item, str):
            return proc.from_chat([{"role": "user", "content": item}])
        images = item.get("images") or []
        if "messages" in item:
            return proc.from_chat(item["messages"], images)
        if "prompt_token_ids" in item:
            return proc.from_token_ids(item["prompt_token_ids"], images)
        if "prompt" in item:
            return proc.from_text(item["prompt"], images)
        raise ValueError("an input dict needs 'messages', 'prompt' or 'prompt_token_ids'")

    def generate(
        self,
        inputs: list[PromptLike],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        params = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params] * len(inputs)
        )
        if len(params) != len(inputs):
            raise ValueError(f"{len(params)} sampling params for {len(inputs)} inputs")
        prompts = [self.to_prompt(x) for x in inputs]  # all input errors surface before any runs
        return [self._output(r) for r in self.llm_engine.run_all(prompts, params)]

    def _output(self, req: Request) -> RequestOutput:
        tok = self.llm_engine.loaded.tokenizer
        text = self.llm_engine.processor.decode(req.output_token_ids) if tok is not None else None
        return RequestOutput(
            req.request_id,
            req.prompt_token_ids,
            list(req.output_token_ids),
            text,
            req.finish_reason,
            req.error,
            request_metrics(req),
        )
