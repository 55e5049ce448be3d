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
    hash (a key for caching its encoder output; None when nobody computed one)."""

    num_tokens: int
    mm_hash: str | None = None

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

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt")
        self.times = RequestTimes(arrival_s=self.arrival_s)

    @property
    def num_image_tokens(self) -> int:
        return sum(img.num_tokens for img in self.images)

    @property
    def needs_vision(self) -> bool:
        return bool(self.images)

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


@dataclass(slots=True, frozen=True)
class Batch:
    batch_id: int
    stage: Stage
    items: tuple[BatchItem, ...]
    partition: Partition
    start_s: float

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
