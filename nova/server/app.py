"""The OpenAI-compatible HTTP API over an ``AsyncEngine``: ``create_app(engine, config)``.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text format).

Request life: auth (``/v1/*`` only, when an API key is set) -> admission (at most ``max_queue``
unfinished requests, else 503 + Retry-After) -> validation, image loading, chat template and
tokenisation (any problem: 400 with an OpenAI error body) -> ``AsyncEngine.generate`` -> JSON
or SSE. Stop strings are matched here over the text deltas; when one matches, the text is cut
before it and the engine request is aborted. A client that goes away (mid-stream or while a
non-streamed request runs) has its engine request aborted, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from nova.core.scheduler import RequestRejected
from nova.metrics import RequestMetrics
from nova.models.errors import InvalidInputError
from nova.models.inputs import PromptInput
from nova.sampling_params import SamplingParams
from nova.server.config import ServerConfig
from nova.server.media import MediaError, load_image_url, open_image
from nova.server.metrics import ServerMetrics
from nova.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelList,
)
from nova.server.stops import StopMatcher, single_token_stop_ids

log = logging.getLogger(__name__)

GREEDY_EPS = 1e-5  # temperatures below this are greedy (as vLLM)
MIN_TOP_P = 1e-6
MAX_STOP_STRINGS = 16
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # messages may quote client input: never let a lone surrogate break the JSON encoding
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(
    message: str, param: str | None = None, code: str | None = "invalid_value"
) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


class GenerationFailed(Exception):
    """The engine failed the request (executor error)."""


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


# discriminator values of the tagged unions in nova.server.protocol (a list item's type)
_UNION_TAGS = frozenset({"system", "developer", "user", "assistant", "text", "image_url"})
_BRANCH_LABELS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """Pydantic error location -> ``messages[0].content[1].image_url.url``: union branch labels
    (``str``, ``list[...]``) and the tag pydantic inserts after a tagged list item are dropped."""
    out = ""
    prev: Any = None
    for item in loc:
        if item == "body" and not out:
            continue
        if isinstance(item, int):
            out += f"[{item}]"
        elif isinstance(item, str):
            skip = (
                "[" in item
                or item in _BRANCH_LABELS
                or (isinstance(prev, int) and item in _UNION_TAGS)
            )
            prev = item
            if skip:
                continue
            out += f".{item}" if out else item
            continue
        prev = item
    return out or None


def validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = list(exc.errors())
    if not errors:
        return bad_request("invalid request body", code="invalid_request")
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return bad_request(
                f"the request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json"
            )
    err = max(errors, key=lambda e: len(e.get("loc", ())))  # the most specific problem
    loc = tuple(err.get("loc", ()))
    param = _loc_to_param(loc)
    if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        tag = str((err.get("ctx") or {}).get("discriminator", "")).strip("'\"")
        if tag:
            param = f"{param}.{tag}" if param else tag
    if loc == ("body",) and err.get("type") == "missing":
        return bad_request("the request body must be a JSON object", code="invalid_request")
    msg = str(err.get("msg", "invalid value"))
    given = err.get("input")
    if isinstance(given, (str, int, float, bool)) and err.get("type") != "missing":
        shown = repr(given)
        msg += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
    more = (
        f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        if len(errors) > 1
        else ""
    )
    where = param or "request body"
    return bad_request(
        f"{where}: {msg}{more}", param=param, code=str(err.get("type") or "invalid_value")
    )


# --------------------------------------------------------------------------------------------
# Server state
# --------------------------------------------------------------------------------------------


class _Admission:
    """Counts requests accepted and not yet finished; thread-safe (test clients may drive the
    app from more than one event loop)."""

    def __init__(self, max_queue: int | None) -> None:
        import threading

        self.max_queue = max_queue
        self._lock = threading.Lock()
        self.num_unfinished = 0

    def try_acquire(self) -> bool:
        with self._lock:
            if self.max_queue is not None and self.num_unfinished >= self.max_queue:
                return False
            self.num_unfinished += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.num_unfinished -= 1


@dataclass(slots=True)
class Prepared:
    """A validated request, ready for the engine."""

    request_id: str
    kind: str  # "chat" | "completion"
    prompt: PromptInput
    sampling: SamplingParams
    stops: tuple[str, ...]
    priority: int
    deadline_s: float | None
    stream: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt.token_ids)


@dataclass(slots=True)
class Piece:
    text: str
    finish_reason: str | None = None  # set on the last piece
    num_output_tokens: int = 0


def _usage(p: Prepared, num_output_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": p.num_prompt_tokens,
        "completion_tokens": num_output_tokens,
        "total_tokens": p.num_prompt_tokens + num_output_tokens,
    }


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class _EngineStream(StreamingResponse):
    """A StreamingResponse that always closes its body generator (so the engine request is
    aborted if it has not finished) and then runs ``on_close``, however the response ends."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._body.aclose()  # type: ignore[attr-defined]
            finally:
                self._on_close()


class _APIKeyMiddleware:
    """``/v1/*`` needs ``Authorization: Bearer <key>``; checked before the body is read."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
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


class _BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413: at once from Content-Length, or as
    soon as a streamed body passes the limit (the app never sees more)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> OpenAIError:
        return OpenAIError(
            413,
            f"the request body exceeds the limit of {self.max_bytes} bytes",
            code="request_too_large",
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
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

        async def limited_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, limited_receive, send)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has gone away (the request body has been read already)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return
    except Exception:  # noqa: BLE001 - a broken receive channel means the client is gone too
        return


# --------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------


class NovaService:
    def __init__(self, engine: Any, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.media = config.media_policy()
        self.admission = _Admission(config.max_queue)
        self.metrics = ServerMetrics(engine, self.admission)
        self.processor = engine.processor
        self.max_model_len = int(engine.nova.loaded.max_model_len)
        self._pool = ThreadPoolExecutor(
            max_workers=config.preprocess_workers, thread_name_prefix="nova-preprocess"
        )
        self.created = int(time.time())
        # test hooks for remote media (an httpx transport and a resolver)
        self.media_transport: Any = None
        self.media_resolver: Any = None

    # -- preparation ----------------------------------------------------------------------
    async def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @staticmethod
    def _check_text(text: str, param: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise bad_request(
                f"{param} is not valid Unicode text (lone surrogate at {exc.start})", param=param
            ) from exc

    def _check_common(self, body: Any) -> None:
        # n, logprobs, penalties, echo, suffix and best_of are limited by the schema itself
        if body.stream_options is not None and not body.stream:
            raise bad_request(
                "stream_options is only allowed when stream is true", "stream_options"
            )

    def _stops(self, stop: str | list[str] | None) -> tuple[str, ...]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
        for i, s in enumerate(stops):
            if not s:
                raise bad_request("stop strings must not be empty", "stop")
            self._check_text(s, f"stop[{i}]")
        return tuple(dict.fromkeys(stops))

    def _sampling(
        self,
        body: Any,
        max_tokens: int | None,
        num_prompt: int,
        prompt_param: str,
        stops: tuple[str, ...],
    ) -> SamplingParams:
        ctx = self.max_model_len
        if num_prompt >= ctx:
            raise bad_request(
                f"the prompt has {num_prompt} tokens (image tokens included); this "
                f"model's context length is {ctx}",
                prompt_param,
                "context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = ctx - num_prompt
        elif num_prompt + max_tokens > ctx:
            raise bad_request(
                f"max_tokens is too large: {num_prompt} prompt tokens + {max_tokens} "
                f"> context length {ctx}",
                "max_tokens",
                "context_length_exceeded",
            )
        try:  # the scheduler's own admission rule, before any stream starts
            self.engine.nova.scheduler.check_admissible(num_prompt, max_tokens)
        except RequestRejected as exc:
            raise bad_request(str(exc), "max_tokens", "context_length_exceeded") from exc
        temperature = 1.0 if body.temperature is None else float(body.temperature)
        if temperature < GREEDY_EPS:
            temperature = 0.0
        top_k = body.top_k if body.top_k not in (None, 0, -1) else None
        # The sampler compares top_p in float32, where a tiny top_p (1e-300) becomes 0 and
        # drops every token. Any top_p below the largest token's probability means "keep only
        # the most likely token"; 1e-6 is below 1/vocab for any vocabulary and exact in float32.
        top_p = 1.0 if body.top_p is None else max(float(body.top_p), MIN_TOP_P)
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=body.seed,
                stop_token_ids=single_token_stop_ids(self.processor.tokenizer, stops),
                ignore_eos=body.ignore_eos,
            )
        except ValueError as exc:
            raise bad_request(str(exc)) from exc

    def _prepared(
        self,
        kind: str,
        body: Any,
        prompt: PromptInput,
        max_tokens: int | None,
        prompt_param: str,
        stops: tuple[str, ...],
    ) -> Prepared:
        sampling = self._sampling(body, max_tokens, len(prompt.token_ids), prompt_param, stops)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return Prepared(
            request_id=f"{prefix}-{uuid.uuid4().hex}",
            kind=kind,
            prompt=prompt,
            sampling=sampling,
            stops=stops,
            priority=body.priority,
            deadline_s=None if body.deadline_ms is None else body.deadline_ms / 1000.0,
            stream=body.stream,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )

    def _chat_messages(self, body: ChatCompletionRequest) -> tuple[list[dict[str, Any]], list[str]]:
        messages: list[dict[str, Any]] = []
        urls: list[str] = []
        for i, msg in enumerate(body.messages):
            role = "system" if msg.role == "developer" else msg.role
            if msg.content is None:  # an assistant turn without text
                messages.append({"role": role, "content": ""})
                continue
            if isinstance(msg.content, str):
                self._check_text(msg.content, f"messages[{i}].content")
                messages.append({"role": role, "content": msg.content})
                continue
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(msg.content):
                if part.type == "text":
                    self._check_text(part.text, f"messages[{i}].content[{j}].text")
                    parts.append({"type": "text", "text": part.text})
                else:
                    self._check_text(
                        part.image_url.url, f"messages[{i}].content[{j}].image_url.url"
                    )
                    urls.append(part.image_url.url)
                    parts.append({"type": "image"})
            messages.append({"role": role, "content": parts})
        return messages, urls

    async def prepare_chat(self, body: ChatCompletionRequest) -> Prepared:
        t0 = time.perf_counter()
        self._check_common(body)
        stops = self._stops(body.stop)
        messages, urls = self._chat_messages(body)
        if len(urls) > self.config.max_images_per_request:
            raise bad_request(
                f"{len(urls)} images in one request; the limit is "
                f"{self.config.max_images_per_request}",
                "messages",
                "too_many_images",
            )
        if urls and self.processor.image_processor is None:
            raise bad_request("this model does not take images", "messages", "images_not_supported")
        blobs = await self._fetch_images(urls)
        prompt = await self._in_pool(self._chat_prompt, messages, blobs)
        self.metrics.prepare.observe(time.perf_counter() - t0)
        max_tokens = (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        )
        return self._prepared("chat", body, prompt, max_tokens, "messages", stops)

    async def _fetch_images(self, urls: list[str]) -> list[bytes]:
        if not urls:
            return []
        import httpx

        client = None
        if any(u[:5].lower() in ("http:", "https") for u in urls) and self.media.allow_remote_media:
            client = httpx.AsyncClient(
                follow_redirects=False, trust_env=False, transport=self.media_transport
            )
        try:
            out = []
            for k, url in enumerate(urls):
                try:
                    out.append(await load_image_url(url, self.media, client, self.media_resolver))
                except MediaError as exc:
                    raise bad_request(f"image {k}: {exc}", "messages", exc.code) from exc
            return out
        finally:
            if client is not None:
                await client.aclose()

    def _chat_prompt(self, messages: list[dict[str, Any]], blobs: list[bytes]) -> PromptInput:
        images = []
        for k, data in enumerate(blobs):
            try:
                images.append(open_image(data, self.media.max_image_pixels))
            except MediaError as exc:
                raise bad_request(f"image {k}: {exc}", "messages", exc.code) from exc
        try:
            return self.processor.from_chat(messages, images)
        except InvalidInputError as exc:
            raise bad_request(str(exc), "messages") from exc

    async def prepare_completion(self, body: CompletionRequest) -> Prepared:
        t0 = time.perf_counter()
        self._check_common(body)
        stops = self._stops(body.stop)
        prompt_in: Any = body.prompt
        if isinstance(prompt_in, list) and prompt_in and not isinstance(prompt_in[0], int):
            if len(prompt_in) != 1:
                raise bad_request(
                    f"batched prompts ({len(prompt_in)}) are not supported; send one "
                    "prompt per request",
                    "prompt",
                    "unsupported_parameter",
                )
            prompt_in = prompt_in[0]
        if isinstance(prompt_in, str):
            self._check_text(prompt_in, "prompt")
        prompt = await self._in_pool(self._completion_prompt, prompt_in)
        self.metrics.prepare.observe(time.perf_counter() - t0)
        return self._prepared("completion", body, prompt, body.max_tokens, "prompt", stops)

    def _completion_prompt(self, prompt: str | list[int]) -> PromptInput:
        try:
            if isinstance(prompt, str):
                return self.processor.from_text(prompt)
            return self.processor.from_token_ids(prompt)
        except InvalidInputError as exc:
            raise bad_request(str(exc), "prompt") from exc

    # -- generation -----------------------------------------------------------------------
    async def run(self, p: Prepared) -> AsyncIterator[Piece]:
        """Engine deltas -> text pieces (stop strings applied); records the outcome."""
        matcher = StopMatcher(p.stops)
        outcome = "aborted"
        final: RequestMetrics | None = None
        stopped_at: int | None = None  # output tokens when a stop string matched
        gen = self.engine.generate(p.prompt, p.sampling, p.request_id, p.priority, p.deadline_s)
        try:
            async with contextlib.aclosing(gen) as deltas:
                async for d in deltas:
                    if d.new_token_ids:
                        self.metrics.generation_tokens.inc(len(d.new_token_ids))
                    if d.finished:
                        final = d.metrics
                    if stopped_at is not None:
                        continue  # draining after our abort, for the final metrics
                    text = matcher.feed(d.text_delta)
                    if matcher.stopped:
                        stopped_at = d.num_output_tokens
                        outcome = "finished"
                        if not d.finished:
                            await self.engine.abort(p.request_id)
                        yield Piece(text, "stop", stopped_at)
                    elif d.finished:
                        if d.finish_reason == "error":
                            outcome = "failed"
                            raise GenerationFailed(d.error or "the engine failed this request")
                        outcome = "finished" if d.finish_reason in ("stop", "length") else "aborted"
                        yield Piece(text + matcher.flush(), d.finish_reason, d.num_output_tokens)
                    elif text:
                        yield Piece(text, None, d.num_output_tokens)
        except RequestRejected as exc:
            outcome = "rejected"
            raise bad_request(str(exc), "max_tokens", "context_length_exceeded") from exc
        finally:
            if outcome != "rejected":  # a rejection is counted where the 400 is answered
                self.metrics.prompt_tokens.inc(p.num_prompt_tokens)
                self.metrics.observe_final(outcome, final)

    async def collect(self, p: Prepared) -> tuple[str, str | None, int]:
        texts: list[str] = []
        finish: str | None = None
        n = 0
        async with contextlib.aclosing(self.run(p)) as pieces:
            async for piece in pieces:
                texts.append(piece.text)
                if piece.finish_reason is not None:
                    finish, n = piece.finish_reason, piece.num_output_tokens
        return "".join(texts), finish, n

    async def collect_unless_gone(
        self, p: Prepared, request: Request
    ) -> tuple[str, str | None, int]:
        work = asyncio.ensure_future(self.collect(p))
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        if work.cancelled():
            raise ClientGone()
        return work.result()

    # -- responses ------------------------------------------------------------------------
    def _head(self, p: Prepared, obj: str) -> dict[str, Any]:
        return {
            "id": p.request_id,
            "object": obj,
            "created": p.created,
            "model": self.config.served_model_name,
            "system_fingerprint": None,
        }

    def chat_response(self, p: Prepared, text: str, finish: str | None, n: int) -> dict[str, Any]:
        return {
            **self._head(p, "chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": _usage(p, n),
        }

    def completion_response(
        self, p: Prepared, text: str, finish: str | None, n: int
    ) -> dict[str, Any]:
        return {
            **self._head(p, "text_completion"),
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(p, n),
        }

    async def sse(self, p: Prepared) -> AsyncIterator[str]:
        chat = p.kind == "chat"
        head = self._head(p, "chat.completion.chunk" if chat else "text_completion")

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = {**head, "choices": [choice]}
            if p.include_usage:
                obj["usage"] = None
            return _sse(obj)

        if chat:
            yield chunk("", None, role=True)
        n = 0
        try:
            async with contextlib.aclosing(self.run(p)) as pieces:
                async for piece in pieces:
                    if piece.text:
                        yield chunk(piece.text, None)
                    if piece.finish_reason is not None:
                        n = piece.num_output_tokens
                        yield chunk(None if chat else "", piece.finish_reason)
        except OpenAIError as exc:
            self.metrics.rejected()
            yield _sse(exc.body())
            yield SSE_DONE
            return
        except GenerationFailed as exc:
            yield _sse(OpenAIError(500, str(exc), "server_error", code="generation_failed").body())
            yield SSE_DONE
            return
        except Exception as exc:
            log.exception("stream of %s failed", p.request_id)
            yield _sse(
                OpenAIError(
                    500,
                    f"internal error: {exc.__class__.__name__}",
                    "server_error",
                    code="internal_error",
                ).body()
            )
            yield SSE_DONE
            return
        if p.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(p, n)})
        yield SSE_DONE

    async def handle(self, p: Prepared, request: Request) -> Response:
        """Run a prepared request; owns one admission slot and releases it when done."""
        if p.stream:
            return _EngineStream(self.sse(p), self.admission.release)
        try:
            text, finish, n = await self.collect_unless_gone(p, request)
        except ClientGone:
            return Response(status_code=499)
        except GenerationFailed as exc:
            raise OpenAIError(500, str(exc), "server_error", code="generation_failed") from exc
        finally:
            self.admission.release()
        build = self.chat_response if p.kind == "chat" else self.completion_response
        return JSONResponse(build(p, text, finish, n))

    def admit(self) -> None:
        if not self.admission.try_acquire():
            raise OpenAIError(
                503,
                f"the server is at its limit of {self.config.max_queue} unfinished requests; "
                "retry later",
                "server_error",
                code="overloaded",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------

_ERRORS = {
    400: {"model": ErrorResponse, "description": "invalid request"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
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


def create_app(engine: Any, config: ServerConfig | Any | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (an ``AsyncEngine``, already started; the app does not
    own it). ``config``: a ``ServerConfig``, an ``argparse.Namespace`` of ``nova serve`` flags,
    or None for defaults."""
    if config is None:
        config = ServerConfig()
    elif not isinstance(config, ServerConfig):
        config = ServerConfig.from_args(config)
    svc = NovaService(engine, config)
    app = FastAPI(
        title="Nova",
        version=_version(),
        description="OpenAI-compatible API of the Nova VLM serving engine",
    )
    app.state.nova = svc

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
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return OpenAIError(
            exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None)
        ).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return OpenAIError(
            500, f"internal error: {exc.__class__.__name__}", "server_error", code="internal_error"
        ).response()

    # added last = outermost: the API key is checked before anything reads the body
    app.add_middleware(_BodyLimitMiddleware, max_bytes=config.max_request_bytes)
    if config.api_key is not None:
        app.add_middleware(_APIKeyMiddleware, api_key=config.api_key)
    v1 = APIRouter(prefix="/v1")

    @v1.post(
        "/chat/completions",
        responses=_stream_doc(ChatCompletionResponse),
        response_model=None,
        summary="Chat completion (text and image_url parts)",
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        svc.admit()
        try:
            p = await svc.prepare_chat(body)
        except BaseException:
            svc.admission.release()
            raise
        return await svc.handle(p, request)

    @v1.post(
        "/completions",
        responses=_stream_doc(CompletionResponse),
        response_model=None,
        summary="Text completion (a string or a list of token ids)",
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        svc.admit()
        try:
            p = await svc.prepare_completion(body)
        except BaseException:
            svc.admission.release()
            raise
        return await svc.handle(p, request)

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
        if not engine.nova.engine.is_running:
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
