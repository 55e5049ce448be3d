"""Analytic roofline cost model: a stage batch's latency from FLOPs, bytes and the SM share.

Torch-free. For a batch alone on its SMs (``solo``):

    compute_s = FLOPs / (peak_flops * share * mfu[stage])
    memory_s  = bytes / (hbm_bandwidth * bw_eff * min(1, share / bw_saturation_share))
    time_s    = max(compute_s, memory_s) + overhead_s[stage]

``share`` is what the GPU grants (``GpuSpec.granted_share``: rounded up to the SM
granularity). Compute scales linearly with SMs. Bandwidth does not: each SM can keep only so
many memory requests in flight, so HBM saturates once enough SMs issue loads; memory-bound
decode reaches (nearly) the full bandwidth with ~30% of the SMs (``bw_saturation_share``).
That asymmetry is why spatial sharing pays: decode on a third of the GPU runs almost as fast
as on all of it, and the other two thirds go to the compute-bound vision and prefill stages.
(The 0.3 is a documented assumption in line with the Nova paper's operating points -- decode
keeps 24-30 of the A6000's 84 SMs -- and with published bandwidth-vs-SM measurements on
Ampere/Hopper; replace it with a profiled curve when one is measured.)

Interference with co-running batches (``time_s(..., co_running, isolated)``), a steady-state
model (the co-running set is assumed fixed for the batch's duration):

- HBM bandwidth is always shared. Each running batch demands ``bytes / solo_time`` bytes/s;
  if the demands exceed the effective capacity ``hbm * bw_eff``, the capacity is divided
  max-min fairly (water-filling): batches demanding less than an equal split get all they
  ask, the rest is split among the heavy ones. (A split proportional to demand would starve
  light, compute-bound batches of the little bandwidth they need, which memory controllers
  do not do: their queues serve whoever has requests outstanding.) A batch that gets less
  than it demands takes ``bytes / allocated`` instead.
- Compute-bound work also slows a little when others load the memory system (L2 and memory
  queueing): compute time x (1 + ``hbm_contention_penalty`` x min(1, others' demand /
  capacity)). 0.08 is an estimate (SM-partitioned prefill/decode co-location is reported to
  cost prefill a few to ~10%); a profile replaces it.
- ``isolated=False`` (plain multi-stream, no SM partitions): stages also share SMs. Each
  batch's SM demand is its share if it is compute-bound, else the share it needs to reach its
  bandwidth (at least ``bw_saturation_share``); when the demands add up to more than the GPU,
  each batch gets SMs in proportion to its demand. On top, the batch's time is multiplied by
  (1 + ``multistream_overhead``) = 1.15 whenever anything co-runs: the block scheduler
  interleaves kernels of both streams, kernels wait on each other's tails, and caches thrash.
  The Nova paper reports heavy contention and unpredictable latency for this mode; 10-25% is
  the range reported for unpartitioned co-location of LLM stages; 15% is the middle. It is an
  uncalibrated estimate: profile the real multi-stream slowdown to replace it.

Calibration: ``calibrate_to_paper()`` fits the per-stage efficiencies so that the CogAgent-9B
shape (``specs/cogagent-9b.json``) on the A6000 reproduces the paper's stage times; the
defaults of ``Calibration`` are that fit, and are used unchanged for the other GPUs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from nova.cost.base import CoRunning, StageWork, TotalsKey, register_cost_model
from nova.cost.gpus import GpuSpec, check_share, get_gpu
from nova.cost.model_spec import ModelSpec, get_model_spec
from nova.types import Stage

# The Nova paper's stage times (RTX A6000, CogAgent-9B, 1120x1120 screenshot), seconds.
PAPER_GPU = "a6000"
PAPER_MODEL = "cogagent-9b"
PAPER_STAGE_TIMES_S: dict[Stage, float] = {
    Stage.VISION: 0.8068,  # one 1120x1120 image
    Stage.PREFILL: 0.3241,  # one prompt: 1600 image tokens + ~150 text tokens (our assumption)
    Stage.DECODE: 0.0289,  # one token, batch 1, context ~1800 tokens (our assumption)
}
PAPER_TEXT_TOKENS = 150
PAPER_DECODE_CONTEXT = 1800


def paper_works(model: ModelSpec | None = None) -> dict[Stage, StageWork]:
    """The batches behind ``PAPER_STAGE_TIMES_S`` (1 image; 1600 + 150 token prompt; decode at
    context 1800). The paper does not state the text length or decode context: ~150 text tokens
    (instruction + short history) and ~1800 context (prompt + a few dozen output tokens) are
    assumptions consistent with its GUI-agent workload."""
    spec = model or ModelSpec.named(PAPER_MODEL)
    return {
        Stage.VISION: StageWork.vision(1),
        Stage.PREFILL: StageWork.prefill(spec.image_tokens + PAPER_TEXT_TOKENS),
        Stage.DECODE: StageWork.decode(PAPER_DECODE_CONTEXT),
    }


@dataclass(slots=True, frozen=True)
class Calibration:
    """Efficiency constants of the roofline model (dimensionless unless suffixed).

    ``*_mfu``: achieved fraction of peak tensor FLOP/s for that stage's matmuls.
    ``bw_eff``: achieved fraction of peak HBM bandwidth for streaming weights / KV.
    ``*_overhead_s``: fixed time per batch (kernel launches, Python, sampling).
    Defaults: the fit of ``calibrate_to_paper()`` (rounded to 4 digits), given the overheads
    below (assumed: ~40 layers x ~10 eager kernel launches x ~4 us each).
    """

    vision_mfu: float = 0.5936
    prefill_mfu: float = 0.5928
    decode_mfu: float = 0.5  # not fitted (decode is memory-bound at the paper's batch 1)
    bw_eff: float = 0.8381
    vision_overhead_s: float = 0.002
    prefill_overhead_s: float = 0.002
    decode_overhead_s: float = 0.0015
    bw_saturation_share: float = 0.3
    hbm_contention_penalty: float = 0.08
    multistream_overhead: float = 0.15
    pcie_eff: float = 0.8

    def __post_init__(self) -> None:
        for name in (
            "vision_mfu",
            "prefill_mfu",
            "decode_mfu",
            "bw_eff",
            "bw_saturation_share",
            "pcie_eff",
        ):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"Calibration.{name} must be in (0, 1], got {value!r}")
        for name in (
            "vision_overhead_s",
            "prefill_overhead_s",
            "decode_overhead_s",
            "hbm_contention_penalty",
            "multistream_overhead",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"Calibration.{name} must be >= 0")

    def mfu(self, stage: Stage) -> float:
        return {
            Stage.VISION: self.vision_mfu,
            Stage.PREFILL: self.prefill_mfu,
            Stage.DECODE: self.decode_mfu,
        }[stage]

    def overhead_s(self, stage: Stage) -> float:
        return {
            Stage.VISION: self.vision_overhead_s,
            Stage.PREFILL: self.prefill_overhead_s,
            Stage.DECODE: self.decode_overhead_s,
        }[stage]

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(slots=True, frozen=True)
class Solo:
    """A batch alone on ``share`` of the SMs: its roofline terms (seconds) and traffic."""

    compute_s: float
    memory_s: float
    pcie_s: float  # weight streaming over PCIe (vision offload), overlapped with compute
    bytes: float
    share: float

    @property
    def busy_s(self) -> float:
        return max(self.compute_s, self.memory_s, self.pcie_s)

    @property
    def demand_bytes_per_s(self) -> float:
        """HBM bandwidth the batch uses on average while it runs alone."""
        return self.bytes / self.busy_s if self.busy_s > 0 else 0.0


@dataclass(slots=True, frozen=True)
class Breakdown:
    """Why ``time_s`` is what it is (all seconds; ``time_s`` = the answer)."""

    time_s: float
    compute_s: float
    memory_s: float
    pcie_s: float
    overhead_s: float
    effective_share: float  # SM share after granularity and (multi-stream) SM sharing
    contention_factor: float  # multi-stream overhead multiplier (1.0 when isolated / alone)

    @property
    def bound(self) -> str:
        terms = {"compute": self.compute_s, "memory": self.memory_s, "pcie": self.pcie_s}
        return max(terms, key=terms.__getitem__)


def water_fill(capacity: float, demands: Sequence[float]) -> list[float]:
    """Max-min fair split of ``capacity`` among ``demands`` (same units): nobody gets more than
    it demands; leftover is shared equally among the unsatisfied. Sum <= capacity."""
    alloc = [0.0] * len(demands)
    remaining = capacity
    order = sorted(range(len(demands)), key=lambda i: demands[i])
    for rank, i in enumerate(order):
        fair = remaining / (len(demands) - rank)
        alloc[i] = min(demands[i], fair)
        remaining -= alloc[i]
    return alloc


class RooflineCostModel:
    """Roofline latency of ``model``'s stages on ``gpu`` (see the module doc for the model)."""

    __slots__ = (
        "_capacity",
        "_gpu",
        "_granted",
        "_memo",
        "_overhead_s",
        "_solos",
        "calib",
        "model",
        "name",
        "offload_vision_weights",
    )
    _MEMO_MAX = 200_000  # entries: FLOPs/bytes/solo terms per shape (``shape_key``)

    def __init__(
        self,
        gpu: GpuSpec | str,
        model: ModelSpec | str,
        calib: Calibration | None = None,
        *,
        offload_vision_weights: bool = False,
    ) -> None:
        self.name = "roofline"
        self._gpu = get_gpu(gpu)
        self.model = get_model_spec(model)
        self.calib = calib or Calibration()
        self._overhead_s = {s: self.calib.overhead_s(s) for s in Stage}
        self._capacity = self._gpu.hbm_bytes_per_s * self.calib.bw_eff  # effective HBM B/s
        self._solos: dict[tuple[TotalsKey, float], Solo] = {}  # (shape key, share) -> solo terms
        self._granted: dict[float, float] = {}  # share asked -> share granted
        # Vision weights streamed from host memory layer by layer (the paper's offloading):
        # a PCIe transfer term overlapped with compute, plus one layer's load up front.
        self.offload_vision_weights = offload_vision_weights
        self._memo: dict[Hashable, float] = {}  # FLOPs, bytes, solo times

    def __repr__(self) -> str:
        return f"RooflineCostModel(gpu={self._gpu.name!r}, model={self.model.name!r})"

    def gpu(self) -> GpuSpec:
        return self._gpu

    # -- work -> FLOPs / bytes -----------------------------------------------------------------
    def _memoized(self, key: Hashable, compute: Callable[[], float]) -> float:
        value = self._memo.get(key)
        if value is None:
            if len(self._memo) >= self._MEMO_MAX:
                self._memo.clear()
            value = self._memo[key] = compute()
        return value

    @staticmethod
    def shape_key(work: StageWork) -> TotalsKey:
        """What ``time_s`` depends on in ``work``: its totals (``StageWork.totals_key``; FLOPs
        and bytes are sums over the sequences). Equal keys, equal times: an exact memo key."""
        return work.totals_key()

    def flops(self, work: StageWork, key: TotalsKey | None = None) -> float:
        memo_key = ("flops", key or work.totals_key())
        if work.stage is Stage.VISION:
            return self._memoized(memo_key, lambda: self.model.vision_flops(work.num_images))
        return self._memoized(
            memo_key, lambda: self.model.llm_flops(work.new_tokens, work.context_lens)
        )

    def bytes(self, work: StageWork, key: TotalsKey | None = None) -> float:
        memo_key = ("bytes", key or work.totals_key())
        if work.stage is Stage.VISION:
            return self._memoized(memo_key, lambda: self.model.vision_bytes(work.num_images))
        return self._memoized(
            memo_key, lambda: self.model.llm_bytes(work.new_tokens, work.context_lens)
        )

    # -- solo ----------------------------------------------------------------------------------
    def attainable_bw_bytes_per_s(self, share: float) -> float:
        """Effective HBM bandwidth reachable with ``share`` of the SMs (no co-runners)."""
        c = self.calib
        return self._gpu.hbm_bytes_per_s * c.bw_eff * min(1.0, share / c.bw_saturation_share)

    def solo(self, work: StageWork, share: float, key: TotalsKey | None = None) -> Solo:
        """Roofline terms with exactly ``share`` of the SMs (no granularity rounding here).
        ``key``: ``shape_key(work)`` if the caller has it."""
        key = key or work.totals_key()
        solo = self._solos.get((key, share))
        if solo is None:
            if len(self._solos) >= self._MEMO_MAX:
                self._solos.clear()
            solo = self._solos[(key, share)] = self._solo(work, share, key)
        return solo

    def _solo(self, work: StageWork, share: float, key: TotalsKey) -> Solo:
        c, g = self.calib, self._gpu
        nbytes = self.bytes(work, key)
        compute_s = self.flops(work, key) / (g.peak_flops * share * c.mfu(work.stage))
        memory_s = nbytes / self.attainable_bw_bytes_per_s(share)
        pcie_s = 0.0
        if self.offload_vision_weights and work.stage is Stage.VISION:
            pcie_s = (
                self.model.vision_params()
                * self.model.bytes_per_param
                / (g.pcie_bytes_per_s * c.pcie_eff)
            )
        return Solo(compute_s, memory_s, pcie_s, nbytes, share)

    def _granted_share(self, share: float) -> float:
        """``GpuSpec.granted_share``, memoized (it validates the share on the first call)."""
        granted = self._granted.get(share)
        if granted is None:
            granted = self._granted[share] = self._gpu.granted_share(share)
        return granted

    def _sm_demand(self, work: StageWork, share: float, key: TotalsKey | None = None) -> float:
        """SM share a batch keeps busy when it may use ``share``: all of it if compute-bound,
        else what it needs to reach its bandwidth (>= ``bw_saturation_share``)."""
        s = self.solo(work, share, key)
        if s.compute_s >= s.memory_s:
            return share
        return min(share, max(self.calib.bw_saturation_share, share * s.compute_s / s.memory_s))

    # -- the CostModel interface ---------------------------------------------------------------
    def time_s(
        self, work: StageWork, sm_share: float, co_running: CoRunning = (), isolated: bool = True
    ) -> float:
        if co_running:
            return self._terms(work, sm_share, co_running, isolated)[0]
        # Alone: memoized per shape and share (the same float ``breakdown`` computes).
        key = ("time", work.totals_key(), sm_share)
        time_s = self._memo.get(key)
        if time_s is None:
            time_s = self._memoized(key, lambda: self._terms(work, sm_share, (), isolated)[0])
        return time_s

    def breakdown(
        self, work: StageWork, sm_share: float, co_running: CoRunning = (), isolated: bool = True
    ) -> Breakdown:
        return Breakdown(*self._terms(work, sm_share, co_running, isolated))

    def _terms(
        self,
        work: StageWork,
        sm_share: float,
        co_running: CoRunning,
        isolated: bool,
        pair_path: bool = True,
    ) -> tuple[float, float, float, float, float, float, float]:
        """``Breakdown``'s fields, in order (a tuple: ``time_s`` needs only the first).
        ``pair_path=False``: the general code even for one co-runner (tests compare them)."""
        if pair_path and len(co_running) == 1:
            return self._terms_pair(work, sm_share, co_running[0], isolated)
        c, g = self.calib, self._gpu
        if co_running:
            works = [work] + [w for w, _ in co_running]
            keys = [w.totals_key() for w in works]
            for _, s in co_running:
                check_share(s)
            shares = [self._granted_share(sm_share)] + [
                self._granted_share(s) for _, s in co_running
            ]
        else:
            works, keys, shares = [work], [work.totals_key()], [self._granted_share(sm_share)]
        contention = 1.0
        if not isolated and co_running:
            demands = [self._sm_demand(w, s, k) for w, s, k in zip(works, shares, keys)]
            total = sum(demands)
            if total > 1.0:
                shares = [d / total for d in demands]
            contention = 1.0 + c.multistream_overhead
        solos = [self.solo(w, s, k) for w, s, k in zip(works, shares, keys)]
        me = solos[0]
        compute_s, memory_s = me.compute_s, me.memory_s
        if co_running:
            capacity = g.hbm_bytes_per_s * c.bw_eff
            rates = [s.demand_bytes_per_s for s in solos]
            alloc = water_fill(capacity, rates)[0]
            if alloc < rates[0]:
                memory_s = max(memory_s, me.bytes / alloc)
            others_load = min(1.0, sum(rates[1:]) / capacity)
            compute_s *= 1.0 + c.hbm_contention_penalty * others_load
        busy_s = max(compute_s, memory_s, me.pcie_s) * contention
        startup_s = me.pcie_s / max(1, self.model.vision_layers) if me.pcie_s else 0.0
        overhead_s = self._overhead_s[work.stage] + startup_s
        return (
            busy_s + overhead_s,
            compute_s,
            memory_s,
            me.pcie_s,
            overhead_s,
            shares[0],
            contention,
        )

    def _terms_pair(
        self, work: StageWork, sm_share: float, other: tuple[StageWork, float], isolated: bool
    ) -> tuple[float, float, float, float, float, float, float]:
        """``_terms`` with exactly one co-runner (the common case), the same arithmetic in the
        same order without the lists (the simulator asks this for most events)."""
        c = self.calib
        other_work, other_share = other
        check_share(other_share)
        key, other_key = work.totals_key(), other_work.totals_key()
        share, share_o = self._granted_share(sm_share), self._granted_share(other_share)
        contention = 1.0
        if not isolated:
            d0 = self._sm_demand(work, share, key)
            d1 = self._sm_demand(other_work, share_o, other_key)
            total = d0 + d1
            if total > 1.0:
                share, share_o = d0 / total, d1 / total
            contention = 1.0 + c.multistream_overhead
        me = self.solo(work, share, key)
        them = self.solo(other_work, share_o, other_key)
        compute_s, memory_s = me.compute_s, me.memory_s
        capacity = self._capacity
        busy = max(me.compute_s, me.memory_s, me.pcie_s)
        rate0 = me.bytes / busy if busy > 0 else 0.0  # = me.demand_bytes_per_s
        busy = max(them.compute_s, them.memory_s, them.pcie_s)
        rate1 = them.bytes / busy if busy > 0 else 0.0
        # water_fill(capacity, [rate0, rate1])[0]: the smaller demand first (ties: rate0)
        if rate0 <= rate1:
            alloc = min(rate0, capacity / 2)
        else:
            alloc = min(rate0, capacity - min(rate1, capacity / 2))
        if alloc < rate0:
            memory_s = max(memory_s, me.bytes / alloc)
        others_load = min(1.0, rate1 / capacity)
        compute_s *= 1.0 + c.hbm_contention_penalty * others_load
        busy_s = max(compute_s, memory_s, me.pcie_s) * contention
        startup_s = me.pcie_s / max(1, self.model.vision_layers) if me.pcie_s else 0.0
        overhead_s = self._overhead_s[work.stage] + startup_s
        return (busy_s + overhead_s, compute_s, memory_s, me.pcie_s, overhead_s, share, contention)


@register_cost_model("roofline")
def _make_roofline(
    gpu: GpuSpec | str, model: ModelSpec | str, calib: Calibration | None = None, **kw: Any
) -> RooflineCostModel:
    return RooflineCostModel(gpu, model, calib, **kw)


def calibrate_to_paper(
    gpu: GpuSpec | str = PAPER_GPU,
    model: ModelSpec | str = PAPER_MODEL,
    targets_s: dict[Stage, float] | None = None,
    base: Calibration | None = None,
) -> Calibration:
    """Fit ``vision_mfu``, ``prefill_mfu`` and ``bw_eff`` so that ``model`` on ``gpu`` (full GPU,
    nothing co-running) takes ``targets_s`` (default: the paper's times) for ``paper_works``.

    Exact by construction: vision and prefill are compute-bound there (checked), decode is
    memory-bound (checked); the per-batch overheads of ``base`` are kept.
    """
    base = base or Calibration()
    targets = targets_s or PAPER_STAGE_TIMES_S
    g, spec = get_gpu(gpu), get_model_spec(model)
    works = paper_works(spec)
    probe = RooflineCostModel(g, spec, base)
    fit: dict[str, float] = {}
    for stage, field_name in ((Stage.VISION, "vision_mfu"), (Stage.PREFILL, "prefill_mfu")):
        busy_s = targets[stage] - base.overhead_s(stage)
        fit[field_name] = probe.flops(works[stage]) / (g.peak_flops * busy_s)
    busy_s = targets[Stage.DECODE] - base.overhead_s(Stage.DECODE)
    fit["bw_eff"] = probe.bytes(works[Stage.DECODE]) / (g.hbm_bytes_per_s * busy_s)
    calib = dataclasses.replace(base, **fit)
    fitted = RooflineCostModel(g, spec, calib)
    expected = {Stage.VISION: "compute", Stage.PREFILL: "compute", Stage.DECODE: "memory"}
    for stage, bound in expected.items():
        got = fitted.breakdown(works[stage], 1.0).bound
        if got != bound:
            raise ValueError(
                f"calibration: {stage.value} should be {bound}-bound at the paper's "
                f"shape, the fit makes it {got}-bound"
            )
    return calib
