"""Exact SM accounting: which SM counts a GPU can grant to co-running stages (torch-free).

The grid (``SmGrid``): CUDA green contexts hand out SMs in aligned groups. The CUDA driver API
documentation (Green Contexts, ``cuDevSmResourceSplitByCount``, CUDA 12.4) gives the guideline
per compute capability: "Compute capability 8.X: the minimum count is 4 SMs and must be a
multiple of 2"; "Compute capability 9.0+: the minimum count is 8 SMs and must be a multiple of
8" (6.X: 1; 7.X: 2 and a multiple of 2). The split also returns the *remainder* (the SMs not
given to an aligned group) as one more partition, which need not be aligned: on a 132-SM Hopper
``[8, 16, 24]`` leaves ``84`` (flashinfer's ``split_device_green_ctx_by_sm_count`` docs show
exactly that). libsmctrl-style stream masks (the Nova paper's mechanism) work per TPC = 2 SMs,
so the CC 8.x grid also expresses the paper's operating points (decode 12, 24, 30 of 84 SMs).

The rule everything here follows: decode gets an aligned group; the compute stage(s) beside it
get the rest -- all but the last compute stage aligned, the last one the exact remainder. So
the SMs granted to co-running stages never sum past the device (a share rounded *up* on its
own would: 0.5 + 0.357 + 0.143 of a 132-SM H100 rounds up to 72 + 48 + 24 = 144 SMs).

Public API (what the policies build their partitions with):

- ``SmGrid(num_sms, step, min_sms)``; ``GpuSpec.grid`` is the GPU's;
  ``grid.decode_choices()``: every aligned decode count that leaves a remainder;
  ``grid.granted(share)``: the SMs a stage with ``share`` of the device runs on;
  ``grid.granted_together(shares)``: the same for stages on partitions side by side, never
  more than the device (the cost models use it for co-running batches);
- ``split_sms(gpu_or_grid, decode_sms, compute_shares=(1.0,)) -> GrantedSMs``: decode on an
  aligned group, the compute stages on the rest;
- ``GrantedSMs``: the counts, and the shares (``count / num_sms``) to put in a ``Partition``;
  ``grid.granted(g.decode_share) == g.decode`` and the same for every compute count, so the
  cost models see exactly the counts that were planned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nova.cost.gpus import GpuSpec

# A share times the SM count within this of an integer is that integer (1/3 * 84 = 28.000001).
_INTEGRAL_EPS = 1e-6


def guideline_min_and_step(cc_major: int) -> tuple[int, int]:
    """(minimum SMs, step) of a green-context partition for compute capability ``cc_major``.x,
    from the CUDA driver API's Green Contexts guideline (see the module doc). The driver may
    grant otherwise; the engine reads the real grant back (``nova.gpu``)."""
    if cc_major >= 9:
        return 8, 8
    if cc_major == 8:
        return 4, 2
    if cc_major == 7:
        return 2, 2
    return 1, 1


@dataclass(slots=True, frozen=True)
class SmGrid:
    """``num_sms`` SMs, handed out in aligned groups of ``min_sms`` + k * ``step``; the rest of
    the device (whatever the aligned groups leave) is one more, unaligned, group."""

    num_sms: int
    step: int = 1
    min_sms: int = 1

    def __post_init__(self) -> None:
        if self.num_sms < 1 or self.step < 1 or self.min_sms < 1:
            raise ValueError(f"SM grid counts must be >= 1, got {self}")
        if self.min_sms > self.num_sms:
            raise ValueError(f"SM grid: minimum {self.min_sms} > the device's {self.num_sms} SMs")

    # -- predicates -------------------------------------------------------------------------
    def is_aligned(self, sms: int) -> bool:
        """An aligned group: at least ``min_sms``, a multiple of ``step``, within the device."""
        return self.min_sms <= sms <= self.num_sms and sms % self.step == 0

    def is_remainder(self, sms: int) -> bool:
        """What aligned groups leave: ``num_sms - sms`` is a sum of aligned groups (a multiple
        of ``step``, at least ``min_sms``), and ``sms`` is itself at least ``min_sms``."""
        rest = self.num_sms - sms
        return sms >= self.min_sms and rest >= self.min_sms and rest % self.step == 0

    # -- choices ------------------------------------------------------------------------------
    def aligned_counts(self) -> tuple[int, ...]:
        """Every aligned group size, ascending."""
        first = -(-self.min_sms // self.step) * self.step  # min_sms rounded up to the step
        return tuple(range(first, self.num_sms + 1, self.step))

    def decode_choices(self, compute_min_sms: int | None = None) -> tuple[int, ...]:
        """Aligned decode counts that leave at least ``compute_min_sms`` (default: the grid
        minimum) for the compute side. Empty when the device cannot be split (e.g. 1 SM)."""
        leave = self.min_sms if compute_min_sms is None else max(1, compute_min_sms)
        return tuple(n for n in self.aligned_counts() if self.num_sms - n >= leave)

    def align(self, sms: float) -> int:
        """The aligned count nearest to ``sms`` (halves round up), within the device."""
        counts = self.aligned_counts()
        if not counts:
            return self.num_sms
        steps = int((sms - counts[0]) / self.step + 0.5 + _INTEGRAL_EPS)
        return counts[min(max(steps, 0), len(counts) - 1)]

    def align_down(self, sms: float) -> int:
        """The largest aligned count <= ``sms`` (0 if there is none)."""
        fitting = [n for n in self.aligned_counts() if n <= sms + _INTEGRAL_EPS]
        return fitting[-1] if fitting else 0

    # -- what a share runs on -----------------------------------------------------------------
    def granted(self, share: float) -> int:
        """SMs a stage whose partition is ``share`` of the device runs on.

        ``share * num_sms`` that is an aligned count or an exact remainder (what ``split_sms``
        builds) is taken as is; any other share is rounded to the nearest aligned count (the
        engine's SM planner rounds to the nearest step too). ``share`` >= 1: the whole device.
        """
        if not 0.0 < share <= 1.0 + _INTEGRAL_EPS:
            raise ValueError(f"SM share must be in (0, 1], got {share!r}")
        exact = share * self.num_sms
        if exact >= self.num_sms - _INTEGRAL_EPS:
            return self.num_sms
        whole = round(exact)
        if abs(exact - whole) < _INTEGRAL_EPS and (
            self.is_aligned(whole) or self.is_remainder(whole)
        ):
            return whole
        return self.align(exact)

    def granted_share(self, share: float) -> float:
        return self.granted(share) / self.num_sms

    def granted_together(self, shares: Sequence[float]) -> tuple[int, ...]:
        """SMs of stages that run at the same time on their own partitions with ``shares``:
        each ``granted(share)``, then, while they sum past the device, the count rounded up
        the most gives back a step (as the engine's SM planner does). Counts ``split_sms``
        built sum to at most the device already and come back unchanged. Only when the
        minimum partitions alone exceed the device (e.g. three stages on a 1-SM cpu) do the
        counts stay over it: the device then time-shares them."""
        counts = [self.granted(s) for s in shares]
        while sum(counts) > self.num_sms:
            # who gives back: rounded up the most, then the larger, then the larger share; ties
            # all give back at once, so the answer does not depend on the order of ``shares``
            keys = {
                i: (n - s * self.num_sms, n, s)
                for i, (n, s) in enumerate(zip(counts, shares))
                if n - self.step >= self.min_sms
            }
            if not keys:
                break
            top = max(keys.values())
            for i, key in keys.items():
                if key == top:
                    n = counts[i]
                    counts[i] = self.align_down(n - 1) if n % self.step else n - self.step
        return tuple(counts)


@dataclass(slots=True, frozen=True)
class GrantedSMs:
    """SMs of stages that co-run: ``decode`` (an aligned group, or 0: no decode partition)
    and ``compute`` (one count per compute share asked for; the last the exact remainder when
    the shares asked for add up to the whole remainder). ``total`` <= ``num_sms`` always."""

    decode: int
    compute: tuple[int, ...]
    num_sms: int

    @property
    def total(self) -> int:
        return self.decode + sum(self.compute)

    @property
    def decode_share(self) -> float:
        return self.decode / self.num_sms

    @property
    def compute_shares(self) -> tuple[float, ...]:
        return tuple(n / self.num_sms for n in self.compute)

    def compute_share(self, index: int = 0) -> float:
        return self.compute[index] / self.num_sms


def split_sms(
    gpu: GpuSpec | SmGrid, decode_sms: int, compute_shares: Sequence[float] = (1.0,)
) -> GrantedSMs:
    """Decode on ``decode_sms`` (aligned to the grid: nearest aligned count that leaves every
    compute stage at least the grid minimum; 0: no decode partition), the compute stages on
    the rest, split by ``compute_shares`` (fractions of the rest, each in [0, 1], summing to at
    most 1). When the shares sum to 1, all compute counts but the last are aligned (nearest)
    and the last is the exact remainder; otherwise every count is aligned, rounded down (at
    least the minimum). A zero share gets 0 SMs.

    Raises ``ValueError`` when the device cannot hold the asked-for stages at the grid minimum
    each (e.g. a 1-SM device split in two).
    """
    grid = gpu if isinstance(gpu, SmGrid) else gpu.grid
    shares = [float(s) for s in compute_shares]
    if any(not 0.0 <= s <= 1.0 + _INTEGRAL_EPS for s in shares):
        raise ValueError(f"compute shares must each be in [0, 1], got {shares}")
    if sum(shares) > 1.0 + _INTEGRAL_EPS:
        raise ValueError(f"compute shares are fractions of the remainder; {shares} sum past 1")
    if decode_sms < 0:
        raise ValueError(f"decode SMs must be >= 0, got {decode_sms}")
    active = [i for i, s in enumerate(shares) if s > _INTEGRAL_EPS]
    compute_min = grid.min_sms * len(active)
    decode = 0
    if decode_sms > 0:
        choices = grid.decode_choices(compute_min) if active else grid.aligned_counts()
        if not choices:
            raise ValueError(
                f"{grid.num_sms} SMs cannot hold decode beside {len(active)} compute stage(s) "
                f"with at least {grid.min_sms} SMs each"
            )
        decode = min(choices, key=lambda n: (abs(n - decode_sms), -n))
    rest = grid.num_sms - decode
    if rest < compute_min:
        raise ValueError(
            f"{rest} SMs left beside decode cannot hold {len(active)} compute stage(s) of at "
            f"least {grid.min_sms} SMs"
        )
    whole = sum(shares) >= 1.0 - _INTEGRAL_EPS
    counts = [0] * len(shares)
    if not whole:  # every stage rounded down (at least the minimum); then fit
        for i in active:
            counts[i] = max(grid.min_sms, grid.align_down(shares[i] * rest))
        while sum(counts) > rest:
            fits = [(counts[i], i) for i in active if counts[i] - grid.step >= grid.min_sms]
            if not fits:
                raise ValueError(f"cannot fit compute shares {shares} in {rest} SMs")
            counts[max(fits)[1]] -= grid.step
        return GrantedSMs(decode, tuple(counts), grid.num_sms)
    left = rest
    for rank, i in enumerate(active):
        if rank == len(active) - 1:
            counts[i] = left  # the exact remainder (>= min_sms: reserved below)
            break
        still_needed = grid.min_sms * (len(active) - rank - 1)  # for the stages after this one
        n = grid.align(shares[i] * rest)
        while n > left - still_needed and n - grid.step >= grid.min_sms:
            n -= grid.step
        if n > left - still_needed:
            raise ValueError(f"cannot fit compute shares {shares} in {rest} SMs")
        counts[i] = n
        left -= n
    return GrantedSMs(decode, tuple(counts), grid.num_sms)
