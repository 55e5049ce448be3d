"""nova's model against the simulator at the two points that fail on every held-out set
(``paper-a6000`` 0.8 and ``rtx4090-qwen2.5-vl-7b`` 3 req/s), and what planning for the rate's
uncertainty, instead of its point estimate, would change there.

1. **At the offered rate**: the model's score (predicted tail + mean latency) of each chunked
   budget next to the simulated max + mean latency of ``chunked_prefill`` with that budget
   (seeds 0-2, ``benchmarks/results/eval``). If the model ranks the budgets as the simulator
   does, a wrong choice comes from the rate nova planned for, not from the model.
2. **At the rates nova read**: the ratio of the two budgets' scores (the larger budget's over
   the smaller's; below 1: the model prefers the larger) at a point read, and averaged over the
   read's standard error after n arrivals (a three-point Gauss-Hermite rule on the log rate,
   sigma = 1/sqrt(n)): the expected score a plan on the rate's uncertainty would minimize.

The load estimate (mix of tokens and images) is the one nova holds at the end of a simulated
run of the experiment at its highest rate, seed 0. Model and simulator only; no wall clock.

Usage: ``python benchmarks/rate_read_scores.py [--out DIR]`` writes
``DIR/rate_read_scores.md``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

from nova.core.nova_model import LoadEstimate, Mode
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
# experiment, offered rates, the two budgets in question (the best baseline's first), rates read
POINTS = (
    ("paper-a6000", (0.6, 0.7, 0.8), (256, 128), (0.66, 0.7, 0.72, 0.74, 0.76, 0.8)),
    ("rtx4090-qwen2.5-vl-7b", (2.0, 2.5, 3.0), (256, 512), (2.9, 3.0, 3.1, 3.2, 3.34, 3.54)),
)
ARRIVALS = (64, 128, 256, 512)
_GH3 = ((-math.sqrt(3.0), 1.0 / 6.0), (0.0, 2.0 / 3.0), (math.sqrt(3.0), 1.0 / 6.0))


def expected_score(policy: NovaPolicy, mode: Mode, load: LoadEstimate, rel_err: float) -> float:
    """The mode's score averaged over a log-normal rate with ``rel_err`` spread."""
    return sum(
        w
        * policy.model.predict(
            mode, replace(load, lam_rps=load.lam_rps * math.exp(z * rel_err))
        ).score_s
        for z, w in _GH3
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    lines = [
        "# The model at the offered rate and at the rates nova read "
        "(`benchmarks/rate_read_scores.py`)",
        "",
        "Policy `nova` (the default). Score: predicted tail + mean latency (s); simulated: max + "
        "mean latency (s) of `chunked_prefill` with that budget, mean over seeds 0-2 "
        "(`benchmarks/results/eval/<experiment>/results.json`).",
        "",
    ]
    for name, offered, budgets, reads in POINTS:
        exp = EXPERIMENTS[name]
        spec = experiment_spec(exp)
        cost = experiment_cost_model(exp, spec)
        policy = build_policy("nova", exp, cost, spec)
        assert isinstance(policy, NovaPolicy)
        arrivals = workload_arrivals(exp, exp.all_series()[0], max(offered), 0)
        res = simulate(exp, policy, cost, spec, arrivals)
        base = policy.load_estimate(res.end_s)
        sim = json.loads((RESULTS / "eval" / name / "results.json").read_text())["policies"]
        big, small = max(budgets), min(budgets)
        lines += [
            f"## {name}",
            "",
            f"Load estimate: image fraction {base.image_fraction:.2f}, "
            f"{base.text_tokens:.0f} text and {base.output_tokens:.0f} output tokens per request.",
            "",
            "| offered req/s | budget | capacity req/s | model score s | simulated max + mean s |",
            "|---:|---:|---:|---:|---:|",
        ]
        for lam in offered:
            for b in sorted(budgets):
                pred = policy.model.predict(Mode.chunked(b), replace(base, lam_rps=lam))
                point = next(
                    p
                    for p in sim[f"chunked_prefill[budget={b}]"]
                    if abs(p["rate_rps"] - lam) < 1e-9
                )
                simulated = point["max_latency_s"] + point["mean_latency_s"]
                lines.append(
                    f"| {lam:g} | {b} | {pred.capacity_rps:.3f} | {pred.score_s:.2f} | "
                    f"{simulated:.2f} |"
                )
        lines += [
            "",
            f"chunked:{big}'s score over chunked:{small}'s at a rate read (point), and averaged "
            "over the read's standard error after n arrivals:",
            "",
            "| rate read req/s | point | " + " | ".join(f"n = {n}" for n in ARRIVALS) + " |",
            "|---:|---:|" + "---:|" * len(ARRIVALS),
        ]
        for lam in reads:
            load = replace(base, lam_rps=lam)
            hi, lo = (policy.model.predict(Mode.chunked(b), load).score_s for b in (big, small))
            cells = []
            for n in ARRIVALS:
                err = 1.0 / math.sqrt(n)
                cells.append(
                    f"{expected_score(policy, Mode.chunked(big), load, err) / expected_score(policy, Mode.chunked(small), load, err):.3f}"  # noqa: E501
                )
            lines.append(f"| {lam:g} | {hi / lo:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rate_read_scores.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
