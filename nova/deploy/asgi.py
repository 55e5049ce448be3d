"""Run one HTTP request through an ASGI app in-process, without a socket (pure; no Ray).

A replica serves a forwarded request by driving its own ``nova serve`` app this way, so
validation, error bodies, admission, SSE and disconnect handling are the app's own. The request
body is delivered at once; after it, ``receive()`` blocks until the consumer goes away and then
reports ``http.disconnect``, which is what the app's disconnect watchers (abort the engine
request, free its KV blocks) listen for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Messages the app may send ahead of a slow consumer: bounds the memory of a stream whose
# reader stalls (each is one SSE event or one response body).
MAX_BUFFERED_MESSAGES = 256
# How long a request whose consumer went away may take to notice the disconnect and clean up
# (abort its engine request) before its task is cancelled.
DISCONNECT_GRACE_S = 2.0
# How long the app may run after its last body message (closing hooks) before it is cancelled.
FINISH_GRACE_S = 10.0

Headers = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class ResponseStart:
    """The status and headers of a response (its first item; body chunks follow as bytes)."""

    status: int
    headers: Headers


def http_scope(
    method: str, path: str, query: bytes, headers: Headers, client_host: str = "127.0.0.1"
) -> dict[str, Any]:
    """An ASGI ``http`` scope (spec 2.3: Starlette then watches ``receive`` for disconnects)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method.upper(),
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8"),
        "query_string": query,
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": (client_host, 0),
        "server": ("nova-replica", 80),
    }


async def drive_asgi(
    app: Any, method: str, path: str, query: bytes, headers: Headers, body: bytes
) -> AsyncIterator[ResponseStart | bytes]:
    """Yields the response's ``ResponseStart``, then its non-empty body chunks. Closing the
    iterator early (the client went away) makes the app see ``http.disconnect`` (what the app
    raises then, such as the ``OSError`` of a send to nobody, is dropped). An exception the app
    raises before it starts a response propagates; one raised after (Starlette re-raises after
    sending its own 500) is logged and dropped."""
    scope = http_scope(method, path, query, headers)
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(MAX_BUFFERED_MESSAGES)
    gone = asyncio.Event()
    body_sent = False
    started = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if gone.is_set():
            raise OSError("the client went away")  # what a server's send does then
        await queue.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)  # the consumer may be gone; then nobody needs it

    task = asyncio.create_task(run())
    finished = False  # the response was read to its end (not: the consumer went away)
    outcome: BaseException | None = None
    try:
        while True:
            get = asyncio.ensure_future(queue.get())
            await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():  # the app ended without a sentinel in the queue (full queue)
                get.cancel()
                if queue.empty():
                    break
                continue
            message = get.result()
            if message is None:
                break
            if message["type"] == "http.response.start":
                started = True
                yield ResponseStart(
                    int(message["status"]),
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]],
                )
            elif message["type"] == "http.response.body":
                # Body messages already waiting are sent as one chunk: under load a stream's
                # events cross the process boundary in fewer, larger items, and an idle stream
                # still sends each event at once.
                data = bytearray(message.get("body", b""))
                last = not message.get("more_body", False)
                app_done = False
                while not last and not queue.empty():
                    nxt = queue.get_nowait()
                    if nxt is None:
                        app_done = True
                        break
                    if nxt["type"] == "http.response.body":
                        data += nxt.get("body", b"")
                        last = not nxt.get("more_body", False)
                if data:
                    yield bytes(data)
                if last or app_done:
                    break
        finished = True
        done, _ = await asyncio.wait({task}, timeout=FINISH_GRACE_S)
        if not done:
            log.warning("the app did not return %.0f s after its response", FINISH_GRACE_S)
    finally:
        if not finished:
            gone.set()
            await asyncio.wait({task}, timeout=DISCONNECT_GRACE_S)
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            [outcome] = await asyncio.gather(task, return_exceptions=True)
        if finished and isinstance(outcome, Exception):
            if not started:
                raise outcome
            log.warning("the app failed after its response started: %r", outcome)
