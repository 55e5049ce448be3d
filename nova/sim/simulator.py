"""Discrete-event simulator: the real ``Scheduler`` and ``Policy`` objects on a virtual clock.

Only the executor differs from the engine: a batch's duration comes from a cost model. Batches
of different stages may run at the same time; their speeds depend on each other (shared HBM
bandwidth, and SMs too when the partition is ``shared``), so the simulator advances a fluid
model: each running batch has remaining work in [0, 1] and a rate ``1 / cost.time_s(work,
share, co_running, isolated)`` that is recomputed whenever a batch starts or ends. A batch keeps
the SM share it started with (partitions change at batch boundaries, as in the engine).

Torch-free. Output tokens are placeholders (EOS is never produced; requests run to max_tokens),
which is what latency simulation needs.
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from nova.core.block_manager import BlockManager
from nova.core.policy import Policy
from nova.core.scheduler import Scheduler
from nova.sampling_params import SamplingParams
from nova.types import STAGES, Batch, ImageInput, Request, Stage, StageResult

SIM_TOKEN = 1  # placeholder token id of simulated outputs
_EPS = 1e-9


class CostModelLike(Protocol):
    def time_s(self, work: Any, sm_share: float, co_running: Sequence[tuple[Any, float]] = (),
               isolated: bool = True) -> float: ...


def work_of(batch: Batch) -> Any:
    """The cost model's view of a batch (``nova.cost.base.StageWork``)."""
    from nova.cost.base import StageWork

    return StageWork.from_batch(batch)


@dataclass(slots=True)
class _Running:
    batch: Batch
    work: Any
    remaining: float = 1.0  # fraction of the batch's work still to do
    rate: float = 0.0  # fraction per second at the current co-running set


@dataclass(slots=True)
class BatchRecord:
    stage: Stage
    start_s: float
    end_s: float
    request_ids: tuple[str, ...]
    share: float


@dataclass(slots=True)
class SimResult:
    requests: list[Request]
    batches: list[BatchRecord]
    end_s: float
    num_preemptions: int

    def decisions(self, stage: Stage) -> list[tuple[str, ...]]:
        """The sequence of batches (request ids) the policy ran for ``stage``."""
        return [b.request_ids for b in self.batches if b.stage is stage]


@dataclass(slots=True, frozen=True)
class SimArrival:
    """One request to simulate. ``arrival_s`` None: a closed-loop step sent ``think_time_s``
    after the previous step of ``session_id`` finished."""

    request_id: str
    arrival_s: float | None
    num_text_tokens: int
    num_images: int
    max_tokens: int
    session_id: str | None = None
    think_time_s: float = 0.0
    priority: int = 0
    deadline_s: float | None = None


def arrivals_from_workload(workload: Any) -> list[SimArrival]:
    """``nova.workload.Workload`` -> arrivals (keeps the workload's session structure)."""
    return [SimArrival(r.request_id, r.arrival_s, r.num_text_tokens, len(r.images), r.max_tokens,
                       r.session_id, r.think_time_s, r.priority, r.deadline_s)
            for r in workload.requests]


class Simulator:
    def __init__(
        self,
        policy: Policy,
        cost_model: CostModelLike,
        num_kv_blocks: int,
        block_size: int = 16,
        image_tokens: int = 576,
        max_model_len: int | None = None,
        work_fn: Any = work_of,
        check_invariants: bool = False,
    ) -> None:
        self.scheduler = Scheduler(policy, BlockManager(num_kv_blocks, block_size), (), max_model_len)
        self.cost = cost_model
        self.image_tokens = image_tokens
        self.work_fn = work_fn
        self.check_invariants = check_invariants  # KV integrity after every event (tests)
        self._seq = itertools.count()

    def _make_request(self, a: SimArrival) -> Request:
        n_prompt = max(1, a.num_text_tokens) + a.num_images * self.image_tokens
        images = [ImageInput(f"{a.request_id}/{i}", self.image_tokens) for i in range(a.num_images)]
        return Request(a.request_id, [SIM_TOKEN] * n_prompt,
                       SamplingParams(max_tokens=a.max_tokens, ignore_eos=True), images,
                       a.priority, a.deadline_s)

    def _update_rates(self, running: dict[Stage, _Running]) -> None:
        for stage, r in running.items():
            others = [(o.work, o.batch.partition.share(s)) for s, o in running.items() if s is not stage]
            isolated = r.batch.partition.name != "shared"
            duration = self.cost.time_s(r.work, r.batch.partition.share(stage), others, isolated)
            r.rate = 1.0 / max(duration, 1e-9)

    def run(self, arrivals: Sequence[SimArrival], max_time_s: float = math.inf) -> SimResult:
        sched = self.scheduler
        heap: list[tuple[float, int, SimArrival]] = []
        by_session: dict[str, list[SimArrival]] = {}
        for a in arrivals:
            if a.arrival_s is not None:
                heapq.heappush(heap, (a.arrival_s, next(self._seq), a))
            elif a.session_id is None:
                raise ValueError(f"{a.request_id}: a request without arrival time needs a session")
            if a.session_id is not None and a.arrival_s is None:
                by_session.setdefault(a.session_id, []).append(a)
        session_of: dict[str, str] = {a.request_id: a.session_id for a in arrivals if a.session_id}
        requests: list[Request] = []
        records: list[BatchRecord] = []
        running: dict[Stage, _Running] = {}
        t = 0.0
        changed = False  # the running set changed since the rates were computed
        while True:
            started = changed
            for stage in STAGES:
                if stage not in running:
                    batch = sched.schedule(stage, t)
                    if batch is not None:
                        running[stage] = _Running(batch, self.work_fn(batch))
                        started = True
            if started:
                self._update_rates(running)
            changed = False
            next_done = min((t + r.remaining / r.rate for r in running.values()), default=math.inf)
            next_arrival = heap[0][0] if heap else math.inf
            t_next = min(next_done, next_arrival)
            if t_next == math.inf:
                if sched.has_unfinished():
                    raise RuntimeError(
                        f"simulation stalled at t={t:.3f}s: {len(sched.state.requests)} requests "
                        f"left but the policy schedules nothing")
                break
            if t_next > max_time_s:
                break
            for r in running.values():
                r.remaining -= r.rate * (t_next - t)
            t = t_next
            for stage in [s for s, r in running.items() if r.remaining <= 1e-9]:
                r = running.pop(stage)
                changed = True
                tokens = {it.request_id: SIM_TOKEN for it in r.batch.items if it.sample}
                events = sched.complete(StageResult(r.batch, t, tokens if stage is not Stage.VISION else {}), t)
                records.append(BatchRecord(stage, r.batch.start_s, t, tuple(r.batch.request_ids),
                                           r.batch.partition.share(stage)))
                for ev in events:
                    sid = session_of.get(ev.request_id)
                    if ev.finished and sid in by_session and by_session[sid]:
                        nxt = by_session[sid].pop(0)
                        heapq.heappush(heap, (t + nxt.think_time_s, next(self._seq), nxt))
            if self.check_invariants:
                sched.block_manager.check_integrity()
            while heap and heap[0][0] <= t + _EPS:
                _, _, a = heapq.heappop(heap)
                req = self._make_request(a)
                sched.add_request(req, max(t, a.arrival_s if a.arrival_s is not None else t))
                requests.append(req)
        return SimResult(requests, records, t, sched.state.num_preemptions)


@dataclass(slots=True)
class FixedCostModel:
    """Constant duration per stage, no interference: for parity tests and quick experiments."""

    durations_s: dict[Stage, float] = field(default_factory=lambda: {s: 0.01 for s in Stage})
    name: str = "fixed"

    def time_s(self, work: Any, sm_share: float, co_running: Sequence[tuple[Any, float]] = (),
               isolated: bool = True) -> float:
        return self.durations_s[work.stage]
