"""CPU partitions, planned: which cores each stage worker runs on (torch-free, clock-free).

The CPU's version of SM partitions. A partition's shares become whole cores with the same
planning as SMs (``nova.gpu.sm_plan.plan_partition`` on a grid of the machine's cores, step 1),
and each group of co-running stages gets its own slice of the cores: decode from the top of
the core list, vision/prefill from the bottom, so a stage keeps its cores when the split moves.

Shared partitions (``Partition.shared()``: ``multi_stream``, the time-sliced baselines) have no
shares; there the cores are split evenly, at each batch start, among the stages running at that
moment (``CoreBroker``): a stage alone gets every core, two running stages get half each. When
more stages run than there are cores they time-share: decode keeps a core of its own when there
are at least two, the others take turns on the rest (one core: everyone shares it).

Why split at all: PyTorch's intra-op pool (OpenMP) of each worker thread starts as many threads
as it is told; three workers each starting a pool of every core put 3x the threads on the
cores, and every op's barrier then waits for a thread the OS has descheduled (measured on 2
cores: a 64-sequence decode step went from 140 ms to 3.4 s with another job on the cores).
``nova.gpu.cpu_threads`` applies a grant: affinity and intra-op thread count of the worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nova.gpu.sm_plan import PartitionPlan, SMGrid, plan_partition
from nova.types import Partition, Stage

# Slices are laid out from the bottom of the core list in this order; decode comes last, so it
# sits at the top.
_LAYOUT = (Stage.VISION, Stage.PREFILL, Stage.DECODE)
# Who gets a core left over by an uneven split.
_REMAINDER_FIRST = (Stage.DECODE, Stage.PREFILL, Stage.VISION)


@dataclass(slots=True, frozen=True)
class CoreGrant:
    """The cores one stage's batch runs on. ``time_shared``: another running stage was handed
    some of the same cores (more stages than cores)."""

    stage: Stage
    cores: tuple[int, ...]
    time_shared: bool = False

    @property
    def num_cores(self) -> int:
        return len(self.cores)


def core_grid(cores: Sequence[int]) -> SMGrid:
    """The cores as an SM grid: any whole number of cores, at least one."""
    return SMGrid(max(1, len(cores)), 1, 1)


def isolated_core_sets(plan: PartitionPlan, cores: Sequence[int]) -> dict[Stage, tuple[int, ...]]:
    """Disjoint core slices for the co-running groups of ``plan`` (stages of one group share
    theirs); an unlimited stage gets every core. Decode's group is laid out from the top."""
    cores = tuple(cores)
    out: dict[Stage, tuple[int, ...]] = {}
    bottom, top = 0, len(cores)
    for stages, n in sorted(plan.groups, key=lambda g: Stage.DECODE in g[0]):
        if Stage.DECODE in stages:
            chosen, top = cores[top - n : top], top - n
        else:
            chosen, bottom = cores[bottom : bottom + n], bottom + n
        for s in stages:
            out[s] = chosen
    for s, limit in plan.sms:
        if limit is None:
            out[s] = cores
    return out


def shared_core_slices(
    running: Sequence[Stage], cores: Sequence[int]
) -> dict[Stage, tuple[tuple[int, ...], bool]]:
    """(cores, time_shared) per running stage for an even split of ``cores``.

    ``k`` stages on ``n >= k`` cores: ``n // k`` each, the remainder to decode then prefill;
    ``k > n``: decode alone on the top core (if ``n >= 2``), the others round-robin over the
    rest, marked time-shared."""
    cores = tuple(cores)
    order = [s for s in _LAYOUT if s in set(running)]
    n, k = len(cores), len(order)
    out: dict[Stage, tuple[tuple[int, ...], bool]] = {}
    if k == 0:
        return out
    if k <= n:
        sizes = dict.fromkeys(order, n // k)
        for s in [s for s in _REMAINDER_FIRST if s in sizes][: n % k]:
            sizes[s] += 1
        start = 0
        for s in order:
            out[s] = (cores[start : start + sizes[s]], False)
            start += sizes[s]
        return out
    others: list[Stage] = [s for s in order if s is not Stage.DECODE]
    pool = cores
    if Stage.DECODE in order and n >= 2:
        out[Stage.DECODE] = ((cores[-1],), False)
        pool = cores[:-1]
    else:
        others = order
    for i, s in enumerate(others):
        out[s] = ((pool[i % len(pool)],), True)
    return out


class CoreBroker:
    """Hands each stage worker its cores at the start of every batch (thread-safe).

    Isolated partitions: the planned slice of ``plan_partition`` on the cores. Shared
    partitions: an even split among the stages running at that moment (``shared_core_slices``);
    stages that started earlier keep what they hold until their own next batch, so a split
    settles within one batch of each running stage.
    """

    def __init__(self, cores: Sequence[int], usable: Callable[[], int] | None = None) -> None:
        if not cores:
            raise ValueError("a CPU partition needs at least one core")
        self.cores = tuple(sorted(cores))
        # how many of the cores batches may run on now (other processes' use: the contention
        # monitor); None: all of them
        self._usable = usable
        self.grid = core_grid(self.cores)
        self._lock = threading.Lock()
        self._plans: dict[Partition, PartitionPlan | None] = {}
        self._isolated: dict[tuple[int | None, ...], dict[Stage, tuple[int, ...]]] = {}
        self._running: dict[Stage, CoreGrant] = {}
        # running stages that have had another stage's batch beside them since they started
        self._overlapped: set[Stage] = set()
        self.last: dict[Stage, CoreGrant] = {}

    def plan(self, partition: Partition) -> PartitionPlan | None:
        """Whole cores per stage; None when the partition's groups cannot each get a core of
        their own (fewer cores than co-running groups): its stages time-share."""
        with self._lock:
            return self._plan_locked(partition)

    def _plan_locked(self, partition: Partition) -> PartitionPlan | None:
        if partition not in self._plans:
            try:
                self._plans[partition] = plan_partition(partition, self.grid)
            except ValueError:  # more co-running groups than cores
                self._plans[partition] = None
        return self._plans[partition]

    def isolated_sets(self, partition: Partition) -> dict[Stage, tuple[int, ...]]:
        """The cores of each stage under an isolated ``partition`` (time-shared when it does
        not fit: the shared split of all three stages)."""
        with self._lock:
            plan = self._plan_locked(partition)
            if plan is None:
                split = shared_core_slices(list(Stage), self.cores)
                return {s: split[s][0] for s in split}
            return self._isolated_locked(plan)

    def _isolated_locked(self, plan: PartitionPlan) -> dict[Stage, tuple[int, ...]]:
        sets = self._isolated.get(plan.key)
        if sets is None:
            sets = self._isolated[plan.key] = isolated_core_sets(plan, self.cores)
        return sets

    def acquire(self, stage: Stage, partition: Partition) -> CoreGrant:
        usable = self._usable() if self._usable is not None else len(self.cores)
        with self._lock:
            plan = self._plan_locked(partition)
            # other processes use some of the cores: the running stages split the first
            # ``usable`` (one thread per core: a team thread the OS deschedules stalls its
            # partners at every barrier), whatever the partition
            capped = usable < len(self.cores)
            if not capped and partition.isolated and plan is not None and not plan.is_unlimited:
                grant = CoreGrant(stage, self._isolated_locked(plan)[stage])
            else:
                running = [*self._running, stage]
                pool = self.cores[: max(1, usable)]
                cores, shared = shared_core_slices(running, pool)[stage]
                grant = CoreGrant(stage, cores, shared)
            if self._running:
                self._overlapped.update(self._running)
                self._overlapped.add(stage)
            self._running[stage] = self.last[stage] = grant
            return grant

    def release(self, stage: Stage) -> bool:
        """End ``stage``'s batch; True when no other stage's batch ran beside it."""
        with self._lock:
            self._running.pop(stage, None)
            alone = stage not in self._overlapped
            self._overlapped.discard(stage)
            return alone

    def running(self) -> dict[Stage, CoreGrant]:
        with self._lock:
            return dict(self._running)
