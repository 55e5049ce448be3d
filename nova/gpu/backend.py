"""The SM-partition backend interface and the two backends without SM limits.

A backend runs a stage's batch inside ``activate(stage, partition)``: on the stream (and, for
green contexts, the SMs) that the stage gets under that partition.

- ``cpu`` (``CpuBackend``): CPU partitions: each stage worker on its own cores with its own
  intra-op thread count (``nova.gpu.cpu_cores``, ``nova.gpu.cpu_threads``); cores are the "SMs".
- ``none`` (``StreamBackend``): one CUDA stream per stage; partitions are recorded, not
  enforced (stages contend freely).

The green-context backend is in ``nova.gpu.green_context``; ``nova.gpu.partition.make_backend``
picks one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TypeVar

from nova.gpu.cpu_contention import ContentionMonitor, TimedCall
from nova.gpu.cpu_cores import MIN_SPLIT_CORES, CoreBroker
from nova.gpu.cpu_threads import TeamThread, apply_cores, available_cores, cores_for_block
from nova.gpu.sm_plan import SHARE_EPS, SMGrid
from nova.gpu.streams import CudaStream, CudaStreams
from nova.types import STAGES, Partition, Stage

T = TypeVar("T")


class PartitionUnavailable(ValueError):
    """A requested partition backend cannot run here (a ValueError: CLIs report it as bad input)."""


@dataclass(slots=True, frozen=True)
class GrantedPartition:
    """One created partition of one stage: what was asked for and what the driver granted."""

    stage: str
    plan: str
    requested_sms: int
    granted_sms: int | None
    granted_source: str  # "driver" (read back), "driver-probe" (same split, dry run), "planned"


class PartitionBackend:
    """Runs a stage's batch inside ``activate(stage, partition)``; subclasses per mechanism."""

    name = "base"

    def __init__(self, grid: SMGrid) -> None:
        self.grid = grid

    @property
    def enforces_limits(self) -> bool:
        return False

    def prepare(self, partitions: Iterable[Partition]) -> None:
        """Create ahead of time whatever the partitions the policy may choose need."""

    @contextlib.contextmanager
    def activate(self, stage: Stage, partition: Partition) -> Iterator[CudaStream | None]:
        """Run the enclosed work as ``stage`` under ``partition``; yields the stream to
        synchronise (``None`` on a CPU)."""
        yield None

    def run(self, stage: Stage, partition: Partition, fn: Callable[[CudaStream | None], T]) -> T:
        """``fn(stream)`` as ``stage``'s batch under ``partition``: inside ``activate`` on the
        calling thread (the CPU backend runs it on the stage's team thread instead)."""
        with self.activate(stage, partition) as stream:
            return fn(stream)

    def granted_sms(self, stage: Stage, partition: Partition) -> int:
        """SMs the stage really runs on under ``partition`` (the whole device if unlimited)."""
        return self.grid.num_sms

    def wait_turn(self, stage: Stage, partition: Partition) -> None:
        """Block until ``stage`` could start a batch under ``partition`` at once (where
        stages take turns on the device; at once here). Stage workers call it before they
        plan a batch, so the batch holds what queued while they waited."""

    def decline_turn(self, stage: Stage) -> None:
        """``stage``'s worker found nothing to run: stages waiting for it need not."""

    @property
    def may_take_turns(self) -> bool:
        """Whether stages may take turns here (``wait_turn`` may block): never on a GPU."""
        return False

    def rank_turn(self, stage: Stage, rank: tuple[float, ...] | None) -> None:
        """``stage``'s earliest waiting request in the engine's service order (None: none):
        where stages take turns, the front stage with the lowest rank goes first."""

    def close(self) -> None:
        """Release what ``run`` keeps between batches (the engine calls it when it stops)."""

    def share_context(self, share: float) -> AbstractContextManager[object]:
        """A context manager running the enclosed work on ``share`` of the SMs (for
        ``nova profile``: ``share_context=backend.share_context``)."""
        if share < 1.0 - SHARE_EPS:
            raise PartitionUnavailable(
                f"the {self.name!r} partition backend cannot limit SMs, so share {share} cannot be "
                "measured; use --partition green_context on a GPU that supports it"
            )
        return contextlib.nullcontext()

    def share_granted_sms(self, share: float) -> int:
        """SMs the work inside ``share_context(share)`` runs on."""
        return self.grid.num_sms

    def created(self) -> list[GrantedPartition]:
        return []

    def stream(self, stage: Stage, partition: Partition) -> CudaStream | None:
        """The stream ``stage`` runs on under ``partition`` (e.g. to capture CUDA graphs per
        partition); ``None`` on a CPU."""
        return None

    def describe(self) -> str:
        return f"{self.name}: {self.grid.num_sms} SMs, no limits"


class CpuBackend(PartitionBackend):
    """CPU partitions: each stage's batch runs on its own cores with as many intra-op threads
    (``nova.gpu.cpu_cores`` plans, ``nova.gpu.cpu_threads`` applies), switched at batch
    boundaries. Cores stand in for SMs: ``grid`` has one "SM" per core, step 1."""

    name = "cpu"

    def __init__(
        self,
        num_cores: int | None = None,
        cores: Sequence[int] | None = None,
        adapt_to_contention: bool = False,
        monitor: ContentionMonitor | None = None,
        min_split_cores: int = MIN_SPLIT_CORES,
    ) -> None:
        if cores is None:
            cores = available_cores()
            if num_cores is not None:
                cores = tuple(range(num_cores)) if num_cores > len(cores) else cores[:num_cores]
        # other processes on these cores: batches run on fewer of them (``cpu_contention``)
        if monitor is None and adapt_to_contention and len(cores) > 1:
            monitor = ContentionMonitor(len(cores))
        self.monitor = monitor
        self.broker = CoreBroker(
            cores,
            monitor.current if monitor is not None else None,
            min_split_cores=min_split_cores,
            clock=time.monotonic,
        )
        super().__init__(self.broker.grid)
        self._apply = _apply_cores  # tests swap in a recorder
        self._created: dict[tuple[str, str], GrantedPartition] = {}
        self._teams: dict[Stage, TeamThread] = {}
        self._retired: list[TeamThread] = []  # retired while running; joined by ``close``
        self._teams_lock = threading.Lock()
        self.num_team_threads_started = 0

    @property
    def enforces_limits(self) -> bool:
        return True

    @property
    def cores(self) -> tuple[int, ...]:
        return self.broker.cores

    def prepare(self, partitions: Iterable[Partition]) -> None:
        for part in partitions:
            if part.isolated:
                self._record(part, self.broker.isolated_sets(part))

    def _record(self, partition: Partition, sets: dict[Stage, tuple[int, ...]]) -> None:
        plan = self.broker.plan(partition)
        for stage in STAGES:
            limit = plan.stage_sms(stage) if plan is not None else None
            requested = limit or self.grid.num_sms
            described = plan.describe() if plan is not None else "time-shared"
            key = (stage.value, described)
            if key not in self._created:
                self._created[key] = GrantedPartition(
                    stage.value, described, requested, len(sets[stage]), "affinity"
                )

    @contextlib.contextmanager
    def activate(self, stage: Stage, partition: Partition) -> Iterator[CudaStream | None]:
        # co-runs as asked, without turns: tools that time stages beside each other
        # (``benchmarks/gpu_sm_curves.py --smoke``) nest one activation inside another's
        grant = self.broker.acquire(stage, partition, take_turns=False)
        try:
            self._apply(grant.cores)
            yield None
        finally:
            self.broker.release(stage)

    def wait_turn(self, stage: Stage, partition: Partition) -> None:
        self.broker.wait_turn(stage, partition)

    def decline_turn(self, stage: Stage) -> None:
        self.broker.decline_turn(stage)

    def rank_turn(self, stage: Stage, rank: tuple[float, ...] | None) -> None:
        self.broker.rank_turn(stage, rank)

    @property
    def stages_take_turns(self) -> bool:
        """Whether shared batches always take turns here (too few cores to split)."""
        return self.broker.stages_take_turns

    @property
    def may_take_turns(self) -> bool:
        return self.broker.min_split_cores > 1

    def run(self, stage: Stage, partition: Partition, fn: Callable[[CudaStream | None], T]) -> T:
        """``fn(None)`` on the stage's team thread, on the cores granted for this batch."""
        grant = self.broker.acquire(stage, partition)
        timed: TimedCall[T] = TimedCall()
        try:
            team = self._team(stage, grant.num_cores)
            return team.run(grant.cores, timed.wrap(lambda: fn(None)))
        finally:
            alone = self.broker.release(stage)
            if alone and self.monitor is not None:
                # (beside another of our stages a thread shares cores by plan: not contention)
                self.monitor.record(timed.wall_s, timed.cpu_s)

    def _team(self, stage: Stage, num_cores: int) -> TeamThread:
        """The stage's team thread for a batch on ``num_cores`` cores, keeping the OpenMP pools
        of all team threads within the cores (``TeamThread`` says why): idle team threads of
        other stages with pools are retired first, then this stage's own if its pool is larger
        than this batch needs. A pool held by a running batch stays until that batch ends."""
        with self._teams_lock:
            team = self._teams.get(stage)
            self._retired = [t for t in self._retired if t.alive]  # (ended: nothing to join)

            def pooled() -> int:  # pool threads after this batch starts, + the initial thread
                mine = max(team.pool_size if team else 1, num_cores)
                others = sum(t.pool_size - 1 for s, t in self._teams.items() if s is not stage)
                return 1 + (mine - 1) + others

            for other, t in list(self._teams.items()):
                if pooled() <= self.grid.num_sms:
                    break
                if other is not stage and not t.busy and t.pool_size > 1:
                    t.retire()
                    self._retired.append(t)
                    del self._teams[other]
            if team is not None and pooled() > self.grid.num_sms and team.pool_size > num_cores:
                team.retire()
                self._retired.append(team)
                team = None
            if team is None:
                team = TeamThread(f"nova-{stage.value}-team", self._apply)
                self._teams[stage] = team
                self.num_team_threads_started += 1
            return team

    def close(self) -> None:
        """Retire every team thread (the engine calls it when it stops)."""
        with self._teams_lock:
            for t in self._teams.values():
                t.retire()
            teams = [*self._retired, *self._teams.values()]
            self._teams.clear()
            self._retired.clear()
        for t in teams:  # (outside the lock: a thread ends after its queued batch)
            t.join()

    def granted_sms(self, stage: Stage, partition: Partition) -> int:
        """Cores the stage's last batch ran on (before its first batch: what it would get)."""
        last = self.broker.last.get(stage)
        if last is not None:
            return last.num_cores
        if partition.isolated:
            return len(self.broker.isolated_sets(partition)[stage])
        return self.grid.num_sms

    def share_context(self, share: float) -> AbstractContextManager[object]:
        """The calling thread on ``share`` of the cores (the first ones), for ``nova profile``."""
        return cores_for_block(self.cores[: self.grid.sms_for_share(share)])

    def share_granted_sms(self, share: float) -> int:
        return self.grid.sms_for_share(share)

    def created(self) -> list[GrantedPartition]:
        return list(self._created.values())

    def describe(self) -> str:
        n = self.broker.min_split_cores
        return (
            f"cpu: {self.grid.num_sms} cores {list(self.cores)}; each stage worker on its own "
            "cores with as many intra-op threads, shared partitions split among running stages "
            f"down to {n} core{'s' if n > 1 else ''} each, else they take turns (decode first, "
            "then the front stage holding the earliest request)"
        )


def _apply_cores(cores: Sequence[int]) -> None:
    apply_cores(cores)


class StreamBackend(PartitionBackend):
    """``none``: one CUDA stream per stage; partitions are recorded, not enforced."""

    name = "none"

    def __init__(self, grid: SMGrid, cuda: CudaStreams) -> None:
        super().__init__(grid)
        self._cuda = cuda
        self._streams = {s: cuda.new_stream() for s in STAGES}

    @contextlib.contextmanager
    def activate(self, stage: Stage, partition: Partition) -> Iterator[CudaStream | None]:
        stream = self._streams[stage]
        with self._cuda.stream_guard(stream):
            yield stream

    def stream(self, stage: Stage, partition: Partition) -> CudaStream | None:
        return self._streams[stage]

    def describe(self) -> str:
        return f"none: one stream per stage on {self.grid.num_sms} SMs, no SM limits"
