"""SM-partition backends: run each stage's batches on the SMs its ``Partition`` share grants.

Three backends behind one interface (``PartitionBackend``):

- ``green_context``: CUDA green contexts through ``torch.cuda.green_contexts``. Partitions are
  planned in whole SMs at the device's granularity (``plan_partition``), created once (ahead of
  time for the set the policy announces, else on first use) and switched at batch boundaries:
  a stage's batch runs on the stream of the green context of its (partition, stage). The SM
  count the driver granted is read back and reported.
- ``none``: one CUDA stream per stage, no SM limits (stages contend freely).
- ``cpu``: no streams, no limits; the core count is reported as the "SMs" granted.

Selection (``make_backend``): ``auto`` takes ``green_context`` when the device is CUDA and
PyTorch, its build and the driver support green contexts, else ``none`` on CUDA and ``cpu`` on
a CPU, logging why. An explicit ``green_context`` that cannot be had is an error naming the
reason, never a silent fallback.

PyTorch's green-context API changed between releases; it is detected by feature, not version:

==================  =====================================================================
``context-stack``   2.10-2.11: ``GreenContext.create(num_sms, device_id)``, work runs between
                    ``set_context()`` and ``pop_context()`` (the context's default stream).
``stream``          2.12-2.14: keyword-only ``create(num_sms=..., device_id=...)`` (2.14: also
                    the constructor) and ``ctx.Stream()``; work runs on that stream.
``sm-partition``    2.15+: ``SMPartition.from_device().split(num_sms=[...])`` gives *disjoint*
                    SM sets and ``GreenContext(sm_partition=...)`` a context on one of them.
==================  =====================================================================

Before ``sm-partition`` every context is split off the whole device on its own, so the SM sets
of two contexts (decode's and the compute stages') are not guaranteed to be disjoint: each
stage is limited to its SM count, but two co-running stages may share some SMs. With
``sm-partition`` (and a CUDA 13.1+ driver) the stages of one partition get disjoint SMs.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from nova.types import STAGES, Partition, Stage

log = logging.getLogger(__name__)

_EPS = 1e-6
MIN_TORCH_FOR_GREEN = "2.10"


class PartitionUnavailable(ValueError):
    """A requested partition backend cannot run here (a ValueError: CLIs report it as bad input)."""


# -- planning: shares -> whole SMs (torch-free) ------------------------------------------------
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
        steps = round(share * self.num_sms / self.granularity + _EPS)
        return min(self.max_partition_sms, max(self.min_sms, steps * self.granularity))


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


def plan_partition(partition: Partition, grid: SMGrid) -> PartitionPlan:
    """Whole SMs per stage for ``partition`` on ``grid``, never more than the device has.

    A share of 1.0 means "no limit". Each group's share is rounded to the nearest grid step
    (at least ``min_sms``); if the co-running groups then exceed the device, the group rounded
    up the most gives back a step at a time, until they fit.
    Rounding every share *up* instead overbooks: on a 132-SM Hopper, shares 0.5/0.357/0.143
    rounded up to multiples of 8 ask for 72 + 48 + 24 = 144 SMs.
    """
    shares = {s: partition.share(s) for s in STAGES}
    limited = [s for s in STAGES if shares[s] < 1.0 - _EPS]
    if not limited:
        return PartitionPlan(tuple((s, None) for s in STAGES))
    v, p = Stage.VISION, Stage.PREFILL
    merge = v in limited and p in limited and sum(shares[s] for s in limited) > 1.0 + _EPS
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


# -- the interface -------------------------------------------------------------------------------
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
    def activate(self, stage: Stage, partition: Partition) -> Iterator[Any]:
        """Run the enclosed work as ``stage`` under ``partition``; yields the stream to
        synchronise (``None`` on a CPU)."""
        yield None

    def granted_sms(self, stage: Stage, partition: Partition) -> int:
        """SMs the stage really runs on under ``partition`` (the whole device if unlimited)."""
        return self.grid.num_sms

    def share_context(self, share: float) -> AbstractContextManager[Any]:
        """A context manager running the enclosed work on ``share`` of the SMs (for
        ``nova profile``: ``share_context=backend.share_context``)."""
        if share < 1.0 - _EPS:
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

    def stream(self, stage: Stage, partition: Partition) -> Any | None:
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


class _TorchCuda:
    """The few torch.cuda calls the CUDA backends make (replaced by a fake in CPU tests)."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def new_stream(self) -> Any:
        import torch

        return torch.cuda.Stream(device=self.device)

    def stream_guard(self, stream: Any) -> AbstractContextManager[Any]:
        import torch

        return torch.cuda.stream(stream)

    def current_stream(self) -> Any:
        import torch

        return torch.cuda.current_stream(self.device)


class StreamBackend(PartitionBackend):
    """``none``: one CUDA stream per stage; partitions are recorded, not enforced."""

    name = "none"

    def __init__(self, grid: SMGrid, cuda: Any) -> None:
        super().__init__(grid)
        self._cuda = cuda
        self._streams = {s: cuda.new_stream() for s in STAGES}

    @contextlib.contextmanager
    def activate(self, stage: Stage, partition: Partition) -> Iterator[Any]:
        stream = self._streams[stage]
        with self._cuda.stream_guard(stream):
            yield stream

    def stream(self, stage: Stage, partition: Partition) -> Any | None:
        return self._streams[stage]

    def describe(self) -> str:
        return f"none: one stream per stage on {self.grid.num_sms} SMs, no SM limits"


# -- green contexts ------------------------------------------------------------------------------
@dataclass(slots=True)
class GreenApi:
    """The installed ``torch.cuda.green_contexts``, detected by feature (see module docstring)."""

    module: Any
    kind: str  # "context-stack" | "stream" | "sm-partition"
    torch_version: str

    def create(self, num_sms: int, device_index: int) -> Any:
        return self.module.GreenContext.create(num_sms=num_sms, device_id=device_index)

    def split(self, counts: list[int], device_index: int) -> list[Any]:
        """Disjoint SM partitions of the device, one per count (``sm-partition`` only)."""
        parts, _rest = self.module.SMPartition.from_device(device_index).split(num_sms=list(counts))
        if len(parts) != len(counts):
            raise RuntimeError(f"asked the driver for {len(counts)} SM groups, got {len(parts)}")
        return list(parts)

    def from_partition(self, part: Any) -> Any:
        return self.module.GreenContext(sm_partition=part)


def detect_green_api(module: Any | None, torch_version: str, cuda_version: str | None) -> GreenApi:
    """The green-context API of this PyTorch, or ``PartitionUnavailable`` saying what is missing.

    ``module``: ``torch.cuda.green_contexts`` (``None`` if it does not import)."""
    if cuda_version is None:
        raise PartitionUnavailable(
            f"green contexts need a CUDA build of PyTorch; this is torch {torch_version} (CPU only)"
        )
    if module is None or not hasattr(module, "GreenContext"):
        raise PartitionUnavailable(
            f"green contexts need PyTorch >= {MIN_TORCH_FOR_GREEN} "
            f"(torch.cuda.green_contexts.GreenContext); this is torch {torch_version}"
        )
    if getattr(module, "SUPPORTED", True) is False:
        raise PartitionUnavailable(
            f"this PyTorch build (torch {torch_version}, CUDA {cuda_version}) was compiled without "
            "green-context support (it needs CUDA >= 12.8 at build time)"
        )
    gc = module.GreenContext
    if hasattr(module, "SMPartition") and hasattr(module.SMPartition, "split"):
        kind = "sm-partition"
    elif hasattr(gc, "Stream"):
        kind = "stream"
    elif hasattr(gc, "set_context") and hasattr(gc, "pop_context"):
        kind = "context-stack"
    else:
        raise PartitionUnavailable(
            f"torch {torch_version}: torch.cuda.green_contexts.GreenContext has neither Stream() "
            "nor set_context()/pop_context(); this API shape is not supported"
        )
    return GreenApi(module, kind, torch_version)


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


_CU_DEV_RESOURCE_TYPE_SM = 1
_RESOURCE_BYTES = 512  # CUdevResource is 144-152 bytes in CUDA 12.4-13.x; room to spare
_SM_COUNT_OFFSET = 96  # after ``type`` (4 bytes) and ``_internal_padding[92]``


class DriverProbe:
    """Dry-run SM splits through the CUDA driver (``cuDevSmResourceSplitByCount``, CUDA 12.4+):
    the SM count a ``create(num_sms=n)`` gets, read without creating anything. PyTorch before
    2.15 splits the same way and does not expose the result. ``None`` when unavailable."""

    def __init__(self, device_index: int) -> None:
        self._lib: Any = None
        self._device = ctypes.c_int(0)
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            lib.cuInit(0)
            if lib.cuDeviceGet(ctypes.byref(self._device), device_index) != 0:
                return
            self._get = lib.cuDeviceGetDevResource
            self._split = lib.cuDevSmResourceSplitByCount
            self._lib = lib
        except (OSError, AttributeError):
            self._lib = None

    @property
    def available(self) -> bool:
        return self._lib is not None

    def _sm_count(self, buf: Any) -> int:
        return int(ctypes.c_uint.from_buffer(buf, _SM_COUNT_OFFSET).value)

    def device_sms(self) -> int | None:
        if self._lib is None:
            return None
        full = (ctypes.c_ubyte * _RESOURCE_BYTES)()
        if self._get(self._device, ctypes.byref(full), _CU_DEV_RESOURCE_TYPE_SM) != 0:
            return None
        return self._sm_count(full)

    def granted(self, min_count: int) -> int | None:
        if self._lib is None:
            return None
        full = (ctypes.c_ubyte * _RESOURCE_BYTES)()
        if self._get(self._device, ctypes.byref(full), _CU_DEV_RESOURCE_TYPE_SM) != 0:
            return None
        result = (ctypes.c_ubyte * _RESOURCE_BYTES)()
        remaining = (ctypes.c_ubyte * _RESOURCE_BYTES)()
        nb = ctypes.c_uint(1)
        rc = self._split(
            ctypes.byref(result),
            ctypes.byref(nb),
            ctypes.byref(full),
            ctypes.byref(remaining),
            ctypes.c_uint(0),
            ctypes.c_uint(min_count),
        )
        if rc != 0 or nb.value != 1:
            return None
        return self._sm_count(result)

    def grid(self, fallback: SMGrid) -> SMGrid:
        """The device's real minimum partition and step, probed; ``fallback`` if unavailable."""
        total = self.device_sms()
        smallest = self.granted(1)
        if not total or not smallest:
            return fallback
        nxt = self.granted(smallest + 1)
        step = (nxt - smallest) if nxt and nxt > smallest else fallback.granularity
        return SMGrid(total, step, smallest)


@dataclass(slots=True)
class _GreenSlot:
    ctx: Any
    stream: Any | None  # ctx.Stream() where the API has it, else None (set/pop context)
    info: GrantedPartition


@dataclass(slots=True)
class _ContextStackGuard:
    """Runs work between ``set_context()`` and ``pop_context()`` (the 2.10-2.11 API)."""

    ctx: Any
    cuda: Any

    @contextlib.contextmanager
    def enter(self) -> Iterator[Any]:
        self.ctx.set_context()
        try:
            yield self.cuda.current_stream()
        finally:
            self.ctx.pop_context()


class GreenContextBackend(PartitionBackend):
    """Green contexts per (partition plan, stage); the stage's worker runs on its context."""

    name = "green_context"

    def __init__(
        self, grid: SMGrid, api: GreenApi, device_index: int, cuda: Any, probe: Any | None = None
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
    def _readback(self, ctx: Any, part: Any | None, requested: int) -> tuple[int | None, str]:
        for source in (ctx, part):
            n = getattr(source, "sm_count", None) if source is not None else None
            if isinstance(n, int) and n > 0:
                return n, "driver"
        if self._probe is not None:
            n = self._probe.granted(requested)
            if n:
                return n, "driver-probe"
        return requested, "planned"

    def _new_slot(
        self, stage: Stage, plan: PartitionPlan, requested: int, part: Any | None
    ) -> _GreenSlot:
        ctx = (
            self.api.from_partition(part)
            if part is not None
            else self.api.create(requested, self.device_index)
        )
        stream = ctx.Stream() if hasattr(ctx, "Stream") else None
        granted, source = self._readback(ctx, part, requested)
        info = GrantedPartition(stage.value, plan.describe(), requested, granted, source)
        if granted is not None and granted != requested:
            log.warning(
                "green context for %s: asked for %d SMs, the driver granted %d",
                stage.value,
                requested,
                granted,
            )
        return _GreenSlot(ctx, stream, info)

    def _ensure_plan(self, plan: PartitionPlan) -> None:
        """Create the contexts of every limited stage of ``plan`` (caller holds the lock)."""
        todo = [
            (stages, n) for stages, n in plan.groups if (plan.key, stages[0]) not in self._slots
        ]
        if not todo:
            return
        parts: list[Any | None] = [None] * len(todo)
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

    def _enter(self, slot: _GreenSlot) -> AbstractContextManager[Any]:
        if slot.stream is not None:
            return _yielding(self._cuda.stream_guard(slot.stream), slot.stream)
        return _ContextStackGuard(slot.ctx, self._cuda).enter()

    # -- use ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def activate(self, stage: Stage, partition: Partition) -> Iterator[Any]:
        plan = self.plan(partition)
        if plan.stage_sms(stage) is None:
            stream = self._plain[stage]
            with self._cuda.stream_guard(stream):
                yield stream
            return
        with self._enter(self._slot(stage, plan)) as stream:
            yield stream

    def stream(self, stage: Stage, partition: Partition) -> Any | None:
        plan = self.plan(partition)
        if plan.stage_sms(stage) is None:
            return self._plain[stage]
        return self._slot(stage, plan).stream

    def granted_sms(self, stage: Stage, partition: Partition) -> int:
        plan = self.plan(partition)
        if plan.stage_sms(stage) is None:
            return self.grid.num_sms
        info = self._slot(stage, plan).info
        return info.granted_sms or info.requested_sms

    def share_context(self, share: float) -> AbstractContextManager[Any]:
        if share >= 1.0 - _EPS:
            return contextlib.nullcontext()
        n = self.grid.sms_for_share(share)
        with self._lock:
            slot = self._profile_slots.get(n)
            if slot is None:
                plan = PartitionPlan(((Stage.VISION, n),), (((Stage.VISION,), n),))
                slot = self._profile_slots[n] = self._new_slot(Stage.VISION, plan, n, None)
        return self._enter(slot)

    def share_granted_sms(self, share: float) -> int:
        if share >= 1.0 - _EPS:
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


@contextlib.contextmanager
def _yielding(guard: AbstractContextManager[Any], value: Any) -> Iterator[Any]:
    with guard:
        yield value


# -- selection -----------------------------------------------------------------------------------
def _import_green_module() -> Any | None:
    try:
        import torch.cuda.green_contexts as gc
    except ImportError:
        return None
    return gc


def make_backend(requested: str, device: Any) -> PartitionBackend:
    """The backend for ``--partition requested`` on ``device`` (a ``torch.device`` or string).

    ``auto``: green contexts when available, else ``none`` on CUDA / ``cpu`` on a CPU (logged).
    ``green_context`` that cannot be had raises ``PartitionUnavailable`` with the reason.
    """
    import torch

    if requested not in ("auto", "green_context", "none", "cpu"):
        raise PartitionUnavailable(
            f"unknown partition backend {requested!r}; choose auto, green_context, none or cpu"
        )
    device = torch.device(device)
    if device.type != "cuda":
        if requested == "green_context":
            raise PartitionUnavailable(
                f"--partition green_context needs a CUDA device; the device is {device}"
            )
        if requested == "none":
            log.info("partition none on %s: no streams on a CPU, using the cpu backend", device)
        return CpuBackend()
    if requested == "cpu":
        raise PartitionUnavailable(
            "--partition cpu is for CPU devices; on CUDA use auto, green_context or none"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    cuda = _TorchCuda(torch.device("cuda", index))
    props = torch.cuda.get_device_properties(index)
    fallback_grid = guideline_grid(props.multi_processor_count, props.major)
    if requested == "none":
        return StreamBackend(fallback_grid, cuda)
    try:
        backend = _green_backend(index, cuda, fallback_grid)
    except PartitionUnavailable as exc:
        if requested == "green_context":
            raise
        log.warning(
            "partition auto: green contexts unavailable (%s); using none (streams "
            "without SM limits)",
            exc,
        )
        return StreamBackend(fallback_grid, cuda)
    log.info("partition backend: %s", backend.describe())
    return backend


def _green_backend(index: int, cuda: Any, fallback_grid: SMGrid) -> GreenContextBackend:
    import torch

    api = detect_green_api(_import_green_module(), torch.__version__, torch.version.cuda)
    probe = DriverProbe(index)
    grid = probe.grid(fallback_grid) if probe.available else fallback_grid
    try:  # the driver must really create one: CUDA 12.4+ driver, a supported GPU
        trial = api.create(grid.min_sms, index)
        del trial
    except Exception as exc:
        raise PartitionUnavailable(
            f"creating a green context of {grid.min_sms} SMs failed ({type(exc).__name__}: {exc}); "
            "green contexts need a CUDA 12.4+ driver and PyTorch built with CUDA >= 12.8"
        ) from exc
    return GreenContextBackend(grid, api, index, cuda, probe if probe.available else None)


def backend_share_context(
    requested: str, device: Any
) -> Callable[[float], AbstractContextManager[Any]] | None:
    """``share_context`` for ``nova profile``: ``None`` when the backend cannot limit SMs."""
    backend = make_backend(requested, device)
    return backend.share_context if backend.enforces_limits else None
