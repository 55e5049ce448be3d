"""CPU partitions, planned: which cores each stage worker runs on (torch-free; clock passed in).

The CPU's version of SM partitions. A partition's shares become whole cores with the same
planning as SMs (``nova.gpu.sm_plan.plan_partition`` on a grid of the machine's cores, step 1),
and each group of co-running stages gets its own slice of the cores: decode from the top of
the core list, vision/prefill from the bottom, so a stage keeps its cores when the split moves.

Shared partitions (``Partition.shared()``: ``multi_stream``, the time-sliced baselines) have no
shares; there the cores are split evenly, at each batch start, among the stages running at that
moment (``CoreBroker``): a stage alone gets every core, two running stages get half each.

A split that would leave a stage fewer than ``min_split_cores`` cores is not made: the stages
take turns on every core instead, a batch at a time, decode first, then the front stage
holding the earliest request (``CoreBroker.acquire``, ``CoreBroker.rank_turn``);
``min_split_cores=1`` always splits. On 2 cores that is every split: a batch on 1 core runs
1.8-2.0x as long as on 2 (decode steps of 16 sequences: ``engine_cpu_overlap.md`` 214 vs 382
ms, ``engine_cpu.md`` 82-84 vs 153-161 ms; the front stages scale the same way), so two
stages on a core each finish no sooner than in turns, and decode's steps take twice as long
(``docs/cpu.md``). ``shared_core_slices`` says how cores are split when more stages than cores
run together (``min_split_cores=1``).

Why split at all: PyTorch's intra-op pool (OpenMP) of each worker thread starts as many threads
as it is told; three workers each starting a pool of every core put 3x the threads on the
cores, and every op's barrier then waits for a thread the OS has descheduled (measured on 2
cores: a 64-sequence decode step went from 140 ms to 3.4 s with another job on the cores).
``nova.gpu.cpu_threads`` applies a grant: affinity and intra-op thread count of the worker.
"""

from __future__ import annotations

import math
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
# The fewest cores a stage is split down to before stages take turns instead. 2: on this
# project's 2-core machine a batch on 1 core takes 1.8-2.0x its 2-core time (module docstring),
# so a 1-core split never beats turns. Splits into >= 2 cores per stage are not measured here
# (no machine with more cores): they keep the split.
MIN_SPLIT_CORES = 2
# After a decode step or a prefill batch ends, the other stages wait this long for decode's
# next step before taking a turn: the engine dispatches that step only after it has read the
# last batch's tokens (well under 1 ms on the 2-core machine in a scratch trace of the
# screenshot burst), so without it a waiting front batch would slip in between every two
# decode steps, and between a prefill batch and its sequences' first decode step. 20 ms is a
# chosen margin, not a measurement: far above that gap, a fraction of one decode step (tens
# of ms here, ``engine_cpu.md``), and cut short when decode's worker declines
# (``decline_turn``).
DECODE_GRACE_S = 0.02

# How the engine ranks a stage's earliest waiting request for a turn (lower first): its service
# order key, (priority, absolute deadline, arrival s).
TurnRank = tuple[float, ...]


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

    def __init__(
        self,
        cores: Sequence[int],
        usable: Callable[[], int] | None = None,
        min_split_cores: int = MIN_SPLIT_CORES,
        decode_grace_s: float = DECODE_GRACE_S,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not cores:
            raise ValueError("a CPU partition needs at least one core")
        if min_split_cores < 1:
            raise ValueError(f"min_split_cores must be at least 1, got {min_split_cores}")
        self.cores = tuple(sorted(cores))
        self.min_split_cores = min_split_cores
        self.decode_grace_s = decode_grace_s
        self._clock = clock
        # how many of the cores batches may run on now (other processes' use: the contention
        # monitor); None: all of them
        self._usable = usable
        self.grid = core_grid(self.cores)
        self._lock = threading.Condition()
        # stages waiting for a turn, in the order they came (decode goes first regardless)
        self._waiting: list[Stage] = []
        # each front stage's earliest waiting request as the engine ranks them (``rank_turn``):
        # the front stage with the lowest goes first; unranked ones after, in the order they
        # came
        self._ranks: dict[Stage, TurnRank | None] = {}
        self._ranked_s: dict[Stage, float] = {}  # when each rank last changed (clock)
        # when the last decode step or prefill batch ended (clock): decode may come next
        self._decode_due_s: float | None = None
        self.turns_waited = 0  # batches that waited for a turn (for reports and tests)
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

    def acquire(self, stage: Stage, partition: Partition, take_turns: bool = True) -> CoreGrant:
        """The cores for ``stage``'s next batch. A shared split that would leave a stage fewer
        than ``min_split_cores`` cores waits instead (blocking) until the stage may run alone:
        no batch running, decode first, then the front stage holding the earliest request
        (``rank_turn``; unranked: in the order they asked); after a decode
        step or a prefill batch the others give decode ``decode_grace_s`` to come.
        ``take_turns=False`` co-runs as asked (tools that measure co-running)."""
        usable = self._usable() if self._usable is not None else len(self.cores)
        with self._lock:
            pool = self._shared_pool_locked(partition, usable)
            if pool is None:
                plan = self._plan_locked(partition)
                assert plan is not None  # (``_shared_pool_locked``: a plan that fits)
                grant = CoreGrant(stage, self._isolated_locked(plan)[stage])
            elif take_turns and self._must_take_turns(len(pool)):
                waited = self._wait_turn_locked(stage)  # (releases the lock meanwhile)
                self.turns_waited += waited
                grant = CoreGrant(stage, pool)
            else:
                running = [*self._running, stage]
                cores, shared = shared_core_slices(running, pool)[stage]
                grant = CoreGrant(stage, cores, shared)
            if self._running:
                self._overlapped.update(self._running)
                self._overlapped.add(stage)
            self._running[stage] = self.last[stage] = grant
            return grant

    def _shared_pool_locked(self, partition: Partition, usable: int) -> tuple[int, ...] | None:
        """The cores ``partition``'s running stages share out, or None where it is isolated
        and its plan fits (each stage then has its own planned cores). Other processes using
        some of the cores make every partition shared: the running stages split the first
        ``usable`` (one thread per core: a team thread the OS deschedules stalls its partners
        at every barrier)."""
        plan = self._plan_locked(partition)
        capped = usable < len(self.cores)
        if not capped and partition.isolated and plan is not None and not plan.is_unlimited:
            return None
        return self.cores[: max(1, usable)]

    @property
    def stages_take_turns(self) -> bool:
        """Whether every shared batch takes a turn (no two stages could split the cores)."""
        return self._never_split(len(self.cores))

    def _never_split(self, num_cores: int) -> bool:
        """No two stages could split ``num_cores`` with ``min_split_cores`` each."""
        return self.min_split_cores > 1 and num_cores // 2 < self.min_split_cores

    def _must_take_turns(self, num_cores: int) -> bool:
        """Whether stages take turns on ``num_cores``: always when no two stages could split
        them (even with nothing running now: a front batch must not slip in between two
        decode steps), else when a stage starting beside those running would get too few."""
        if self.min_split_cores == 1:
            return False  # always split (more stages than cores share them: the OS's turns)
        if self._never_split(num_cores):
            return True
        return num_cores // (len(self._running) + 1) < self.min_split_cores

    def wait_turn(self, stage: Stage, partition: Partition) -> None:
        """Block until ``stage`` could start a batch under ``partition`` without waiting (its
        turn, where stages take turns; at once otherwise), without taking the cores: the
        caller plans the batch now, with what has queued meanwhile, then ``acquire``s."""
        usable = self._usable() if self._usable is not None else len(self.cores)
        with self._lock:
            pool = self._shared_pool_locked(partition, usable)
            if pool is not None and self._must_take_turns(len(pool)):
                self._wait_turn_locked(stage)

    def decline_turn(self, stage: Stage) -> None:
        """``stage`` has nothing to run now: no one waits for it. (After a decode step or a
        prefill batch the front stages give decode ``decode_grace_s`` to come back; decode's
        worker declining ends that wait, e.g. when the policy picks a front batch next; a
        front stage declining ends the others' wait for it to ask, ``rank_turn``.)"""
        with self._lock:
            if stage is not Stage.DECODE:
                if self._ranked_s.get(stage, -math.inf) > -math.inf:
                    self._ranked_s[stage] = -math.inf  # its grace to ask is over
                    self._lock.notify_all()
            elif self._decode_due_s is not None:
                self._decode_due_s = None
                self._lock.notify_all()

    def _wait_turn_locked(self, stage: Stage) -> bool:
        """Wait for ``stage``'s turn; True if it had to wait."""
        self._waiting.append(stage)
        waited = False
        try:
            while True:
                delay_s = self._turn_delay_locked(stage)
                if delay_s == 0.0:
                    return waited
                waited = True
                self._lock.wait(delay_s)  # None: until a release or a waiter leaves
        finally:
            self._waiting.remove(stage)
            # the next waiter in line may go now (``wait_turn`` takes no cores, so no
            # release follows when its stage then finds nothing to run)
            self._lock.notify_all()

    def rank_turn(self, stage: Stage, rank: TurnRank | None) -> None:
        """``stage``'s earliest waiting request, ranked by the engine (lower goes first: its
        service order, (priority, deadline, arrival)); None: it has none. The front stage
        holding the earliest request goes first, as in a first-come-first-served server,
        also over one that asked earlier; a stage ranked ahead that has not asked yet is
        given ``decode_grace_s`` from when its rank changed to ask (its worker is waking to
        the requests the last batch handed it). Unranked stages go in the order they asked.
        The engine re-ranks every front stage when the queues change."""
        with self._lock:
            if self._ranks.get(stage) != rank:
                self._ranks[stage] = rank
                if self._clock is not None:
                    self._ranked_s[stage] = self._clock()
                self._lock.notify_all()

    def _front_delay_locked(self, stage: Stage) -> float | None:
        """0: no front stage goes before ``stage``; else how long to wait for one that holds
        an earlier request (None: until something changes)."""
        own = self._ranks.get(stage)
        waiting: list[Stage] = [s for s in self._waiting if s is not Stage.DECODE]
        for other in waiting[: waiting.index(stage)]:
            ahead = self._ranks.get(other)
            if own is None or (ahead is not None and ahead <= own):
                return None  # asked earlier and holds an earlier (or no later) request
        delay_s = 0.0
        for other, ahead in self._ranks.items():
            if other is stage or ahead is None or (own is not None and ahead >= own):
                continue
            if other in waiting:
                return None  # waits too, for an earlier request
            if self._clock is not None:  # not asked yet: its grace to ask
                left_s = self._ranked_s[other] + self.decode_grace_s - self._clock()
                delay_s = max(delay_s, left_s)
        return delay_s

    def _turn_delay_locked(self, stage: Stage) -> float | None:
        """0: ``stage`` may start now; else how long to wait before looking again (None: until
        a batch ends)."""
        if self._running:
            return None
        if stage is Stage.DECODE:
            return 0.0
        if Stage.DECODE in self._waiting:
            return None
        front_s = self._front_delay_locked(stage)
        if front_s != 0.0:
            return front_s  # a front stage holding an earlier request goes first
        if self._decode_due_s is not None and self._clock is not None:
            left_s = self._decode_due_s + self.decode_grace_s - self._clock()
            if left_s > 0:
                return left_s
        return 0.0

    def release(self, stage: Stage) -> bool:
        """End ``stage``'s batch; True when no other stage's batch ran beside it."""
        with self._lock:
            self._running.pop(stage, None)
            alone = stage not in self._overlapped
            self._overlapped.discard(stage)
            if stage is not Stage.VISION and self._clock is not None:
                self._decode_due_s = self._clock()
            self._lock.notify_all()
            return alone

    def running(self) -> dict[Stage, CoreGrant]:
        with self._lock:
            return dict(self._running)
