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

``--ablate``: what each of the simulator's speed tricks is worth. Every policy runs with all
tricks on and with each one switched off (stage skipping from the policy's declarations, the
cost memo, unchecked ``StageWork`` construction, the paused garbage collector), interleaved,
``--repeats`` times; reported is the least process CPU time per variant (CPU time, not wall
time: the 2 cores are shared, and CPU time of this process is far less disturbed by other jobs).
Writes benchmarks/results/scheduler_sim_ablation.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

from runtime_throughput import machine

from nova.cost.base import StageWork, make_cost_model
from nova.cost.model_spec import ModelSpec, get_model_spec
from nova.metrics import percentile
from nova.sim.eval import EXPERIMENTS, Experiment, build_policy, num_kv_blocks
from nova.sim.simulator import SimArrival, Simulator, arrivals_from_workload
from nova.workload import make_workload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=10_000)
    ap.add_argument("--rate-rps", type=float, default=0.4)  # every policy sustains it (paper-a6000)
    ap.add_argument(
        "--repeats", type=int, default=3, help="runs per policy; the fastest is reported"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--ablate", action="store_true", help="measure each speed trick instead")
    args = ap.parse_args()

    exp = EXPERIMENTS["paper-a6000"]
    spec = get_model_spec(exp.model)
    cost = make_cost_model("roofline", exp.gpu, spec)
    arrivals = arrivals_from_workload(
        make_workload("poisson", rate_rps=args.rate_rps, num_requests=args.num_requests, seed=1)
    )
    if args.ablate:
        ablate(args, exp, spec, arrivals)
        return
    rows = []
    for policy in POLICIES:
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
        # the policy's hook after every batch (nova observes the load and re-plans there)
        hooks: list[float] = []
        hook = sim.scheduler.policy.on_batch_done

        def timed_hook(result, state, now_s, _inner=hook, _calls=hooks):
            t0 = time.perf_counter()
            _inner(result, state, now_s)
            _calls.append(time.perf_counter() - t0)

        sim.scheduler.policy.on_batch_done = timed_hook  # type: ignore[method-assign]
        res = sim.run(arrivals)
        calls.sort()
        hooks.sort()
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
            "hook_us_p50": round(1e6 * percentile(hooks, 50), 1),
            "hook_us_p99": round(1e6 * percentile(hooks, 99), 1),
            "hook_us_max": round(1e6 * hooks[-1], 1),
            "replans": getattr(sim.scheduler.policy, "num_replans", None),
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
        "separate run; the simulator asks only stages that can get a batch. Hook = the policy's "
        "`on_batch_done` after every batch (nova updates its load estimate and re-plans there; "
        "plans computed = cache misses).",
        "",
        "| policy | sim wall s | runs s | load before runs | decisions | p50 us | p99 us | mean "
        "us | max us | hook p50 us | hook p99 us | hook max us | plans |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['sim_wall_s']} | {', '.join(map(str, r['sim_wall_s_runs']))} "
            f"| {', '.join(map(str, r['loadavg_1min_before_runs']))} | {r['num_decisions']} "
            f"| {r['decision_us_p50']} | {r['decision_us_p99']} | {r['decision_us_mean']} "
            f"| {r['decision_us_max']} | {r['hook_us_p50']} | {r['hook_us_p99']} "
            f"| {r['hook_us_max']} | {r['replans'] if r['replans'] is not None else '-'} |"
        )
    (args.out / "scheduler_sim.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


POLICIES = ("nova", "pf_limit", "chunked_prefill", "multi_stream", "sequential", "static_partition")


def _ask_every_stage(sim: Simulator) -> None:
    # instance attributes shadow the class's declarations: the simulator then asks every idle
    # stage after every event
    sim.scheduler.policy.idle_without_queue = False
    sim.scheduler.policy.one_batch_at_a_time = False


# variant -> (Simulator keyword arguments, a change to the built simulator, run with the
# garbage collector left running)
ABLATIONS: dict[str, tuple[dict, Callable[[Simulator], None] | None, bool]] = {
    "all tricks": ({}, None, False),
    "every stage asked": ({}, _ask_every_stage, False),
    "no cost memo": ({"memoize_costs": False}, None, False),
    "checked StageWork": ({"work_fn": StageWork.from_batch}, None, False),
    "gc running": ({}, None, True),
}


def ablate(
    args: argparse.Namespace, exp: Experiment, spec: ModelSpec, arrivals: list[SimArrival]
) -> None:
    policies = POLICIES
    cpu_s: dict[str, dict[str, list[float]]] = {p: {v: [] for v in ABLATIONS} for p in policies}
    loads = []
    for _ in range(args.repeats):
        loads.append(round(os.getloadavg()[0], 2))
        for policy in policies:
            for variant, (kwargs, change, gc_running) in ABLATIONS.items():
                fresh = make_cost_model("roofline", exp.gpu, spec)  # its own memo, like the first
                sim = Simulator(
                    build_policy(policy, exp, fresh, spec),
                    fresh,
                    num_kv_blocks(fresh, spec, 16),
                    16,
                    spec.image_tokens,
                    **kwargs,
                )
                if change is not None:
                    change(sim)
                with mock.patch("gc.disable") if gc_running else contextlib.nullcontext():
                    t0 = time.process_time()
                    sim.run(arrivals)
                    cpu_s[policy][variant].append(time.process_time() - t0)
        print(f"repeat done, load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for policy, runs in cpu_s.items():
        base = min(runs["all tricks"])
        row = {"policy": policy, "cpu_s": {v: round(min(r), 2) for v, r in runs.items()}}
        row["slowdown_without"] = {
            v: round(min(r) / base, 2) for v, r in runs.items() if v != "all tricks"
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "benchmark": "scheduler_sim_ablation",
        "experiment": "paper-a6000",
        "num_requests": args.num_requests,
        "rate_rps": args.rate_rps,
        "repeats": args.repeats,
        "loadavg_1min_before_repeats": loads,
        "machine": machine(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scheduler_sim_ablation.json").write_text(json.dumps(report, indent=2) + "\n")
    variants = [v for v in ABLATIONS if v != "all tricks"]
    lines = [
        "# What each simulator speed trick is worth",
        "",
        f"Machine: {report['machine']}; 1-minute load before each repeat: {loads}.",
        "",
        f"paper-a6000 setup, {args.num_requests} Poisson GUI-agent requests at {args.rate_rps} "
        f"req/s. Least process CPU time of {args.repeats} interleaved runs per variant; "
        "the columns give the slowdown with that one trick switched off (> 1: the trick pays).",
        "",
        "| policy | all tricks CPU s | " + " | ".join(variants) + " |",
        "|---|---:|" + "---:|" * len(variants),
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['cpu_s']['all tricks']} | "
            + " | ".join(f"{r['slowdown_without'][v]}x" for v in variants)
            + " |"
        )
    (args.out / "scheduler_sim_ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
