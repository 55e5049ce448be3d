"""Does the simulator predict the real engine? Same held-out workload through both, on the CPU.

Real: the demo model in the engine (three concurrent worker threads) on this machine; requests
(a GUI-agent instruction + a generated screenshot each, fixed output length, EOS ignored) are
submitted at their Poisson arrival times. Simulated: the same arrivals and prompt sizes through
the simulator, with the cost model profiled on this CPU (``nova/cost/profiles/demo-cpu.json``,
made by ``nova profile``; the workload's seed differs from anything used to profile).
Reports mean and p99 end-to-end latency of both and the relative error, per policy and real
run (``--repeats``), with the 1-minute load average around each real run: the 2 cores are
shared with other jobs, and a run under load is slower than the profile (taken when quiet).
Writes benchmarks/results/sim_vs_real_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from runtime_throughput import machine

from nova.config import EngineConfig
from nova.cost.profiled import ProfiledCostModel
from nova.engine.llm_engine import LLMEngine
from nova.metrics import request_metrics, summarize
from nova.models.inputs import chat_messages
from nova.sampling_params import SamplingParams
from nova.screenshots import make_screenshot
from nova.sim.eval import Experiment, build_policy
from nova.sim.simulator import SimArrival, Simulator
from nova.workload import make_workload

PROFILE = Path(__file__).resolve().parents[1] / "nova" / "cost" / "profiles" / "demo-cpu.json"


def run_real(nova: LLMEngine, wl, prompts) -> list:
    nova.start()
    try:
        t0 = time.monotonic()
        reqs = []
        for w, p in zip(wl.requests, prompts):
            time.sleep(max(0.0, w.arrival_s - (time.monotonic() - t0)))
            reqs.append(
                nova.submit(
                    p,
                    SamplingParams(max_tokens=w.max_tokens, ignore_eos=True),
                    request_id=w.request_id,
                )
            )
        nova.loop.wait_idle()
    finally:
        nova.stop()
    return reqs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=40)
    ap.add_argument("--rate-rps", type=float, default=0.5)
    ap.add_argument("--policies", nargs="+", default=["sequential", "multi_stream"])
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--repeats", type=int, default=1, help="real runs per policy (each reported)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    cost = ProfiledCostModel.from_file(PROFILE)
    wl = make_workload(
        "poisson",
        rate_rps=args.rate_rps,
        num_requests=args.num_requests,
        seed=args.seed,
        min_tokens=16,
        max_tokens=32,
    )
    rows = []
    loaded = None
    turns_seen: set[bool] = set()
    for policy in args.policies:
        nova = LLMEngine(
            EngineConfig(model="demo", policy=policy, num_kv_blocks=1024), loaded=loaded
        )
        loaded = nova.loaded
        proc = nova.processor
        prompts = []
        for w in wl.requests:
            msgs = chat_messages(w.instruction, num_images=len(w.images))
            images = [make_screenshot(w.seed, im.width // 4, im.height // 4) for im in w.images]
            prompts.append(proc.from_chat(msgs, images))
        arrivals = [
            SimArrival(
                w.request_id,
                w.arrival_s,
                len(p.token_ids) - p.num_images * proc.num_image_tokens,
                p.num_images,
                w.max_tokens,
            )
            for w, p in zip(wl.requests, prompts)
        ]
        exp = Experiment(
            "cpu",
            "",
            gpu="cpu",
            model="demo",
            rates_rps=(args.rate_rps,),
            num_requests=args.num_requests,
        )
        # the real engine's CPU backend: stages take turns on cores too few to split
        turns = bool(getattr(nova.partition_backend, "stages_take_turns", False))
        turns_seen.add(turns)
        sim = Simulator(
            build_policy(policy, exp, cost, None),
            cost,
            1024,
            16,
            proc.num_image_tokens,
            stages_take_turns=turns,
        ).run(arrivals)
        s_sum = summarize([request_metrics(r) for r in sim.requests])
        for run in range(args.repeats):
            if run:  # a fresh engine (and scheduler) on the same loaded model
                nova = LLMEngine(
                    EngineConfig(model="demo", policy=policy, num_kv_blocks=1024), loaded=loaded
                )
            load_before = round(os.getloadavg()[0], 2)
            real = run_real(nova, wl, prompts)
            load_after = round(os.getloadavg()[0], 2)
            r_sum = summarize([request_metrics(r) for r in real])
            row = {
                "policy": policy,
                "run": run,
                "num_requests": args.num_requests,
                "rate_rps": args.rate_rps,
                "loadavg_1min_before_after": [load_before, load_after],
                "real_mean_e2e_s": r_sum.e2e.mean,
                "sim_mean_e2e_s": s_sum.e2e.mean,
                "real_p99_e2e_s": r_sum.e2e.p99,
                "sim_p99_e2e_s": s_sum.e2e.p99,
                "real_mean_ttft_s": r_sum.ttft.mean,
                "sim_mean_ttft_s": s_sum.ttft.mean,
            }
            row["mean_error"] = s_sum.e2e.mean / r_sum.e2e.mean - 1.0
            row["p99_error"] = s_sum.e2e.p99 / r_sum.e2e.p99 - 1.0
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = cost.metadata
    report = {
        "benchmark": "sim_vs_real",
        "model": "demo",
        "profile": PROFILE.name,
        "profile_metadata": {
            k: meta.get(k)
            for k in ("date", "timed", "statistic", "passes", "repeats", "loadavg_1min")
        },
        "workload": f"poisson {args.rate_rps} req/s, {args.num_requests} requests, seed "
        f"{args.seed}, 16-32 output tokens, one screenshot each",
        "machine": machine(),
        "stages_take_turns": sorted(turns_seen),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sim_vs_real_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Simulator vs real engine (CPU, demo model)",
        "",
        f"Machine: {report['machine']}",
        "",
        f"Workload: {report['workload']}. Cost model: profiled on this CPU ({PROFILE.name}, "
        f"{meta.get('date')}, {meta.get('statistic')}, timed: {meta.get('timed')}, "
        f"load during profiling {meta.get('loadavg_1min')}). Stages take turns on the cores "
        f"(engine's CPU backend, and simulated alike): {report['stages_take_turns']}.",
        "",
        "| policy | run | load before/after | real mean s | sim mean s | error | real p99 s | sim "
        "p99 s | error |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        load = "/".join(map(str, r["loadavg_1min_before_after"]))
        lines.append(
            f"| {r['policy']} | {r['run']} | {load} | {r['real_mean_e2e_s']:.2f} | "
            f"{r['sim_mean_e2e_s']:.2f} | "
            f"{100 * r['mean_error']:+.1f}% | {r['real_p99_e2e_s']:.2f} | "
            f"{r['sim_p99_e2e_s']:.2f} | "
            f"{100 * r['p99_error']:+.1f}% |"
        )
    (args.out / "sim_vs_real_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
