"""The roofline model's per-GPU evidence: numbers from data files, each naming its source.

Torch-free. Files (JSON, ``"format": "nova-cost-evidence"``) under ``nova/cost/data/``:

- ``common.json``: what applies to every GPU unless its own file says otherwise (co-running
  interference, per-batch overheads, decode's compute efficiency);
- ``gpus/<gpu>.json``: one GPU (bandwidth vs SMs, achievable bandwidth, GEMM efficiencies and
  the tile shape cuBLAS uses, the A6000's fit to the Nova paper);
- ``measured/<gpu>*.json``: our own measurements (``benchmarks/gpu_sm_curves.py``), applied
  over the two above in name order: a measured number replaces the default.

Every number is an object ``{"value": x, "source": "...", "measured_on": "..."}``:
``source`` says where it comes from (paper + table/figure, a public measurement's URL or file,
a fit, our own committed profile, or ``assumption: ...`` with the reason); ``measured_on`` names
the device the evidence was measured on (a registered GPU, another device such as ``a40``, or
``none`` for an assumption). A number whose ``measured_on`` is not the GPU it is used for is
*borrowed* (``GpuEvidence.borrowed()``; the calibration table lists them). A bare number, a
missing or empty source, an unknown key or a value out of range is a load error
(``EvidenceError``).

Bandwidth vs SMs (``hbm_vs_sms``): points ``{"sms", "fraction", "source", "measured_on"}``
measured on one device (fraction of that device's full bandwidth reachable with ``sms`` SMs),
and ``sm_scale`` factors (each sourced) that map this GPU's SMs onto the measured device's:
``x = sms / prod(sm_scale)``. By Little's law a partition reaches a bandwidth when it keeps
enough bytes in flight, so a GPU with more bandwidth per SM needs proportionally more SMs
(factor = bandwidth ratio), and a kernel with more loads in flight per SM fewer (e.g. async
copies). The curve is piecewise linear through (0, 0) and the points, flat after the last,
normalised so that the whole GPU reaches fraction 1 (the full-GPU efficiency is
``decode_bandwidth_fraction``).
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVIDENCE_FORMAT = "nova-cost-evidence"
EVIDENCE_VERSION = 1
DATA_DIR = Path(__file__).parent / "data"
NO_DEVICE = "none"  # measured_on of an assumption

# name -> (lowest, highest) allowed value; every GPU needs all of them after merging.
VALUE_RANGES: dict[str, tuple[float, float]] = {
    # Fraction of the spec HBM bandwidth the decode step reaches on the whole GPU.
    "decode_bandwidth_fraction": (0.05, 1.0),
    # Fraction of the spec bf16 tensor FLOP/s a stage's GEMMs reach in full waves.
    "vision_efficiency": (0.01, 1.0),
    "prefill_efficiency": (0.01, 1.0),
    "decode_efficiency": (0.01, 1.0),
    # Large square bf16 matmul: achieved / spec (what other GPUs' efficiencies scale from).
    "matmul_ceiling": (0.1, 1.2),
    # The output tile of cuBLAS's bf16 GEMM kernels (rows of A x columns of B), and how many
    # such thread blocks one SM runs at once (wave quantization).
    "gemm_tile_m": (1, 512),
    "gemm_tile_n": (1, 512),
    "ctas_per_sm": (1, 8),
    # Co-running (SM partitions): compute time x (1 + this x the others' HBM load fraction).
    "interference_compute_per_load": (0.0, 1.0),
    # Co-running: a memory-bound batch's time x (1 + this) while a compute-bound one runs.
    "interference_memory_beside_compute": (0.0, 1.0),
    # Plain multi-stream (no partitions): every co-running batch's time x (1 + this).
    "multistream_overhead": (0.0, 2.0),
    # Fixed time per batch (launches, host work, sampling), seconds.
    "vision_overhead_s": (0.0, 0.1),
    "prefill_overhead_s": (0.0, 0.1),
    "decode_overhead_s": (0.0, 0.1),
    # Achieved fraction of the PCIe link when streaming weights.
    "pcie_efficiency": (0.05, 1.0),
}
OPTIONAL_VALUES = frozenset({"matmul_ceiling"})
_SOURCED_KEYS = frozenset({"value", "source", "measured_on", "note"})
_POINT_KEYS = frozenset({"sms", "fraction", "source", "measured_on", "note"})


class EvidenceError(ValueError):
    """A malformed evidence file: a number without a source, an unknown key, a bad value."""


@dataclass(slots=True, frozen=True)
class Sourced:
    """One number and where it comes from (see the module doc)."""

    value: float
    source: str
    measured_on: str
    note: str = ""
    file: str = ""  # the data file it was read from (relative to nova/cost/data)

    def borrowed_for(self, gpu: str) -> bool:
        return self.measured_on not in (gpu, NO_DEVICE)

    @property
    def is_assumption(self) -> bool:
        return self.measured_on == NO_DEVICE

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "value": self.value,
            "source": self.source,
            "measured_on": self.measured_on,
        }
        if self.note:
            d["note"] = self.note
        return d


@dataclass(slots=True, frozen=True)
class CurvePoint:
    sms: float  # on the device it was measured on
    fraction: float  # of that device's full bandwidth
    source: str
    measured_on: str


@dataclass(slots=True, frozen=True)
class BandwidthCurve:
    """Fraction of the whole GPU's achievable bandwidth reachable with ``sms`` SMs."""

    points: tuple[CurvePoint, ...]
    sm_scale: tuple[Sourced, ...] = ()
    note: str = ""
    file: str = ""
    _xs: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)
    _ys: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.points:
            raise EvidenceError("hbm_vs_sms needs at least one point")
        xs = [p.sms for p in self.points]
        if any(b <= a for a, b in itertools.pairwise(xs)) or xs[0] <= 0:
            raise EvidenceError(f"hbm_vs_sms points must have ascending SMs > 0, got {xs}")
        ys = [p.fraction for p in self.points]
        if any(not 0 < y <= 1.0 for y in ys) or any(b < a for a, b in itertools.pairwise(ys)):
            raise EvidenceError(f"hbm_vs_sms fractions must rise within (0, 1], got {ys}")
        object.__setattr__(self, "_xs", (0.0, *xs))
        object.__setattr__(self, "_ys", (0.0, *ys))

    @property
    def scale(self) -> float:
        return math.prod(s.value for s in self.sm_scale)

    def raw(self, x: float) -> float:
        """The measured curve at ``x`` SMs of the device it was measured on."""
        xs, ys = self._xs, self._ys
        if x >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, x) - 1
        return ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])

    def fraction(self, sms: float, num_sms: int) -> float:
        """Fraction of the full-GPU bandwidth ``sms`` of this GPU's ``num_sms`` SMs reach."""
        scale = self.scale
        full = self.raw(num_sms / scale)
        return min(1.0, self.raw(sms / scale) / full) if sms > 0 else 0.0

    def sms_for(self, fraction: float, num_sms: int) -> float:
        """The fewest SMs (of ``num_sms``) that reach ``fraction`` of the bandwidth."""
        lo, hi = 0.0, float(num_sms)
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.fraction(mid, num_sms) >= fraction else (mid, hi)
        return hi


@dataclass(slots=True, frozen=True)
class GpuEvidence:
    """All the evidence one GPU's roofline uses, merged from its files (common, own, measured)."""

    gpu: str
    values: dict[str, Sourced]
    hbm_vs_sms: BandwidthCurve
    files: tuple[str, ...]
    curves: dict[str, tuple[dict[str, Any], ...]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return self.values[name].value

    def get(self, name: str) -> Sourced | None:
        return self.values.get(name)

    def borrowed(self) -> dict[str, str]:
        """Numbers measured on another device: name -> that device."""
        out = {k: v.measured_on for k, v in self.values.items() if v.borrowed_for(self.gpu)}
        for i, s in enumerate(self.hbm_vs_sms.sm_scale):
            if s.borrowed_for(self.gpu):
                out[f"hbm_vs_sms.sm_scale[{i}]"] = s.measured_on
        devices = sorted({p.measured_on for p in self.hbm_vs_sms.points} - {self.gpu, NO_DEVICE})
        if devices:
            out["hbm_vs_sms.points"] = ", ".join(devices)
        return out

    def assumptions(self) -> list[str]:
        return sorted(k for k, v in self.values.items() if v.is_assumption)


# -- parsing -------------------------------------------------------------------------------------
def _where(file: str, key: str) -> str:
    return f"{file}: {key}"


def _text(d: dict[str, Any], key: str, where: str) -> str:
    value = d.get(key)
    if not isinstance(value, str) or not value.strip():
        raise EvidenceError(f"{where}: needs a non-empty {key!r} (every number names its source)")
    return value.strip()


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EvidenceError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def parse_sourced(d: Any, where: str, file: str = "") -> Sourced:
    if not isinstance(d, dict):
        raise EvidenceError(
            f"{where}: a number must be an object {{value, source, measured_on}}, got {d!r}"
        )
    unknown = sorted(set(d) - _SOURCED_KEYS)
    if unknown:
        raise EvidenceError(f"{where}: unknown fields {unknown}")
    note = d.get("note", "")
    if not isinstance(note, str):
        raise EvidenceError(f"{where}: note must be text")
    return Sourced(
        _number(d.get("value"), f"{where}.value"),
        _text(d, "source", where),
        _text(d, "measured_on", where),
        note,
        file,
    )


def _parse_curve(d: Any, where: str, file: str) -> BandwidthCurve:
    if not isinstance(d, dict):
        raise EvidenceError(f"{where}: must be an object {{points, sm_scale, note}}")
    unknown = sorted(set(d) - {"points", "sm_scale", "note"})
    if unknown:
        raise EvidenceError(f"{where}: unknown fields {unknown}")
    raw_points = d.get("points")
    if not isinstance(raw_points, list) or not raw_points:
        raise EvidenceError(f"{where}.points: needs a non-empty list")
    points = []
    for i, p in enumerate(raw_points):
        at = f"{where}.points[{i}]"
        if not isinstance(p, dict):
            raise EvidenceError(f"{at}: a point must be an object {{sms, fraction, source}}")
        unknown = sorted(set(p) - _POINT_KEYS)
        if unknown:
            raise EvidenceError(f"{at}: unknown fields {unknown}")
        points.append(
            CurvePoint(
                _number(p.get("sms"), f"{at}.sms"),
                _number(p.get("fraction"), f"{at}.fraction"),
                _text(p, "source", at),
                _text(p, "measured_on", at),
            )
        )
    scale = d.get("sm_scale", [])
    if not isinstance(scale, list):
        raise EvidenceError(f"{where}.sm_scale: needs a list of sourced factors")
    factors = tuple(parse_sourced(s, f"{where}.sm_scale[{i}]", file) for i, s in enumerate(scale))
    if any(f.value <= 0 for f in factors):
        raise EvidenceError(f"{where}.sm_scale: factors must be > 0")
    note = d.get("note", "")
    return BandwidthCurve(tuple(points), factors, str(note), file)


def _parse_measured_curve(d: Any, where: str) -> tuple[dict[str, Any], ...]:
    """A measured curve kept for reports (``curves``): points with ``sms``, ``value`` and a
    source each."""
    if not isinstance(d, list) or not d:
        raise EvidenceError(f"{where}: needs a non-empty list of points")
    out = []
    for i, p in enumerate(d):
        at = f"{where}[{i}]"
        if not isinstance(p, dict):
            raise EvidenceError(f"{at}: a point must be an object")
        _text(p, "source", at)
        _text(p, "measured_on", at)
        for k, v in p.items():
            if k not in ("source", "measured_on", "note", "label"):
                _number(v, f"{at}.{k}")
        out.append(dict(p))
    return tuple(out)


@dataclass(slots=True, frozen=True)
class EvidenceFile:
    """One parsed file (before merging)."""

    gpu: str  # "*" for common.json
    values: dict[str, Sourced]
    hbm_vs_sms: BandwidthCurve | None
    curves: dict[str, tuple[dict[str, Any], ...]]
    name: str


def parse_evidence(d: Any, name: str = "evidence") -> EvidenceFile:
    """Validate one evidence document (the file format of the module doc)."""
    if not isinstance(d, dict) or d.get("format") != EVIDENCE_FORMAT:
        raise EvidenceError(
            f"{name}: not a cost evidence file (format must be {EVIDENCE_FORMAT!r})"
        )
    if d.get("version") != EVIDENCE_VERSION:
        raise EvidenceError(f"{name}: unsupported version {d.get('version')!r}")
    unknown = sorted(
        set(d) - {"format", "version", "gpu", "description", "values", "hbm_vs_sms", "curves"}
    )
    if unknown:
        raise EvidenceError(f"{name}: unknown top-level fields {unknown}")
    gpu = d.get("gpu")
    if not isinstance(gpu, str) or not gpu:
        raise EvidenceError(f"{name}: needs 'gpu' (a GPU name, or '*' for every GPU)")
    raw_values = d.get("values", {})
    if not isinstance(raw_values, dict):
        raise EvidenceError(f"{name}: 'values' must be an object")
    values: dict[str, Sourced] = {}
    for key, raw in raw_values.items():
        if key not in VALUE_RANGES:
            raise EvidenceError(f"{name}: unknown value {key!r}; known: {sorted(VALUE_RANGES)}")
        s = parse_sourced(raw, _where(name, key), name)
        lo, hi = VALUE_RANGES[key]
        if not lo <= s.value <= hi:
            raise EvidenceError(f"{name}: {key} = {s.value} is outside [{lo}, {hi}]")
        values[key] = s
    curve = None
    if "hbm_vs_sms" in d:
        curve = _parse_curve(d["hbm_vs_sms"], _where(name, "hbm_vs_sms"), name)
    raw_curves = d.get("curves", {})
    if not isinstance(raw_curves, dict):
        raise EvidenceError(f"{name}: 'curves' must be an object of named point lists")
    curves = {
        k: _parse_measured_curve(v, _where(name, f"curves.{k}")) for k, v in raw_curves.items()
    }
    return EvidenceFile(gpu, values, curve, curves, name)


def read_evidence_file(path: Path, data_dir: Path = DATA_DIR) -> EvidenceFile:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvidenceError(f"{path}: cannot read evidence: {exc}") from exc
    try:
        rel = str(path.relative_to(data_dir))
    except ValueError:
        rel = str(path)
    return parse_evidence(d, rel)


def merge_evidence(gpu: str, files: list[EvidenceFile]) -> GpuEvidence:
    """Later files win, value by value (the curve as a whole)."""
    values: dict[str, Sourced] = {}
    curve: BandwidthCurve | None = None
    curves: dict[str, tuple[dict[str, Any], ...]] = {}
    for f in files:
        if f.gpu not in ("*", gpu):
            raise EvidenceError(f"{f.name} is evidence for {f.gpu!r}, not {gpu!r}")
        values.update(f.values)
        curve = f.hbm_vs_sms or curve
        curves.update(f.curves)
    missing = sorted(set(VALUE_RANGES) - OPTIONAL_VALUES - set(values))
    if missing:
        raise EvidenceError(
            f"GPU {gpu!r}: no evidence for {missing} (files: {[f.name for f in files]})"
        )
    if curve is None:
        raise EvidenceError(f"GPU {gpu!r}: no hbm_vs_sms curve")
    return GpuEvidence(gpu, values, curve, tuple(f.name for f in files), curves)


def evidence_paths(gpu: str, data_dir: Path = DATA_DIR) -> list[Path]:
    """The files that make ``gpu``'s evidence, in merge order."""
    own = data_dir / "gpus" / f"{gpu}.json"
    if not own.is_file():
        raise EvidenceError(f"no evidence file for GPU {gpu!r} ({own})")
    measured = sorted((data_dir / "measured").glob(f"{gpu}*.json"))
    measured = [p for p in measured if _measured_gpu(p) == gpu]
    return [data_dir / "common.json", own, *measured]


def _measured_gpu(path: Path) -> str:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvidenceError(f"{path}: cannot read evidence: {exc}") from exc
    return str(d.get("gpu", "")) if isinstance(d, dict) else ""


_CACHE: dict[str, GpuEvidence] = {}


def load_evidence(gpu: str, data_dir: Path | None = None) -> GpuEvidence:
    """``gpu``'s merged evidence (shipped files; cached). ``data_dir``: another tree (tests)."""
    if data_dir is not None:
        files = [read_evidence_file(p, data_dir) for p in evidence_paths(gpu, data_dir)]
        return merge_evidence(gpu, files)
    cached = _CACHE.get(gpu)
    if cached is None:
        cached = _CACHE[gpu] = merge_evidence(
            gpu, [read_evidence_file(p) for p in evidence_paths(gpu)]
        )
    return cached


def shipped_evidence_files(data_dir: Path = DATA_DIR) -> list[Path]:
    return sorted(data_dir.rglob("*.json"))
