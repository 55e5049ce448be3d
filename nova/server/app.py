"""The OpenAI-compatible HTTP API over an ``EngineClient``: ``create_app(client, config)``.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text format).

Request life: auth (``/v1/*`` only, when an API key is set; ``middleware``) -> admission (at
most ``max_queue`` unfinished requests, else 503 + Retry-After; ``service``) -> validation,
image loading, chat template and tokenisation (any problem: 400 with an OpenAI error body;
``prepare``) -> ``EngineClient.generate`` -> JSON or SSE (``responses``). Stop strings are
matched in the service over the text deltas; when one matches, the text is cut before it and
the engine request is aborted. A client that goes away (mid-stream or while a non-streamed
request runs) has its engine request aborted, which frees its KV blocks.

This module only wires those parts into FastAPI: routes, error handlers, the OpenAPI schema.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from nova.engine.client import EngineClient
from nova.server.config import ServerConfig
from nova.server.errors import OpenAIError, body_parse_error, internal_error, validation_error
from nova.server.middleware import APIKeyMiddleware, ArrivalMiddleware, BodyLimitMiddleware
from nova.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelList,
)
from nova.server.service import NovaService

log = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "model not served (code model_not_found)"},
    413: {"model": ErrorResponse, "description": "request body too large"},
    503: {"model": ErrorResponse, "description": "overloaded; see Retry-After"},
}


def _stream_doc(model: type) -> dict[int | str, dict[str, Any]]:
    event = {
        "type": "object",
        "required": ["data"],
        "description": "one server-sent event: data is a JSON chunk (or an error object), "
        "then a last event whose data is [DONE]",
        "properties": {
            "data": {"type": "string"},
            "event": {"type": "string"},
            "id": {"type": "string"},
        },
    }
    return {
        200: {
            "model": model,
            "description": "a JSON body, or server-sent events when stream=true",
            "content": {"text/event-stream": {"schema": event}},
        },
        **_ERRORS,
    }


def create_app(
    client: EngineClient, config: ServerConfig | argparse.Namespace | None = None
) -> FastAPI:
    """The FastAPI app serving ``client`` (an ``EngineClient`` such as a started
    ``AsyncEngine``; the app does not own it). ``config``: a ``ServerConfig``, an
    ``argparse.Namespace`` of ``nova serve`` flags, or None for defaults."""
    if config is None:
        config = ServerConfig()
    elif not isinstance(config, ServerConfig):
        config = ServerConfig.from_args(config)
    svc = NovaService(client, config)
    app = FastAPI(
        title="Nova",
        version=_version(),
        description="OpenAI-compatible API of the Nova VLM serving engine",
    )
    app.state.service = svc

    # -- errors ---------------------------------------------------------------------------
    def _count_rejection(request: Request, status: int) -> None:
        if request.url.path in GENERATION_PATHS and request.method == "POST" and status != 401:
            svc.metrics.rejected()

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        _count_rejection(request, exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc)
        _count_rejection(request, err.status)
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cause = exc.__cause__ or exc.__context__  # FastAPI wraps errors raised reading the body
        if isinstance(cause, OpenAIError):
            _count_rejection(request, cause.status)
            return cause.response()
        if exc.status_code == 400 and cause is not None:  # the body could not be parsed
            _count_rejection(request, 400)
            return body_parse_error(cause).response()
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return OpenAIError(
            exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None)
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return internal_error(exc).response()

    # added last = outermost: the API key is checked before anything reads the body; a
    # request refused by either is never announced to the engine
    app.add_middleware(ArrivalMiddleware, expect=client.expect_request)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes)
    if config.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    v1 = APIRouter(prefix="/v1")

    @v1.post(
        "/chat/completions",
        responses=_stream_doc(ChatCompletionResponse),
        response_model=None,
        summary="Chat completion (text and image_url parts)",
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await svc.serve(lambda: svc.preparer.prepare_chat(body), request)

    @v1.post(
        "/completions",
        responses=_stream_doc(CompletionResponse),
        response_model=None,
        summary="Text completion (a string or a list of token ids)",
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await svc.serve(lambda: svc.preparer.prepare_completion(body), request)

    @v1.get("/models", response_model=ModelList, responses={401: _ERRORS[401]})
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": config.served_model_name,
                    "object": "model",
                    "created": svc.created,
                    "owned_by": "nova",
                    "max_model_len": svc.max_model_len,
                }
            ],
        }

    app.include_router(v1)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> Any:
        if not client.is_healthy():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                "description": "Prometheus text format",
            }
        },
    )
    async def metrics() -> Response:
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema without its 422 responses: this server answers 400 instead."""
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            if config.api_key is not None:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}
                }
                for route, path in schema.get("paths", {}).items():
                    if route.startswith("/v1/"):
                        for op in path.values():
                            op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _version() -> str:
    from nova import __version__

    return __version__
