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
def screenshot_data_url(seed: int, width: int, height: int, revision: int | None = None) -> str:
    """A PNG data URL of ``make_screenshot(seed)``, or with ``revision`` of
    ``make_session_screenshot(seed, revision)`` (one session's screen after that many steps)."""
    from nova.screenshots import make_screenshot, make_session_screenshot

    def draw(w: int, h: int) -> Any:
        if revision is None:
            return make_screenshot(seed, w, h)
        return make_session_screenshot(seed, revision, w, h)

    try:
        image = draw(width, height)
    except ValueError:  # too small for its layout: draw it larger, then scale down
        image = draw(max(width, 160), max(height, 320)).resize((width, height))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def turn_messages(req: WorkloadRequest) -> list[dict[str, Any]]:
    """The chat messages of a multi-turn request (``req.turns``): each image before its turn's
    text, as a UI-TARS-style client sends screenshots."""
    messages: list[dict[str, Any]] = []
    for turn in req.turns:
        if turn.image is None:
            messages.append({"role": turn.role, "content": turn.text})
            continue
        img = turn.image
        seed = img.seed if img.seed is not None else req.seed
        content: list[dict[str, Any]] = [
            _image_part(screenshot_data_url(seed & 0x7FFFFFFF, img.width, img.height, img.revision))
        ]
        if turn.text:
            content.append({"type": "text", "text": turn.text})
        messages.append({"role": turn.role, "content": content})
    return messages


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
    """The chat request for ``req``: its conversation (``req.turns``), or its images first,
    then its instruction, as one user turn. A session's requests name it as ``user``."""
    messages: list[dict[str, Any]]
    if req.turns:
        messages = turn_messages(req)
    elif req.images:
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
        messages = [{"role": "user", "content": content}]
    else:
        messages = [{"role": "user", "content": req.instruction}]
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": req.max_tokens,
        "temperature": temperature,
    }
    if req.session_id is not None:
        body["user"] = req.session_id
    if ignore_eos:
        body["ignore_eos"] = True
    if nova_extensions:
        if req.priority:
            body["priority"] = req.priority
        if req.deadline_s is not None:
            body["deadline_ms"] = req.deadline_s * 1000.0
    return body
