"""The longest wait a run of N requests sees in a single-server FIFO queue, in the heavy-traffic
units nova's queueing model uses (``nova.core.nova_model.window_max_wait``'s table).

Near saturation the stationary p99 of the waiting time is a poor guide to the p99 a run of a
few hundred or thousand requests reports: the queue relaxes to its steady state over about
``tau = 2 / ((1 - rho) eta)`` seconds (``eta``: the waiting tail's decay rate), and a run that
lasts a few ``tau`` sees one or two long excursions, not the stationary tail. This script
measures ``E[max wait over the run] * eta`` against ``t = T / tau`` (``T``: the run's
duration) by Lindley's recursion, for M/D/1 queues (nearly deterministic service: nova's
front service has a squared CV of a few hundredths) at several utilizations, and M/M/1 for
comparison. In these units the curves of different utilizations fall close together, which
is what lets one table serve every load.

Usage: ``python benchmarks/window_max_table.py [--seeds N] [--out DIR]`` writes
``DIR/window_max_table.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

# the t grid of the table (dimensionless run lengths)
T_GRID = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 35.0, 60.0)


def decay_rate(rho: float, law: str) -> float:
    """The waiting tail's decay rate for unit-mean service at utilization ``rho``."""
    if law == "M":
        return 1.0 - rho  # M/M/1: exactly (1 - rho) / E[S]
    # M/D/1: the positive root of rho (exp(eta) - 1) = eta (Cramer-Lundberg), by bisection
    lo, hi = 1e-12, 50.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if rho * math.expm1(mid) < mid:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def run_waits(rho: float, law: str, num_requests: int, seeds: int) -> tuple[float, float]:
    """E[the longest wait among ``num_requests`` arrivals from an empty queue] and E[their
    mean wait], unit service."""
    total = total_mean = 0.0
    for seed in range(seeds):
        rng = random.Random(seed)
        wait = longest = summed = 0.0
        expo = rng.expovariate
        for _ in range(num_requests):
            if wait > longest:
                longest = wait
            summed += wait
            service = 1.0 if law == "D" else expo(1.0)
            wait = wait + service - expo(rho)
            if wait < 0.0:
                wait = 0.0
        total += longest
        total_mean += summed / num_requests
    return total / seeds, total_mean / seeds


def stationary_mean_wait(rho: float, law: str) -> float:
    """Pollaczek-Khinchine's mean wait, unit service: rho (1 + cs2) / (2 (1 - rho))."""
    return rho * (1.0 if law == "D" else 2.0) / (2.0 * (1.0 - rho))


def requests_for(t: float, rho: float, eta: float) -> int:
    """Arrivals whose run lasts ``t`` relaxation times (``T = N / lam``, ``tau = 2 / (mu eta)``)."""
    tau = 2.0 / ((1.0 - rho) * eta)
    return max(2, round(t * tau * rho))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    t0 = time.perf_counter()
    cases = [("D", 0.95), ("D", 0.9), ("D", 0.85), ("M", 0.95)]
    rows: dict[str, list[float | None]] = {}
    means: dict[str, list[float | None]] = {}  # a run's mean wait over the stationary mean
    for law, rho in cases:
        eta = decay_rate(rho, law)
        vals: list[float | None] = []
        ratios: list[float | None] = []
        for t in T_GRID:
            n = requests_for(t, rho, eta)
            if n > 200_000:
                vals.append(None)
                ratios.append(None)
                continue
            longest, mean = run_waits(rho, law, n, args.seeds)
            vals.append(longest * eta)
            ratios.append(mean / stationary_mean_wait(rho, law))
        rows[f"M/{law}/1 rho={rho}"] = vals
        means[f"M/{law}/1 rho={rho}"] = ratios
        print(law, rho, [None if v is None else round(v, 3) for v in vals], flush=True)
        print("  mean", [None if v is None else round(v, 3) for v in ratios], flush=True)
    wall = time.perf_counter() - t0
    table = rows["M/D/1 rho=0.95"]
    lines = [
        "# Longest wait in a run, heavy-traffic units (`benchmarks/window_max_table.py`)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, python "
        f"{platform.python_version()}; {args.seeds} seeds per cell; {wall:.0f} s.",
        "",
        "g = E[longest wait over a run from an empty queue] x eta, against t = run duration / "
        "tau, tau = 2 / ((1 - rho) eta); unit-mean service; Lindley's recursion. nova's model "
        "uses the M/D/1 rho = 0.95 row (`nova.core.nova_model.WINDOW_MAX_TABLE`).",
        "",
        "| t | " + " | ".join(rows) + " | ln t |",
        "|---:|" + "---:|" * (len(rows) + 1),
    ]
    for i, t in enumerate(T_GRID):
        cells = ["-" if rows[k][i] is None else f"{rows[k][i]:.3f}" for k in rows]
        lines.append(f"| {t:g} | " + " | ".join(cells) + f" | {math.log(t):.2f} |")
    lines += [
        "",
        "## A run's mean wait",
        "",
        "r = E[mean wait over a run from an empty queue] / the stationary mean wait "
        "(Pollaczek-Khinchine), against the same t; the same runs. nova's model uses the M/D/1 "
        "rho = 0.95 row (`nova.core.nova_model.WINDOW_MEAN_R`).",
        "",
        "| t | " + " | ".join(means) + " |",
        "|---:|" + "---:|" * len(means),
    ]
    for i, t in enumerate(T_GRID):
        cells = ["-" if means[k][i] is None else f"{means[k][i]:.3f}" for k in means]
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "window_max_table.md").write_text("\n".join(lines))
    (args.out / "window_max_table.json").write_text(
        json.dumps(
            {"t": T_GRID, "rows": rows, "mean_rows": means, "seeds": args.seeds, "wall_s": wall},
            indent=1,
        )
    )
    print("\n".join(lines))
    assert all(v is not None for v in table)
    print("table:", tuple(round(v, 3) for v in table if v is not None))
    print("mean table:", tuple(round(v, 3) for v in means["M/D/1 rho=0.95"] if v is not None))


if __name__ == "__main__":
    main()
