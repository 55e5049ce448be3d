"""How sure was nova's model when it chose a spatial mode over the time-sliced ones, and what did
that choice give on seeds the evaluation never chose anything on?

For every point of the committed held-out evaluations where nova's choice at the offered rate
is a spatial mode, the model's score (predicted tail + mean latency) of the best spatial mode
over the best time-sliced one (both carrying the rate), next to nova's max latency over the best
tuned baseline's on each held-out seed set (the paired interval's geometric mean, and whether
the interval lies above or below 1). The load the model is asked about: the offered rate, with
the request mix nova observed over the first ``--warm`` arrivals of seed 3 (a simulated run).

Usage: ``python benchmarks/nova_margins.py [--warm N] [--out DIR]`` writes
``DIR/nova_margins.md`` and ``.json``. Simulated; no wall-clock figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any

from nova.core.nova_policy import NovaPolicy
from nova.sim.eval import (
    EXPERIMENTS,
    build_policy,
    experiment_cost_model,
    experiment_spec,
    simulate,
    workload_arrivals,
)

RESULTS = Path(__file__).parent / "results"
# the policy the held-out sets below ran: nova's default until the seeds 33-42 pre-registration
# (benchmarks/results/preregistration_seeds_33_42.md) made spatial_margin 0.05 part of it
NOVA = "nova[run_mean=0, rho_cap=0.95, spatial_margin=0]"
SETS = {
    "3-12": RESULTS / "eval_heldout" / "summary.json",
    "13-22": RESULTS / "eval_fresh_seeds" / "summary.json",
    "23-32": RESULTS / "eval_seeds_23_32" / "summary.json",
}


def model_view(experiment: str, series: str, load: float, warm: int) -> dict[str, Any] | None:
    """nova's choice at the offered ``load`` and the best spatial and time-sliced modes' scores
    (None for closed loops, whose load is a number of sessions, not a rate)."""
    exp = EXPERIMENTS[experiment]
    if exp.closed_loop:
        return None
    spec = experiment_spec(exp)
    cost = experiment_cost_model(exp, spec)
    index = [s.label for s in exp.all_series()].index(series)
    arrivals = workload_arrivals(exp, exp.all_series()[index], load, 3)[:warm]
    policy = build_policy(NOVA, exp, cost, spec)
    assert isinstance(policy, NovaPolicy)
    res = simulate(exp, policy, cost, spec, arrivals)
    at = replace(policy.load_estimate(res.end_s), lam_rps=load, backlog=0)
    preds = policy.candidates(at)
    chosen = policy.choose(preds, load, at.clustered)
    carry = [p for p in preds if p.feasible and p.capacity_rps >= load]
    spatial = [p for p in carry if p.mode.kind == "spatial"]
    sliced = [p for p in carry if p.mode.kind != "spatial"]
    if not spatial or not sliced:
        return None
    bs, bt = (min(group, key=lambda p: p.score_s) for group in (spatial, sliced))
    return {
        "chosen": chosen.mode.label,
        "best_spatial": bs.mode.label,
        "best_time_sliced": bt.mode.label,
        "spatial_over_time_sliced": bs.score_s / bt.score_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warm", type=int, default=300)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    outcomes: dict[tuple[str, str, float], dict[str, Any]] = {}
    for name, path in SETS.items():
        for p in json.loads(path.read_text())["points"]:
            key = (p["experiment"], p["series"], p["load"])
            outcomes.setdefault(key, {})[name] = p["max_ratio_paired"]
    rows = []
    for (experiment, series, load), by_set in sorted(outcomes.items()):
        view = model_view(experiment, series, load, args.warm)
        if view is None or not view["chosen"].startswith("spatial"):
            continue
        rows.append({"experiment": experiment, "series": series, "load": load, **view, **by_set})
        print(experiment, series, load, view, flush=True)

    def cell(r: dict[str, float]) -> str:
        mark = " (below)" if r["high95"] < 1 else " (above)" if r["low95"] > 1 else ""
        return f"{r['geomean']:.3f}{mark}"

    lines = [
        "# Spatial choices: the model's margin and the outcome (`benchmarks/nova_margins.py`)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"simulated. Mix observed over the first {args.warm} arrivals of seed 3; the model asked "
        f"at the offered rate. Points where nova (`{NOVA}`, the policy the sets ran) chooses "
        "a spatial mode there.",
        "",
        "margin: the best spatial mode's score over the best time-sliced mode's (both carry the "
        "rate; below 1: the model prefers spatial by that much). Outcome per held-out seed set: "
        "nova's max over the best tuned baseline's (geometric mean of the paired ratios; "
        "(below)/(above): the 95% interval lies entirely below/above 1). Sets: "
        + ", ".join(
            f"seeds {k} (`{v.relative_to(RESULTS.parent.parent)}`)" for k, v in SETS.items()
        )
        + ".",
        "",
        "| experiment | series | load | nova's choice | best time-sliced | margin | "
        + " | ".join(f"seeds {k}" for k in SETS)
        + " |",
        "|---|---|---:|---|---|---:|" + "---:|" * len(SETS),
    ]
    for r in sorted(rows, key=lambda r: r["spatial_over_time_sliced"]):
        lines.append(
            f"| {r['experiment']} | {r['series']} | {r['load']:g} | `{r['chosen']}` | "
            f"`{r['best_time_sliced']}` | {r['spatial_over_time_sliced']:.3f} | "
            + " | ".join(cell(r[k]) if k in r else "-" for k in SETS)
            + " |"
        )
    lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nova_margins.md").write_text("\n".join(lines))
    (args.out / "nova_margins.json").write_text(
        json.dumps({"warm": args.warm, "rows": rows}, indent=1) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
