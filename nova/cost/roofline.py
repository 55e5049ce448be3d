"""Analytic roofline cost model: a stage batch's latency from FLOPs, bytes and the SMs it runs on.

Torch-free. Every constant comes from the GPU's evidence files (``nova.cost.evidence``,
``nova/cost/data/``), each naming its source; ``docs/scheduler.md`` ("Cost model") lists them.
A batch alone on ``k`` SMs (``k = GpuSpec.granted_sms(share)``: the count the partition really
has, ``nova.cost.sm_grid``) of a GPU with ``N``:

    compute_s = sum over GEMMs g of flops_g / wave_efficiency_g(k) + other FLOPs
                ------------------------------------------------------------------
                        k / N * peak_flops * efficiency[stage]
    memory_s  = bytes / (hbm_bandwidth * decode_bandwidth_fraction * hbm_vs_sms(k))
    time_s    = max(compute_s, memory_s, pcie_s) + overhead_s[stage]

- **Wave quantization** (Bullet, arXiv 2504.19516 §2.2.1): a GEMM of ``M x N`` with output
  tiles ``gemm_tile_m x gemm_tile_n`` has ``tiles = ceil(M/tm) * ceil(N/tn)`` thread blocks;
  on ``k`` SMs running ``ctas_per_sm`` each they take ``waves = ceil(tiles / slots)`` waves, and
  the efficiency is ``tiles / (waves * slots)`` (the last wave's idle SMs). A GEMM with fewer
  tiles than slots is assumed to fill the partition (cuBLAS picks split-K or smaller tiles for
  such shapes). Decode's GEMMs (M = batch) are not quantized (GEMV-like kernels). Attention,
  patch embedding and the projector scale with ``k`` without quantization.
- **Bandwidth vs SMs**: ``hbm_vs_sms`` is a measured curve per GPU family (``evidence``),
  not a fixed saturation point: a partition reaches a fraction of the bandwidth that depends on
  how many bytes its SMs keep in flight.
- ``efficiency[stage]`` is the fraction of peak tensor FLOP/s a stage's GEMMs reach in full
  waves: on the A6000 fitted to the Nova paper's stage times (``calibrate_to_paper``); on other
  GPUs their measured large-GEMM ceiling times the A6000 fit's ratio to its own ceiling (the
  data files say so). ``Calibration`` holds these per GPU.

Interference with co-running batches (``time_s(..., co_running, isolated)``), a steady-state
model (the co-running set is assumed fixed for the batch's duration):

- HBM bandwidth is always shared. Each running batch demands ``bytes / solo_time`` bytes/s;
  if the demands exceed the achievable capacity (``hbm * decode_bandwidth_fraction``), it is
  divided max-min fairly (water-filling): batches demanding less than an equal split get all
  they ask, the rest is split among the heavy ones. A batch that gets less than it demands
  takes ``bytes / allocated``.
- Beyond raw bandwidth (L2, memory queues): compute time x (1 + ``interference_compute_per_load``
  x the others' bandwidth demand / capacity) (Bullet Fig. 10: < 8% beside a copy kernel); a
  memory-bound batch's memory time x (1 + ``interference_memory_beside_compute``) while a
  compute-bound batch co-runs (NanoFlow Table 3, MuxWise: decode is the sensitive side).
- ``isolated=False`` (plain multi-stream, no SM partitions): stages also share SMs. Each batch's
  SM demand is its share if it is compute-bound, else the SMs it needs to reach its bandwidth
  (at least where ``hbm_vs_sms`` reaches 95%); when the demands exceed the GPU, SMs are split in
  proportion to demand. Every batch is then slowed by (1 + ``multistream_overhead``) (Bullet
  §4.4: unpartitioned decode beside prefill 1.19-1.20x worse than partitioned).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from nova.cost.base import CoRunning, StageWork, TotalsKey, register_cost_model
from nova.cost.evidence import BandwidthCurve, GpuEvidence, load_evidence
from nova.cost.gpus import GpuSpec, check_share, get_gpu
from nova.cost.model_spec import Gemm, ModelSpec, get_model_spec
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

# Enum members as module constants: ``Stage.DECODE`` is looked up through the enum's metaclass
# (about ten times a global's cost in CPython 3.11), and a cost-model miss tests them
# several times.
_VISION, _PREFILL = Stage.VISION, Stage.PREFILL


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
    """The per-GPU efficiency constants of the roofline model (dimensionless unless suffixed).

    ``*_mfu``: fraction of peak tensor FLOP/s a stage's GEMMs reach in full waves (the
    evidence's ``*_efficiency``). ``bw_eff``: fraction of peak HBM bandwidth the decode step
    reaches on the whole GPU (``decode_bandwidth_fraction``). ``*_overhead_s``: fixed time per
    batch. ``pcie_eff``: achieved fraction of the PCIe link. ``Calibration.for_gpu(name)``: the
    shipped evidence's values; ``calibrate_to_paper()`` refits the A6000's.
    """

    vision_mfu: float
    prefill_mfu: float
    decode_mfu: float
    bw_eff: float
    vision_overhead_s: float
    prefill_overhead_s: float
    decode_overhead_s: float
    pcie_eff: float

    def __post_init__(self) -> None:
        for name in ("vision_mfu", "prefill_mfu", "decode_mfu", "bw_eff", "pcie_eff"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"Calibration.{name} must be in (0, 1], got {value!r}")
        for name in ("vision_overhead_s", "prefill_overhead_s", "decode_overhead_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"Calibration.{name} must be >= 0")

    @classmethod
    def from_evidence(cls, ev: GpuEvidence) -> Calibration:
        return cls(
            vision_mfu=ev["vision_efficiency"],
            prefill_mfu=ev["prefill_efficiency"],
            decode_mfu=ev["decode_efficiency"],
            bw_eff=ev["decode_bandwidth_fraction"],
            vision_overhead_s=ev["vision_overhead_s"],
            prefill_overhead_s=ev["prefill_overhead_s"],
            decode_overhead_s=ev["decode_overhead_s"],
            pcie_eff=ev["pcie_efficiency"],
        )

    @classmethod
    def for_gpu(cls, gpu: GpuSpec | str) -> Calibration:
        """The shipped evidence's calibration of ``gpu``."""
        return cls.from_evidence(load_evidence(get_gpu(gpu).name))

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
class Interference:
    """Co-running constants (see the module doc; values from the evidence files)."""

    compute_per_load: float
    memory_beside_compute: float
    multistream_overhead: float

    @classmethod
    def from_evidence(cls, ev: GpuEvidence) -> Interference:
        return cls(
            ev["interference_compute_per_load"],
            ev["interference_memory_beside_compute"],
            ev["multistream_overhead"],
        )


def wave_efficiency(m: int, n: int, slots: float, tile_m: int, tile_n: int) -> float:
    """Useful share of ``slots`` thread-block slots over the waves an ``m x n`` GEMM output
    needs in ``tile_m x tile_n`` tiles (Bullet §2.2.1); 1.0 when the tiles do not fill one wave
    (the library then splits K or picks smaller tiles)."""
    tiles = -(-m // tile_m) * -(-n // tile_n)
    if tiles <= slots:
        return 1.0
    waves = math.ceil(tiles / slots - 1e-9)
    return tiles / (waves * slots)


@dataclass(slots=True, frozen=True)
class Solo:
    """A batch alone on ``sms`` SMs: its roofline terms (seconds) and traffic."""

    compute_s: float
    memory_s: float
    pcie_s: float  # weight streaming over PCIe (vision offload), overlapped with compute
    bytes: float
    sms: float

    @property
    def busy_s(self) -> float:
        return max(self.compute_s, self.memory_s, self.pcie_s)

    @property
    def demand_bytes_per_s(self) -> float:
        """HBM bandwidth the batch uses on average while it runs alone."""
        busy_s = self.busy_s
        return self.bytes / busy_s if busy_s > 0 else 0.0

    @property
    def compute_bound(self) -> bool:
        return self.compute_s >= self.memory_s


@dataclass(slots=True, frozen=True)
class Breakdown:
    """Why ``time_s`` is what it is (all seconds; ``time_s`` = the answer)."""

    time_s: float
    compute_s: float
    memory_s: float
    pcie_s: float
    overhead_s: float
    effective_share: float  # SM share after granting and (multi-stream) SM sharing
    contention_factor: float  # multi-stream overhead multiplier (1.0 when isolated / alone)

    @property
    def bound(self) -> str:
        terms = {"compute": self.compute_s, "memory": self.memory_s, "pcie": self.pcie_s}
        return max(terms, key=terms.__getitem__)


def water_fill(capacity: float, demands: Sequence[float]) -> list[float]:
    """Max-min fair split of ``capacity`` among ``demands`` (same units): nobody gets more than
    it demands; leftover is shared equally among the unsatisfied. Sum <= capacity."""
    n = len(demands)
    alloc = [0.0] * n
    remaining = capacity
    for rank, i in enumerate(sorted(range(n), key=demands.__getitem__)):
        fair = remaining / (n - rank)
        demand = demands[i]
        alloc[i] = share = fair if fair < demand else demand  # = min(demand, fair)
        remaining -= share
    return alloc


# Multi-stream: a memory-bound batch keeps at least the SMs where its curve reaches this.
_SATURATION_LEVEL = 0.95


class RooflineCostModel:
    """Roofline latency of ``model``'s stages on ``gpu`` (see the module doc for the model)."""

    __slots__ = (
        "_bw_fractions",
        "_capacity",
        "_curve",
        "_gpu",
        "_granted",
        "_granted_groups",
        "_granted_pairs",
        "_memo",
        "_mfu",
        "_overhead_s",
        "_per_sm_flops",
        "_saturation_share",
        "_solos",
        "_tile",
        "_waves",
        "calib",
        "evidence",
        "interference",
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
        evidence: GpuEvidence | None = None,
    ) -> None:
        self.name = "roofline"
        self._gpu = get_gpu(gpu)
        self.model = get_model_spec(model)
        self.evidence = evidence or load_evidence(self._gpu.name)
        self.calib = calib or Calibration.from_evidence(self.evidence)
        self.interference = Interference.from_evidence(self.evidence)
        ev = self.evidence
        self._tile = (int(ev["gemm_tile_m"]), int(ev["gemm_tile_n"]), ev["ctas_per_sm"])
        self._curve: BandwidthCurve = ev.hbm_vs_sms
        self._overhead_s = {s: self.calib.overhead_s(s) for s in Stage}
        self._mfu = {s: self.calib.mfu(s) for s in Stage}
        self._capacity = self._gpu.hbm_bytes_per_s * self.calib.bw_eff  # achievable HBM B/s
        self._per_sm_flops = self._gpu.peak_flops / self._gpu.num_sms
        self._saturation_share = (
            self._curve.sms_for(_SATURATION_LEVEL, self._gpu.num_sms) / self._gpu.num_sms
        )
        self._solos: dict[tuple[TotalsKey, float], Solo] = {}  # (shape key, SMs) -> solo terms
        self._granted: dict[float, float] = {}  # share asked -> SMs granted
        self._bw_fractions: dict[float, float] = {}  # SMs -> ``bandwidth_fraction``
        # shares -> SMs granted to each side by side (isolated)
        self._granted_groups: dict[tuple[float, ...], tuple[float, ...]] = {}
        # (share, co-runner's share) -> SMs granted to both side by side (isolated)
        self._granted_pairs: dict[tuple[float, float], tuple[float, float]] = {}
        # Vision weights streamed from host memory layer by layer (the paper's offloading):
        # a PCIe transfer term overlapped with compute, plus one layer's load up front.
        self.offload_vision_weights = offload_vision_weights
        self._memo: dict[Hashable, float] = {}  # FLOPs, bytes, solo times
        self._waves: dict[tuple[TotalsKey, float], tuple[float, ...]] = {}  # ``_wave_terms``

    def __repr__(self) -> str:
        return f"RooflineCostModel(gpu={self._gpu.name!r}, model={self.model.name!r})"

    def gpu(self) -> GpuSpec:
        return self._gpu

    # -- work -> FLOPs / bytes -----------------------------------------------------------------
    def _remember(self, key: Hashable, value: float) -> float:
        """Store ``value`` in the memo (cleared when full); returns it. Callers look the key up
        first themselves (no closure built per lookup: the simulator's misses go through
        here)."""
        if len(self._memo) >= self._MEMO_MAX:
            self._memo.clear()
        self._memo[key] = value
        return value

    # shape_key(work): what ``time_s`` depends on in ``work``: its totals (FLOPs, bytes and GEMM
    # shapes are functions of the totals). Equal keys, equal times: an exact memo key. It is
    # ``StageWork.totals_key`` itself (the simulator calls it once per batch).
    shape_key = staticmethod(StageWork.totals_key)

    def flops(self, work: StageWork, key: TotalsKey | None = None) -> float:
        memo_key = ("flops", key or work.totals_key())
        value = self._memo.get(memo_key)
        if value is not None:
            return value
        if work.stage is _VISION:
            return self._remember(memo_key, self.model.vision_flops(work.num_images))
        return self._remember(memo_key, self.model.llm_flops(work.new_tokens, work.context_lens))

    def bytes(self, work: StageWork, key: TotalsKey | None = None) -> float:
        memo_key = ("bytes", key or work.totals_key())
        value = self._memo.get(memo_key)
        if value is not None:
            return value
        if work.stage is _VISION:
            return self._remember(memo_key, self.model.vision_bytes(work.num_images))
        return self._remember(memo_key, self.model.llm_bytes(work.new_tokens, work.context_lens))

    def gemms(self, work: StageWork) -> tuple[Gemm, ...]:
        """The GEMMs wave quantization applies to (none for decode)."""
        if work.stage is _VISION:
            return self.model.vision_gemms(work.num_images)
        if work.stage is _PREFILL:
            return self.model.llm_gemms(work.total_new_tokens, work.num_seqs)
        return ()

    def quantized_flops(self, work: StageWork, sms: float, key: TotalsKey | None = None) -> float:
        """FLOPs as if every GEMM ran full waves: each GEMM's FLOPs / its wave efficiency on
        ``sms`` SMs, plus the FLOPs wave quantization does not apply to."""
        key = key or work.totals_key()
        memo_key = ("qflops", key, sms)
        value = self._memo.get(memo_key)
        if value is not None:
            return value
        out = self.flops(work, key)
        for extra in self._wave_terms(work, key, sms):
            out += extra
        return self._remember(memo_key, out)

    def _wave_terms(self, work: StageWork, key: TotalsKey, sms: float) -> tuple[float, ...]:
        """Per GEMM, the FLOPs its last wave wastes on ``sms`` SMs (its FLOPs / its wave
        efficiency - its FLOPs). The GEMM shapes depend on the stage and the image, sequence
        and new-token counts only (``key[:3]``), not on the context: memoized on those, so a
        prefill chunk at a new context length computes no wave."""
        shape = (key[:3], sms)
        terms = self._waves.get(shape)
        if terms is None:
            tile_m, tile_n, ctas = self._tile
            slots = sms * ctas
            out = []
            for m, n, k, count in self.gemms(work):
                f = 2.0 * m * n * k * count
                out.append(f / wave_efficiency(m, n, slots, tile_m, tile_n) - f)
            if len(self._waves) >= self._MEMO_MAX:
                self._waves.clear()
            terms = self._waves[shape] = tuple(out)
        return terms

    # -- solo ----------------------------------------------------------------------------------
    def bandwidth_fraction(self, sms: float) -> float:
        """Fraction of the achievable bandwidth ``sms`` SMs reach (``hbm_vs_sms``; memoized: a
        few SM counts occur)."""
        fraction = self._bw_fractions.get(sms)
        if fraction is None:
            fraction = self._bw_fractions[sms] = self._curve.fraction(sms, self._gpu.num_sms)
        return fraction

    def attainable_bw_bytes_per_s(self, share: float) -> float:
        """Achievable HBM bandwidth with ``share`` of the SMs (granted; nothing co-running)."""
        return self._capacity * self.bandwidth_fraction(self._gpu.granted_sms(share))

    def solo(self, work: StageWork, sms: float, key: TotalsKey | None = None) -> Solo:
        """Roofline terms on exactly ``sms`` SMs (no granting here; may be fractional when
        streams share SMs). ``key``: ``shape_key(work)`` if the caller has it."""
        key = key or work.totals_key()
        solo = self._solos.get((key, sms))
        if solo is None:
            if len(self._solos) >= self._MEMO_MAX:
                self._solos.clear()
            solo = self._solos[(key, sms)] = self._solo(work, sms, key)
        return solo

    def _solo(self, work: StageWork, sms: float, key: TotalsKey) -> Solo:
        c, g = self.calib, self._gpu
        nbytes = self.bytes(work, key)
        flops = self.quantized_flops(work, sms, key)
        compute_s = flops / (self._per_sm_flops * sms * self._mfu[work.stage])
        memory_s = nbytes / (self._capacity * self.bandwidth_fraction(sms))
        pcie_s = 0.0
        if self.offload_vision_weights and work.stage is _VISION:
            pcie_s = (
                self.model.vision_params()
                * self.model.bytes_per_param
                / (g.pcie_bytes_per_s * c.pcie_eff)
            )
        return Solo(compute_s, memory_s, pcie_s, nbytes, sms)

    def _granted_sms(self, share: float) -> float:
        """``GpuSpec.granted_sms``, memoized (it validates the share on the first call)."""
        granted = self._granted.get(share)
        if granted is None:
            granted = self._granted[share] = float(self._gpu.granted_sms(share))
        return granted

    def _granted_side_by_side(self, shares: Sequence[float]) -> tuple[float, ...]:
        """SMs of isolated partitions that run together: ``SmGrid.granted_together`` (never
        more than the device in all, whatever shares the policy asked for); memoized (a few
        share sets occur)."""
        key = tuple(shares)
        sms = self._granted_groups.get(key)
        if sms is None:
            sms = tuple([float(n) for n in self._gpu.grid.granted_together(key)])
            self._granted_groups[key] = sms
        return sms

    def _granted_pair(self, share: float, other: float) -> tuple[float, float]:
        pair = self._granted_pairs.get((share, other))
        if pair is None:
            a, b = self._granted_side_by_side((share, other))
            pair = self._granted_pairs[(share, other)] = (a, b)
        return pair

    def _sm_demand(self, work: StageWork, sms: float, key: TotalsKey | None = None) -> float:
        """SMs a batch keeps busy when it may use ``sms``: all of them if compute-bound, else
        what it needs to reach its bandwidth (at least where the curve reaches 95%)."""
        s = self.solo(work, sms, key)
        if s.compute_s >= s.memory_s:
            return sms
        floor = self._saturation_share * self._gpu.num_sms
        return min(sms, max(floor, sms * s.compute_s / s.memory_s))

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
            time_s = self._remember(key, self._terms_alone(work, sm_share)[0])
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
        if not co_running:
            return self._terms_alone(work, sm_share)
        if pair_path and len(co_running) == 1:
            return self._terms_pair(work, sm_share, co_running[0], isolated)
        inter, n = self.interference, self._gpu.num_sms
        works, shares = [work], [sm_share]
        for w, share in co_running:
            check_share(share)
            works.append(w)
            shares.append(share)
        keys = [w.totals_key() for w in works]
        sms: Sequence[float]
        contention = 1.0
        if isolated:
            sms = self._granted_side_by_side(shares)
        else:
            sms = [self._granted_sms(s) for s in shares]
            demands = [self._sm_demand(w, k_sms, k) for w, k_sms, k in zip(works, sms, keys)]
            total = sum(demands)
            if total > n:
                sms = [d / total * n for d in demands]
            contention = 1.0 + inter.multistream_overhead
        solos = [self.solo(w, k_sms, k) for w, k_sms, k in zip(works, sms, keys)]
        me = solos[0]
        compute_s, memory_s = me.compute_s, me.memory_s
        capacity = self._capacity
        rates: list[float] = []  # each one's Solo.demand_bytes_per_s
        others_compute_bound = False  # any(s.compute_bound for s in solos[1:])
        for i, solo in enumerate(solos):
            busy = max(solo.compute_s, solo.memory_s, solo.pcie_s)
            rates.append(solo.bytes / busy if busy > 0 else 0.0)
            if i and solo.compute_s >= solo.memory_s:
                others_compute_bound = True
        alloc = water_fill(capacity, rates)[0]
        if alloc < rates[0]:
            memory_s = max(memory_s, me.bytes / alloc)
        if others_compute_bound:
            memory_s *= 1.0 + inter.memory_beside_compute
        others_load = min(1.0, sum(rates[1:]) / capacity)
        compute_s *= 1.0 + inter.compute_per_load * others_load
        busy_s = max(compute_s, memory_s, me.pcie_s) * contention
        startup_s = me.pcie_s / max(1, self.model.vision_layers) if me.pcie_s else 0.0
        overhead_s = self._overhead_s[work.stage] + startup_s
        return (
            busy_s + overhead_s,
            compute_s,
            memory_s,
            me.pcie_s,
            overhead_s,
            sms[0] / n,
            contention,
        )

    def _terms_alone(
        self, work: StageWork, sm_share: float
    ) -> tuple[float, float, float, float, float, float, float]:
        """``_terms`` with nothing co-running (isolation does not matter then): the same
        arithmetic without the lists."""
        sms = self._granted_sms(sm_share)
        me = self.solo(work, sms)
        compute_s, memory_s, pcie_s = me.compute_s, me.memory_s, me.pcie_s
        contention = 1.0
        busy_s = max(compute_s, memory_s, pcie_s) * contention
        startup_s = pcie_s / max(1, self.model.vision_layers) if pcie_s else 0.0
        overhead_s = self._overhead_s[work.stage] + startup_s
        return (
            busy_s + overhead_s,
            compute_s,
            memory_s,
            pcie_s,
            overhead_s,
            sms / self._gpu.num_sms,
            contention,
        )

    def _terms_pair(
        self, work: StageWork, sm_share: float, other: tuple[StageWork, float], isolated: bool
    ) -> tuple[float, float, float, float, float, float, float]:
        """``_terms`` with exactly one co-runner (the common case), the same arithmetic in the
        same order without the lists (the simulator asks this for most events)."""
        inter, n = self.interference, self._gpu.num_sms
        other_work, other_share = other
        check_share(other_share)
        key, other_key = work.totals_key(), other_work.totals_key()
        if isolated:
            sms, sms_o = self._granted_pair(sm_share, other_share)
        else:
            sms, sms_o = self._granted_sms(sm_share), self._granted_sms(other_share)
        contention = 1.0
        if not isolated:
            d0 = self._sm_demand(work, sms, key)
            d1 = self._sm_demand(other_work, sms_o, other_key)
            total = d0 + d1
            if total > n:
                sms, sms_o = d0 / total * n, d1 / total * n
            contention = 1.0 + inter.multistream_overhead
        me = self.solo(work, sms, key)
        them = self.solo(other_work, sms_o, other_key)
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
        if them.compute_s >= them.memory_s:
            memory_s *= 1.0 + inter.memory_beside_compute
        others_load = min(1.0, rate1 / capacity)
        compute_s *= 1.0 + inter.compute_per_load * others_load
        busy_s = max(compute_s, memory_s, me.pcie_s) * contention
        startup_s = me.pcie_s / max(1, self.model.vision_layers) if me.pcie_s else 0.0
        overhead_s = self._overhead_s[work.stage] + startup_s
        return (
            busy_s + overhead_s,
            compute_s,
            memory_s,
            me.pcie_s,
            overhead_s,
            sms / n,
            contention,
        )


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
    memory-bound (checked); the per-batch overheads of ``base`` (default: the GPU's evidence)
    are kept, and so is wave quantization at the full GPU (the efficiencies are per full wave).
    """
    g, spec = get_gpu(gpu), get_model_spec(model)
    base = base or Calibration.for_gpu(g)
    targets = targets_s or PAPER_STAGE_TIMES_S
    return calibrate_to_times(g, spec, paper_works(spec), targets, base)


def calibrate_to_times(
    gpu: GpuSpec,
    spec: ModelSpec,
    works: dict[Stage, StageWork],
    targets_s: dict[Stage, float],
    base: Calibration,
    check_bounds: bool = True,
) -> Calibration:
    """Fit the stage efficiencies (vision, prefill) and the bandwidth fraction (decode) so that
    ``works`` alone on the whole ``gpu`` take ``targets_s`` (see ``calibrate_to_paper``).
    ``check_bounds``: raise unless vision/prefill come out compute-bound and decode
    memory-bound (the premise of fitting each stage's one term)."""
    probe = RooflineCostModel(gpu, spec, base)
    n = float(gpu.num_sms)
    fit: dict[str, float] = {}
    for stage, field_name in ((Stage.VISION, "vision_mfu"), (Stage.PREFILL, "prefill_mfu")):
        if stage not in works:
            continue
        busy_s = targets_s[stage] - base.overhead_s(stage)
        fit[field_name] = probe.quantized_flops(works[stage], n) / (gpu.peak_flops * busy_s)
    if Stage.DECODE in works:
        busy_s = targets_s[Stage.DECODE] - base.overhead_s(Stage.DECODE)
        fit["bw_eff"] = probe.bytes(works[Stage.DECODE]) / (gpu.hbm_bytes_per_s * busy_s)
    calib = dataclasses.replace(base, **fit)
    fitted = RooflineCostModel(gpu, spec, calib)
    expected = {Stage.VISION: "compute", Stage.PREFILL: "compute", Stage.DECODE: "memory"}
    for stage, work in works.items() if check_bounds else ():
        got = fitted.breakdown(work, 1.0).bound
        if got != expected[stage]:
            raise ValueError(
                f"calibration: {stage.value} should be {expected[stage]}-bound at the fitted "
                f"shape, the fit makes it {got}-bound"
            )
    return calib


def profile_works(metadata: dict[str, Any], spec: ModelSpec) -> dict[Stage, StageWork]:
    """The representative shapes a ``nova profile`` run recorded (``metadata.corun_works``:
    vision ``[images]``, prefill ``[tokens, seqs]``, decode ``[batch, context]``); defaults
    1 image, 256 tokens, 4 x 256 when absent."""
    raw = metadata.get("corun_works", {})
    vision = raw.get("vision", [1])
    prefill = raw.get("prefill", [256, 1])
    decode = raw.get("decode", [4, 256])
    tokens, seqs = int(prefill[0]), max(1, int(prefill[1]))
    works = {
        Stage.PREFILL: StageWork.prefill([tokens // seqs] * seqs),
        Stage.DECODE: StageWork.decode([int(decode[1])] * int(decode[0])),
    }
    if spec.has_vision:
        works[Stage.VISION] = StageWork.vision(int(vision[0]))
    return works


def calibrate_to_profile(
    times_s: dict[Stage, float],
    works: dict[Stage, StageWork],
    gpu: GpuSpec | str,
    model: ModelSpec | str,
    base: Calibration,
) -> Calibration:
    """Fit the roofline to measured stage times (e.g. a ``nova profile`` table at
    ``profile_works``), as ``calibrate_to_paper`` does to the paper's."""
    return calibrate_to_times(get_gpu(gpu), get_model_spec(model), works, times_s, base)
