"""ASGI middleware that acts before the app reads a request: the API key on ``/v1/*`` (401),
the request-body size limit (413), and the announcement of generation requests to the engine."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nova.engine.arrivals import ExpectedRequest
from nova.server.errors import OpenAIError

# where ArrivalMiddleware leaves a request's announcement for the endpoint (the ASGI scope)
ARRIVAL_SCOPE_KEY = "nova.arrival"
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class APIKeyMiddleware:
    """``/v1/*`` needs ``Authorization: Bearer <key>``; checked before the body is read."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = b""
            for name, value in scope.get("headers", ()):
                if name.lower() == b"authorization":
                    header = value
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                err = OpenAIError(
                    401,
                    "missing or incorrect API key; send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413: at once from Content-Length, or as
    soon as a streamed body passes the limit (the app never sees more)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> OpenAIError:
        return OpenAIError(
            413,
            f"the request body exceeds the limit of {self.max_bytes} bytes",
            code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if (
                name.lower() == b"content-length"
                and value.isdigit()
                and int(value) > self.max_bytes
            ):
                await self._error().response()(scope, receive, send)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, limited_receive, send)


class ArrivalMiddleware:
    """Announces each generation request to the engine (``expect``) as it comes in, before
    its body is read, parsed and prepared: an idle engine then waits for a burst still being
    prepared and starts it in one batch (``nova.engine.arrivals``). The announcement is in the
    scope under ``ARRIVAL_SCOPE_KEY``; the engine marks it done when it has the request, and
    this marks it done when the request ends in any case (an error, a disconnect)."""

    def __init__(self, app: ASGIApp, expect: Callable[[], ExpectedRequest]) -> None:
        self.app = app
        self.expect = expect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope["path"] not in GENERATION_PATHS
        ):
            await self.app(scope, receive, send)
            return
        arrival = self.expect()
        scope[ARRIVAL_SCOPE_KEY] = arrival
        try:
            await self.app(scope, receive, send)
        finally:
            arrival.done()
