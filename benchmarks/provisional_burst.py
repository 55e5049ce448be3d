"""The screenshot burst in the simulator under each ``provisional_switch`` rule of ``nova``.

``engine_latency.py``'s 64 requests (3 of 4 with a screenshot, 32 output tokens) arrive as the
engine's submitting thread delivers them: most 1 ms apart, some after a stall (``stalls``:
50-400 ms, 15% of gaps; ``short``: 5-50 ms). The demo model's CPU profile on 2 cores, stages
taking turns. ``nova`` plans with the profile, as the engine does; the simulated stage times
are the profile's (``profile``) or scaled per stage to what this AMD EPYC measured against it
(``amd``: vision 3.88x, prefill 1.96x, decode 0.92x,
``benchmarks/results/batch_times_vs_profile_cpu_amd.md``). Per burst: nova's mode switches,
E2E mean and max, TPOT p50, beside ``sequential``. Simulated figures.
Writes ``benchmarks/results/provisional_burst_cpu.{json,md}``.
Usage: ``.venv/bin/python benchmarks/provisional_burst.py [--seeds 8]``
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

from nova.core.nova_policy import NovaPolicy
from nova.core.policy import StageLimits, make_policy
from nova.cost.base import CostModel, StageWork, make_cost_model
from nova.metrics import request_metrics, summarize
from nova.sim.simulator import SimArrival, Simulator
from nova.types import Stage

IMAGE_TOKENS = 196  # the demo model's tokens per image
LIMITS = StageLimits(8, 4096, 64)  # the engine's caps for the demo model
AMD_SCALE = {Stage.VISION: 3.88, Stage.PREFILL: 1.96, Stage.DECODE: 0.92}
STALLS = {"stalls": (0.05, 0.4), "short": (0.005, 0.05)}


class ScaledCost:
    """``base``'s stage times times a per-stage factor (the machine the burst runs on)."""

    def __init__(self, base: CostModel, scale: dict[Stage, float]) -> None:
        self.base, self.scale, self.name = base, scale, f"{base.name}-scaled"

    def time_s(self, work: StageWork, sm_share: float, co_running=(), isolated: bool = True):
        return self.base.time_s(work, sm_share, co_running, isolated) * self.scale[work.stage]

    def gpu(self):
        return self.base.gpu()


def burst(seed: int, pattern: str) -> list[SimArrival]:
    lo, hi = STALLS[pattern]
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(64):
        t += 0.001 if rng.random() < 0.85 else rng.uniform(lo, hi)
        image = i % 4 != 3
        out.append(SimArrival(f"r{i}", t, 54 if image else 35, 1 if image else 0, 32))
    return out


def run(spec: str, profile: CostModel, truth: CostModel, arrivals: list[SimArrival]) -> dict:
    if spec == "sequential":
        policy = make_policy("sequential", limits=LIMITS)
    else:
        rule = spec.partition("=")[2]
        policy = NovaPolicy(
            LIMITS,
            profile,
            image_tokens=IMAGE_TOKENS,
            sm_granularity_share=0.5,
            provisional_switch=rule,
        )
    res = Simulator(policy, truth, 4000, 16, IMAGE_TOKENS, stages_take_turns=True).run(arrivals)
    s = summarize([request_metrics(q) for q in res.requests], duration_s=res.end_s)
    return {
        "switches": getattr(policy, "num_switches", 0),
        "e2e_mean_s": s.e2e.mean,
        "e2e_max_s": s.e2e.max,
        "tpot_p50_ms": 1e3 * s.tpot.p50,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    profile = make_cost_model("profiled", "cpu", "demo")
    truths = {"profile": profile, "amd": ScaledCost(profile, AMD_SCALE)}
    specs = ["nova=any", "nova=capacity", "nova=none", "sequential"]
    rows = []
    for truth_name, truth in truths.items():
        for pattern in STALLS:
            for spec in specs:
                runs = [run(spec, profile, truth, burst(s, pattern)) for s in range(args.seeds)]
                rows.append({"times": truth_name, "pattern": pattern, "policy": spec, "runs": runs})
                print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "provisional_burst_cpu.json").write_text(
        json.dumps({"seeds": args.seeds, "rows": rows}, indent=1)
    )
    lines = [
        "# The screenshot burst under nova's provisional_switch rules (simulated, demo CPU)",
        "",
        f"Written by `benchmarks/provisional_burst.py`; {args.seeds} bursts (seeds) per row. "
        "Stage times: `profile` (the shipped demo CPU profile) or `amd` (scaled to this AMD "
        "EPYC's measured batches); nova plans with the profile in both.",
        "",
        "| stage times | stalls | policy | bursts with a switch | switches per burst | "
        "E2E mean s | E2E max s | TPOT p50 ms |",
        "|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        runs = r["runs"]
        sw = [x["switches"] for x in runs]

        def mean(key: str, runs: list[dict] = runs) -> float:
            return statistics.mean(x[key] for x in runs)

        lines.append(
            f"| {r['times']} | {r['pattern']} | `{r['policy']}` | "
            f"{sum(1 for x in sw if x)} of {len(sw)} | {', '.join(map(str, sw))} | "
            f"{mean('e2e_mean_s'):.2f} | {mean('e2e_max_s'):.2f} | {mean('tpot_p50_ms'):.0f} |"
        )
    (args.out / "provisional_burst_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
