"""Diagnostics behind figures quoted in docs/scheduler.md: nova's early plans under bursty
arrivals and its initial mode at light load (simulated, cost model; no GPU).

1. ``provisional_z`` (plans before the first held rate take the rate so far ``z`` standard
   errors low): nova on every ``bursty-a6000`` point and seed for each ``z``, checked against
   the baselines and static modes of the committed
   ``benchmarks/results/eval/bursty-a6000/results.json`` (the simulator is deterministic per
   seed, and ``z`` touches neither a baseline nor a pinned mode); passing points per ``z``.
   ``z`` = 1 (the default) must reproduce the committed nova figures exactly.
2. The rate so far at the first provisional plan: ``bursty-a6000`` CV 2, 0.4 req/s: what nova
   reads (arrivals in its window over their span) after every batch from the 16th arrival until
   its first held rate: the first reading and the highest, with their times.
3. The initial mode at light load: nova's worst request at Poisson points whose early arrivals
   come in a cluster, against the same seed under the point's oracle configuration (from the
   committed ``results.json``) run alone.

Usage: ``python benchmarks/scheduler_diag.py [--smoke]`` (``--smoke``: one point and one seed
per part, nothing written). Writes benchmarks/results/scheduler_diag.{json,md} with the machine
and its load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from eval_all import machine  # the same machine record as the evaluation (benchmarks/)

from nova.core.nova_policy import NovaPolicy
from nova.sim.eval import (
    EXPERIMENTS,
    NOVA,
    aggregate,
    analyse,
    build_policy,
    experiment_cost_model,
    experiment_spec,
    run_one,
    simulate,
    workload_arrivals,
)
from nova.types import StageResult

RESULTS = Path(__file__).parent / "results"
EVAL = RESULTS / "eval"
Z_VALUES = (0.5, 1.0, 2.0)
# (experiment, load, seed): Poisson points where the worst request arrived in an early cluster
LIGHT_POINTS = (
    ("paper-a6000", 0.1, 0),
    ("paper-a6000", 0.2, 0),
    ("rtx4090-cogagent-offload", 0.2, 0),
    ("h100-qwen2.5-vl-7b-1080p", 2.0, 0),
)


def committed(name: str) -> dict[str, Any]:
    return json.loads((EVAL / name / "results.json").read_text())


def committed_point(report: dict[str, Any], policy: str, series: str, load: float) -> dict:
    return next(
        p for p in report["policies"][policy] if p["series"] == series and p["load"] == load
    )


# -- 1. provisional_z --------------------------------------------------------------------------
def z_sweep(smoke: bool) -> dict[str, Any]:
    exp = EXPERIMENTS["bursty-a6000"]
    spec = experiment_spec(exp)
    cost = experiment_cost_model(exp, spec)
    report = committed(exp.name)
    others = [p for p in report["policies"] if p not in (NOVA, "oracle")]
    series_list = exp.all_series()[:1] if smoke else exp.all_series()
    seeds = exp.seeds[:1] if smoke else exp.seeds
    out: dict[str, Any] = {"points": len(series_list) * len(series_list[0].loads)}
    for z in Z_VALUES:
        name = f"{NOVA}[provisional_z={z:g}]"
        passing, failing, matches = 0, [], True
        for series in series_list:
            loads = series.loads[:1] if smoke else series.loads
            for load in loads:
                per_seed = {
                    seed: run_one(exp, name, cost, spec, workload_arrivals(exp, series, load, seed))
                    for seed in seeds
                }
                nova = aggregate(per_seed, exp.closed_loop)
                points = {p: committed_point(report, p, series.label, load) for p in others}
                points[NOVA] = nova
                a = analyse(points, report["baselines"], report["static_modes"])
                if a["pass"]:
                    passing += 1
                else:
                    failing.append(f"{series.label} {load:g}: {', '.join(a['failed'])}")
                if z == 1.0 and not smoke:
                    old = committed_point(report, NOVA, series.label, load)
                    matches &= all(old[k] == nova[k] for k in ("max_latency_s", "mean_latency_s"))
                print(f"z={z:g} {series.label} {load:g}: pass={a['pass']}", flush=True)
        out[f"{z:g}"] = {"passing": passing, "failing": failing}
        if z == 1.0 and not smoke:
            out["z1_matches_committed_nova"] = matches
    return out


# -- 2. the rate so far at the first provisional plan -----------------------------------------
def early_rates(smoke: bool) -> list[dict[str, Any]]:
    """After every batch from the 16th arrival until the first held rate: the rate so far
    (arrivals in nova's window over their span, what a provisional plan starts from before the
    ``z`` shrink) and the burstiness estimate, read from the policy."""
    exp = EXPERIMENTS["bursty-a6000"]
    spec = experiment_spec(exp)
    cost = experiment_cost_model(exp, spec)
    series = next(s for s in exp.all_series() if s.label == "cv2")
    rows = []
    for seed in (1,) if smoke else (0, 1):
        policy = build_policy(NOVA, exp, cost, spec)
        assert isinstance(policy, NovaPolicy)
        readings: list[tuple[float, float, float]] = []
        inner = policy.on_batch_done

        def hook(result: StageResult, state: Any, now_s: float, _p: NovaPolicy = policy) -> None:
            inner(result, state, now_s)
            if _p._plan_rate == 0.0 and len(_p._obs.arrivals_s) >= 16:
                readings.append((now_s, _p._arrival_rate(now_s), _p._obs.arrival_cv2()))

        policy.on_batch_done = hook  # type: ignore[method-assign]
        res = simulate(exp, policy, cost, spec, workload_arrivals(exp, series, 0.4, seed))
        first = readings[0] if readings else None
        top = max(readings, key=lambda r: r[1]) if readings else None
        rows.append(
            {
                "point": "bursty-a6000 cv2 0.4 req/s",
                "seed": seed,
                "readings": len(readings),
                "first": _reading(first),
                "highest": _reading(top),
                "first_held_rate_after_s": round(readings[-1][0], 1) if readings else None,
                "modes": [(round(t, 1), label) for t, label in policy.mode_log[:6]],
                "max_latency_s": round(
                    max(r.times.finish_s - r.arrival_s for r in res.requests), 2
                ),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _reading(r: tuple[float, float, float] | None) -> dict[str, float] | None:
    if r is None:
        return None
    return {"t_s": round(r[0], 1), "rate_rps": round(r[1], 3), "arrival_cv2": round(r[2], 2)}


# -- 3. the initial mode at light load --------------------------------------------------------
def light_load(smoke: bool) -> list[dict[str, Any]]:
    rows = []
    for name, load, seed in LIGHT_POINTS[1:2] if smoke else LIGHT_POINTS:
        exp = EXPERIMENTS[name]
        spec = experiment_spec(exp)
        cost = experiment_cost_model(exp, spec)
        series = exp.all_series()[0]
        arrivals = workload_arrivals(exp, series, load, seed)
        analysis = next(
            a
            for a in committed(name)["analysis"]
            if a["series"] == series.label and a["load"] == load
        )
        row: dict[str, Any] = {"point": f"{name} {load:g}", "seed": seed}
        for label, policy_name in (("nova", NOVA), ("oracle", analysis["oracle"])):
            policy = build_policy(policy_name, exp, cost, spec)
            res = simulate(exp, policy, cost, spec, arrivals)
            reqs = sorted(res.requests, key=lambda r: r.arrival_s)
            worst = max(range(len(reqs)), key=lambda i: reqs[i].times.finish_s - reqs[i].arrival_s)
            r = reqs[worst]
            row[label] = {
                "config": policy_name,
                "worst_request": worst + 1,  # in arrival order, from 1
                "worst_latency_s": round(r.times.finish_s - r.arrival_s, 2),
                "worst_arrival_s": round(r.arrival_s, 1),
            }
            if label == "nova":
                log = getattr(policy, "mode_log", [])
                row[label]["mode_at_worst_arrival"] = next(
                    (m for t, m in reversed(log) if t <= r.arrival_s), None
                )
        # the early cluster: how close together arrivals 9-16 came, in mean gaps
        times = sorted(a.arrival_s for a in arrivals if a.arrival_s is not None)
        row["arrivals_9_to_16_in_mean_gaps"] = round((times[15] - times[8]) * load, 2)
        row["nova_over_oracle_worst"] = round(
            row["nova"]["worst_latency_s"] / row["oracle"]["worst_latency_s"], 3
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(report: dict[str, Any]) -> str:
    z = report["provisional_z"]
    lines = [
        "# Scheduler diagnostics (docs/scheduler.md)",
        "",
        f"Machine: {report['machine']}; wall {report['wall_s']} s.",
        "",
        "## provisional_z on bursty-a6000",
        "",
        f"nova on every point ({z['points']}) x 3 seeds per `z`, checked against the committed "
        "baselines and static modes (`benchmarks/results/eval/bursty-a6000/results.json`). "
        f"z = 1 reproduces the committed nova figures: {z.get('z1_matches_committed_nova')}.",
        "",
        "| z | passing points | failing (checks) |",
        "|---:|---:|---|",
    ]
    for key in (f"{v:g}" for v in Z_VALUES):
        lines.append(f"| {key} | {z[key]['passing']} | {'; '.join(z[key]['failing'])} |")
    lines += [
        "",
        "## The rate so far before the first held rate (bursty-a6000, CV 2, 0.4 req/s)",
        "",
        "| seed | readings | first: t s, rate, ca2 | highest: t s, rate, ca2 | held after s "
        "| first modes (t s, mode) |",
        "|---:|---:|---|---|---:|---|",
    ]
    for r in report["early_rates"]:
        f, h = r["first"] or {}, r["highest"] or {}
        lines.append(
            f"| {r['seed']} | {r['readings']} | {f.get('t_s')}, {f.get('rate_rps')}, "
            f"{f.get('arrival_cv2')} | {h.get('t_s')}, {h.get('rate_rps')}, "
            f"{h.get('arrival_cv2')} | {r['first_held_rate_after_s']} | {r['modes']} |"
        )
    lines += [
        "",
        "## The initial mode at light load (worst request, seed 0)",
        "",
        "| point | arrivals 9-16 within (mean gaps) | nova: worst request, latency s, mode at "
        "its arrival | oracle config alone: worst request, latency s | nova / oracle |",
        "|---|---:|---|---|---:|",
    ]
    for r in report["light_load"]:
        n, o = r["nova"], r["oracle"]
        lines.append(
            f"| {r['point']} | {r['arrivals_9_to_16_in_mean_gaps']} | {n['worst_request']}, "
            f"{n['worst_latency_s']}, {n['mode_at_worst_arrival']} | `{o['config']}`: "
            f"{o['worst_request']}, {o['worst_latency_s']} | {r['nova_over_oracle_worst']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="one point per part, nothing written")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--skip-z", action="store_true", help="parts 2 and 3 only (minutes less)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    report: dict[str, Any] = {"benchmark": "scheduler_diag", "machine": machine()}
    report["early_rates"] = early_rates(args.smoke)
    report["light_load"] = light_load(args.smoke)
    report["provisional_z"] = {"points": 0} if args.skip_z else z_sweep(args.smoke)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["machine"]["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    text = markdown(report) if not args.skip_z else json.dumps(report, indent=1)
    print(text)
    if args.smoke or args.skip_z:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scheduler_diag.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "scheduler_diag.md").write_text(text)


if __name__ == "__main__":
    main()
