"""The SM-partition backend interface and the two backends without SM limits.

A backend runs a stage's batch inside ``activate(stage, partition)``: on the stream (and, for
green contexts, the SMs) that the stage gets under that partition.

- ``cpu`` (``CpuBackend``): no streams, no limits; the core count is reported as the "SMs".
- ``none`` (``StreamBackend``): one CUDA stream per stage; partitions are recorded, not
  enforced (stages contend freely).

The green-context backend is in ``nova.gpu.green_context``; ``nova.gpu.partition.make_backend``
picks one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from nova.gpu.sm_plan import SHARE_EPS, SMGrid
from nova.gpu.streams import CudaStream, CudaStreams
from nova.types import STAGES, Partition, Stage


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

    def granted_sms(self, stage: Stage, partition: Partition) -> int:
        """SMs the stage really runs on under ``partition`` (the whole device if unlimited)."""
        return self.grid.num_sms

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
    """No streams, no SM limits; the core count stands in for the SM count."""

    name = "cpu"

    def __init__(self, num_cores: int | None = None) -> None:
        super().__init__(SMGrid(num_cores or os.cpu_count() or 1))

    def describe(self) -> str:
        return f"cpu: {self.grid.num_sms} cores reported as SMs; no partitioning on a CPU"


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
