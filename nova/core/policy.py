"""The scheduling policy interface, its registry, and the first two policies.

A policy decides *when* a stage may run, *which* waiting requests it should take and in what
order, and the SM partition. The ``Scheduler`` (mechanism) turns a policy's ``BatchPlan`` into
a ``Batch``: it admits prefills only while their KV blocks fit, grows decode sequences and
preempts when blocks run out. Policies get the state and the time as arguments and never read
a clock, so the real engine and the simulator drive the same objects.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from nova.types import STAGES, Partition, Request, Stage, StageResult

if TYPE_CHECKING:
    from nova.core.scheduler import SchedulerState


@dataclass(slots=True, frozen=True)
class BatchPlan:
    """A policy's answer for one stage: candidates in the order to admit them, and limits.

    ``max_requests``/``max_tokens``/``max_images`` are upper bounds; the scheduler may admit
    fewer (e.g. KV blocks run out). For decode, ``request_ids`` are the running sequences to
    step; the scheduler preempts from the end of that order when blocks run out.

    Chunked prefill (time-sliced baselines): a PREFILL plan with ``chunked=True`` may split a
    prompt to fill ``max_tokens`` exactly; with ``decode_ids`` it first puts one decode token of
    each of those running sequences into the same batch (the token budget counts them).
    """

    stage: Stage
    request_ids: tuple[str, ...]
    max_requests: int | None = None
    max_tokens: int | None = None
    max_images: int | None = None
    chunked: bool = False
    decode_ids: tuple[str, ...] = ()


class Policy(ABC):
    name: ClassVar[str]
    # Declarations the simulator's fast path relies on to skip asking a stage that cannot get
    # a batch (defaults assume nothing; ``tests/test_simulator.py`` checks the built-ins make
    # the same decisions either way):
    # ``idle_without_queue``: ``next_batch`` has no side effects, and a stage can only get a
    # batch while some live request has that stage's waiting status.
    idle_without_queue: ClassVar[bool] = False
    # ``one_batch_at_a_time``: ``next_batch`` returns None while any batch runs (time-sliced).
    one_batch_at_a_time: ClassVar[bool] = False

    @abstractmethod
    def next_batch(self, stage: Stage, state: SchedulerState, now_s: float) -> BatchPlan | None:
        """The next batch for ``stage``, which is idle; None to leave it idle for now."""

    def partition(self, state: SchedulerState, now_s: float) -> Partition:
        return _SHARED  # == Partition.shared() (frozen: one instance serves every batch)

    def on_batch_done(  # noqa: B027 - optional hook, a no-op by default
        self, result: StageResult, state: SchedulerState, now_s: float
    ) -> None:
        """Told after the scheduler has applied ``result``."""


_SHARED = Partition.shared()

POLICIES: dict[str, Callable[..., Policy]] = {}


def register_policy(name: str) -> Callable[[type[Policy]], type[Policy]]:
    def wrap(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        POLICIES[name] = cls
        return cls

    return wrap


_BUILTIN_POLICY_MODULES = ("nova.core.baselines", "nova.core.nova_policy")


def available_policies() -> list[str]:
    """Names of all registered policies (imports the built-in policy modules once)."""
    import importlib

    for module in _BUILTIN_POLICY_MODULES:
        importlib.import_module(module)
    return sorted(POLICIES)


def make_policy(name: str, **kwargs: object) -> Policy:
    available_policies()
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}"
        ) from None
    return factory(**kwargs)


def service_order_key(req: Request) -> tuple[int, float, float]:
    """Lower priority value first, then earlier absolute deadline, then earlier arrival."""
    deadline_s = req.deadline_s  # inline of req.absolute_deadline_s (hot: every sort)
    return (
        req.priority,
        math.inf if deadline_s is None else req.arrival_s + deadline_s,
        req.arrival_s,
    )


def prefill_head_fits(state: SchedulerState, max_tokens: int | None = None) -> bool:
    """Whether the best-ranked waiting prefill (its next ``max_tokens`` tokens, or all) can get
    its KV blocks now. Time-sliced policies must not pick prefill when it cannot: the blocks
    are held by decoding sequences, which only a decode step (finishing or preempting) frees."""
    queue = state.queue(Stage.PREFILL)
    if not queue:
        return True
    head = min(queue, key=service_order_key)
    left = len(head.prefill_token_ids) - head.num_computed_tokens
    take = left if max_tokens is None else min(left, max_tokens)
    return state.block_manager.can_allocate(head.request_id, head.num_computed_tokens + take)


@dataclass(slots=True)
class StageLimits:
    """Per-batch caps shared by the policies (engine flags set them)."""

    max_vision_images: int = 8
    max_prefill_tokens: int = 4096
    max_num_seqs: int = 64


def _plan(stage: Stage, state: SchedulerState, limits: StageLimits) -> BatchPlan | None:
    queue = state.queue(stage)
    if not queue:
        return None
    if len(queue) == 1:
        ordered: tuple[str, ...] = (queue[0].request_id,)
    else:
        ordered = tuple([r.request_id for r in sorted(queue, key=service_order_key)])
    if stage is Stage.VISION:
        return BatchPlan(stage, ordered, max_images=limits.max_vision_images)
    if stage is Stage.PREFILL:
        return BatchPlan(
            stage, ordered, max_tokens=limits.max_prefill_tokens, max_requests=limits.max_num_seqs
        )
    return BatchPlan(stage, ordered, max_requests=limits.max_num_seqs)


@register_policy("multi_stream")
class MultiStreamPolicy(Policy):
    """All three stage workers run concurrently whenever they have work; no SM partitioning
    (the paper's multi-stream baseline: streams contend for the whole GPU)."""

    idle_without_queue = True

    def __init__(self, limits: StageLimits | None = None) -> None:
        self.limits = limits or StageLimits()

    def next_batch(self, stage: Stage, state: SchedulerState, now_s: float) -> BatchPlan | None:
        return _plan(stage, state, self.limits)


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
