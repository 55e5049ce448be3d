"""Plain data at the seams between the scheduler, the executors, the engine and the simulator.

No torch in here: the scheduler and the simulator are torch-free. Times are seconds on the
engine's clock (``time.monotonic`` in the real engine, a virtual clock in the simulator), passed
in by whoever owns the clock; nothing here reads one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from nova.sampling_params import SamplingParams


class RequestRejected(ValueError):
    """The request can never be served (e.g. larger than the whole KV cache). Raised by the
    scheduler's admission check; front ends answer it with a 400 before a stream starts."""


class Stage(str, Enum):
    VISION = "vision"
    PREFILL = "prefill"
    DECODE = "decode"


STAGES: tuple[Stage, ...] = (Stage.VISION, Stage.PREFILL, Stage.DECODE)


class RequestStatus(str, Enum):
    WAITING_VISION = "waiting_vision"
    WAITING_PREFILL = "waiting_prefill"  # also a preempted request waiting to recompute
    DECODING = "decoding"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def is_done(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.ABORTED, RequestStatus.FAILED)


@dataclass(slots=True, frozen=True)
class ImageInput:
    """One image of a request: how many placeholder tokens it fills, and optionally a content
    hash (``nova.core.hashing.image_key``: the encoder cache's key and part of the prefix-cache
    key of the blocks it covers; None when nobody computed one: then neither cache is used for
    it, nor for any KV block from its first placeholder on).

    ``offset``: index of its first placeholder token in the prompt (None: unknown, which also
    keeps the blocks it covers out of the prefix cache). ``grid``: its (t, h, w) patch grid
    (Qwen-VL; M-RoPE positions depend on it), None for fixed-size towers. ``has_embeds``: the
    front end already holds its embeddings (an encoder-cache hit when the request was
    prepared), so it needs no vision work whatever the cache holds by the time it is added."""

    num_tokens: int
    mm_hash: str | None = None
    offset: int | None = None
    grid: tuple[int, int, int] | None = None
    has_embeds: bool = False

    def __post_init__(self) -> None:
        # Loud on the old field order (hash first), where a str lands in num_tokens.
        if isinstance(self.num_tokens, str) or isinstance(self.mm_hash, int):
            raise TypeError(
                f"ImageInput(num_tokens, mm_hash=None), got ({self.num_tokens!r}, {self.mm_hash!r})"
            )
        if self.num_tokens < 0:
            raise ValueError(f"ImageInput.num_tokens must be >= 0, got {self.num_tokens}")


@dataclass(slots=True, frozen=True)
class TokenLogprobs:
    """The log-probability of one sampled token and of the most likely alternatives, from the
    distribution the sampler processed (``nova.runtime.sampler`` says which). ``rank``: 1 for
    the most likely token; ``top``: (token id, logprob) pairs, most likely first (as many as
    the request asked for, fewer when fewer tokens are allowed)."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class RequestTimes:
    arrival_s: float
    vision_start_s: float | None = None
    vision_end_s: float | None = None
    prefill_start_s: float | None = None  # first prefill (a recompute does not move it)
    prefill_end_s: float | None = None
    token_s: list[float] = field(default_factory=list)  # time each output token was produced
    finish_s: float | None = None


@dataclass(slots=True)
class Request:
    """A request and its lifecycle, as the scheduler sees it.

    ``priority``: lower values are served first (vLLM's convention), default 0.
    ``deadline_s``: optional latency target, seconds after arrival.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    images: list[ImageInput] = field(default_factory=list)
    priority: int = 0
    deadline_s: float | None = None
    arrival_s: float = 0.0
    status: RequestStatus = RequestStatus.WAITING_PREFILL
    output_token_ids: list[int] = field(default_factory=list)
    times: RequestTimes = field(init=False)  # starts at ``arrival_s``
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    num_preemptions: int = 0
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    # -- caches (the scheduler fills these) --
    # hashes of the full KV blocks of ``prefill_token_ids`` computed so far
    # (``nova.core.hashing.block_hash`` chain); stops before the first block that cannot be
    # keyed (an image without hash or offset)
    block_hashes: list[bytes] = field(default_factory=list)
    # prompt tokens found in the prefix cache by the latest lookup (when the request entered
    # the prefill queue, then at each admission to a prefill); a multiple of the block size
    prefix_hit_tokens: int = 0
    # prompt tokens served from the prefix cache at the first prefill (usage.cached_tokens)
    num_cached_prompt_tokens: int = 0
    # per image: True if its embeddings came from the encoder cache (or the front end's hit)
    encoder_cache_hits: list[bool] = field(default_factory=list)
    # images (indices into ``images``) the vision stage still has to encode
    images_to_encode: list[int] = field(default_factory=list)
    # ``n`` > 1: the request whose prefill this one shares (None: its own prefill), and its
    # index among the choices (0 for the request that prefills)
    parent_id: str | None = None
    choice_index: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt")
        self.times = RequestTimes(arrival_s=self.arrival_s)

    @property
    def num_image_tokens(self) -> int:
        return sum(img.num_tokens for img in self.images)

    @property
    def needs_vision(self) -> bool:
        """Some image still has to go through the vision encoder (after the encoder-cache
        lookup at ``Scheduler.add_request``; before it: any image without embeddings)."""
        if self.encoder_cache_hits:
            return bool(self.images_to_encode)
        return any(not img.has_embeds for img in self.images)

    @property
    def encoder_cache_misses(self) -> list[int]:
        """Indices of the images the vision stage encodes (or encoded) for this request: the
        encoder cache's misses once ``Scheduler.add_request`` looked them up (unlike
        ``images_to_encode``, kept after the vision batch), before that every image without
        embeddings."""
        if self.encoder_cache_hits:
            return [i for i, hit in enumerate(self.encoder_cache_hits) if not hit]
        return [i for i, img in enumerate(self.images) if not img.has_embeds]

    @property
    def num_uncached_prompt_tokens(self) -> int:
        """Tokens a (re)prefill of this request still has to compute: the prompt (plus, after
        a preemption, the outputs so far) minus what is in the KV cache or, before admission,
        what the latest prefix-cache lookup found. What policies should plan and cost."""
        done = max(self.num_computed_tokens, self.prefix_hit_tokens)
        return max(0, len(self.prompt_token_ids) + len(self.output_token_ids) - done)

    @property
    def prefill_token_ids(self) -> list[int]:
        """Tokens a (re)prefill computes: the prompt plus, after a preemption, the outputs so
        far."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def absolute_deadline_s(self) -> float | None:
        return None if self.deadline_s is None else self.arrival_s + self.deadline_s


@dataclass(slots=True, frozen=True)
class Partition:
    """Share of the GPU's SMs per stage, each in (0, 1]. ``Partition.shared()`` = no limits
    (every stage may use the whole GPU; streams contend freely).

    ``isolated``: the stages run on separate SM partitions (green contexts / SM masks), so
    co-running stages share only memory bandwidth and caches; False: plain concurrent streams
    that also contend for SMs. The cost models' ``isolated`` argument. ``name`` is for display.
    """

    vision: float = 1.0
    prefill: float = 1.0
    decode: float = 1.0
    name: str = "shared"
    isolated: bool = False

    def __post_init__(self) -> None:
        for stage in STAGES:
            share = self.share(stage)
            if not 0.0 < share <= 1.0:
                raise ValueError(f"SM share of {stage.value} must be in (0, 1], got {share}")

    def share(self, stage: Stage) -> float:
        if stage is Stage.DECODE:
            return self.decode
        return self.prefill if stage is Stage.PREFILL else self.vision

    @classmethod
    def shared(cls) -> Partition:
        return cls()


@dataclass(slots=True, frozen=True)
class ItemExtras:
    """The rarer parts of a batch item (kept apart so that the common item, a decode step,
    is built with few fields: the simulator builds millions)."""

    # KV blocks to copy (src, dst) before the item's tokens are written: copy-on-write of a
    # partially filled block it shares with a fork
    block_copies: tuple[tuple[int, int], ...] = ()
    # vision: the images (indices into the request's images) to encode; the others come from
    # the encoder cache or the front end. Of those, ``cache_images`` are kept in the encoder
    # cache under their hash once encoded.
    encode_images: tuple[int, ...] = ()
    cache_images: tuple[int, ...] = ()
    # prefill that reaches the end of the prompt: the forks (``n`` > 1) that also sample a
    # first token from this item's logits and then share its blocks
    fork_ids: tuple[str, ...] = ()


NO_EXTRAS = ItemExtras()


@dataclass(slots=True, frozen=True)
class BatchItem:
    """One request's part of a batch: everything the executor needs, as plain data."""

    request_id: str
    token_ids: tuple[int, ...] = ()  # prefill: tokens to compute; decode: the last output token
    num_cached_tokens: int = 0
    block_table: tuple[int, ...] = ()
    num_images: int = 0
    # False for a prefill chunk that does not reach the end of the prompt: no token is sampled
    # (and no RNG state consumed) for it.
    sample: bool = True
    extras: ItemExtras = NO_EXTRAS

    @property
    def block_copies(self) -> tuple[tuple[int, int], ...]:
        return self.extras.block_copies

    @property
    def encode_images(self) -> tuple[int, ...]:
        return self.extras.encode_images

    @property
    def cache_images(self) -> tuple[int, ...]:
        return self.extras.cache_images

    @property
    def fork_ids(self) -> tuple[str, ...]:
        return self.extras.fork_ids


@dataclass(slots=True, frozen=True)
class Batch:
    batch_id: int
    stage: Stage
    items: tuple[BatchItem, ...]
    partition: Partition
    start_s: float
    # encoder-cache entries (image hashes) to drop before the batch runs (evicted to make room
    # for the ones this batch adds)
    evict_mm_hashes: tuple[str, ...] = ()

    @property
    def request_ids(self) -> list[str]:
        return [it.request_id for it in self.items]

    @property
    def num_images(self) -> int:
        return sum(it.num_images for it in self.items)

    @property
    def num_tokens(self) -> int:
        return sum(len(it.token_ids) for it in self.items)

    @property
    def context_lens(self) -> list[int]:
        return [it.num_cached_tokens + len(it.token_ids) for it in self.items]


@dataclass(slots=True)
class StageResult:
    """What running a batch produced. ``end_s``: when the batch completed, on the clock of
    whoever drives the scheduler (an executor leaves it at ``batch.start_s``; the engine loop
    stamps it); ``new_token_ids``: the token sampled for each request (prefill and decode);
    ``failed``: request id -> reason for requests whose part failed."""

    batch: Batch
    end_s: float
    new_token_ids: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    # request id -> log-probabilities of its new token (requests that asked for them only)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.batch.start_s


@dataclass(slots=True, frozen=True)
class RequestEvent:
    """What a completed batch meant for one request, for streaming to its caller."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    # log-probabilities of ``new_token_ids`` when the request asked for them (else empty)
    logprobs: tuple[TokenLogprobs, ...] = ()
