"""``NovaIngress``: the HTTP entry of the application (one per Serve app; runs the router).

Every request except ``/health`` and ``/metrics`` is forwarded as raw HTTP to a replica, which
answers it with its own ``nova serve`` app (``nova.deploy.replica``); the ingress validates
nothing but the API key and the body size (with the app's own middleware, so the 401 and 413
bodies are the same), computes the session key (``nova.deploy.session``) and lets
``NovaRouter`` pick the replica. Each response carries ``x-nova-replica``.

Failures the ingress answers itself, all 503 with ``Retry-After`` and an OpenAI error body:
every replica full (``overloaded``, Serve's back-pressure), no replica free within
``--queue-timeout-s`` or none running (``no_replica_available``), the replica died before the
response started (``replica_unavailable``). A replica that dies mid-stream ends the stream with
an SSE error event (``replica_unavailable``) and ``[DONE]``, as ``nova serve`` ends a stream
that fails. ``/health`` lists the replicas (name, pid, node) and asks each; ``/metrics`` joins
every replica's metrics, labelled ``replica="replica-<rank>"``, with the ingress's own.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from nova.deploy import state
from nova.deploy.asgi import Headers, ResponseStart
from nova.deploy.config import DeployConfig
from nova.deploy.promtext import merge, relabel
from nova.deploy.router import PIN_PREFIX
from nova.deploy.session import SessionKey, session_key
from nova.server.config import ServerConfig
from nova.server.errors import OpenAIError, internal_error
from nova.server.middleware import APIKeyMiddleware, BodyLimitMiddleware

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-nova-replica"
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# headers that describe one connection, not the request or response
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
# bounds on the ingress's own calls to one replica (health, metrics, warm-up)
PINNED_CALL_TIMEOUT_S = 5.0
SSE_DONE = b"data: [DONE]\n\n"


def _header_pairs(headers: Headers, replica: str) -> list[tuple[bytes, bytes]]:
    kept = [(k.lower(), v) for k, v in headers if k.lower() not in HOP_BY_HOP]
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in kept] + [
        (REPLICA_HEADER.encode(), replica.encode())
    ]


def _content_type(headers: Headers) -> str:
    for k, v in headers:
        if k.lower() == "content-type":
            return v
    return ""


def _unavailable(message: str, code: str, retry_after_s: int) -> OpenAIError:
    return OpenAIError(
        503, message, "server_error", code=code, headers={"Retry-After": str(retry_after_s)}
    )


class Forwarder:
    """The ingress's logic over a replica deployment handle."""

    def __init__(
        self, replicas: DeploymentHandle, server_config: ServerConfig, deploy_config: DeployConfig
    ) -> None:
        self.replicas = replicas
        self.stream = replicas.options(stream=True)
        self.server_config = server_config
        self.deploy_config = deploy_config
        self.metrics = state.ingress_metrics()

    # -- the router (created by the handle on its first request) -----------------------------
    async def router(self) -> Any:
        r = state.ROUTERS.get(self.deploy_config.app_name)
        if r is None:
            gen = self.stream.http.remote("GET", "/health", b"", [], b"")
            try:
                await asyncio.wait_for(_drain(gen), self.deploy_config.queue_timeout_s)
            except Exception:  # noqa: BLE001 - a failed warm-up still creates the router
                gen.cancel()
            r = state.ROUTERS.get(self.deploy_config.app_name)
        return r

    async def call_pinned(self, unique_id: str, method: str, path: str) -> tuple[int, bytes] | None:
        """One request to exactly this replica: (status, body), or None if it failed.

        Runs in a fresh context: inside an HTTP request every call carries that request's
        internal id, and Serve's router confuses concurrent calls that share one (it hands a
        chosen replica to the first pending call with the id), so the fan-out's calls must
        not share it."""
        return await asyncio.create_task(
            self._call_pinned(unique_id, method, path), context=contextvars.Context()
        )

    async def _call_pinned(
        self, unique_id: str, method: str, path: str
    ) -> tuple[int, bytes] | None:
        gen = self.stream.options(session_id=PIN_PREFIX + unique_id).http.remote(
            method, path, b"", [], b""
        )
        try:
            return await asyncio.wait_for(_drain(gen), PINNED_CALL_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - any failure of a side call means "no answer"
            gen.cancel()
            return None

    # -- errors -----------------------------------------------------------------------------
    def reject(self, reason: str, exc: BaseException | None, replica: str | None) -> OpenAIError:
        self.metrics.rejected.labels(reason).inc()
        retry = self.server_config.retry_after_s
        if reason == "backpressure":
            return _unavailable(
                "every replica is at its limit of unfinished requests; retry later",
                "overloaded",
                retry,
            )
        if reason == "replica_failed":
            who = f" ({replica})" if replica else ""
            return _unavailable(
                f"the replica serving this request{who} stopped before it finished; retry "
                "(the session moves to another replica)",
                "replica_unavailable",
                retry,
            )
        if reason == "queue_timeout":
            return _unavailable(
                f"no replica could take the request within {self.deploy_config.queue_timeout_s:g}"
                " s; retry later",
                "no_replica_available",
                retry,
            )
        return _unavailable(
            f"no replica is running ({type(exc).__name__ if exc else 'none'}); retry later",
            "no_replica_available",
            retry,
        )

    def _reject_for(self, exc: BaseException, replica: str | None) -> OpenAIError | None:
        if isinstance(exc, BackPressureError):
            return self.reject("backpressure", exc, replica)
        if isinstance(exc, DeploymentUnavailableError):
            return self.reject("no_replicas", exc, replica)
        if isinstance(exc, RayActorError):
            return self.reject("replica_failed", exc, replica)
        return None

    # -- forwarding -------------------------------------------------------------------------
    async def _open(
        self, handle: Any, request: Request, headers: Headers, body: bytes
    ) -> tuple[Any, str | None, ResponseStart | None]:
        """Send the request through ``handle``: (the response's item stream, the replica's
        name, the ``ResponseStart``); (stream, None, None) when no replica took it within
        ``--queue-timeout-s``. Serve's errors propagate."""
        gen = handle.http.remote(
            request.method, request.url.path, request.url.query.encode(), headers, body
        )
        try:
            replica = await asyncio.wait_for(gen.__anext__(), self.deploy_config.queue_timeout_s)
        except TimeoutError:
            gen.cancel()
            return gen, None, None
        except BaseException:
            gen.cancel()
            raise
        start = await gen.__anext__()
        if not isinstance(start, ResponseStart) or not isinstance(replica, str):
            gen.cancel()
            raise RuntimeError(f"unexpected items from the replica: {replica!r}, {start!r}")
        return gen, replica, start

    async def _spill_target(self, key: SessionKey, full: str) -> str | None:
        """The unique id of the replica a request refused by the full replica ``full`` goes to:
        the session's next ring replica, or another replica for a request without a session."""
        router = state.ROUTERS.get(self.deploy_config.app_name)
        if router is None:
            return None
        other = router.alternative(key.key, full)
        return str(other.replica_id.unique_id) if other is not None else None

    async def forward(self, request: Request) -> Response:
        try:
            body = await request.body()  # the size limit's 413 is raised here
        except OpenAIError as exc:
            return exc.response()
        headers: Headers = [(k, v) for k, v in request.headers.items() if k not in HOP_BY_HOP]
        headers.append(("content-length", str(len(body))))
        key = (
            session_key(dict(request.headers.items()), body)
            if request.method == "POST"
            else SessionKey(None, "none")
        )
        self.metrics.sessions.labels(key.source).inc()
        handle = self.stream.options(session_id=key.key) if key.key else self.stream
        gen: Any = None
        replica: str | None = None
        try:
            gen, replica, start = await self._open(handle, request, headers, body)
            if replica is None or start is None:
                return self.reject("queue_timeout", None, None).response()
            if start.status == 503:
                # The replica's own admission refused it (it has --max-queue unfinished
                # requests; nothing was run): the session's other replica gets one try.
                content = b"".join([chunk async for chunk in gen])
                target = await self._spill_target(key, replica) if _overloaded(content) else None
                if target is not None:
                    self.metrics.decisions.labels("spill").inc()
                    pinned = self.stream.options(session_id=PIN_PREFIX + target)
                    gen, replica, start = await self._open(pinned, request, headers, body)
                    if replica is None or start is None:
                        return self.reject("queue_timeout", None, None).response()
                else:
                    self._count(key, replica)
                    return _response(start, content, replica)
            self._count(key, replica)
            if "text/event-stream" in _content_type(start.headers):
                resp: Response = StreamingResponse(
                    self._relay(gen, replica), status_code=start.status
                )
                resp.raw_headers = _header_pairs(start.headers, replica)
                return resp
            content = b"".join([chunk async for chunk in gen])
        except asyncio.CancelledError:  # the client went away: stop the replica's work too
            if gen is not None:
                gen.cancel()
            raise
        except RequestCancelledError:
            return Response(status_code=499)
        except Exception as exc:  # every failure gets an OpenAI error body
            if gen is not None:
                gen.cancel()
            err = self._reject_for(exc, replica)
            if err is None:
                log.exception("forwarding %s %s failed", request.method, request.url.path)
                err = internal_error(exc)
            resp = err.response()
            if replica is not None:
                resp.headers[REPLICA_HEADER] = replica
            return resp
        return _response(start, content, replica)

    def _count(self, key: SessionKey, replica: str) -> None:
        self.metrics.routed.labels(replica).inc()
        if key.key is None:
            return
        router = state.ROUTERS.get(self.deploy_config.app_name)
        owner = router.owner(key.key) if router is not None else None
        self.metrics.affinity.labels("hit" if owner == replica else "miss").inc()

    async def _relay(self, gen: Any, replica: str) -> AsyncIterator[bytes]:
        """A streamed body; a replica that dies mid-stream ends it with an error event."""
        done = False
        try:
            async for chunk in gen:
                yield chunk
            done = True
        except (RayActorError, DeploymentUnavailableError) as exc:
            err = self.reject("replica_failed", exc, replica)
            event = json.dumps(err.body(), separators=(",", ":"))
            yield f"data: {event}\n\n".encode() + SSE_DONE
            done = True
        finally:
            if not done:  # the client went away, or the relay failed: free the replica's work
                gen.cancel()

    # -- the ingress's own endpoints ----------------------------------------------------------
    async def health(self, request: Request) -> Response:
        router = await self.router()
        replicas = router.replicas_by_name() if router is not None else {}
        names = sorted(replicas)
        answers = await asyncio.gather(
            *[
                self.call_pinned(str(replicas[n].replica_id.unique_id), "GET", "/health")
                for n in names
            ]
        )
        entries = []
        for name, answer in zip(names, answers):
            meta = dict(replicas[name].replica_metadata or {})
            entries.append(
                {
                    "name": name,
                    "unique_id": str(replicas[name].replica_id.unique_id),
                    "pid": meta.get("pid"),
                    "node_ip": meta.get("node_ip"),
                    "status": "ok" if answer is not None and answer[0] == 200 else "unhealthy",
                }
            )
        healthy = sum(e["status"] == "ok" for e in entries)
        body = {"status": "ok" if healthy else "no healthy replica", "replicas": entries}
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def metrics_text(self, request: Request) -> Response:
        router = await self.router()
        replicas = router.replicas_by_name() if router is not None else {}
        names = sorted(replicas)
        answers = await asyncio.gather(
            *[
                self.call_pinned(str(replicas[n].replica_id.unique_id), "GET", "/metrics")
                for n in names
            ]
        )
        groups = []
        for name, answer in zip(names, answers):
            if answer is None or answer[0] != 200:
                self.metrics.scrape_failures.inc()
                continue
            groups.append(relabel(answer[1].decode(), replica=name))
        self.metrics.replicas.set(len(names))
        groups.append(relabel(self.metrics.render().decode()))
        return Response(merge(groups), media_type=CONTENT_TYPE_LATEST)


def _response(start: ResponseStart, content: bytes, replica: str) -> Response:
    resp = Response(content, status_code=start.status)
    resp.raw_headers = [
        (b"content-length", str(len(content)).encode()),
        *_header_pairs(start.headers, replica),
    ]
    return resp


def _overloaded(content: bytes) -> bool:
    """A replica's 503 body says its admission queue is full (``nova serve``'s 503)."""
    try:
        return bool(json.loads(content)["error"]["code"] == "overloaded")
    except (ValueError, KeyError, TypeError):
        return False


async def _drain(gen: Any) -> tuple[int, bytes]:
    """(status, body) of a forwarded request's items."""
    status = 0
    chunks = []
    async for item in gen:
        if isinstance(item, ResponseStart):
            status = item.status
        elif isinstance(item, bytes):
            chunks.append(item)
    return status, b"".join(chunks)


def ingress_app(fwd: Forwarder) -> Starlette:
    """The ingress's ASGI app: the API key, then the body limit (the outermost first, as in
    ``nova serve``), then the routes."""
    middleware = []
    if fwd.server_config.api_key is not None:
        middleware.append(Middleware(APIKeyMiddleware, api_key=fwd.server_config.api_key))
    middleware.append(
        Middleware(BodyLimitMiddleware, max_bytes=fwd.server_config.max_request_bytes)
    )
    return Starlette(
        routes=[
            Route("/health", fwd.health, methods=["GET"]),
            Route("/metrics", fwd.metrics_text, methods=["GET"]),
            Route("/{path:path}", fwd.forward, methods=METHODS),
        ],
        middleware=middleware,
    )


@serve.ingress()
class NovaIngress:
    def __init__(
        self, replicas: DeploymentHandle, server_config: ServerConfig, deploy_config: DeployConfig
    ) -> None:
        self.forwarder = Forwarder(replicas, server_config, deploy_config)

    def __serve_build_asgi_app__(self) -> Starlette:
        return ingress_app(self.forwarder)

    async def describe(self) -> dict[str, Any]:
        """One replica's engine description and the replica names (for start-up output)."""
        router = await self.forwarder.router()
        about: dict[str, Any] = await self.forwarder.replicas.describe.remote()
        about["replicas"] = sorted(router.replicas_by_name()) if router is not None else []
        return about
