"""The seam between a front end (the HTTP server, its metrics, ``nova serve``) and the engine.

A front end holds an ``EngineClient`` and nothing else: it never reaches inside the engine.
``AsyncEngine`` implements it; tests drive the server with a small fake that implements only
these members. Everything that crosses the seam is plain data (``EngineSnapshot``,
``EngineDescription``, ``OutputDelta``) or a prompt built by the client's own ``processor``.

Torch-free: importing this module imports neither torch nor the engine.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from nova.engine.arrivals import ExpectedRequest
from nova.metrics import RequestMetrics
from nova.sampling_params import GenerationDefaults, SamplingParams
from nova.types import Stage, TokenLogprobs

if TYPE_CHECKING:
    from nova.models.inputs import PromptInput
    from nova.structured.compiler import GrammarCompiler


@dataclass(slots=True)
class OutputDelta:
    """What one step of the engine produced for one request (streamed to its caller)."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str  # "" when the model has no tokenizer
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    num_output_tokens: int = 0
    metrics: RequestMetrics | None = None  # set on the final delta
    index: int = 0  # which of the request's ``n`` choices (0 .. n-1)
    # prompt tokens whose KV came from the prefix cache (known from the first token on)
    num_cached_tokens: int = 0
    # log-probabilities of ``new_token_ids`` when the request asked for them (else empty)
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class EngineSnapshot:
    """A consistent read of the engine's state, for metrics and health.

    ``requests_in_stage``: requests waiting for or running in each stage; ``kv_cache_usage``:
    fraction of KV blocks in use, in [0, 1]; ``sm_shares``: each stage's SM share in the
    current partition, in (0, 1]; ``num_preemptions``: so far. ``memory_bytes``: the start-up
    memory accounting (``nova.gpu.memory.MemoryReport`` field -> value; fields that are unknown
    on this device are absent; ``kv_cache_blocks`` is a count); ``granted_sms``: the SMs each
    stage's last batch ran on (CPU cores on a CPU; absent before its first batch).
    Cache counters (since start): prompt tokens looked up in the prefix cache and found there;
    images looked up in the encoder cache and found there; and the encoder cache's bytes in
    use and the KV blocks kept only as cache (evictable)."""

    requests_in_stage: dict[Stage, int]
    kv_cache_usage: float
    num_free_blocks: int
    sm_shares: dict[Stage, float]
    num_preemptions: int
    memory_bytes: dict[str, int] = field(default_factory=dict)
    granted_sms: dict[Stage, int] = field(default_factory=dict)
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    encoder_cache_queried_images: int = 0
    encoder_cache_hit_images: int = 0
    encoder_cache_used_bytes: int = 0
    kv_cache_cached_blocks: int = 0


@dataclass(slots=True, frozen=True)
class EngineDescription:
    """What a front end tells its operator at start-up (``nova serve`` prints it)."""

    model: str  # the model directory the weights came from
    architecture: str
    max_model_len: int  # context length, tokens
    num_kv_blocks: int
    block_size_tokens: int
    policy: str
    memory_lines: tuple[str, ...]  # the start-up memory report, one line each
    partition_backend: str  # the SM partition backend and why it was chosen


@runtime_checkable
class PromptProcessor(Protocol):
    """What a front end needs of the engine's input processor to turn a request into a
    ``PromptInput`` (chat template, tokenisation, image preprocessing).
    ``nova.models.inputs.InputProcessor`` implements it."""

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer, or None for a model without one (token ids only)."""

    @property
    def image_processor(self) -> Any:
        """The image processor, or None for a text-only model."""

    @property
    def grammar_compiler(self) -> GrammarCompiler | None:
        """Compiles structured-output grammars for this model (None: no structured output)."""

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits: token ids (prompts, ``logit_bias``, stop tokens)
        must be below it."""

    @property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for (>= 1): a text of more than
        ``context length * max_token_chars`` characters cannot fit, whatever its tokens."""

    def from_chat(
        self,
        messages: list[dict[str, Any]],
        images: list[Any] | None = None,
        image_limits: tuple[int | None, int | None] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> PromptInput:
        """Apply the chat template to ``messages`` (images in the order of their parts) and
        ``tools`` (OpenAI function tools; only passed when a request has them). Text
        in the messages is text: a special token's string in it (``<image>``,
        ``<|im_start|>``) is never parsed as that token. ``image_limits``: (min_pixels,
        max_pixels) to resize this request's images within (dynamic-resolution models only;
        None in either: the served value); outside the served limits: ``InvalidInputError``."""

    def from_text(self, prompt: str, images: list[Any] | None = None) -> PromptInput:
        """Tokenise raw text (no chat template)."""

    def from_token_ids(self, token_ids: list[int], images: list[Any] | None = None) -> PromptInput:
        """Take token ids as they are (a model's image placeholders are expanded)."""

    @property
    def hash_images(self) -> bool:
        """Whether images are keyed (a cache is on): then preparation should key each image's
        raw bytes (``image_key``, off the event loop) and look it up (``cached_image``)."""

    def image_key(
        self, data: bytes, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> str:
        """The encoder-cache key of an image's raw bytes under the effective resize limits."""

    def cached_image(self, key: str | None) -> Any:
        """The encoder cache's entry for ``key`` (an opaque handle a prompt can carry instead
        of the image), or None."""


@runtime_checkable
class EngineClient(Protocol):
    """What a front end may ask of a running engine; nothing else crosses the seam."""

    @property
    def max_model_len(self) -> int:
        """The context length in tokens (prompt and output together)."""

    @property
    def processor(self) -> PromptProcessor:
        """The input processor requests are prepared with before ``generate``."""

    @property
    def sampling_defaults(self) -> GenerationDefaults:
        """The model's defaults for sampling fields a request leaves unset."""

    def check_admissible(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ``nova.core.scheduler.RequestRejected`` if such a request could never be
        served (so a front end can answer before a stream starts); return None otherwise."""

    def is_healthy(self) -> bool:
        """Started, and every stage worker is alive."""

    def snapshot(self) -> EngineSnapshot:
        """A consistent read of the engine's state (cheap: for every metrics scrape)."""

    def describe(self) -> EngineDescription:
        """The model, its context, the KV cache, memory and partitions, for start-up logs."""

    def expect_request(self) -> ExpectedRequest:
        """Announce a request the front end accepted and is still preparing: an idle engine
        waits a little for announced requests, so a burst starts in one batch
        (``nova.engine.arrivals``). ``generate(..., arrival=)`` marks it done once submitted;
        the front end calls ``done()`` itself (idempotent) when the request ends before that."""

    def generate(
        self,
        prompt: PromptInput,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        deadline_s: float | None = None,
        n: int = 1,
        arrival: ExpectedRequest | None = None,
    ) -> AsyncGenerator[OutputDelta, None]:
        """Submit a request and stream its deltas; the last has ``finished`` set. Raises
        ``RequestRejected`` on the first iteration for a request that can never be served.
        Closing the iterator before the last delta aborts the request.

        ``n`` > 1: n choices of one prompt, prefilled once (deltas carry their ``index``; each
        choice finishes on its own; the stream ends when all have; a seed gives choice i the
        seed + i)."""

    async def abort(self, request_id: str) -> bool:
        """Abort a live request (its KV blocks are freed); False if unknown or already done."""
