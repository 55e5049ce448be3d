"""Profiled cost model: stage latencies interpolated from tables measured with the real runtime.

Torch-free (the measuring side, which needs torch, is ``nova.profiling``).

Profile file (JSON, ``"format": "nova-cost-profile"``)::

    {
      "format": "nova-cost-profile", "version": 1,
      "metadata": {"model": ..., "device": ..., "gpu": "cpu", "gpu_spec": {...}, ...},
      "stages": {
        "<stage>": {
          "axes": [...],              # vision: num_images; prefill: total_new_tokens, num_seqs;
                                      # decode: batch_size, mean_context_len
          "grid": [[...], ...],       # ascending grid values, one list per axis
          "shares": [1.0, ...],       # SM shares measured (ascending; CPU: [1.0])
          "latency_s": [ table, ...]  # one table per share, nested lists shaped like the grid
        }, ...
      },
      "corun_mode": "shared",         # how co-running was measured: "shared" (streams /
                                      # threads, no SM partitions) or "isolated" (partitions)
      "corun_factor": {"<stage>": {"<other stage>": 1.4, ...}, ...},
      "corun_factor_isolated": {...}  # optional: the other mode, when both were measured
    }

``corun_factor[stage][other]`` = latency of ``stage`` while ``other`` runs concurrently /
latency alone (measured, >= 1).

Interpolation (``interpolate``), per axis, recursively over the axes:
- inside the grid: piecewise linear;
- below the first grid point: clamped to the first point's value (smaller batches are not
  assumed faster than the smallest measured one: no negative or vanishing extrapolation);
- above the last grid point: linear extrapolation of the last segment, with its slope clamped
  to >= 0 (bigger batches never get faster).
SM share: the requested share is first rounded to what the GPU grants. Between measured shares:
linear. Above the largest measured share: clamped. Below the smallest: that share's latency
scaled by ``smallest / share`` (the compute-bound worst case; conservative for decode).
With ``monotone=True`` (default) the tables are made monotone before use (running max along
each axis that sizes the work, ``MONOTONE_AXES``; fewer SMs never faster) so that measurement
noise cannot make the simulator believe a bigger batch is faster; ``to_dict`` still returns the
raw measurements. Prefill's ``num_seqs`` is not such an axis: at a fixed token total, more
sequences means shorter prompts and less attention (the demo model in bf16 on 2 cores: 4,096
new tokens took 1.44 s as one prompt and 0.58 s as 16, ``profiles/demo-cpu-bfloat16.json``),
and a running max along it had priced every split like the single long prompt.

Co-running: the latency is multiplied by the *product* of ``corun_factor[stage][other]`` over
the co-running batches. The factors were measured pairwise, one co-runner at a time; with two
co-runners the product is the conservative choice (a max would claim the second co-runner is
free), which suits tail-latency planning. Each factor comes from the requested mode's table
(``isolated``) when it has the entry, else from the other mode's, else it is 1.0. The
co-runners' own shapes and shares are not used (factors were measured at one representative
shape per stage, recorded in ``metadata.corun_works``).
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nova.cost.base import CoRunning, StageWork, TotalsKey, register_cost_model
from nova.cost.gpus import GpuSpec, check_share, get_gpu
from nova.shapes.fields import read_json_dict
from nova.types import Stage

PROFILE_FORMAT = "nova-cost-profile"
PROFILE_VERSION = 1
PROFILES_DIR = Path(__file__).parent / "profiles"
CORUN_MODES = ("shared", "isolated")

STAGE_AXES: dict[Stage, tuple[str, ...]] = {
    Stage.VISION: ("num_images",),
    Stage.PREFILL: ("total_new_tokens", "num_seqs"),
    Stage.DECODE: ("batch_size", "mean_context_len"),
}

# the axes along which more means more work (the rest, prefill's num_seqs, split the same work)
MONOTONE_AXES = frozenset({"num_images", "total_new_tokens", "batch_size", "mean_context_len"})

Nested = Any  # float or list of Nested: a table shaped like its grid


class ProfileError(ValueError):
    """A malformed profile file or a profile that cannot answer a question."""


def work_coords(work: StageWork) -> tuple[float, ...]:
    """The point of ``STAGE_AXES[work.stage]`` that ``work`` sits at."""
    if work.stage is Stage.VISION:
        return (float(work.num_images),)
    if work.stage is Stage.PREFILL:
        return (float(work.total_new_tokens), float(work.num_seqs))
    return (float(work.num_seqs), work.mean_context_len)


# -- interpolation -------------------------------------------------------------------------------
def interpolate(values: Nested, grid: Sequence[Sequence[float]], point: Sequence[float]) -> float:
    """Multi-linear interpolation of ``values`` (nested, shaped like ``grid``) at ``point``,
    with the edge rules of the module doc (clamp below, non-decreasing extrapolation above)."""
    if not grid:
        return float(values)
    axis, x, rest, rest_point = grid[0], point[0], grid[1:], point[1:]
    if len(axis) == 1 or x <= axis[0]:
        return interpolate(values[0], rest, rest_point)
    if x >= axis[-1]:
        v1 = interpolate(values[-1], rest, rest_point)
        v0 = interpolate(values[-2], rest, rest_point)
        slope = (v1 - v0) / (axis[-1] - axis[-2])
        return v1 + max(0.0, slope) * (x - axis[-1])
    i = bisect.bisect_right(axis, x) - 1
    w = (x - axis[i]) / (axis[i + 1] - axis[i])
    lo = interpolate(values[i], rest, rest_point)
    if w == 0.0:
        return lo
    return (1.0 - w) * lo + w * interpolate(values[i + 1], rest, rest_point)


def _emax(a: Nested, b: Nested) -> Nested:
    if isinstance(a, list):
        return [_emax(x, y) for x, y in zip(a, b)]
    return max(a, b)


def _running_max(values: Nested, axis: int) -> Nested:
    """Running max of a nested table along ``axis`` (elementwise over the other axes)."""
    if axis > 0:
        return [_running_max(v, axis - 1) for v in values]
    out = [values[0]]
    for v in values[1:]:
        out.append(_emax(out[-1], v))
    return out


def _shape_ok(values: Nested, grid: Sequence[Sequence[float]]) -> bool:
    if not grid:
        return isinstance(values, (int, float)) and not isinstance(values, bool) and values > 0
    return (
        isinstance(values, list)
        and len(values) == len(grid[0])
        and all(_shape_ok(v, grid[1:]) for v in values)
    )


# -- tables --------------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class StageTable:
    """Measured latencies of one stage: one table per SM share, over the stage's axes."""

    stage: Stage
    grid: tuple[tuple[float, ...], ...]
    shares: tuple[float, ...]
    latency_s: tuple[Nested, ...]  # per share; nested lists shaped like ``grid``

    @property
    def axes(self) -> tuple[str, ...]:
        return STAGE_AXES[self.stage]

    @classmethod
    def from_dict(cls, stage: Stage, d: dict[str, Any]) -> StageTable:
        where = f"profile stage {stage.value!r}"
        axes = tuple(d.get("axes", ()))
        if axes != STAGE_AXES[stage]:
            raise ProfileError(f"{where}: axes must be {list(STAGE_AXES[stage])}, got {list(axes)}")
        grid = tuple(tuple(float(x) for x in axis) for axis in d.get("grid", ()))
        if len(grid) != len(axes) or any(not a for a in grid):
            raise ProfileError(f"{where}: need one non-empty grid list per axis")
        for name, axis in zip(axes, grid):
            if any(b <= a for a, b in itertools.pairwise(axis)):
                raise ProfileError(
                    f"{where}: grid of {name} must be strictly ascending: {list(axis)}"
                )
        shares = tuple(float(s) for s in d.get("shares", (1.0,)))
        if not shares or any(not 0 < s <= 1 for s in shares) or list(shares) != sorted(set(shares)):
            raise ProfileError(
                f"{where}: shares must be ascending, distinct, in (0, 1]: {list(shares)}"
            )
        tables = d.get("latency_s")
        if not isinstance(tables, list) or len(tables) != len(shares):
            raise ProfileError(f"{where}: latency_s needs one table per share ({len(shares)})")
        for share, table in zip(shares, tables):
            if not _shape_ok(table, grid):
                raise ProfileError(
                    f"{where}: the table for share {share} is not shaped like the grid "
                    f"{[len(a) for a in grid]} or holds non-positive / missing values"
                )
        return cls(stage, grid, shares, tuple(tables))

    def to_dict(self) -> dict[str, Any]:
        return {
            "axes": list(self.axes),
            "grid": [list(a) for a in self.grid],
            "shares": list(self.shares),
            "latency_s": list(self.latency_s),
        }

    def monotone(self) -> StageTable:
        """Running max along every axis that sizes the work (``MONOTONE_AXES``), and fewer SMs
        never faster than more."""
        tables = []
        for table in self.latency_s:
            for axis, name in enumerate(self.axes):
                if name in MONOTONE_AXES:
                    table = _running_max(table, axis)
            tables.append(table)
        for i in range(len(tables) - 2, -1, -1):
            tables[i] = _emax(tables[i], tables[i + 1])
        return StageTable(self.stage, self.grid, self.shares, tuple(tables))

    def lookup(self, coords: Sequence[float], share: float) -> float:
        """Latency at ``coords`` with ``share`` of the SMs (already granularity-rounded)."""
        shares = self.shares
        if share <= shares[0]:
            return interpolate(self.latency_s[0], self.grid, coords) * (shares[0] / share)
        if share >= shares[-1]:
            return interpolate(self.latency_s[-1], self.grid, coords)
        i = bisect.bisect_right(shares, share) - 1
        w = (share - shares[i]) / (shares[i + 1] - shares[i])
        lo = interpolate(self.latency_s[i], self.grid, coords)
        hi = interpolate(self.latency_s[i + 1], self.grid, coords)
        return (1.0 - w) * lo + w * hi


CorunTable = dict[Stage, dict[Stage, float]]


def _parse_corun(d: Any, key: str) -> CorunTable:
    if not isinstance(d, dict):
        raise ProfileError(f"profile {key} must be an object {{stage: {{other_stage: factor}}}}")
    out: CorunTable = {}
    try:
        for stage, row in d.items():
            out[Stage(stage)] = {Stage(other): float(f) for other, f in row.items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise ProfileError(f"profile {key}: {exc}") from exc
    bad = [f for row in out.values() for f in row.values() if not f > 0]
    if bad:
        raise ProfileError(f"profile {key}: factors must be > 0, got {bad}")
    return out


def _corun_to_dict(table: CorunTable) -> dict[str, dict[str, float]]:
    return {s.value: {o.value: f for o, f in row.items()} for s, row in table.items()}


# -- the model -----------------------------------------------------------------------------------
class ProfiledCostModel:
    """Latencies interpolated from a measured profile (see the module doc)."""

    __slots__ = (
        "_gpu",
        "corun",
        "corun_mode",
        "metadata",
        "name",
        "raw_tables",
        "source",
        "tables",
    )

    def __init__(
        self,
        tables: dict[Stage, StageTable],
        corun: dict[str, CorunTable],
        corun_mode: str = "shared",
        metadata: dict[str, Any] | None = None,
        gpu: GpuSpec | str | None = None,
        monotone: bool = True,
        source: str | None = None,
    ) -> None:
        if not tables:
            raise ProfileError("a profile needs at least one stage table")
        if corun_mode not in CORUN_MODES:
            raise ProfileError(f"corun_mode must be one of {CORUN_MODES}, got {corun_mode!r}")
        self.name = "profiled"
        self.raw_tables = dict(tables)
        self.tables = {s: t.monotone() for s, t in tables.items()} if monotone else dict(tables)
        self.corun = dict(corun)  # mode -> table
        self.corun_mode = corun_mode
        self.metadata = dict(metadata or {})
        self._gpu = get_gpu(gpu) if gpu is not None else _gpu_from_metadata(self.metadata)
        self.source = source

    def __repr__(self) -> str:
        return (
            f"ProfiledCostModel(model={self.metadata.get('model')!r}, gpu={self._gpu.name!r}, "
            f"stages={[s.value for s in self.tables]})"
        )

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, d: dict[str, Any], monotone: bool = True, source: str | None = None
    ) -> ProfiledCostModel:
        where = source or "profile"
        if d.get("format") != PROFILE_FORMAT:
            raise ProfileError(
                f"{where}: not a Nova cost profile (format must be {PROFILE_FORMAT!r})"
            )
        if d.get("version") != PROFILE_VERSION:
            raise ProfileError(f"{where}: unsupported profile version {d.get('version')!r}")
        stages = d.get("stages")
        if not isinstance(stages, dict) or not stages:
            raise ProfileError(f"{where}: 'stages' must be a non-empty object")
        tables: dict[Stage, StageTable] = {}
        for name, table in stages.items():
            try:
                stage = Stage(name)
            except ValueError:
                raise ProfileError(f"{where}: unknown stage {name!r}") from None
            tables[stage] = StageTable.from_dict(stage, table)
        mode = d.get("corun_mode", "shared")
        if mode not in CORUN_MODES:
            raise ProfileError(f"{where}: corun_mode must be one of {CORUN_MODES}, got {mode!r}")
        corun = {mode: _parse_corun(d.get("corun_factor", {}), "corun_factor")}
        for other in CORUN_MODES:
            key = f"corun_factor_{other}"
            if key in d:
                corun[other] = _parse_corun(d[key], key)
        return cls(tables, corun, mode, d.get("metadata", {}), monotone=monotone, source=source)

    @classmethod
    def from_file(cls, path: str | Path, monotone: bool = True) -> ProfiledCostModel:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ProfileError(f"no cost profile at {path}")
        d = read_json_dict(path, ProfileError)
        return cls.from_dict(d, monotone=monotone, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The profile as measured (raw tables), in the file format."""
        d: dict[str, Any] = {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "metadata": self.metadata,
            "stages": {s.value: t.to_dict() for s, t in self.raw_tables.items()},
            "corun_mode": self.corun_mode,
            "corun_factor": _corun_to_dict(self.corun.get(self.corun_mode, {})),
        }
        for mode, table in self.corun.items():
            if mode != self.corun_mode:
                d[f"corun_factor_{mode}"] = _corun_to_dict(table)
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    # -- the CostModel interface ---------------------------------------------------------------
    def gpu(self) -> GpuSpec:
        return self._gpu

    @property
    def stages(self) -> tuple[Stage, ...]:
        return tuple(self.tables)

    @staticmethod
    def shape_key(work: StageWork) -> TotalsKey:
        """What ``time_s`` depends on in ``work``: the table coordinates are functions of its
        totals (``StageWork.totals_key``), so equal keys give equal times (a memo key)."""
        return work.totals_key()

    def solo_time_s(self, work: StageWork, sm_share: float = 1.0) -> float:
        table = self.tables.get(work.stage)
        if table is None:
            raise ProfileError(
                f"the profile has no {work.stage.value} table (stages: "
                f"{', '.join(s.value for s in self.tables)})"
            )
        return table.lookup(work_coords(work), self._gpu.granted_share(sm_share))

    def corun_factor(self, stage: Stage, other: Stage, isolated: bool = True) -> float:
        """Factor for the requested mode; an entry that mode lacks comes from the other mode's
        table; 1.0 when neither has it."""
        mode = "isolated" if isolated else "shared"
        for table in (self.corun.get(mode, {}), *self.corun.values()):
            factor = table.get(stage, {}).get(other)
            if factor is not None:
                return factor
        return 1.0

    def time_s(
        self, work: StageWork, sm_share: float, co_running: CoRunning = (), isolated: bool = True
    ) -> float:
        t = self.solo_time_s(work, sm_share)
        for other, share in co_running:
            check_share(share)
            t *= self.corun_factor(work.stage, other.stage, isolated)
        return t


def merge_profiles(
    profiles: Sequence[dict[str, Any]],
    table_statistic: str = "min",
    corun_statistic: str = "median",
) -> dict[str, Any]:
    """Combine profiles of the same model, device and grid, measured at different times.

    Tables: the elementwise ``table_statistic`` (``min`` or ``median``) over the profiles --
    on a machine shared with other processes, the minimum over sweeps taken minutes apart is
    the least disturbed measurement. Co-running factors: ``corun_statistic`` over the
    profiles that have each factor. Metadata: the first profile's, with ``merged_from``
    listing every source's date, statistic and load.
    """
    import statistics

    reducers: dict[str, Callable[[list[float]], float]] = {
        "min": min,
        "median": statistics.median,
    }
    if table_statistic not in reducers or corun_statistic not in reducers:
        raise ValueError(f"statistics must be one of {sorted(reducers)}")
    if not profiles:
        raise ProfileError("nothing to merge")
    models = [ProfiledCostModel.from_dict(p, monotone=False) for p in profiles]  # validates
    first = models[0]
    for m in models[1:]:
        if m.metadata.get("model") != first.metadata.get("model") or m.gpu() != first.gpu():
            raise ProfileError("can only merge profiles of the same model on the same device")
        for stage, table in first.raw_tables.items():
            theirs = m.raw_tables.get(stage)
            if theirs is None or theirs.grid != table.grid or theirs.shares != table.shares:
                raise ProfileError(
                    f"can only merge profiles with the same {stage.value} grid and shares"
                )

    def reduce_tables(tables: list[Nested]) -> Nested:
        if isinstance(tables[0], list):
            return [reduce_tables([t[i] for t in tables]) for i in range(len(tables[0]))]
        return float(reducers[table_statistic](tables))

    stages = {}
    for stage, table in first.raw_tables.items():
        latency = [
            reduce_tables([m.raw_tables[stage].latency_s[k] for m in models])
            for k in range(len(table.shares))
        ]
        stages[stage.value] = StageTable(stage, table.grid, table.shares, tuple(latency)).to_dict()
    corun: dict[str, dict[str, float]] = {}
    mode_tables = [m.corun.get(first.corun_mode, {}) for m in models]
    for stage in Stage:
        for other in Stage:
            values = [t[stage][other] for t in mode_tables if other in t.get(stage, {})]
            if values:
                corun.setdefault(stage.value, {})[other.value] = round(
                    float(reducers[corun_statistic](values)), 4
                )
    metadata = dict(first.metadata)
    metadata["statistic"] = f"{table_statistic} over {len(models)} merged profiles"
    metadata["corun_statistic"] = f"{corun_statistic} over the merged profiles that have the factor"
    metadata["merged_from"] = [
        {
            k: m.metadata.get(k)
            for k in ("date", "statistic", "passes", "repeats", "loadavg_1min", "profiling_wall_s")
        }
        | {"has_corun": bool(t)}
        for m, t in zip(models, mode_tables)
    ]
    metadata.pop("corun_raw", None)  # per-source details; not meaningful after merging
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "metadata": metadata,
        "stages": stages,
        "corun_mode": first.corun_mode,
        "corun_factor": corun,
    }


def _gpu_from_metadata(meta: dict[str, Any]) -> GpuSpec:
    spec = meta.get("gpu_spec")
    if isinstance(spec, dict):
        try:
            return GpuSpec(**spec)
        except TypeError as exc:
            raise ProfileError(f"profile metadata gpu_spec is malformed: {exc}") from exc
    return get_gpu(meta.get("gpu") or "cpu")


def available_profiles() -> list[str]:
    """Shipped profiles, as ``<model>-<gpu>`` names (files in ``nova/cost/profiles``)."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def shipped_profile_path(model: str, gpu: str) -> Path:
    return PROFILES_DIR / f"{model}-{gpu}.json"


def device_slug(device_name: str) -> str:
    """'AMD EPYC' -> 'amd-epyc': a device's name as it appears in a profile's file name."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def profile_device_name(path: Path) -> str | None:
    """The device a profile was measured on (its metadata's ``device_name``), if it says."""
    name = json.loads(path.read_text()).get("metadata", {}).get("device_name")
    return name if isinstance(name, str) else None


def shipped_profile_for(
    model: str, gpu: str, dtype: str, device_name: str | None = None
) -> Path | None:
    """The shipped profile of ``model`` on ``gpu`` measured in ``dtype`` (``float32``,
    ``bfloat16``, ...): first, where ``device_name`` is given, one measured on that very device
    (``<model>-<gpu>-<dtype>-<device slug>.json`` whose metadata names both: "cpu" is every
    CPU, and two CPUs' stage times differ by several times, e.g. an Intel Xeon with AMX and an
    AMD EPYC without, docs/scheduler.md "Back on the AMD EPYC"); else
    ``<model>-<gpu>-<dtype>.json``, else ``<model>-<gpu>.json`` if its metadata names that
    dtype; None if none (a profile of another dtype times other kernels: on a CPU with AMX a
    bf16 prefill token costs a fraction of an fp32 one, and the fused steps' per-step
    overheads weigh differently). Whether the profile found was measured on this device:
    ``profile_device_name``."""
    # (path, the device its metadata must name; None: any)
    candidates: list[tuple[Path, str | None]] = [
        (PROFILES_DIR / f"{model}-{gpu}-{dtype}.json", None),
        (shipped_profile_path(model, gpu), None),
    ]
    if device_name:
        own = PROFILES_DIR / f"{model}-{gpu}-{dtype}-{device_slug(device_name)}.json"
        candidates.insert(0, (own, device_name))
    for path, device in candidates:
        if path.is_file():
            meta = json.loads(path.read_text()).get("metadata", {})
            if meta.get("dtype") == dtype and device in (None, meta.get("device_name")):
                return path
    return None


@register_cost_model("profiled")
def _make_profiled(
    gpu: GpuSpec | str, model: Any, path: str | Path | None = None, monotone: bool = True
) -> ProfiledCostModel:
    gpu_spec = get_gpu(gpu)
    if path is None:
        model_name = model if isinstance(model, str) else getattr(model, "name", str(model))
        path = shipped_profile_path(model_name, gpu_spec.name)
        if not path.is_file():
            raise ProfileError(
                f"no shipped profile for model {model_name!r} on GPU {gpu_spec.name!r} "
                f"(looked for {path.name}; shipped: {', '.join(available_profiles()) or 'none'}); "
                f"measure one with 'nova profile' and pass path="
            )
    cm = ProfiledCostModel.from_file(path, monotone=monotone)
    if cm.gpu().name != gpu_spec.name:
        raise ProfileError(
            f"profile {path} was measured on {cm.gpu().name!r}, not {gpu_spec.name!r}"
        )
    return cm
