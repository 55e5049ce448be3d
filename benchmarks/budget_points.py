"""``chunked_prefill`` at chunk budgets between the powers of two, at the points whose analysis
cites them (docs/scheduler.md, "Chunk budgets between the powers of two" and `paper-h100` 4
req/s): each budget's max, p99 and mean latency (means over seeds 3-12) and its max over the
first budget's (geometric mean of the per-seed ratios); and nova's model's score of each budget
at the rate reads its plans took there, with the budgets' capacities. Simulated, as
``eval_heldout.py``.

Usage: ``python benchmarks/budget_points.py [--workers 2] [--out DIR]`` writes
``DIR/budget_points.{json,md}`` (default DIR: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from nova.core.nova_model import Mode, Prediction
from nova.core.nova_policy import NovaPolicy
from nova.sim.eval import (
    EXPERIMENTS,
    build_policy,
    experiment_cost_model,
    experiment_spec,
    run_one,
    simulate,
    workload_arrivals,
)

sys.path.insert(0, str(Path(__file__).parent))
from eval_all import machine

SEEDS = tuple(range(3, 13))
# experiment, rate (req/s), budgets (the reference first)
POINTS = (
    ("paper-a6000", 0.8, (256, 128, 160, 192)),
    ("paper-a6000", 0.7, (128, 256, 160, 192)),
    ("rtx4090-qwen2.5-vl-7b", 3.0, (256, 512, 320, 384)),
    ("paper-h100", 4.0, (256, 288, 320, 352, 384)),
)


def run(task: tuple[str, float, int, int]) -> tuple[str, float, int, int, dict[str, Any]]:
    name, rate, budget, seed = task
    exp = EXPERIMENTS[name]
    spec = experiment_spec(exp)
    cost = experiment_cost_model(exp, spec)
    arrivals = workload_arrivals(exp, exp.all_series()[0], rate, seed)
    return (
        name,
        rate,
        budget,
        seed,
        run_one(exp, f"chunked_prefill[budget={budget}]", cost, spec, arrivals),
    )


# rate reads nova's plans took at these points (benchmarks/results/nova_trace_*.md)
READS = {
    ("paper-a6000", 0.8): (0.66, 0.7, 0.72, 0.74, 0.76, 0.8, 0.84),
    ("rtx4090-qwen2.5-vl-7b", 3.0): (2.9, 3.0, 3.1, 3.2, 3.34, 3.54),
    ("paper-h100", 4.0): (3.6, 3.8, 4.0, 4.2, 4.4),
}


def model_lines(name: str, rate: float, budgets: tuple[int, ...]) -> list[str]:
    """nova's model (the default policy, its load estimate at the end of a seed-0 run at
    ``rate``): each budget's score (predicted tail + mean, s) at each rate read, and capacity."""
    exp = EXPERIMENTS[name]
    spec = experiment_spec(exp)
    cost = experiment_cost_model(exp, spec)
    policy = build_policy("nova", exp, cost, spec)
    assert isinstance(policy, NovaPolicy)
    res = simulate(exp, policy, cost, spec, workload_arrivals(exp, exp.all_series()[0], rate, 0))
    base = policy.load_estimate(res.end_s)
    order = sorted(budgets)

    def pred(b: int, lam: float) -> Prediction:
        return policy.model.predict(Mode.chunked(b), replace(base, lam_rps=lam))

    lines = [
        f"### {name}, model scores at the rate reads (capacity at {rate:g}: "
        + ", ".join(f"{b} {pred(b, rate).capacity_rps:.3f}/s" for b in order)
        + ")",
        "",
        "| rate read | lowest | " + " | ".join(str(b) for b in order) + " |",
        "|---:|---:|" + "---:|" * len(order),
    ]
    for lam in READS[(name, rate)]:
        scores = {b: pred(b, lam).score_s for b in order}
        best = min(scores, key=scores.__getitem__)
        lines.append(
            f"| {lam:g} | {best} | " + " | ".join(f"{scores[b]:.2f}" for b in order) + " |"
        )
    return [*lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    tasks = [(n, r, b, s) for n, r, budgets in POINTS for b in budgets for s in SEEDS]
    runs: dict[tuple[str, float, int], dict[int, dict[str, Any]]] = {}
    with ProcessPoolExecutor(args.workers) as pool:
        for name, rate, budget, seed, m in pool.map(run, tasks):
            runs.setdefault((name, rate, budget), {})[seed] = m
    rows = []
    for name, rate, budgets in POINTS:
        ref = runs[(name, rate, budgets[0])]
        for b in budgets:
            cell = runs[(name, rate, b)]
            logs = [math.log(cell[s]["max_latency_s"] / ref[s]["max_latency_s"]) for s in SEEDS]
            rows.append(
                {
                    "experiment": name,
                    "rate_rps": rate,
                    "budget": b,
                    **{
                        k: statistics.fmean(cell[s][k] for s in SEEDS)
                        for k in ("max_latency_s", "p99_latency_s", "mean_latency_s")
                    },
                    "max_over_reference": math.exp(statistics.fmean(logs)),
                    "reference_budget": budgets[0],
                }
            )
    result = {
        "benchmark": "budget_points",
        "machine": machine(),
        "loadavg_1min_start_end": [load0, os.getloadavg()[0]],
        "wall_s": round(time.perf_counter() - t0, 1),
        "seeds": list(SEEDS),
        "rows": rows,
    }
    lines = [
        "# `chunked_prefill` at budgets between the powers of two (`benchmarks/budget_points.py`)",
        "",
        f"Machine: {result['machine']}; 1-min load average at the start and end: "
        f"{result['loadavg_1min_start_end']}; wall time {result['wall_s']} s. Simulated, seeds "
        f"{SEEDS[0]}-{SEEDS[-1]}; latencies are means over the seeds (s); max ratio: geometric "
        "mean of the per-seed max over the reference budget's (the first listed at the point).",
        "",
        "| experiment | rate req/s | budget | max | p99 | mean | max / reference |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['experiment']} | {r['rate_rps']:g} | {r['budget']} | {r['max_latency_s']:.2f} | "
            f"{r['p99_latency_s']:.2f} | {r['mean_latency_s']:.2f} | "
            f"{r['max_over_reference']:.3f} (vs {r['reference_budget']}) |"
        )
    lines += ["", "## nova's model at the same points", ""]
    for name, rate, budgets in POINTS:
        if (name, rate) in READS:
            lines += model_lines(name, rate, budgets)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "budget_points.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "budget_points.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
