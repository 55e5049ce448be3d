"""The baselines Nova is measured against, all behind the same ``Policy`` interface.

- ``sequential``: one stage at a time, first come first served, run-to-completion batching (what
  a naive server does).
- ``multi_stream``: all stages concurrently whenever they have work, no SM partitioning (streams
  contend for the whole GPU).
- ``pf_limit``: time-sliced (one batch at a time on the whole GPU), prefill-first: waiting
  vision/prefill work runs before decode, but after ``max_consecutive_prefills`` front-stage
  batches in a row while sequences wait to decode, one decode step must run (the limit).
- ``chunked_prefill``: time-sliced, vLLM-style: every step carries one decode token of every
  running sequence plus prompt chunks filling a token budget (default 128, decode tokens
  included); the images of the requests a step reaches are encoded in a step before it, as
  vLLM V1 runs its encoder before a step's forward (``chunk_encoder_ids``).
- ``static_partition``: all stages concurrently, each on a fixed, isolated SM share.

Tuned variants are named with their parameters (``nova.core.policy.parse_policy_name``):
``chunked_prefill[budget=512]``, ``pf_limit[limit=2]``,
``static_partition[vision=0.4,prefill=0.4,decode=0.2]``. ``prefill_first_stage`` and
``chunked_prefill_plan`` are the two time-sliced disciplines as functions, so the ``nova`` policy
runs exactly the same discipline when it chooses one of them as its mode.
"""

from __future__ import annotations

from typing import ClassVar

from nova.core.policy import (
    BatchPlan,
    Policy,
    SchedulerState,
    StageLimits,
    earliest_key,
    plan_in_service_order,
    prefill_head_fits,
    register_policy,
    service_order_key,
)
from nova.types import STAGES, Partition, Request, RequestStatus, Stage, StageResult


@register_policy("multi_stream")
class MultiStreamPolicy(Policy):
    """All three stage workers run concurrently whenever they have work; no SM partitioning
    (the paper's multi-stream baseline: streams contend for the whole GPU)."""

    idle_without_queue = True

    def __init__(self, limits: StageLimits | None = None) -> None:
        self.limits = limits or StageLimits()

    def next_batch(self, stage: Stage, state: SchedulerState, now_s: float) -> BatchPlan | None:
        return plan_in_service_order(stage, state, self.limits)


@register_policy("sequential")
class SequentialPolicy(Policy):
    """One stage at a time, first come first served: what a naive server does.

    When nothing runs, the stage that holds the earliest-arrived waiting request goes next
    (decoding requests count as waiting for decode), batched in arrival order. Because running
    requests are older than new arrivals, the decode set drains before new requests start:
    run-to-completion batching.
    """

    idle_without_queue = True
    one_batch_at_a_time = True

    def __init__(self, limits: StageLimits | None = None) -> None:
        self.limits = limits or StageLimits()

    def next_batch(self, stage: Stage, state: SchedulerState, now_s: float) -> BatchPlan | None:
        if state.any_running():
            return None
        own = state.queue(stage)
        if not own:
            return None  # its head would be infinitely late
        # ``stage`` goes iff its head is the earliest (ties: the earlier stage in STAGES); a
        # prefill head that cannot get its blocks while sequences decode counts as never.
        decoding = stage is Stage.DECODE or bool(state.queue(Stage.DECODE))
        if stage is Stage.PREFILL and decoding and not prefill_head_fits(state):
            return None
        own_head = min([r.arrival_s for r in own])
        own_index = STAGES.index(stage)
        for other in _SEQUENTIAL_RIVALS:  # cheapest and likeliest rivals first
            if other is stage:
                continue
            queue = state.queue(other)
            if not queue:
                continue
            head = min([r.arrival_s for r in queue])
            if head < own_head or (head == own_head and STAGES.index(other) < own_index):
                if other is Stage.PREFILL and decoding and not prefill_head_fits(state):
                    continue  # decode must free blocks first
                return None
        by_arrival = tuple([r.request_id for r in sorted(own, key=_arrival_s)])
        limits = self.limits
        if stage is Stage.VISION:
            return BatchPlan(stage, by_arrival, max_images=limits.max_vision_images)
        if stage is Stage.PREFILL:
            return BatchPlan(stage, by_arrival, limits.max_num_seqs, limits.max_prefill_tokens)
        return BatchPlan(stage, by_arrival, limits.max_num_seqs)


_SEQUENTIAL_RIVALS = (Stage.DECODE, Stage.VISION, Stage.PREFILL)


def _arrival_s(req: Request) -> float:
    return req.arrival_s


def front_stage(state: SchedulerState) -> Stage | None:
    """VISION or PREFILL, whichever holds the best-ranked waiting request; None if neither."""
    # (the best of (rank, stage) pairs: equal ranks go to the smaller stage value, prefill)
    best = None
    for stage in (Stage.VISION, Stage.PREFILL):
        key = earliest_key(state, stage)
        if key is not None:
            ranked = (key, stage)
            if best is None or ranked < best:
                best = ranked
    return best[1] if best is not None else None


def prefill_first_stage(state: SchedulerState, streak: int, limit: int) -> Stage | None:
    """The stage a prefill-first, time-sliced server runs next: the front stage (vision or
    prefill) unless ``streak`` front batches ran in a row while sequences wait to decode and
    ``streak >= limit``; decode when the prefill head cannot get its KV blocks (only decode
    frees them). None when nothing waits."""
    front = front_stage(state)
    has_decode = bool(state.queue(Stage.DECODE))
    if front is Stage.PREFILL and has_decode and not prefill_head_fits(state):
        front = Stage.VISION if state.queue(Stage.VISION) else None  # decode frees blocks
    if front is not None and (not has_decode or streak < limit):
        return front
    return Stage.DECODE if has_decode else None


def chunked_prefill_plan(
    stage: Stage, state: SchedulerState, limits: StageLimits, token_budget: int
) -> BatchPlan | None:
    """vLLM-style chunked prefill for ``stage`` (time-sliced: the caller checks that nothing
    runs): one step of every decoding sequence's next token plus prompt chunks filling
    ``token_budget`` (decode tokens count), preceded by an encoder step for the images of the
    requests that step reaches (``chunk_encoder_ids``); a plain decode step when no prompt
    waits."""
    encode = chunk_encoder_ids(state, limits, token_budget)
    if encode:
        if stage is not Stage.VISION:
            return None
        return BatchPlan(Stage.VISION, encode, max_requests=len(encode))
    if state.queue(Stage.PREFILL):
        if stage is not Stage.PREFILL:
            return None
        ordered = tuple(
            r.request_id for r in sorted(state.queue(Stage.PREFILL), key=service_order_key)
        )
        return BatchPlan(
            Stage.PREFILL,
            ordered,
            max_tokens=token_budget,
            max_requests=limits.max_num_seqs,
            chunked=True,
            decode_ids=_decode_ids(state, limits),
        )
    if stage is not Stage.DECODE:
        return None
    decode_ids = _decode_ids(state, limits)
    if decode_ids:
        return BatchPlan(Stage.DECODE, decode_ids, max_requests=limits.max_num_seqs)
    return None


def chunk_encoder_ids(
    state: SchedulerState, limits: StageLimits, token_budget: int
) -> tuple[str, ...]:
    """The requests whose images the next fused step needs encoded first, in service order.

    vLLM V1 schedules, for every request whose tokens enter a step, the encoder inputs those
    tokens reach, within an encoder budget of ``max(max_num_batched_tokens, largest item)``
    image tokens, and runs the encoder before the step's forward. Here the step's reach is
    walked the same way: waiting prompts in service order (vision's and prefill's queues
    together), each taking its uncomputed tokens from what the decode tokens leave of
    ``token_budget``, until the budget or ``max_num_seqs`` is spent; every reached request that
    still needs the encoder is encoded first, while the images fit the encoder budget (and the
    engine's ``max_vision_images``). A request's images are encoded before its first chunk
    (vLLM waits for the chunk that reaches the image's position: the same work, at most one
    step earlier; here a prompt cannot be prefilled before its images). Empty when the reach
    holds no such request (then the step is the fused one)."""
    vision_queue = state.queue(Stage.VISION)
    if not vision_queue:
        return ()
    waiting = sorted([*vision_queue, *state.queue(Stage.PREFILL)], key=service_order_key)
    tokens_left = token_budget - min(len(state.queue(Stage.DECODE)), limits.max_num_seqs)
    encode: list[str] = []
    encoder_tokens = num_images = largest_image = 0
    for num_reached, req in enumerate(waiting):
        if num_reached and (tokens_left <= 0 or num_reached >= limits.max_num_seqs):
            break
        if req.status is RequestStatus.WAITING_VISION:
            sizes = [req.images[i].num_tokens for i in req.images_to_encode]
            largest_image = max([largest_image, *sizes])
            if encode and (
                encoder_tokens + sum(sizes) > max(token_budget, largest_image)
                or num_images + len(sizes) > limits.max_vision_images
            ):
                break  # vLLM ends the step's tokens before an image it cannot encode
            encode.append(req.request_id)
            encoder_tokens += sum(sizes)
            num_images += len(sizes)
        tokens_left -= req.num_uncached_prompt_tokens
    return tuple(encode)


def _decode_ids(state: SchedulerState, limits: StageLimits) -> tuple[str, ...]:
    """The decoding sequences, best-ranked first, at most ``max_num_seqs``."""
    decode_ids = tuple(
        r.request_id for r in sorted(state.queue(Stage.DECODE), key=service_order_key)
    )
    return decode_ids[: limits.max_num_seqs]


@register_policy("pf_limit")
class PrefillFirstLimitPolicy(Policy):
    idle_without_queue = True
    one_batch_at_a_time = True
    variant_params: ClassVar[dict[str, str]] = {"limit": "max_consecutive_prefills"}

    def __init__(
        self, limits: StageLimits | None = None, max_consecutive_prefills: int = 4
    ) -> None:
        if max_consecutive_prefills < 1:
            raise ValueError("max_consecutive_prefills must be >= 1")
        self.limits = limits or StageLimits()
        self.max_consecutive_prefills = max_consecutive_prefills
        self._streak = 0  # front-stage batches since the last decode step

    def next_batch(self, stage: Stage, state: SchedulerState, now_s: float) -> BatchPlan | None:
        # (an empty queue gets no plan whatever prefill_first_stage says)
        if (
            state.any_running()
            or not state.num_waiting(stage)
            or prefill_first_stage(state, self._streak, self.max_consecutive_prefills) is not stage
        ):
            return None
        return plan_in_service_order(stage, state, self.limits)

    def on_batch_done(self, result: StageResult, state: SchedulerState, now_s: float) -> None:
        self._streak = 0 if result.batch.stage is Stage.DECODE else self._streak + 1


@register_policy("chunked_prefill")
class ChunkedPrefillPolicy(Policy):
    idle_without_queue = True  # a mixed batch needs a waiting prefill (decode rides along)
    one_batch_at_a_time = True
    variant_params: ClassVar[dict[str, str]] = {"budget": "token_budget"}

    def __init__(self, limits: StageLimits | None = None, token_budget: int = 128) -> None:
        if token_budget < 1:
            raise ValueError("token_budget must be >= 1")
        self.limits = limits or StageLimits()
        self.token_budget = token_budget

    def next_batch(self, stage: Stage, state: SchedulerState, now_s: float) -> BatchPlan | None:
        if state.any_running() or not state.num_waiting(stage):
            return None  # (each branch of chunked_prefill_plan needs a request waiting)
        return chunked_prefill_plan(stage, state, self.limits, self.token_budget)


@register_policy("static_partition")
class StaticPartitionPolicy(Policy):
    """All three stages concurrently, like ``multi_stream``, on a fixed split: ``partition``,
    or shares ``vision_share``/``prefill_share``/``decode_share`` (default the paper's
    40/40/20). Shares that co-run must fit the device: their sum is at most 1."""

    idle_without_queue = True
    variant_params: ClassVar[dict[str, str]] = {
        "vision": "vision_share",
        "prefill": "prefill_share",
        "decode": "decode_share",
    }

    def __init__(
        self,
        limits: StageLimits | None = None,
        partition: Partition | None = None,
        vision_share: float = 0.4,
        prefill_share: float = 0.4,
        decode_share: float = 0.2,
    ) -> None:
        self.limits = limits or StageLimits()
        if partition is None:
            total = vision_share + prefill_share + decode_share
            if total > 1.0 + 1e-9:
                raise ValueError(
                    f"static_partition shares sum to {total:.3f} > 1: co-running stages cannot "
                    "get more SMs than the device has"
                )
            partition = Partition(
                vision_share, prefill_share, decode_share, name="static", isolated=True
            )
        self.fixed = partition

    def next_batch(self, stage: Stage, state: SchedulerState, now_s: float) -> BatchPlan | None:
        return plan_in_service_order(stage, state, self.limits)

    def partition(self, state: SchedulerState, now_s: float) -> Partition:
        return self.fixed
