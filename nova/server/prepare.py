"""Request preparation: an accepted API request becomes a ``Prepared`` one, ready for the
engine, or an ``OpenAIError`` (400). Validation (text, stop strings, context length, the
engine's admission rule), sampling parameters, images (fetched, then decoded and preprocessed in
a worker pool), the chat template and tokenisation."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from nova.engine.arrivals import ExpectedRequest
from nova.engine.client import EngineClient
from nova.models.errors import InvalidInputError
from nova.models.mm_cache import KeyedImage
from nova.sampling_params import SamplingParams
from nova.server.config import ServerConfig
from nova.server.constraints import (
    Constraints,
    ToolMode,
    chat_constraints,
    completion_constraints,
    grammar_error,
)
from nova.server.errors import (
    COMBINATION_CODE,
    CONTEXT_CODE,
    IMAGE_LIMITS_CODE,
    JSON_TEXT_CODE,
    VOCAB_CODE,
    OpenAIError,
    bad_request,
)
from nova.server.media import MediaError, load_image_url, open_image
from nova.server.protocol import ChatCompletionRequest, CompletionRequest
from nova.server.stops import single_token_stop_ids
from nova.structured.spec import GrammarError, GrammarSpec
from nova.tools.render import detect_parser, fallback_messages, template_renders_tools
from nova.types import RequestRejected

if TYPE_CHECKING:
    from nova.models.inputs import PromptInput
    from nova.structured.compiler import CompiledGrammar

T = TypeVar("T")
RequestBody = ChatCompletionRequest | CompletionRequest

GREEDY_EPS = 1e-5  # temperatures below this are greedy (as vLLM)
MIN_TOP_P = 1e-6
MAX_STOP_STRINGS = 16
DEFAULT_TEMPERATURE = 1.0  # OpenAI's, when neither the request nor the model sets one


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
    # alternatives per token when the response carries logprobs (None: no logprobs)
    logprobs: int | None = None
    continuous_usage: bool = False  # usage so far in every streamed chunk
    include_stop_str: bool = False  # keep the matched stop string in the text
    min_tokens: int = 0  # stop strings are looked for only after this many output tokens
    tool_mode: ToolMode | None = None  # parse tool calls out of the output
    n: int = 1  # choices
    # the request's announcement to the engine (``EngineClient.expect_request``), done once
    # the engine has it; None when the front end did not announce it
    arrival: ExpectedRequest | None = field(default=None, compare=False, repr=False)

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
        self.defaults = client.sampling_defaults
        self.vocab_size = int(self.processor.vocab_size)
        self.served_model_name = config.served_model_name
        self.on_prepared = on_prepared
        self._pool = ThreadPoolExecutor(
            max_workers=config.preprocess_workers, thread_name_prefix="nova-preprocess"
        )
        # test hooks for remote media (an httpx transport and a resolver)
        self.media_transport: Any = None
        self.media_resolver: Any = None
        # Tools: the model's call format, and whether its template renders tools (if not,
        # nova.tools.render's fallback does).
        template = getattr(self.processor.tokenizer, "chat_template", None)
        template = template if isinstance(template, str) else None
        self.template_renders_tools = template_renders_tools(template)
        self.tool_parser = (
            detect_parser(template)
            if config.tool_call_parser == "auto"
            else config.tool_call_parser
        )

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

    @property
    def max_text_chars(self) -> int:
        """Characters of text beyond which a prompt cannot fit the context whatever its
        tokens (each token stands for at most ``processor.max_token_chars`` characters):
        checked before anything is tokenised."""
        return self.max_model_len * int(self.processor.max_token_chars)

    def _check_text_length(self, num_chars: int, param: str) -> None:
        limit = self.max_text_chars
        if num_chars > limit:
            raise bad_request(
                f"the prompt has {num_chars} characters of text; this model's context of "
                f"{self.max_model_len} tokens holds at most {limit} (a token stands for at "
                f"most {self.processor.max_token_chars} characters)",
                param,
                CONTEXT_CODE,
            )

    def _check_common(self, body: RequestBody) -> None:
        # n, echo, suffix, best_of and the unsupported fields are limited by the schema itself
        if body.model is not None and body.model != self.served_model_name:
            raise OpenAIError(
                404,
                f"The model `{body.model}` does not exist; this server serves "
                f"`{self.served_model_name}` (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        if body.stream_options is not None and not body.stream:
            raise bad_request(
                "stream_options is only allowed when stream is true",
                "stream_options",
                COMBINATION_CODE,
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

    def _token_ids_in_vocab(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(
                f"token ids must be below the vocabulary size {self.vocab_size}, got {bad[:5]}",
                param,
                VOCAB_CODE,
            )

    def _logit_bias(self, body: RequestBody) -> tuple[tuple[int, float], ...]:
        if not body.logit_bias:
            return ()
        bias = [(int(k), float(v)) for k, v in body.logit_bias.items()]
        self._token_ids_in_vocab([t for t, _ in bias], "logit_bias")
        return tuple(bias)

    def _max_tokens(self, max_tokens: int | None, num_prompt: int, prompt_param: str) -> int:
        ctx = self.max_model_len
        if num_prompt >= ctx:
            raise bad_request(
                f"the prompt has {num_prompt} tokens (image tokens included); this "
                f"model's context length is {ctx}",
                prompt_param,
                CONTEXT_CODE,
            )
        if max_tokens is None:
            # the model's max_new_tokens, within the context; else the rest of the context
            default = self.defaults.max_tokens
            max_tokens = ctx - num_prompt if default is None else min(default, ctx - num_prompt)
        elif num_prompt + max_tokens > ctx:
            raise bad_request(
                f"max_tokens is too large: {num_prompt} prompt tokens + {max_tokens} "
                f"> context length {ctx}",
                "max_tokens",
                CONTEXT_CODE,
            )
        try:  # the scheduler's own admission rule, before any stream starts
            self.client.check_admissible(num_prompt, max_tokens)
        except RequestRejected as exc:
            raise bad_request(str(exc), "max_tokens", CONTEXT_CODE) from exc
        return max_tokens

    def _sampling(
        self,
        body: RequestBody,
        max_tokens: int | None,
        num_prompt: int,
        prompt_param: str,
        stops: tuple[str, ...],
        logprobs: int | None,
    ) -> SamplingParams:
        """The request's sampling parameters: its own fields, else the model's defaults
        (``generation_config.json``, ``--generation-config``), else OpenAI's."""
        max_tokens = self._max_tokens(max_tokens, num_prompt, prompt_param)
        d = self.defaults
        temperature = _first(body.temperature, d.temperature, DEFAULT_TEMPERATURE)
        if temperature < GREEDY_EPS:
            temperature = 0.0
        top_k_in = body.top_k if body.top_k is not None else d.top_k
        top_k = top_k_in if top_k_in not in (None, 0, -1) else None
        # The sampler compares top_p in float32, where a tiny top_p (1e-300) becomes 0 and
        # drops every token. Any top_p below the largest token's probability means "keep only
        # the most likely token"; 1e-6 is below 1/vocab for any vocabulary and exact in float32.
        top_p = max(_first(body.top_p, d.top_p, 1.0), MIN_TOP_P)
        stop_ids = list(single_token_stop_ids(self.processor.tokenizer, stops))
        if body.stop_token_ids:
            self._token_ids_in_vocab(body.stop_token_ids, "stop_token_ids")
            stop_ids += [t for t in body.stop_token_ids if t not in stop_ids]
        min_tokens = body.min_tokens or 0
        if min_tokens > max_tokens:
            raise bad_request(
                f"min_tokens ({min_tokens}) is larger than max_tokens ({max_tokens})",
                "min_tokens",
                CONTEXT_CODE if body.max_tokens is None else COMBINATION_CODE,
            )
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=body.seed,
                stop_token_ids=tuple(stop_ids),
                ignore_eos=body.ignore_eos,
                logprobs=logprobs,
                logit_bias=self._logit_bias(body),
                min_tokens=min_tokens,
                repetition_penalty=_first(body.repetition_penalty, d.repetition_penalty, 1.0),
                presence_penalty=_first(body.presence_penalty, None, 0.0),
                frequency_penalty=_first(body.frequency_penalty, None, 0.0),
                min_p=_first(body.min_p, d.min_p, 0.0),
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
        logprobs: int | None,
        grammar: CompiledGrammar | None = None,
        tool_mode: ToolMode | None = None,
    ) -> Prepared:
        sampling = self._sampling(
            body, max_tokens, len(prompt.token_ids), prompt_param, stops, logprobs
        )
        if grammar is not None:
            sampling = dataclasses.replace(sampling, structured_output=grammar)
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
            logprobs=logprobs,
            continuous_usage=bool(
                body.stream_options and body.stream_options.continuous_usage_stats
            ),
            include_stop_str=body.include_stop_str_in_output,
            min_tokens=sampling.min_tokens,
            tool_mode=tool_mode,
            n=body.n or 1,
        )

    def _chat_messages(self, body: ChatCompletionRequest) -> tuple[list[dict[str, Any]], list[str]]:
        messages: list[dict[str, Any]] = []
        urls: list[str] = []
        num_chars = 0
        for i, msg in enumerate(body.messages):
            role = "system" if msg.role == "developer" else msg.role
            if msg.role == "tool":
                messages.append(self._tool_message(i, msg))
                num_chars += len(messages[-1]["content"])
                continue
            if msg.role == "assistant" and msg.tool_calls:
                messages.append(self._tool_calls_message(i, msg))
                num_chars += len(messages[-1]["content"]) + sum(
                    len(c.function.arguments) for c in msg.tool_calls
                )
                continue
            head: dict[str, Any] = {"role": role}
            if msg.name is not None:  # for templates that name participants
                self._check_text(msg.name, f"messages[{i}].name")
                head["name"] = msg.name
                num_chars += len(msg.name)
            if msg.content is None:  # an assistant turn without text
                messages.append({**head, "content": ""})
                continue
            if isinstance(msg.content, str):
                self._check_text(msg.content, f"messages[{i}].content")
                num_chars += len(msg.content)
                messages.append({**head, "content": msg.content})
                continue
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(msg.content):
                if part.type == "text":
                    self._check_text(part.text, f"messages[{i}].content[{j}].text")
                    num_chars += len(part.text)
                    parts.append({"type": "text", "text": part.text})
                else:
                    self._check_text(
                        part.image_url.url, f"messages[{i}].content[{j}].image_url.url"
                    )
                    urls.append(part.image_url.url)
                    parts.append({"type": "image"})
            messages.append({**head, "content": parts})
        self._check_text_length(num_chars, "messages")
        return messages, urls

    def _tool_message(self, i: int, msg: Any) -> dict[str, Any]:
        if isinstance(msg.content, str):
            text = msg.content
        else:
            text = "\n".join(part.text for part in msg.content)
        self._check_text(text, f"messages[{i}].content")
        return {"role": "tool", "content": text, "tool_call_id": msg.tool_call_id}

    def _tool_calls_message(self, i: int, msg: Any) -> dict[str, Any]:
        """An assistant turn with tool calls, for a template: arguments as dicts."""
        calls = []
        for j, call in enumerate(msg.tool_calls):
            param = f"messages[{i}].tool_calls[{j}].function.arguments"
            self._check_text(call.function.arguments, param)
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except json.JSONDecodeError as exc:
                raise bad_request(
                    f"{param} is not valid JSON: {exc}", param, JSON_TEXT_CODE
                ) from exc
            calls.append(
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": arguments},
                }
            )
        content = msg.content
        if isinstance(content, list):
            content = "\n".join(p.text for p in content if p.type == "text")
        return {"role": "assistant", "content": content or "", "tool_calls": calls}

    async def _compile(self, grammar: GrammarSpec | None, param: str | None) -> Any:
        """The compiled grammar (on the preparation pool; cached by the compiler), or None."""
        if grammar is None:
            return None
        compiler = self.processor.grammar_compiler
        if compiler is None:
            raise bad_request(
                "structured output needs a model with a tokenizer", param, "unsupported_parameter"
            )
        try:
            return await self._in_pool(compiler.compile, grammar)
        except GrammarError as exc:
            raise grammar_error(exc, param) from exc

    def _with_tools(
        self, messages: list[dict[str, Any]], c: Constraints
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """(messages, tools for the template): a template that does not render tools gets
        the messages rewritten by the fallback and no tools argument."""
        history = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if self.template_renders_tools:
            return messages, [t.as_openai() for t in c.tools] or None
        if c.tools or history:
            return fallback_messages(messages, c.tools), None
        return messages, None

    async def prepare_chat(self, body: ChatCompletionRequest) -> Prepared:
        t0 = time.perf_counter()
        self._check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs", COMBINATION_CODE)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        stops = self._stops(body.stop)
        constraints = chat_constraints(body, self.tool_parser)
        messages, urls = self._chat_messages(body)
        messages, tools = self._with_tools(messages, constraints)
        if len(urls) > self.config.max_images_per_request:
            raise bad_request(
                f"{len(urls)} images in one request; the limit is "
                f"{self.config.max_images_per_request}",
                "messages",
                "too_many_images",
            )
        if urls and self.processor.image_processor is None:
            raise bad_request("this model does not take images", "messages", "images_not_supported")
        grammar = await self._compile(constraints.grammar, constraints.grammar_param)
        blobs = await self._fetch_images(urls)
        prompt = await self._in_pool(self._chat_prompt, messages, blobs, _image_limits(body), tools)
        self.on_prepared(time.perf_counter() - t0)
        max_tokens = (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        )
        return self._prepared(
            "chat",
            body,
            prompt,
            max_tokens,
            "messages",
            stops,
            logprobs,
            grammar,
            constraints.tool_mode,
        )

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

    def _image(
        self, k: int, data: bytes, image_limits: tuple[int | None, int | None] | None
    ) -> Any:
        """One image, in a preparation thread: keyed by its raw bytes and the request's
        effective resize limits when the engine caches (``image_key``: BLAKE3, a few GB/s); an
        encoder-cache hit is taken as it is (no decoding, no preprocessing); otherwise decoded
        and checked."""
        key = None
        if self.processor.hash_images:
            lo, hi = image_limits if image_limits is not None else (None, None)
            key = self.processor.image_key(data, lo, hi)
            cached = self.processor.cached_image(key)
            if cached is not None:
                return cached
        try:
            image = open_image(data, self.media.max_image_pixels)
        except MediaError as exc:
            raise bad_request(f"image {k}: {exc}", "messages", exc.code) from exc
        return image if key is None else KeyedImage(key, image)

    def _chat_prompt(
        self,
        messages: list[dict[str, Any]],
        blobs: list[bytes],
        image_limits: tuple[int | None, int | None] | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> PromptInput:
        images = [self._image(k, data, image_limits) for k, data in enumerate(blobs)]
        try:
            if tools:
                return self.processor.from_chat(messages, images, image_limits, tools=tools)
            if image_limits is None:  # the two-argument call of processors without limits
                return self.processor.from_chat(messages, images)
            return self.processor.from_chat(messages, images, image_limits)
        except InvalidInputError as exc:
            if str(exc).startswith("mm_processor_kwargs"):
                raise bad_request(str(exc), "mm_processor_kwargs", IMAGE_LIMITS_CODE) from exc
            code = "invalid_image" if images else "invalid_value"  # e.g. its size, its ratio
            raise bad_request(str(exc), "messages", code) from exc

    async def prepare_completion(self, body: CompletionRequest) -> Prepared:
        t0 = time.perf_counter()
        self._check_common(body)
        stops = self._stops(body.stop)
        prompt_in: Any = body.prompt
        if isinstance(prompt_in, list) and prompt_in and not isinstance(prompt_in[0], int):
            prompt_in = prompt_in[0]  # the schema allows one
        if isinstance(prompt_in, str):
            self._check_text(prompt_in, "prompt")
            self._check_text_length(len(prompt_in), "prompt")
        else:
            self._token_ids_in_vocab(prompt_in, "prompt")
        constraints = completion_constraints(body)
        grammar = await self._compile(constraints.grammar, constraints.grammar_param)
        prompt = await self._in_pool(self._completion_prompt, prompt_in)
        self.on_prepared(time.perf_counter() - t0)
        return self._prepared(
            "completion", body, prompt, body.max_tokens, "prompt", stops, body.logprobs, grammar
        )

    def _completion_prompt(self, prompt: str | list[int]) -> PromptInput:
        try:
            if isinstance(prompt, str):
                return self.processor.from_text(prompt)
            return self.processor.from_token_ids(prompt)
        except InvalidInputError as exc:
            raise bad_request(str(exc), "prompt") from exc


def _first(*values: float | int | None) -> float:
    """The first value that is not None (the last one never is)."""
    for v in values:
        if v is not None:
            return float(v)
    raise ValueError("no value")


def _image_limits(body: ChatCompletionRequest) -> tuple[int | None, int | None] | None:
    kw = body.mm_processor_kwargs
    if kw is None or (kw.min_pixels is None and kw.max_pixels is None):
        return None
    return (kw.min_pixels, kw.max_pixels)
