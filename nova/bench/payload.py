"""Workload requests -> OpenAI chat request bodies, with real image payloads: each image is a
synthetic screenshot (``nova.screenshots.make_screenshot``) seeded from the request, encoded as
PNG in a base64 ``data:`` URL. Built before the run, so encoding is not timed."""

from __future__ import annotations

import base64
import io
from functools import lru_cache
from typing import Any

from nova.workload.types import WorkloadRequest


@lru_cache(maxsize=256)
def screenshot_data_url(seed: int, width: int, height: int) -> str:
    from nova.screenshots import make_screenshot

    try:
        image = make_screenshot(seed, width, height)
    except ValueError:  # too small for its layout: draw it larger, then scale down
        image = make_screenshot(seed, max(width, 160), max(height, 320)).resize((width, height))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def is_chat_endpoint(endpoint: str) -> bool:
    return endpoint.rstrip("/").endswith("chat/completions")


def request_body(
    req: WorkloadRequest,
    model: str,
    endpoint: str,
    temperature: float = 0.0,
    ignore_eos: bool = False,
    nova_extensions: bool = True,
) -> dict[str, Any]:
    """The body for ``endpoint``: chat (images as data URLs) or, for ``/v1/completions``, the
    instruction as a plain prompt (text-only workloads)."""
    if is_chat_endpoint(endpoint):
        return chat_body(req, model, temperature, ignore_eos, nova_extensions)
    if req.images:
        raise ValueError(
            f"request {req.request_id} has images; {endpoint} takes text only "
            "(use /v1/chat/completions or --images-per-request 0)"
        )
    body = chat_body(req, model, temperature, ignore_eos, nova_extensions)
    del body["messages"]
    body["prompt"] = req.instruction
    return body


def chat_body(
    req: WorkloadRequest,
    model: str,
    temperature: float = 0.0,
    ignore_eos: bool = False,
    nova_extensions: bool = True,
) -> dict[str, Any]:
    """The chat request for ``req``: its images first, then its instruction, as one user turn."""
    if req.images:
        content: Any = [
            {
                "type": "image_url",
                "image_url": {
                    "url": screenshot_data_url((req.seed + k) & 0x7FFFFFFF, img.width, img.height)
                },
            }
            for k, img in enumerate(req.images)
        ]
        content.append({"type": "text", "text": req.instruction})
    else:
        content = req.instruction
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": req.max_tokens,
        "temperature": temperature,
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if nova_extensions:
        if req.priority:
            body["priority"] = req.priority
        if req.deadline_s is not None:
            body["deadline_ms"] = req.deadline_s * 1000.0
    return body
