"""SM planning: a ``Partition``'s shares of the device -> whole SMs per stage (torch-free).

The CUDA driver hands out green-context SMs in steps (``SMGrid``); ``plan_partition`` rounds a
partition's shares onto that grid without ever asking for more SMs than the device has. Plain
arithmetic on plain data: the scheduler and the simulator may import this module (it imports
neither torch nor anything of the runtime).
"""

from __future__ import annotations

from dataclasses import dataclass

from nova.types import STAGES, Partition, Stage

# Shares within SHARE_EPS of 1.0 mean "no limit"; also nudges x.5 roundings up.
SHARE_EPS = 1e-6


@dataclass(slots=True, frozen=True)
class SMGrid:
    """The SMs a backend can hand out: ``num_sms`` in all, partitions of at least ``min_sms``
    in steps of ``granularity`` (CUDA green contexts: 8 and 8 on Hopper, 4 and 2 on Ampere)."""

    num_sms: int
    granularity: int = 1
    min_sms: int = 1

    def __post_init__(self) -> None:
        if self.num_sms < 1 or self.granularity < 1 or self.min_sms < 1:
            raise ValueError(f"SM grid counts must be >= 1, got {self}")

    @property
    def share_step(self) -> float:
        """The granularity as a share of the device (what the ``nova`` policy plans on)."""
        return self.granularity / self.num_sms

    @property
    def max_partition_sms(self) -> int:
        return max(self.min_sms, (self.num_sms // self.granularity) * self.granularity)

    def sms_for_share(self, share: float) -> int:
        """Nearest whole number of SMs on the grid to ``share`` of the device (>= ``min_sms``)."""
        steps = round(share * self.num_sms / self.granularity + SHARE_EPS)
        return min(self.max_partition_sms, max(self.min_sms, steps * self.granularity))


def guideline_grid(num_sms: int, major: int) -> SMGrid:
    """The CUDA driver's documented green-context guideline per compute capability (minimum SMs,
    step): 6.x 1/1, 7.x 2/2, 8.x 4/2, 9.0+ 8/8. The driver probe refines it when it can."""
    if major >= 9:
        return SMGrid(num_sms, 8, 8)
    if major == 8:
        return SMGrid(num_sms, 2, 4)
    if major == 7:
        return SMGrid(num_sms, 2, 2)
    return SMGrid(num_sms, 1, 1)


@dataclass(slots=True, frozen=True)
class PartitionPlan:
    """SMs per stage for one ``Partition``; ``None``: the whole device (no limit).

    ``groups``: the stages that may run at the same time, each group with its own SMs; vision
    and prefill form one group when their shares cannot both fit beside decode (the ``nova``
    policy gives them the same share and never co-runs them). The SMs of all groups together
    never exceed the device's SM count.
    """

    sms: tuple[tuple[Stage, int | None], ...]
    groups: tuple[tuple[tuple[Stage, ...], int], ...] = ()

    def stage_sms(self, stage: Stage) -> int | None:
        return dict(self.sms)[stage]

    @property
    def key(self) -> tuple[int | None, ...]:
        return tuple(n for _, n in self.sms)

    @property
    def is_unlimited(self) -> bool:
        return all(n is None for _, n in self.sms)

    def describe(self) -> str:
        if self.is_unlimited:
            return "shared (no SM limits)"
        return " + ".join(f"{'/'.join(s.value for s in g)} {n}" for g, n in self.groups) + " SMs"


def single_stage_plan(stage: Stage, num_sms: int) -> PartitionPlan:
    """One stage limited to ``num_sms`` (what a profiling share context runs under)."""
    return PartitionPlan(((stage, num_sms),), (((stage,), num_sms),))


def plan_partition(partition: Partition, grid: SMGrid) -> PartitionPlan:
    """Whole SMs per stage for ``partition`` on ``grid``, never more than the device has.

    A share of 1.0 means "no limit". Each group's share is rounded to the nearest grid step
    (at least ``min_sms``); if the co-running groups then exceed the device, the group rounded
    up the most gives back a step at a time, until they fit.
    Rounding every share *up* instead overbooks: on a 132-SM Hopper, shares 0.5/0.357/0.143
    rounded up to multiples of 8 ask for 72 + 48 + 24 = 144 SMs.
    """
    shares = {s: partition.share(s) for s in STAGES}
    limited = [s for s in STAGES if shares[s] < 1.0 - SHARE_EPS]
    if not limited:
        return PartitionPlan(tuple((s, None) for s in STAGES))
    v, p = Stage.VISION, Stage.PREFILL
    merge = v in limited and p in limited and sum(shares[s] for s in limited) > 1.0 + SHARE_EPS
    groups: list[tuple[tuple[Stage, ...], float]] = []
    if merge:
        groups.append(((v, p), max(shares[v], shares[p])))
    groups += [((s,), shares[s]) for s in limited if not (merge and s in (v, p))]
    counts = [grid.sms_for_share(share) for _, share in groups]
    while sum(counts) > grid.num_sms:
        # Undo the largest rounding-up first (then the largest group).
        i = max(
            range(len(counts)), key=lambda j: (counts[j] - groups[j][1] * grid.num_sms, counts[j])
        )
        if counts[i] - grid.granularity < grid.min_sms:
            raise ValueError(
                f"partition {partition} does not fit {grid.num_sms} SMs with partitions of at "
                f"least {grid.min_sms} SMs in steps of {grid.granularity}"
            )
        counts[i] -= grid.granularity
    per_stage: dict[Stage, int | None] = dict.fromkeys(STAGES)
    for (stages, _), n in zip(groups, counts):
        for s in stages:
            per_stage[s] = n
    return PartitionPlan(
        tuple((s, per_stage[s]) for s in STAGES),
        tuple((stages, n) for (stages, _), n in zip(groups, counts)),
    )
