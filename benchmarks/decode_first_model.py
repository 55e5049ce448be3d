"""The queueing model against the simulator for the CPU's time-sliced modes (demo profile).

Runs ``decode_first:8`` and ``chunked:512`` pinned (``nova[mode=...]``) in the simulator on the
demo model's CPU profile, stages taking turns as on the 2-core ``cpu`` backend, with Poisson
arrivals of ``engine_latency``'s mix (3 of 4 with a screenshot, 32 output tokens), and prints
the model's mean, tail and capacity beside the simulated mean, p99 and max. Simulated figures.
Writes ``benchmarks/results/decode_first_model_cpu.{json,md}``.

Usage: ``python benchmarks/decode_first_model.py [--rates 0.3 0.8 ...] [--seeds 3]``
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from nova.core.nova_model import LoadEstimate, Mode
from nova.core.nova_policy import NovaPolicy
from nova.core.policy import StageLimits
from nova.cost.base import make_cost_model
from nova.metrics import request_metrics, summarize
from nova.sim.simulator import SimArrival, Simulator

IMAGE_TOKENS = 196  # the demo model's tokens per image
LIMITS = StageLimits(8, 4096, 64)  # the engine's caps for the demo model


def arrivals(rate_rps: float, n: int, seed: int) -> list[SimArrival]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate_rps)
        image = rng.random() < 0.75
        out.append(SimArrival(f"r{i}", t, 54 if image else 35, 1 if image else 0, 32))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.5, 0.8, 1.0, 1.3, 1.7])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=400)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    cost = make_cost_model("profiled", "cpu", "demo")
    rows = []
    for rate in args.rates:
        for label in ("decode_first:8", "chunked:512"):
            sims = []
            for seed in range(args.seeds):
                policy = NovaPolicy(
                    LIMITS,
                    cost,
                    image_tokens=IMAGE_TOKENS,
                    sm_granularity_share=0.5,
                    fixed_mode=label,
                )
                sim = Simulator(policy, cost, 4000, 16, IMAGE_TOKENS, stages_take_turns=True)
                res = sim.run(arrivals(rate, args.num_requests, seed))
                s = summarize([request_metrics(q) for q in res.requests], duration_s=res.end_s)
                sims.append((s.e2e.mean, s.e2e.p99, s.e2e.max, s.tpot.p50))
            pred = policy.model.predict(
                Mode.parse(label), LoadEstimate(rate, 0.75, 1.0, 47.0, 32.0, 32.0)
            )
            mean = [sum(x[i] for x in sims) / len(sims) for i in range(4)]
            rows.append(
                {
                    "rate_rps": rate,
                    "mode": label,
                    "sim_mean_s": mean[0],
                    "sim_p99_s": mean[1],
                    "sim_max_s": mean[2],
                    "sim_tpot_p50_s": mean[3],
                    "model_mean_s": pred.mean_latency_s,
                    "model_tail_s": pred.tail_latency_s,
                    "model_capacity_rps": pred.capacity_rps,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_first_model_cpu.json").write_text(
        json.dumps({"seeds": args.seeds, "num_requests": args.num_requests, "rows": rows}, indent=1)
    )
    lines = [
        "# The queueing model vs the simulator: the CPU's time-sliced modes (demo profile)",
        "",
        f"Simulated: `nova[mode=...]` pinned, stages taking turns (2-core `cpu` backend), the demo "
        f"CPU profile; Poisson arrivals, 3 of 4 with a screenshot, 32 output tokens; "
        f"{args.num_requests} requests, mean over {args.seeds} seeds. Written by "
        "`benchmarks/decode_first_model.py`.",
        "",
        "| req/s | mode | sim mean s | model mean s | sim p99 s | sim max s | model tail s "
        "| model capacity req/s | sim TPOT p50 ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rate_rps']} | `{r['mode']}` | {r['sim_mean_s']:.2f} | {r['model_mean_s']:.2f} "
            f"| {r['sim_p99_s']:.2f} | {r['sim_max_s']:.2f} | {r['model_tail_s']:.2f} "
            f"| {r['model_capacity_rps']:.2f} | {1000 * r['sim_tpot_p50_s']:.0f} |"
        )
    (args.out / "decode_first_model_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
