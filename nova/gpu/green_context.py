"""The ``green_context`` partition backend: each stage's batch runs in a CUDA green context.

Partitions are planned in whole SMs at the device's granularity (``nova.gpu.sm_plan``),
created once (ahead of time for the set the policy announces, else on first use) and switched at
batch boundaries: a stage's batch runs on the stream of the green context of its (partition,
stage). The SM count the driver granted is read back and reported.

Before the ``sm-partition`` API (PyTorch 2.15+, ``nova.gpu.green_api``) every context is split
off the whole device on its own, so the SM sets of two contexts (decode's and the compute
stages') are not guaranteed to be disjoint: each stage is limited to its SM count, but two
co-running stages may share some SMs. With ``sm-partition`` (and a CUDA 13.1+ driver) the stages
of one partition get disjoint SMs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from nova.gpu.backend import GrantedPartition, PartitionBackend
from nova.gpu.driver_probe import GrantProbe
from nova.gpu.green_api import GreenApi, GreenContextHandle
from nova.gpu.sm_plan import SHARE_EPS, PartitionPlan, SMGrid, plan_partition, single_stage_plan
from nova.gpu.streams import CudaStream, CudaStreams
from nova.types import STAGES, Partition, Stage

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _GreenSlot:
    context: GreenContextHandle
    info: GrantedPartition


class GreenContextBackend(PartitionBackend):
    """Green contexts per (partition plan, stage); the stage's worker runs on its context."""

    name = "green_context"

    def __init__(
        self,
        grid: SMGrid,
        api: GreenApi,
        device_index: int,
        cuda: CudaStreams,
        probe: GrantProbe | None = None,
    ) -> None:
        super().__init__(grid)
        self.api = api
        self.device_index = device_index
        self._cuda = cuda
        self._probe = probe
        self._lock = threading.Lock()
        self._plans: dict[Partition, PartitionPlan] = {}
        self._slots: dict[tuple[tuple[int | None, ...], Stage], _GreenSlot] = {}
        self._plain = {s: cuda.new_stream() for s in STAGES}  # unlimited stages
        self._profile_slots: dict[int, _GreenSlot] = {}
        self._split_failed: str | None = None

    @property
    def enforces_limits(self) -> bool:
        return True

    def plan(self, partition: Partition) -> PartitionPlan:
        plan = self._plans.get(partition)
        if plan is None:
            plan = self._plans[partition] = plan_partition(partition, self.grid)
        return plan

    def prepare(self, partitions: Iterable[Partition]) -> None:
        plans = {}
        for part in partitions:
            plan = self.plan(part)
            plans[plan.key] = plan
        with self._lock:
            for plan in plans.values():
                self._ensure_plan(plan)
        log.info(
            "green contexts ready for %d partitions (%d contexts)", len(plans), len(self._slots)
        )

    # -- creation --------------------------------------------------------------------------------
    def _granted(self, context: GreenContextHandle, requested: int) -> tuple[int | None, str]:
        if context.sm_count is not None:
            return context.sm_count, "driver"
        if self._probe is not None:
            n = self._probe.granted(requested)
            if n:
                return n, "driver-probe"
        return requested, "planned"

    def _new_slot(
        self, stage: Stage, plan: PartitionPlan, requested: int, part: object | None
    ) -> _GreenSlot:
        context = (
            self.api.from_partition(part)
            if part is not None
            else self.api.create(requested, self.device_index)
        )
        granted, source = self._granted(context, requested)
        info = GrantedPartition(stage.value, plan.describe(), requested, granted, source)
        if granted is not None and granted != requested:
            log.warning(
                "green context for %s: asked for %d SMs, the driver granted %d",
                stage.value,
                requested,
                granted,
            )
        return _GreenSlot(context, info)

    def _ensure_plan(self, plan: PartitionPlan) -> None:
        """Create the contexts of every limited stage of ``plan`` (caller holds the lock)."""
        todo = [
            (stages, n) for stages, n in plan.groups if (plan.key, stages[0]) not in self._slots
        ]
        if not todo:
            return
        parts: list[object | None] = [None] * len(todo)
        if self.api.kind == "sm-partition" and self._split_failed is None:
            try:  # disjoint SM sets for the co-running groups of this plan
                parts = list(self.api.split([n for _, n in todo], self.device_index))
            except Exception as exc:  # noqa: BLE001 - e.g. a driver older than CUDA 13.1
                self._split_failed = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "disjoint SM split unavailable (%s); each green context takes its SMs "
                    "from the whole device, so co-running stages may share SMs",
                    self._split_failed,
                )
                parts = [None] * len(todo)
        for (stages, n), part in zip(todo, parts):
            for stage in stages:
                self._slots[(plan.key, stage)] = self._new_slot(stage, plan, n, part)
        log.info(
            "green contexts for partition %s: %s",
            plan.describe(),
            ", ".join(
                f"{s.value} {self._slots[(plan.key, s)].info.granted_sms}"
                for stages, _ in todo
                for s in stages
            ),
        )

    def _slot(self, stage: Stage, plan: PartitionPlan) -> _GreenSlot:
        key = (plan.key, stage)
        slot = self._slots.get(key)
        if slot is None:
            with self._lock:
                if key not in self._slots:
                    log.info(
                        "creating green contexts on first use of partition %s", plan.describe()
                    )
                    self._ensure_plan(plan)
                slot = self._slots[key]
        return slot

    # -- use ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def activate(self, stage: Stage, partition: Partition) -> Iterator[CudaStream | None]:
        plan = self.plan(partition)
        if plan.stage_sms(stage) is None:
            stream = self._plain[stage]
            with self._cuda.stream_guard(stream):
                yield stream
            return
        with self._slot(stage, plan).context.enter(self._cuda) as stream:
            yield stream

    def stream(self, stage: Stage, partition: Partition) -> CudaStream | None:
        plan = self.plan(partition)
        if plan.stage_sms(stage) is None:
            return self._plain[stage]
        return self._slot(stage, plan).context.stream

    def granted_sms(self, stage: Stage, partition: Partition) -> int:
        plan = self.plan(partition)
        if plan.stage_sms(stage) is None:
            return self.grid.num_sms
        info = self._slot(stage, plan).info
        return info.granted_sms or info.requested_sms

    def share_context(self, share: float) -> AbstractContextManager[object]:
        if share >= 1.0 - SHARE_EPS:
            return contextlib.nullcontext()
        n = self.grid.sms_for_share(share)
        with self._lock:
            slot = self._profile_slots.get(n)
            if slot is None:
                plan = single_stage_plan(Stage.VISION, n)
                slot = self._profile_slots[n] = self._new_slot(Stage.VISION, plan, n, None)
        return slot.context.enter(self._cuda)

    def share_granted_sms(self, share: float) -> int:
        if share >= 1.0 - SHARE_EPS:
            return self.grid.num_sms
        with self.share_context(share):  # creates the context on first use
            pass
        info = self._profile_slots[self.grid.sms_for_share(share)].info
        return info.granted_sms or info.requested_sms

    def created(self) -> list[GrantedPartition]:
        return [slot.info for slot in self._slots.values()]

    def describe(self) -> str:
        disjoint = (
            "disjoint SM sets"
            if self.api.kind == "sm-partition" and not self._split_failed
            else "SM sets may overlap between stages"
        )
        return (
            f"green_context ({self.api.kind} API, torch {self.api.torch_version}): "
            f"{self.grid.num_sms} SMs, partitions of >= {self.grid.min_sms} in steps of "
            f"{self.grid.granularity}; {disjoint}"
        )
