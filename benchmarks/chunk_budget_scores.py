"""nova's model's scores (predicted tail + mean latency) of ``chunked:128`` and ``chunked:256``
on the paper's load (CogAgent on an A6000, one 1600-token screenshot, 150 text and 55 output
tokens per request: ``tests/test_nova_policy.py``'s ``PAPER_LOAD``) against the arrival rate,
for the model nova used to score with (``nova[run_mean=0, rho_cap=0.95]``) and its default since
the seeds 33-42 pre-registration (``nova[run_mean=1, rho_cap=0.99]``): where the ranking of the
two budgets turns (docs/scheduler.md, "What still fails: `paper-a6000` 0.8 req/s").

Usage: ``python benchmarks/chunk_budget_scores.py [--out DIR]`` writes
``DIR/chunk_budget_scores.md``. Model only; no simulation, no wall-clock figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nova.core.nova_model import LoadEstimate, Mode
from nova.core.policy import StageLimits, make_policy
from nova.cost.base import make_cost_model

RATES = (0.6, 0.65, 0.7, 0.72, 0.74, 0.76, 0.78, 0.8, 0.82, 0.84, 0.86, 0.9)
VARIANTS = ("nova[run_mean=0, rho_cap=0.95]", "nova[run_mean=1, rho_cap=0.99]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    cost = make_cost_model("roofline", "a6000", "cogagent-9b")
    lines = [
        "# chunked:128 against chunked:256 in nova's model, paper load "
        "(`benchmarks/chunk_budget_scores.py`)",
        "",
        "Score: predicted tail + mean latency (s). ratio: 256's score over 128's (below 1: "
        "the model prefers 256). Capacity (req/s) in the header.",
        "",
    ]
    for name in VARIANTS:
        policy = make_policy(
            name, limits=StageLimits(), cost_model=cost, image_tokens=1600, min_decode_share=12 / 84
        )
        model = policy.model  # type: ignore[attr-defined]
        caps = [
            model.predict(Mode.chunked(b), LoadEstimate(0.1, 1.0, 1.0, 150, 55)).capacity_rps
            for b in (128, 256)
        ]
        lines += [
            f"## `{name}` (capacity: 128 {caps[0]:.3f}, 256 {caps[1]:.3f})",
            "",
            "| rate req/s | chunked:128 | chunked:256 | ratio |",
            "|---:|---:|---:|---:|",
        ]
        for lam in RATES:
            load = LoadEstimate(lam, 1.0, 1.0, 150, 55)
            s128, s256 = (
                p.score_s for p in (model.predict(Mode.chunked(b), load) for b in (128, 256))
            )
            lines.append(f"| {lam:g} | {s128:.1f} | {s256:.1f} | {s256 / s128:.3f} |")
        lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chunk_budget_scores.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
