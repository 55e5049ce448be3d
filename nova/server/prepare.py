"""Request preparation: an accepted API request becomes a ``Prepared`` one, ready for the
engine, or an ``OpenAIError`` (400). Validation (text, stop strings, context length, the
engine's admission rule), sampling parameters, images (fetched, then decoded and preprocessed in
a worker pool), the chat template and tokenisation."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from nova.engine.client import EngineClient
from nova.models.errors import InvalidInputError
from nova.models.mm_cache import KeyedImage
from nova.sampling_params import SamplingParams
from nova.server.config import ServerConfig
from nova.server.errors import bad_request
from nova.server.media import MediaError, load_image_url, open_image
from nova.server.protocol import ChatCompletionRequest, CompletionRequest
from nova.server.stops import single_token_stop_ids
from nova.types import RequestRejected

if TYPE_CHECKING:
    from nova.models.inputs import PromptInput

T = TypeVar("T")
RequestBody = ChatCompletionRequest | CompletionRequest

GREEDY_EPS = 1e-5  # temperatures below this are greedy (as vLLM)
MIN_TOP_P = 1e-6
MAX_STOP_STRINGS = 16


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
    n: int = 1  # choices

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt.token_ids)


class RequestPreparer:
    """Turns API request bodies into ``Prepared`` requests for ``client``. ``on_prepared(s)``
    is told how long each preparation took (seconds, image fetch to tokens; the prompt may
    still be rejected afterwards by the sampling checks)."""

    def __init__(
        self,
        client: EngineClient,
        config: ServerConfig,
        on_prepared: Callable[[float], None] = lambda _s: None,
    ) -> None:
        self.client = client
        self.config = config
        self.media = config.media_policy()
        self.processor = client.processor
        self.max_model_len = int(client.max_model_len)
        self.on_prepared = on_prepared
        self._pool = ThreadPoolExecutor(
            max_workers=config.preprocess_workers, thread_name_prefix="nova-preprocess"
        )
        # test hooks for remote media (an httpx transport and a resolver)
        self.media_transport: Any = None
        self.media_resolver: Any = None

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @staticmethod
    def _check_text(text: str, param: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise bad_request(
                f"{param} is not valid Unicode text (lone surrogate at {exc.start})", param=param
            ) from exc

    def _check_common(self, body: RequestBody) -> None:
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
        body: RequestBody,
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
            self.client.check_admissible(num_prompt, max_tokens)
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
        body: RequestBody,
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
            n=body.n or 1,
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
        self.on_prepared(time.perf_counter() - t0)
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

    def _image(self, k: int, data: bytes) -> Any:
        """One image, in a preparation thread: keyed by its raw bytes when the engine caches
        (``image_key``: BLAKE3, a few GB/s); an encoder-cache hit is taken as it is (no
        decoding, no preprocessing); otherwise decoded and checked."""
        key = None
        if self.processor.hash_images:
            key = self.processor.image_key(data)
            cached = self.processor.cached_image(key)
            if cached is not None:
                return cached
        try:
            image = open_image(data, self.media.max_image_pixels)
        except MediaError as exc:
            raise bad_request(f"image {k}: {exc}", "messages", exc.code) from exc
        return image if key is None else KeyedImage(key, image)

    def _chat_prompt(self, messages: list[dict[str, Any]], blobs: list[bytes]) -> PromptInput:
        images = [self._image(k, data) for k, data in enumerate(blobs)]
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
        self.on_prepared(time.perf_counter() - t0)
        return self._prepared("completion", body, prompt, body.max_tokens, "prompt", stops)

    def _completion_prompt(self, prompt: str | list[int]) -> PromptInput:
        try:
            if isinstance(prompt, str):
                return self.processor.from_text(prompt)
            return self.processor.from_token_ids(prompt)
        except InvalidInputError as exc:
            raise bad_request(str(exc), "prompt") from exc
