"""One streamed request to an OpenAI-compatible chat endpoint, timed on the client.

Times are ``time.perf_counter()`` seconds. The time to first token is the first SSE chunk that
carries text (a role-only chunk, which some servers send before prefill, does not count; aiperf
and guidellm also wait for text, while ``vllm bench serve`` takes the first chunk with any
``choices``, so Nova sends its first chunk only with the first token); each later chunk with
text gives one inter-token latency. Token counts come from the final ``usage`` chunk
(``stream_options.include_usage``); without one, the number of text chunks is used.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from nova.metrics import RequestMetrics


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    num_images: int
    deadline_s: float | None
    send_s: float = 0.0
    end_s: float | None = None
    chunk_s: list[float] = field(default_factory=list)  # arrival of each chunk carrying text
    text: str = ""
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    completion_tokens: int | None = None
    finish_reason: str | None = None
    status_code: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_s is not None

    @property
    def num_output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_s)

    def metrics(self, t0_s: float) -> RequestMetrics:
        """As ``nova.metrics.RequestMetrics`` (times relative to ``t0_s``), so the engine's
        aggregation code summarises client-side measurements too. TPOT = (last text chunk -
        first text chunk) / (output tokens - 1), the engine's definition with chunk times."""
        ok = self.ok
        chunks = self.chunk_s if ok else []  # latencies of completed requests only
        first = chunks[0] if chunks else None
        last = chunks[-1] if chunks else None
        n_out = self.num_output_tokens
        e2e = self.end_s - self.send_s if self.end_s is not None else None
        deadline_met = None
        if ok and self.deadline_s is not None and e2e is not None:
            deadline_met = e2e <= self.deadline_s
        return RequestMetrics(
            request_id=self.request_id,
            status="finished" if ok else "failed",
            num_prompt_tokens=self.prompt_tokens or 0,
            num_output_tokens=n_out,
            num_images=self.num_images,
            num_preemptions=0,
            arrival_s=self.send_s - t0_s,
            finish_s=None if self.end_s is None else self.end_s - t0_s,
            deadline_s=self.deadline_s,
            deadline_met=deadline_met,
            ttft_s=None if first is None else first - self.send_s,
            tpot_s=(last - first) / (n_out - 1)
            if first is not None and last is not None and n_out >= 2
            else None,
            e2e_s=e2e if ok else None,
            itl_s=[b - a for a, b in itertools.pairwise(chunks)],
        )

    def to_dict(self, t0_s: float) -> dict[str, Any]:
        m = self.metrics(t0_s)
        return {
            "request_id": self.request_id,
            "ok": self.ok,
            "status_code": self.status_code,
            "error": self.error,
            "send_s": self.send_s - t0_s,
            "ttft_s": m.ttft_s,
            "tpot_s": m.tpot_s,
            "e2e_s": m.e2e_s,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "num_text_chunks": len(self.chunk_s),
            "num_images": self.num_images,
            "deadline_s": self.deadline_s,
            "deadline_met": m.deadline_met,
            "finish_reason": self.finish_reason,
        }


def _error_text(body: bytes) -> str:
    try:
        obj = json.loads(body)
        return str(obj.get("error", {}).get("message") or obj)[:300]
    except (ValueError, AttributeError):
        return body[:300].decode("utf-8", "replace")


async def stream_request(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    record: RequestRecord,
    headers: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> RequestRecord:
    """POST ``body`` (``stream`` forced on) and fill ``record`` from the SSE stream."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    record.send_s = time.perf_counter()
    try:
        async with client.stream(
            "POST", url, json=body, headers=headers, timeout=httpx.Timeout(timeout_s)
        ) as resp:
            record.status_code = resp.status_code
            if resp.status_code != 200:
                record.error = f"HTTP {resp.status_code}: {_error_text(await resp.aread())}"
                return record
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    record.end_s = time.perf_counter()
                    done = True
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj:
                    record.error = f"stream error: {obj['error'].get('message', obj['error'])}"
                    return record
                usage = obj.get("usage")
                if usage:
                    record.prompt_tokens = usage.get("prompt_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    record.cached_tokens = details.get("cached_tokens")
                    record.completion_tokens = usage.get("completion_tokens")
                for choice in obj.get("choices") or ():
                    delta = choice.get("delta") or {}
                    text = delta.get("content") if "delta" in choice else choice.get("text")
                    if text:
                        record.chunk_s.append(now)
                        record.text += text
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
            if not done:
                record.error = "the stream ended without [DONE]"
    except httpx.HTTPError as exc:
        record.error = f"{exc.__class__.__name__}: {exc}"
    except json.JSONDecodeError as exc:
        record.error = f"bad SSE payload: {exc}"
    return record
