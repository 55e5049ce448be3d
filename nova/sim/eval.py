"""``nova eval``: run an experiment in the simulator, compare policies the way a skeptic would,
and write ``results.json``, ``results.md`` and plots.

For every series and load point of an experiment (``nova.sim.experiments``), every policy runs
on the same seeded requests for each seed (at least 3): ``nova``, every tuned baseline variant
(``chunked_prefill[budget=128]`` ...), and nova's static modes (``nova[mode=...]``). Per point
and policy the report keeps the mean over seeds of each metric, its spread (min, max, std) and
the per-seed values.

- **Sustained**: throughput over the steady window (arrivals after the first 10% of requests,
  up to the last arrival; the drain after it is left out) is at least 0.98 x the rate offered in
  that window (mean over seeds). Closed-loop points are sustained by construction (the load
  waits for the answers).
- **Best tuned baseline** at a point: among the baseline variants that sustain it, the lowest
  mean max latency, ties by mean latency.
- **Oracle**: the best static configuration chosen after the fact, the same way, among the
  baseline variants and nova's static modes: an upper bound for any policy that picks one
  configuration per load.
- **Checks** at every point where the best tuned baseline sustains: nova's max, p99 and mean
  latency each <= 1.03 x the best tuned baseline's and its throughput >= 0.98 x; nova's max and
  mean latency <= 1.05 x the oracle's; where the oracle beats the best tuned baseline's max
  latency by more than 5%, nova beats it too.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nova.core.policy import Policy, StageLimits, make_policy, parse_policy_name
from nova.cost.base import CostModel, make_cost_model
from nova.cost.gpus import GpuSpec
from nova.cost.model_spec import ModelSpec, get_model_spec
from nova.metrics import request_metrics, summarize
from nova.sim.experiments import (
    BASELINE_VARIANTS,
    EXPERIMENTS,
    NOVA,
    ORACLE,
    PAPER_SETTINGS,
    Experiment,
    Series,
    expand_policies,
    register_experiment,
    static_modes,
)
from nova.sim.simulator import SimArrival, SimResult, Simulator, arrivals_from_workload
from nova.types import Request
from nova.workload import make_workload

__all__ = [
    "BASELINE_VARIANTS",
    "EXPERIMENTS",
    "Experiment",
    "Series",
    "analyse",
    "build_policy",
    "experiment_spec",
    "num_kv_blocks",
    "register_experiment",
    "run_experiment",
    "steady_window",
]

SUSTAINED_RATIO = 0.98
WARMUP_FRACTION = 0.1
MAX_RATIO, THROUGHPUT_RATIO, ORACLE_RATIO, ORACLE_GAIN = 1.03, 0.98, 1.05, 0.05
METRICS = (
    "throughput_rps",
    "max_latency_s",
    "p99_latency_s",
    "p90_latency_s",
    "p50_latency_s",
    "mean_latency_s",
    "mean_ttft_s",
    "p99_ttft_s",
    "mean_tpot_s",
    "num_requests",
    "num_preemptions",
    "steady_throughput_rps",
    "offered_rps",
    "steady_ratio",
    "rate_rps",
)
RESIDENT_VISION_LAYERS = 2  # offloaded vision: layers resident on the GPU (the paper, Sec. V-D)


# -- building a point ------------------------------------------------------------------------
def experiment_spec(exp: Experiment) -> ModelSpec:
    """The model shape, sized for the experiment's screenshot (dynamic-resolution models)."""
    spec = get_model_spec(exp.model)
    if exp.image_size is not None and spec.has_vision:
        spec = spec.for_image(*exp.image_size)
    return spec


def num_kv_blocks(
    cost: CostModel, spec: ModelSpec, block_size: int, offload_vision: bool = False
) -> int:
    """KV blocks of ``block_size`` tokens that fit the cost model's GPU after the resident
    weights and a 2 GiB activation reserve (at least 64). ``offload_vision``: the vision
    weights live in host memory; only ``RESIDENT_VISION_LAYERS`` layers sit on the GPU."""
    gpu = cost.gpu()
    params = spec.num_params()
    if offload_vision and spec.has_vision:
        layers = max(1, spec.vision_layers)
        resident = spec.vision_params() * min(RESIDENT_VISION_LAYERS, layers) / layers
        params = spec.text_params() + int(resident)
    free = gpu.memory_gib * 2**30 - params * spec.bytes_per_param - 2 * 2**30
    per_block = spec.kv_bytes_per_token * block_size
    return max(64, int(free // per_block))


def _grid_split(gpu: GpuSpec, vision: float, prefill: float, decode: float) -> tuple[float, ...]:
    """A 3-way split of the SMs on the GPU's grid: decode and vision rounded to the grid (at
    least the minimum partition), prefill the exact remainder; as shares."""
    n, g = gpu.num_sms, gpu.sm_granularity
    low = max(g, gpu.min_partition_sms)

    def snap(share: float) -> int:
        return max(low, math.floor(share * n / g + 0.5) * g)

    d, v = snap(decode), snap(vision)
    p = n - d - v
    if p < low:
        raise ValueError(f"split {vision}/{prefill}/{decode} leaves prefill {p} SMs on {gpu.name}")
    return v / n, p / n, d / n


def build_policy(name: str, exp: Experiment, cost: CostModel, spec: ModelSpec | None) -> Policy:
    """Policy ``name`` (variant parameters allowed) as ``exp`` runs it: nova plans on the cost
    model's GPU grid with the experiment's minimum decode slice; static splits are snapped to
    the grid so co-running stages never get more SMs than the GPU has."""
    limits = StageLimits(max_num_seqs=exp.max_num_seqs)
    base, params = parse_policy_name(name)
    gpu = cost.gpu()
    if base == NOVA:
        image_tokens = spec.image_tokens if spec is not None else 576
        if spec is not None and exp.image_size is not None and spec.has_vision:
            image_tokens = spec.image_tokens_for(*exp.image_size)
        min_decode = (exp.min_decode_sms or gpu.sm_granularity) / gpu.num_sms
        return make_policy(
            name,
            limits=limits,
            cost_model=cost,
            image_tokens=image_tokens,
            min_decode_share=min_decode,
        )
    if base == "static_partition" and params:
        v, p, d = _grid_split(
            gpu,
            float(params.get("vision", 0.4)),
            float(params.get("prefill", 0.4)),
            float(params.get("decode", 0.2)),
        )
        return make_policy(
            "static_partition", limits=limits, vision_share=v, prefill_share=p, decode_share=d
        )
    return make_policy(name, limits=limits)


def workload_arrivals(exp: Experiment, series: Series, load: float, seed: int) -> list[SimArrival]:
    """The arrivals of ``exp``'s ``series`` at ``load`` for ``seed`` (as every policy sees)."""
    kwargs: dict[str, Any] = dict(series.workload_kwargs)
    if exp.image_size is not None:
        kwargs.setdefault("image_width", exp.image_size[0])
        kwargs.setdefault("image_height", exp.image_size[1])
    if exp.closed_loop:
        kwargs["num_sessions"] = int(load)
    else:
        kwargs["rate_rps"] = load
        kwargs["num_requests"] = exp.num_requests
    return arrivals_from_workload(
        make_workload(exp.workload, seed=seed, **kwargs), segments=exp.caches
    )


def steady_window(
    requests: Sequence[Request], warmup_fraction: float = WARMUP_FRACTION, samples: int = 200
) -> dict[str, float]:
    """Throughput over the steady window: from the arrival of the request after the first
    ``warmup_fraction`` of arrivals to the last arrival (warm-up and drain left out).

    ``offered_rps``: arrivals in the window per second. ``steady_throughput_rps``: the offered
    rate minus the growth rate of the backlog (requests arrived and not finished), the
    least-squares slope of the backlog sampled ``samples`` times over the window: a queue that
    keeps up has no trend, one that falls behind grows at (offered - served) per second. (A
    plain count of completions in the window swings by the few requests in flight at its
    edges.) ``steady_ratio``: served / offered."""
    arrivals = sorted(r.times.arrival_s for r in requests)
    if len(arrivals) < 3:
        return {"steady_throughput_rps": 0.0, "offered_rps": 0.0, "steady_ratio": 1.0}
    start = arrivals[min(len(arrivals) - 2, int(warmup_fraction * len(arrivals)))]
    end = arrivals[-1]
    span = end - start
    if span <= 0:
        return {"steady_throughput_rps": 0.0, "offered_rps": 0.0, "steady_ratio": 1.0}
    finishes = sorted(
        r.times.finish_s if r.times.finish_s is not None else math.inf for r in requests
    )
    offered = (len(arrivals) - bisect.bisect_left(arrivals, start)) / span
    ts = [start + span * i / (samples - 1) for i in range(samples)]
    backlog = [bisect.bisect_right(arrivals, t) - bisect.bisect_right(finishes, t) for t in ts]
    t_mean, b_mean = statistics.fmean(ts), statistics.fmean(backlog)
    var = sum((t - t_mean) ** 2 for t in ts)
    slope = sum((t - t_mean) * (b - b_mean) for t, b in zip(ts, backlog)) / var
    served = offered - slope
    return {
        "steady_throughput_rps": served,
        "offered_rps": offered,
        "steady_ratio": served / offered if offered > 0 else 1.0,
    }


def _mode_shares(policy: Policy, end_s: float) -> dict[str, float]:
    """nova: the fraction of the run spent in each mode (by label)."""
    log = getattr(policy, "mode_log", None)
    if not log or end_s <= 0:
        return {}
    shares: dict[str, float] = {}
    for (t, label), (t_next, _) in zip(log, [*log[1:], (end_s, "")]):
        shares[label] = shares.get(label, 0.0) + max(0.0, min(t_next, end_s) - t) / end_s
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def simulate(
    exp: Experiment, policy: Policy, cost: CostModel, spec: ModelSpec, arrivals: list[SimArrival]
) -> SimResult:
    """``policy`` (built by ``build_policy``) on ``arrivals``, as ``exp`` runs it: its KV cache,
    image tokens and caches."""
    block_size = 16
    image_tokens = spec.image_tokens
    if exp.image_size is not None and spec.has_vision:
        image_tokens = spec.image_tokens_for(*exp.image_size)
    encoder_bytes = int(exp.encoder_cache_gib * 2**30) if exp.caches else 0
    # the encoder cache's device memory comes out of the KV cache's
    kv_blocks = num_kv_blocks(cost, spec, block_size, exp.offload_vision)
    kv_blocks -= int(encoder_bytes // (spec.kv_bytes_per_token * block_size))
    sim = Simulator(
        policy,
        cost,
        max(64, kv_blocks),
        block_size,
        image_tokens,
        prefix_caching=exp.caches,
        encoder_cache_bytes=encoder_bytes,
        embed_bytes_per_token=max(1, int(spec.text_hidden * spec.bytes_per_param)),
    )
    return sim.run(arrivals)


def run_one(
    exp: Experiment,
    policy_name: str,
    cost: CostModel,
    spec: ModelSpec,
    arrivals: list[SimArrival],
    keep_e2e: bool = False,
) -> dict[str, Any]:
    """One simulation: the per-seed metrics of ``policy_name`` on ``arrivals``."""
    policy = build_policy(policy_name, exp, cost, spec)
    t0 = time.perf_counter()
    res = simulate(exp, policy, cost, spec, arrivals)
    metrics = [request_metrics(r) for r in res.requests]
    s = summarize(metrics)
    arrival_times = [r.times.arrival_s for r in res.requests]
    span = max(arrival_times) - min(arrival_times) if len(arrival_times) > 1 else 0.0
    out: dict[str, Any] = {
        "num_requests": len(res.requests),
        "throughput_rps": s.request_throughput_rps,
        "max_latency_s": s.e2e.max,
        "p99_latency_s": s.e2e.p99,
        "p90_latency_s": s.e2e.p90,
        "p50_latency_s": s.e2e.p50,
        "mean_latency_s": s.e2e.mean,
        "mean_ttft_s": s.ttft.mean,
        "p99_ttft_s": s.ttft.p99,
        "mean_tpot_s": s.tpot.mean,
        "num_preemptions": res.num_preemptions,
        "prefix_cache_hit_rate": (
            res.prefix_cache_hit_tokens / res.prefix_cache_queried_tokens
            if res.prefix_cache_queried_tokens
            else None
        ),
        "encoder_cache_hit_rate": (
            res.encoder_cache_hit_images / res.encoder_cache_queried_images
            if res.encoder_cache_queried_images
            else None
        ),
        "rate_rps": (len(arrival_times) - 1) / span if span > 0 else 0.0,
        **steady_window(res.requests),
        "sim_wall_s": round(time.perf_counter() - t0, 3),
    }
    modes = _mode_shares(policy, res.end_s)
    if modes:
        out["modes"] = {k: round(v, 4) for k, v in modes.items()}
        out["num_mode_switches"] = len(getattr(policy, "mode_log", [])) - 1
    if keep_e2e:
        out["e2e_s"] = sorted(m.e2e_s for m in metrics if m.e2e_s is not None)
    return out


@dataclass(slots=True, frozen=True)
class PointTask:
    """One (series, load, seed) point of an experiment, run for ``policies`` (picklable, for
    the worker pool); ``keep_e2e``: keep every request's latency (for plots)."""

    exp: Experiment
    series_index: int
    load: float
    seed: int
    policies: tuple[str, ...]
    keep_e2e: bool


def run_point_task(task: PointTask) -> tuple[int, float, int, dict[str, dict[str, Any]]]:
    """Simulate ``task``'s point once per policy: (series index, load, seed, policy -> result)."""
    exp = task.exp
    spec = experiment_spec(exp)
    cost = experiment_cost_model(exp, spec)
    series = exp.all_series()[task.series_index]
    arrivals = workload_arrivals(exp, series, task.load, task.seed)
    out = {p: run_one(exp, p, cost, spec, arrivals, task.keep_e2e) for p in task.policies}
    return task.series_index, task.load, task.seed, out


def experiment_cost_model(exp: Experiment, spec: ModelSpec) -> CostModel:
    """The cost model ``exp`` simulates ``spec`` with (its GPU, kind and offload)."""
    kwargs = dict(exp.cost_kwargs)
    if exp.offload_vision:
        kwargs.setdefault("offload_vision_weights", True)
    return make_cost_model(exp.cost_kind, exp.gpu, spec, **kwargs)


# -- aggregating ------------------------------------------------------------------------------
def aggregate(per_seed: dict[int, dict[str, Any]], closed_loop: bool) -> dict[str, Any]:
    """Mean over seeds of every metric, the spread (min, max, std), the per-seed values, and
    whether the point is sustained (mean steady ratio >= ``SUSTAINED_RATIO``)."""
    seeds = sorted(per_seed)
    point: dict[str, Any] = {}
    spread: dict[str, dict[str, float]] = {}
    for key in METRICS:
        values = [per_seed[s][key] for s in seeds if per_seed[s].get(key) is not None]
        if not values:
            point[key] = None
            continue
        point[key] = statistics.fmean(values)
        spread[key] = {
            "min": min(values),
            "max": max(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        }
    point["sustained"] = closed_loop or (point.get("steady_ratio") or 0.0) >= SUSTAINED_RATIO
    point["spread"] = spread
    point["seeds"] = [
        {"seed": s, **{k: v for k, v in per_seed[s].items() if k != "e2e_s"}} for s in seeds
    ]
    return point


def _rank(point: dict[str, Any]) -> tuple[float, float]:
    return (point["max_latency_s"], point["mean_latency_s"])


def best_of(points: dict[str, dict[str, Any]], names: Iterable[str]) -> str | None:
    """The sustained configuration with the lowest max latency (ties: mean); None if none."""
    ok = [n for n in names if n in points and points[n]["sustained"]]
    return min(ok, key=lambda n: _rank(points[n])) if ok else None


def _ratio(a: float | None, c: float | None) -> float:
    if a is None or c is None:
        return math.inf
    return a / c if c > 0 else (1.0 if a == 0 else math.inf)


def nova_ratios(
    nova: dict[str, Any], best: dict[str, Any], oracle: dict[str, Any]
) -> tuple[dict[str, float], dict[str, float]]:
    """nova's aggregated point over the best tuned baseline's (max, p99, mean latency;
    throughput) and over the oracle's (max, mean latency)."""
    nb = {k: _ratio(nova[f"{k}_latency_s"], best[f"{k}_latency_s"]) for k in ("max", "p99", "mean")}
    nb["throughput"] = _ratio(nova["throughput_rps"], best["throughput_rps"])
    no = {k: _ratio(nova[f"{k}_latency_s"], oracle[f"{k}_latency_s"]) for k in ("max", "mean")}
    return nb, no


def must_hold_checks(
    nova_vs_best: dict[str, float],
    nova_vs_oracle: dict[str, float],
    sustained: bool,
    oracle_gain: float,
) -> dict[str, bool]:
    """The must-hold checks at one point from nova's ratios to the best tuned baseline (max,
    p99, mean latency; throughput) and to the oracle (max, mean), whether nova sustains the
    load, and the oracle's gain over the best baseline."""
    nb, no = nova_vs_best, nova_vs_oracle
    checks = {
        "max_vs_best": nb["max"] <= MAX_RATIO,
        "p99_vs_best": nb["p99"] <= MAX_RATIO,
        "mean_vs_best": nb["mean"] <= MAX_RATIO,
        "throughput_vs_best": nb["throughput"] >= THROUGHPUT_RATIO,
        "sustained": sustained,
        "max_vs_oracle": no["max"] <= ORACLE_RATIO,
        "mean_vs_oracle": no["mean"] <= ORACLE_RATIO,
    }
    if oracle_gain > ORACLE_GAIN:
        checks["beats_best_where_oracle_does"] = nb["max"] < 1.0
    return checks


def analyse(
    points: dict[str, dict[str, Any]], baselines: Sequence[str], statics: Sequence[str]
) -> dict[str, Any]:
    """Best tuned baseline, oracle and the checks at one point (``points``: policy -> its
    aggregated point)."""
    best = best_of(points, baselines)
    oracle = best_of(points, [*baselines, *statics])
    out: dict[str, Any] = {"best_baseline": best, "oracle": oracle, "must_hold": best is not None}
    nova = points.get(NOVA)
    if best is None or nova is None or oracle is None:
        out["pass"] = best is None
        out["checks"] = {}
        return out
    b, o = points[best], points[oracle]
    nb, no = nova_ratios(nova, b, o)
    oracle_gain = 1.0 - _ratio(o["max_latency_s"], b["max_latency_s"])
    checks = must_hold_checks(nb, no, bool(nova["sustained"]), oracle_gain)
    out.update(
        nova_vs_best=nb,
        nova_vs_oracle=no,
        oracle_gain=oracle_gain,
        nova_gain=1.0 - nb["max"],
        nova_mean_gain=1.0 - nb["mean"],
        checks=checks,
        failed=[k for k, v in checks.items() if not v],
    )
    out["pass"] = all(checks.values())
    return out


# -- running an experiment --------------------------------------------------------------------
def run_experiment(
    name: str | Experiment,
    out_dir: Path | None,
    num_requests: int | None = None,
    progress: Callable[[str], None] = print,
    seeds: int | None = None,
    workers: int | None = None,
    plots: bool = True,
    reuse: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``name`` (a registered experiment or an ``Experiment``), write results under
    ``out_dir`` (None: nothing written) and return the report. ``seeds``: how many seeds
    (default the experiment's); ``workers``: processes (default ``NOVA_EVAL_WORKERS`` or 1).
    ``reuse``: an earlier report of the same experiment (its ``results.json``) whose per-seed
    runs of every policy but adaptive ``nova`` are taken as they are (they do not depend on
    nova's planning), so that only ``nova`` runs: the quick check of a change to nova's model.
    Its points and seeds must be this run's. The plots are drawn then too: the reused runs keep
    no per-request latencies, so the latency CDF's fixed policies are re-run at its one point
    and seed (``headline_cdf_runs``)."""
    exp = EXPERIMENTS.lookup(name) if isinstance(name, str) else name
    if num_requests and not exp.closed_loop:  # closed loop: sessions x steps make the count
        exp = replace(exp, num_requests=num_requests)
    if seeds:
        exp = replace(exp, seeds=tuple(range(seeds)))
    spec = experiment_spec(exp)
    cost = experiment_cost_model(exp, spec)
    baselines = expand_policies(list(exp.baselines))
    statics = [f"{NOVA}[mode={m}]" for m in static_modes(exp, cost.gpu())]
    compared = expand_policies(list(exp.policies))
    policies = tuple(dict.fromkeys([*compared, *baselines, *statics]))
    series_list = exp.all_series()
    raw: dict[tuple[int, float], dict[str, dict[int, dict[str, Any]]]] = {}
    run_policies = policies
    if reuse is not None:
        raw = reused_runs(reuse, exp, [p for p in policies if p != NOVA])
        run_policies = (NOVA,)
    tasks = [
        PointTask(exp, i, load, seed, run_policies, keep_e2e=plots and seed == exp.seeds[0])
        for i, series in enumerate(series_list)
        for load in series.loads
        for seed in exp.seeds
    ]
    workers = workers or int(os.environ.get("NOVA_EVAL_WORKERS", "1"))
    t0 = time.perf_counter()
    results: Iterable[tuple[int, float, int, dict[str, dict[str, Any]]]]
    if workers > 1 and len(tasks) > 1:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(run_point_task, tasks)
    else:
        pool = None
        results = map(run_point_task, tasks)
    try:
        for done, (i, load, seed, out) in enumerate(results, 1):
            cell = raw.setdefault((i, load), {})
            for policy, metrics in out.items():
                cell.setdefault(policy, {})[seed] = metrics
            nova = out.get(NOVA)
            label = series_list[i].label
            progress(
                f"{exp.name} {label} {exp.load_param} {load:g} seed {seed}: "
                + (
                    f"nova max {nova['max_latency_s']:.2f}s mean {nova['mean_latency_s']:.2f}s "
                    if nova
                    else ""
                )
                + f"[{done}/{len(tasks)} {time.perf_counter() - t0:.0f}s]"
            )
    finally:
        if pool is not None:
            pool.shutdown()
    report = build_report(exp, cost, policies, baselines, statics, compared, raw)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(report, indent=1) + "\n")
        (out_dir / "results.md").write_text(render_markdown(report))
        if plots:
            from nova.sim.plots import plot_report

            if reuse is not None:
                raw = headline_cdf_runs(exp, report, raw)
            plot_report(report, raw, out_dir)
    return report


def headline_cdf_runs(
    exp: Experiment,
    report: dict[str, Any],
    raw: dict[tuple[int, float], dict[str, dict[int, dict[str, Any]]]],
) -> dict[tuple[int, float], dict[str, dict[int, dict[str, Any]]]]:
    """``raw`` with the runs the latency CDF draws (``nova.sim.plots``: the best tuned baseline
    and the paper's settings at the report's headline point, first seed) re-run keeping every
    request's latency, for a report whose fixed policies were reused (the simulator is
    deterministic: the same runs). ``raw`` itself is left as it is; no headline: unchanged."""
    h = report["headline"]
    if h is None:
        return raw
    index = report["series"].index(h["series"])
    first = exp.seeds[0]
    cell = {p: dict(seeds) for p, seeds in raw.get((index, h["load"]), {}).items()}
    wanted = (h["best_baseline"], *PAPER_SETTINGS)
    fixed = tuple(p for p in dict.fromkeys(wanted) if p in cell and p != NOVA)
    _, _, _, out = run_point_task(PointTask(exp, index, h["load"], first, fixed, True))
    for policy, metrics in out.items():
        cell[policy][first] = metrics
    return {**raw, (index, h["load"]): cell}


def reused_runs(
    report: dict[str, Any], exp: Experiment, policies: Sequence[str]
) -> dict[tuple[int, float], dict[str, dict[int, dict[str, Any]]]]:
    """The per-seed runs of ``policies`` in ``report`` (an earlier ``results.json`` of ``exp``),
    as ``run_experiment`` collects them; a ``ValueError`` naming what differs when the report
    is of another experiment, other seeds or other points, or lacks a policy."""
    if report.get("experiment") != exp.name:
        raise ValueError(f"reuse: a report of {report.get('experiment')!r}, not {exp.name!r}")
    if list(report.get("seeds", [])) != list(exp.seeds):
        raise ValueError(f"reuse: seeds {report.get('seeds')} there, {list(exp.seeds)} here")
    labels = [s.label for s in exp.all_series()]
    raw: dict[tuple[int, float], dict[str, dict[int, dict[str, Any]]]] = {}
    for policy in policies:
        points = report.get("policies", {}).get(policy)
        if points is None:
            raise ValueError(f"reuse: no runs of {policy!r} in the report")
        for point in points:
            i = labels.index(point["series"])
            cell = raw.setdefault((i, point["load"]), {})
            cell[policy] = {
                run["seed"]: {k: v for k, v in run.items() if k != "seed"} for run in point["seeds"]
            }
    wanted = {(i, load) for i, s in enumerate(exp.all_series()) for load in s.loads}
    if set(raw) != wanted:
        raise ValueError(f"reuse: the report's points {sorted(raw)} are not {sorted(wanted)}")
    return raw


def build_report(
    exp: Experiment,
    cost: CostModel,
    policies: Sequence[str],
    baselines: Sequence[str],
    statics: Sequence[str],
    compared: Sequence[str],
    raw: dict[tuple[int, float], dict[str, dict[int, dict[str, Any]]]],
) -> dict[str, Any]:
    by_policy: dict[str, list[dict[str, Any]]] = {p: [] for p in [*policies, ORACLE]}
    analysis: list[dict[str, Any]] = []
    for i, series in enumerate(exp.all_series()):
        for load in series.loads:
            cell = raw[(i, load)]
            points = {p: aggregate(cell[p], exp.closed_loop) for p in policies}
            for point in points.values():
                point.update(series=series.label, load=load)
                if not exp.closed_loop:
                    point["rate_rps"] = load
            a = analyse(points, baselines, statics)
            a.update(series=series.label, load=load)
            analysis.append(a)
            for name in policies:
                by_policy[name].append(points[name])
            if a["oracle"] is not None:
                by_policy[ORACLE].append({**points[a["oracle"]], "config": a["oracle"]})
    headline = _headline(analysis, by_policy)
    return {
        "experiment": exp.name,
        "description": exp.description,
        "gpu": exp.gpu,
        "model": exp.model,
        "cost_model": cost.name,
        "workload": exp.workload,
        "load_param": exp.load_param,
        "num_requests_per_point": exp.num_requests,
        "seeds": list(exp.seeds),
        "series": [s.label for s in exp.all_series()],
        "compared": list(compared),
        "baselines": list(baselines),
        "static_modes": list(statics),
        "policies": by_policy,
        "analysis": analysis,
        "checks_pass": all(a["pass"] for a in analysis),
        "headline": headline,
    }


def _headline(
    analysis: list[dict[str, Any]], by_policy: dict[str, list[dict[str, Any]]]
) -> dict[str, Any] | None:
    """nova vs the best tuned baseline at the highest load the best baseline sustains (per
    series: the first series)."""
    if NOVA not in by_policy:
        return None
    series = analysis[0]["series"] if analysis else ""
    held = [a for a in analysis if a["series"] == series and a["must_hold"]]
    if not held:
        return None
    a = held[-1]
    load = a["load"]
    nova = next(p for p in by_policy[NOVA] if p["series"] == series and p["load"] == load)
    best = next(
        p for p in by_policy[a["best_baseline"]] if p["series"] == series and p["load"] == load
    )
    out: dict[str, Any] = {"series": series, "load": load, "best_baseline": a["best_baseline"]}
    for metric in ("max_latency_s", "p99_latency_s", "mean_latency_s"):
        out[metric] = {
            "nova": nova[metric],
            "baseline": best[metric],
            "reduction": 1.0 - nova[metric] / best[metric] if best[metric] else 0.0,
        }
    out["throughput_ratio"] = (
        nova["throughput_rps"] / best["throughput_rps"] if best["throughput_rps"] else None
    )
    return out


# -- report ---------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def render_markdown(report: dict[str, Any]) -> str:
    load_name = "sessions" if report["load_param"] == "num_sessions" else "req/s"
    lines = [
        f"# {report['experiment']}",
        "",
        report["description"],
        "",
        f"GPU `{report['gpu']}`, model `{report['model']}`, cost model `{report['cost_model']}`, "
        f"workload `{report['workload']}`, "
        + (
            f"{report['num_requests_per_point']} requests per point, "
            if report["num_requests_per_point"]
            else ""
        )
        + f"seeds {report['seeds']} (every figure: mean over seeds; spread in results.json). "
        f"Baselines: {len(report['baselines'])} tuned variants; oracle: the best of them and "
        f"nova's {len(report['static_modes'])} static modes, chosen per point after the fact.",
        "",
        "## nova vs the best tuned baseline and the oracle",
        "",
        f"| series | load {load_name} | best baseline | max s | p99 s | mean s | nova max s | "
        "p99 s | mean s | nova/best max | p99 | mean | thr | oracle | oracle max s | "
        "nova/oracle max | mean | checks |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    pols = report["policies"]

    def at(name: str | None, a: dict[str, Any]) -> dict[str, Any] | None:
        if name is None or name not in pols:
            return None
        return next(
            (p for p in pols[name] if p["series"] == a["series"] and p["load"] == a["load"]), None
        )

    for a in report["analysis"]:
        b, n, o = at(a["best_baseline"], a), at(NOVA, a), at(a["oracle"], a)
        nb, no = a.get("nova_vs_best", {}), a.get("nova_vs_oracle", {})
        verdict = (
            "no baseline sustains"
            if not a["must_hold"]
            else ("pass" if a["pass"] else "FAIL: " + ", ".join(a.get("failed", [])))
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    a["series"] or "-",
                    f"{a['load']:g}",
                    f"`{a['best_baseline']}`" if a["best_baseline"] else "-",
                    _fmt(b and b["max_latency_s"]),
                    _fmt(b and b["p99_latency_s"]),
                    _fmt(b and b["mean_latency_s"]),
                    _fmt(n and n["max_latency_s"]),
                    _fmt(n and n["p99_latency_s"]),
                    _fmt(n and n["mean_latency_s"]),
                    _fmt(nb.get("max"), ".3f"),
                    _fmt(nb.get("p99"), ".3f"),
                    _fmt(nb.get("mean"), ".3f"),
                    _fmt(nb.get("throughput"), ".3f"),
                    f"`{a['oracle']}`" if a["oracle"] else "-",
                    _fmt(o and o["max_latency_s"]),
                    _fmt(no.get("max"), ".3f"),
                    _fmt(no.get("mean"), ".3f"),
                    verdict,
                ]
            )
            + " |"
        )
    h = report["headline"]
    lines += ["", "## Headline", ""]
    if h is None:
        lines.append("The best tuned baseline sustains no load point: no headline comparison.")
    else:
        lines.append(
            f"At the highest load the best tuned baseline sustains ({h['load']:g} {load_name}"
            + (f", series {h['series']}" if h["series"] else "")
            + f"; best baseline `{h['best_baseline']}`):"
        )
        lines.append("")
        for metric in ("max_latency_s", "p99_latency_s", "mean_latency_s"):
            m = h[metric]
            lines.append(
                f"- {metric}: nova {m['nova']:.2f} s vs {m['baseline']:.2f} s: "
                f"{100 * m['reduction']:+.1f}% reduction"
            )
        lines.append(
            f"- throughput ratio nova / best baseline: {_fmt(h['throughput_ratio'], '.3f')}"
        )
    lines.append("")
    lines.append(
        f"All checks pass: **{'yes' if report['checks_pass'] else 'no'}** (checks at points "
        "where the best tuned baseline sustains: nova max, p99, mean <= 1.03 x best, throughput "
        ">= 0.98 x; nova max, mean <= 1.05 x oracle; nova beats the best baseline where the "
        "oracle beats it by > 5%)."
    )
    lines += ["", "## nova's modes (share of the run, seed 0)", ""]
    for p in pols.get(NOVA, []):
        modes = p["seeds"][0].get("modes", {}) if p["seeds"] else {}
        top = ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(modes.items())[:4])
        lines.append(
            f"- {p['series'] or '-'} {p['load']:g}: {top or '-'} "
            f"({p['seeds'][0].get('num_mode_switches', 0) if p['seeds'] else 0} switches)"
        )
    lines += [
        "",
        "## Every configuration (mean over seeds; max latency min-max over seeds)",
        "",
        "| policy | series | load | thr req/s | sustained | mean s | p99 s | max s | "
        "max range s | TTFT s |",
        "|---|---|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for policy, pts in pols.items():
        for p in pts:
            rng = p["spread"].get("max_latency_s", {})
            name = policy if policy != ORACLE else f"oracle ({p.get('config')})"
            lines.append(
                f"| `{name}` | {p['series'] or '-'} | {p['load']:g} | "
                f"{_fmt(p['throughput_rps'], '.3f')} | {'yes' if p['sustained'] else 'no'} | "
                f"{_fmt(p['mean_latency_s'])} | {_fmt(p['p99_latency_s'])} | "
                f"{_fmt(p['max_latency_s'])} | {_fmt(rng.get('min'))}-{_fmt(rng.get('max'))} | "
                f"{_fmt(p['mean_ttft_s'])} |"
            )
    return "\n".join(lines) + "\n"
