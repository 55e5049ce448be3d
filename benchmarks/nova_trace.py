"""Every plan nova makes in one simulated run of a named experiment: the rate it planned for,
the mode it chose, the mode with the lowest score, and each chunked budget's score and
capacity. For tracing a choice back to the model (e.g. why a chunk budget other than the best
tuned one ran). Simulated; the scores are the policy's own (predicted tail + mean latency, s).

Usage: ``python benchmarks/nova_trace.py EXPERIMENT LOAD SEED [--series INDEX] [--nova SPEC]
[--out DIR]`` writes ``DIR/nova_trace_<experiment>_<load>_<seed>.md`` (default DIR:
benchmarks/results). Each trace names the policy it ran: the committed ones were made under
earlier defaults, and ``--nova`` with the spec in a trace's header reproduces it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nova.core.nova_model import Prediction
from nova.core.nova_policy import NovaPolicy
from nova.sim.eval import (
    EXPERIMENTS,
    build_policy,
    experiment_cost_model,
    experiment_spec,
    simulate,
    workload_arrivals,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", choices=sorted(EXPERIMENTS))
    ap.add_argument("load", type=float)
    ap.add_argument("seed", type=int)
    ap.add_argument("--series", type=int, default=0)
    ap.add_argument("--nova", default="nova", help="the policy spec to trace (default: nova)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    exp = EXPERIMENTS[args.experiment]
    spec = experiment_spec(exp)
    cost = experiment_cost_model(exp, spec)
    arrivals = workload_arrivals(exp, exp.all_series()[args.series], args.load, args.seed)
    policy = build_policy(args.nova, exp, cost, spec)
    assert isinstance(policy, NovaPolicy)
    rows: list[str] = []
    choose = policy.choose

    def traced(
        preds: list[Prediction], lam: float, clustered: bool = False, floor: float | None = None
    ) -> Prediction:
        out = choose(preds, lam, clustered, floor)
        lowest = min(preds, key=lambda p: p.score_s)
        chunked = sorted(
            [p for p in preds if p.mode.kind == "chunked"], key=lambda p: p.mode.token_budget
        )
        budgets = "; ".join(
            f"{p.mode.label} {p.score_s:.2f} s, {p.capacity_rps:.3f}/s" for p in chunked
        )
        rows.append(
            f"| {lam:.3f} | {clustered} | {floor} | `{out.mode.label}` | "
            f"`{lowest.mode.label}` {lowest.score_s:.2f} | {budgets} |"
        )
        return out

    policy.choose = traced  # type: ignore[method-assign]
    res = simulate(exp, policy, cost, spec, arrivals)
    name = f"nova_trace_{args.experiment}_{args.load:g}_{args.seed}"
    lines = [
        f"# nova's plans: {args.experiment}, load {args.load:g}, seed {args.seed}",
        "",
        f"Written by `benchmarks/nova_trace.py`; policy `{args.nova}`. Simulated, "
        f"{len(res.requests)} requests. "
        "Score: predicted tail + mean latency (s); capacity: requests/s.",
        "",
        "Modes run (start s, mode): " + ", ".join(f"{t:.1f} `{m}`" for t, m in policy.mode_log),
        "",
        "| planned rate /s | clustered | floor | chose | lowest score | chunked budgets: score, "
        "capacity |",
        "|---:|---|---|---|---|---|",
        *rows,
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines[-12:]))


if __name__ == "__main__":
    main()
