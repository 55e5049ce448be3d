"""Scheduler decision time and simulator speed (targets: a decision < 100 us; 10,000
simulated requests < 10 s), for every policy, on this machine.

Decision time: one ``Scheduler.schedule(stage, now)`` call (the policy's ``next_batch`` and
``partition`` plus admission), measured inside a simulation of the paper setup
(CogAgent-9B-shaped model, A6000 roofline), so the states are realistic. Reported: median, p99
and mean per call, over all calls of the run.
Simulator speed: wall time to simulate 10,000 GUI-agent requests (Poisson) per policy; with
``--repeats N`` each policy runs N times and the fastest run is reported (the 2 cores are
shared with other jobs: the fastest run is the least disturbed one), with every run's time and
the 1-minute load average before each run. Decisions are timed in that fastest run.
Writes benchmarks/results/scheduler_sim.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from runtime_throughput import machine

from nova.cost.base import make_cost_model
from nova.cost.model_spec import get_model_spec
from nova.metrics import percentile
from nova.sim.eval import EXPERIMENTS, build_policy, num_kv_blocks
from nova.sim.simulator import Simulator, arrivals_from_workload
from nova.workload import make_workload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=10_000)
    ap.add_argument("--rate-rps", type=float, default=0.4)  # every policy sustains it (paper-a6000)
    ap.add_argument(
        "--repeats", type=int, default=3, help="runs per policy; the fastest is reported"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    exp = EXPERIMENTS["paper-a6000"]
    spec = get_model_spec(exp.model)
    cost = make_cost_model("roofline", exp.gpu, spec)
    arrivals = arrivals_from_workload(
        make_workload("poisson", rate_rps=args.rate_rps, num_requests=args.num_requests, seed=1)
    )
    rows = []
    for policy in (*exp.policies, "sequential", "static_partition"):
        runs = []
        for _ in range(args.repeats):
            load = round(os.getloadavg()[0], 2)
            sim = Simulator(
                build_policy(policy, exp, cost, spec),
                cost,
                num_kv_blocks(cost, spec, 16),
                16,
                spec.image_tokens,
            )
            t0 = time.perf_counter()
            res = sim.run(arrivals)
            runs.append((time.perf_counter() - t0, load, len(res.requests)))
        wall, _, num_done = min(runs)
        # decision time: one more run with every schedule() call timed (timing adds overhead,
        # so it is not the run whose wall time is reported)
        sim = Simulator(
            build_policy(policy, exp, cost, spec),
            cost,
            num_kv_blocks(cost, spec, 16),
            16,
            spec.image_tokens,
        )
        calls: list[float] = []
        inner = sim.scheduler.schedule

        def timed(stage, now_s, _inner=inner, _calls=calls):
            t0 = time.perf_counter()
            out = _inner(stage, now_s)
            _calls.append(time.perf_counter() - t0)
            return out

        sim.scheduler.schedule = timed
        res = sim.run(arrivals)
        calls.sort()
        row = {
            "policy": policy,
            "num_requests": num_done,
            "sim_wall_s": round(wall, 2),
            "sim_wall_s_runs": [round(w, 2) for w, _, _ in runs],
            "loadavg_1min_before_runs": [load for _, load, _ in runs],
            "sim_requests_per_s": round(num_done / wall, 1),
            "num_decisions": len(calls),
            "decision_us_p50": round(1e6 * percentile(calls, 50), 1),
            "decision_us_p99": round(1e6 * percentile(calls, 99), 1),
            "decision_us_mean": round(1e6 * statistics.fmean(calls), 1),
            "decision_us_max": round(1e6 * calls[-1], 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "benchmark": "scheduler_sim",
        "experiment": "paper-a6000",
        "rate_rps": args.rate_rps,
        "repeats": args.repeats,
        "machine": machine(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scheduler_sim.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Scheduler decision time and simulator speed",
        "",
        f"Machine: {report['machine']}",
        "",
        f"paper-a6000 setup, {args.num_requests} Poisson GUI-agent requests at {args.rate_rps} "
        "req/s.",
        f"sim wall s: the fastest of {args.repeats} runs (all runs and the 1-minute load average "
        "before each in the next columns; the machine's 2 cores are shared with other jobs).",
        "A decision = one `Scheduler.schedule(stage, now)` call (policy + admission), timed in a "
        "separate run; the simulator asks only stages that can get a batch.",
        "",
        "| policy | sim wall s | runs s | load before runs | decisions | p50 us | p99 us | mean "
        "us | max us |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['sim_wall_s']} | {', '.join(map(str, r['sim_wall_s_runs']))} "
            f"| {', '.join(map(str, r['loadavg_1min_before_runs']))} | {r['num_decisions']} "
            f"| {r['decision_us_p50']} | {r['decision_us_p99']} | {r['decision_us_mean']} "
            f"| {r['decision_us_max']} |"
        )
    (args.out / "scheduler_sim.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
