"""The scheduling policy interface: what a policy sees, what it answers, and its registry.

A policy decides *when* a stage may run, *which* waiting requests it should take and in what
order, and the SM partition. Its input is a ``SchedulerState`` (read-only for policies), its
answer a ``BatchPlan``; the ``Scheduler`` (mechanism, ``nova.core.scheduler``) turns the plan
into a ``Batch``: it admits prefills only while their KV blocks fit, grows decode sequences and
preempts when blocks run out. Policies get the state and the time as arguments and never read
a clock, so the real engine and the simulator drive the same objects.

The policies themselves: ``nova.core.baselines`` (sequential, multi_stream, pf_limit,
chunked_prefill, static_partition) and ``nova.core.nova_policy`` (nova).
"""

from __future__ import annotations

import importlib
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import ClassVar, TypeVar

from nova.core.block_manager import BlockManager
from nova.registry import Registry
from nova.types import Batch, Partition, Request, RequestStatus, Stage, StageResult

# The status of a live request waiting for (or, for decode, between steps of) each stage.
WAITING_STATUS: dict[Stage, RequestStatus] = {
    Stage.VISION: RequestStatus.WAITING_VISION,
    Stage.PREFILL: RequestStatus.WAITING_PREFILL,
    Stage.DECODE: RequestStatus.DECODING,
}
# Enum members as module constants: ``Stage.DECODE`` is looked up through the enum's metaclass
# (about ten times a global's cost in CPython 3.11), and the hot paths below test them for
# every batch and item.
_VISION, _PREFILL, _DECODE = Stage.VISION, Stage.PREFILL, Stage.DECODE

# One frozen instance serves every batch of a policy that does not partition SMs.
SHARED_PARTITION = Partition.shared()


@dataclass(slots=True)
class SchedulerState:
    """What policies may look at (the scheduler owns and mutates it; policies only read).

    ``requests`` holds live (not yet done) requests in arrival order.
    """

    block_manager: BlockManager
    requests: dict[str, Request] = field(default_factory=dict)
    # live requests by status, each in the order they entered it (kept by ``set_status``)
    by_status: dict[RequestStatus, dict[str, Request]] = field(
        default_factory=lambda: {s: {} for s in WAITING_STATUS.values()}
    )
    running: dict[Stage, Batch | None] = field(default_factory=lambda: dict.fromkeys(Stage))
    in_flight: dict[str, Stage] = field(default_factory=dict)
    partition: Partition = SHARED_PARTITION
    num_preemptions: int = 0
    num_added: int = 0  # requests ever added (the newest are the last ``requests`` entries)

    def set_status(self, req: Request, status: RequestStatus) -> None:
        old = self.by_status.get(req.status)
        if old is not None:
            old.pop(req.request_id, None)
        req.status = status
        index = self.by_status.get(status)
        if index is not None:
            index[req.request_id] = req

    def queue(self, stage: Stage) -> list[Request]:
        """Requests waiting for ``stage`` and not inside a running batch, in the order they
        entered that stage (arrival order, except that a preempted request re-enters prefill
        later; policies rank with ``service_order_key`` anyway)."""
        index = self.by_status[WAITING_STATUS[stage]]
        in_flight = self.in_flight
        if not in_flight:
            return list(index.values())
        return [r for rid, r in index.items() if rid not in in_flight]

    def num_waiting(self, stage: Stage) -> int:
        """``len(queue(stage))`` without building the list."""
        index = self.by_status[WAITING_STATUS[stage]]
        in_flight = self.in_flight
        if not in_flight:
            return len(index)
        return sum([1 for rid in index if rid not in in_flight])

    def num_in_stage(self, stage: Stage) -> int:
        """Waiting for or running in ``stage``."""
        return len(self.by_status[WAITING_STATUS[stage]])

    def any_running(self) -> bool:
        running = self.running
        return (
            running[_VISION] is not None
            or running[_PREFILL] is not None
            or running[_DECODE] is not None
        )


@dataclass(slots=True, frozen=True, init=False)
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

    def __init__(
        self,
        stage: Stage,
        request_ids: tuple[str, ...],
        max_requests: int | None = None,
        max_tokens: int | None = None,
        max_images: int | None = None,
        chunked: bool = False,
        decode_ids: tuple[str, ...] = (),
    ) -> None:
        # The generated __init__ of a frozen dataclass sets each field through
        # object.__setattr__; the slots' own setters cost about half, and every policy builds a
        # plan per step. (Same fields and defaults as declared above; tests/test_policies.py
        # checks the two agree.)
        _PLAN_STAGE(self, stage)
        _PLAN_IDS(self, request_ids)
        _PLAN_MAX_REQUESTS(self, max_requests)
        _PLAN_MAX_TOKENS(self, max_tokens)
        _PLAN_MAX_IMAGES(self, max_images)
        _PLAN_CHUNKED(self, chunked)
        _PLAN_DECODE_IDS(self, decode_ids)


# (unpacked: a field added to BatchPlan fails here until its __init__ sets it too)
(
    _PLAN_STAGE,
    _PLAN_IDS,
    _PLAN_MAX_REQUESTS,
    _PLAN_MAX_TOKENS,
    _PLAN_MAX_IMAGES,
    _PLAN_CHUNKED,
    _PLAN_DECODE_IDS,
) = (getattr(BatchPlan, f.name).__set__ for f in fields(BatchPlan))


class Policy(ABC):
    name: ClassVar[str]
    # Variant parameters a policy name may carry, ``chunked_prefill[budget=512]``: short key ->
    # constructor keyword (``make_policy`` parses them; see ``parse_policy_name``).
    variant_params: ClassVar[dict[str, str]] = {}
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
        return SHARED_PARTITION

    def on_batch_done(  # noqa: B027 - optional hook, a no-op by default
        self, result: StageResult, state: SchedulerState, now_s: float
    ) -> None:
        """Told after the scheduler has applied ``result``."""


# -- registry ------------------------------------------------------------------------------------
POLICIES: Registry[type[Policy]] = Registry("policy")
_P = TypeVar("_P", bound=type[Policy])


def register_policy(name: str) -> Callable[[_P], _P]:
    """Class decorator: register a ``Policy`` subclass under ``name`` (its ``name``)."""

    def wrap(cls: _P) -> _P:
        POLICIES.add(name, cls)
        cls.name = name
        return cls

    return wrap


_BUILTIN_POLICY_MODULES = ("nova.core.baselines", "nova.core.nova_policy")


def available_policies() -> list[str]:
    """Names of all registered policies (imports the built-in policy modules once)."""
    for module in _BUILTIN_POLICY_MODULES:
        importlib.import_module(module)
    return POLICIES.names()


def make_policy(name: str, **kwargs: object) -> Policy:
    """The policy registered as ``name``, built with ``kwargs``; ``ValueError`` naming the
    choices if unknown. ``name`` may carry variant parameters, ``chunked_prefill[budget=512]``
    (``parse_policy_name``); ``kwargs`` win over them."""
    cls, params = check_policy_name(name)
    variant = {cls.variant_params[key]: value for key, value in params.items()}
    return cls(**{**variant, **kwargs})


def check_policy_name(name: str) -> tuple[type[Policy], dict[str, int | float | str]]:
    """The policy class ``name`` names and its variant parameters, checked (``ValueError``
    naming the choices for an unknown policy or parameter), without building it."""
    available_policies()
    base, params = parse_policy_name(name)
    cls = POLICIES.lookup(base)
    for key in params:
        if key not in cls.variant_params:
            known = ", ".join(sorted(cls.variant_params)) or "none"
            raise ValueError(
                f"policy {base!r} has no variant parameter {key!r}; its parameters: {known}"
            )
    return cls, params


_VARIANT_RE = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\[(.*)\])?\s*$")


def parse_policy_name(name: str) -> tuple[str, dict[str, int | float | str]]:
    """``"chunked_prefill[budget=512]"`` -> ``("chunked_prefill", {"budget": 512})``: the base
    name and its variant parameters (ints, floats, or strings as written). A plain name has
    none. ``ValueError`` for a malformed name."""
    match = _VARIANT_RE.match(name)
    if match is None:
        raise ValueError(f"malformed policy name {name!r}; expected NAME or NAME[key=value,...]")
    base, body = match.group(1), match.group(2)
    params: dict[str, int | float | str] = {}
    if body is None:
        return base, params
    for part in body.split(","):
        key, sep, raw = part.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise ValueError(f"malformed variant parameter {part!r} in policy name {name!r}")
        if key in params:
            raise ValueError(f"variant parameter {key!r} given twice in {name!r}")
        params[key] = _parse_value(raw)
    return base, params


def _parse_value(raw: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def policy_name(base: str, **params: object) -> str:
    """The inverse of ``parse_policy_name``: ``policy_name("pf_limit", limit=2)`` ->
    ``"pf_limit[limit=2]"`` (parameters in the order given)."""
    if not params:
        return base
    return f"{base}[{','.join(f'{k}={v}' for k, v in params.items())}]"


# -- what policies share -------------------------------------------------------------------------
@dataclass(slots=True)
class StageLimits:
    """Per-batch caps shared by the policies (engine flags set them)."""

    max_vision_images: int = 8
    max_prefill_tokens: int = 4096
    max_num_seqs: int = 64


def service_order_key(req: Request) -> tuple[int, float, float]:
    """Lower priority value first, then earlier absolute deadline, then earlier arrival."""
    deadline_s = req.deadline_s  # inline of req.absolute_deadline_s (hot: every sort)
    return (
        req.priority,
        math.inf if deadline_s is None else req.arrival_s + deadline_s,
        req.arrival_s,
    )


def earliest_key(state: SchedulerState, stage: Stage) -> tuple[int, float, float] | None:
    """The ``service_order_key`` of ``stage``'s best-ranked waiting request; None if none waits.
    (``queue()`` is in arrival order, but priority/deadline may reorder: the whole queue is
    ranked.)"""
    queue = state.queue(stage)
    return min(map(service_order_key, queue)) if queue else None


def prefill_head_fits(state: SchedulerState, max_tokens: int | None = None) -> bool:
    """Whether the best-ranked waiting prefill (its next ``max_tokens`` tokens, or all) can get
    its KV blocks now. Time-sliced policies must not pick prefill when it cannot: the blocks
    are held by decoding sequences, which only a decode step (finishing or preempting) frees."""
    queue = state.queue(_PREFILL)
    if not queue:
        return True
    head = min(queue, key=service_order_key)
    left = len(head.prefill_token_ids) - head.num_computed_tokens
    take = left if max_tokens is None else min(left, max_tokens)
    return state.block_manager.can_allocate(head.request_id, head.num_computed_tokens + take)


def plan_in_service_order(
    stage: Stage, state: SchedulerState, limits: StageLimits
) -> BatchPlan | None:
    """Every request waiting for ``stage``, in service order (``service_order_key``), capped
    by ``limits``; None if none waits."""
    queue = state.queue(stage)
    if not queue:
        return None
    if len(queue) == 1:
        ordered: tuple[str, ...] = (queue[0].request_id,)
    else:
        ordered = tuple([r.request_id for r in sorted(queue, key=service_order_key)])
    # (positional: the decode plan is built for every step, and keywords cost a fifth more)
    if stage is _VISION:  # max_images
        return BatchPlan(stage, ordered, None, None, limits.max_vision_images)
    if stage is _PREFILL:  # max_requests, max_tokens
        return BatchPlan(stage, ordered, limits.max_num_seqs, limits.max_prefill_tokens)
    return BatchPlan(stage, ordered, limits.max_num_seqs)  # max_requests
