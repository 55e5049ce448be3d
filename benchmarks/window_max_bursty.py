"""Does nova's run-window tail hold for bursty arrivals? Lindley's recursion against the model.

nova's queueing model prices a run's waiting tail near saturation by ``window_max_wait``: a
table measured on Poisson arrivals (M/D/1, ``benchmarks/window_max_table.py``), used in
heavy-traffic units. For arrivals burstier than Poisson the model scales the waiting tail's
decay rate by Kingman's factor (``eta / burst``, ``burst = (ca2 + cs2) / (1 + cs2)``; the
diffusion limit), which stretches both the wait unit ``1 / eta`` and the relaxation time
``tau``. Whether that scaling holds at the loads and burstiness the evaluation runs
(`bursty-a6000`: gamma gaps with CV 2, 3 and 4, loads to 60-90% of capacity) was untested.

This script measures, for gamma inter-arrival gaps (CV 1 = Poisson, 2, 3, 4) and unit
deterministic service at several utilizations, a run of ``--requests`` arrivals from an empty
queue (Lindley's recursion, ``--seeds`` runs per cell): the mean over runs of the run's
longest wait and of its p99 wait, and what the model predicts for both (``window_max_wait``
with the model's ``eta / burst``), and their ratio. A ratio near the Poisson column's means the
scaling holds; well above it, the model under-prices a bursty run's tail.

Usage: ``python benchmarks/window_max_bursty.py [--seeds N] [--requests N] [--out DIR]``
writes ``DIR/window_max_bursty.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

from window_max_table import decay_rate

from nova.core.nova_model import window_max_wait

CVS = (1.0, 2.0, 3.0, 4.0)
RHOS = (0.5, 0.6, 0.7, 0.8, 0.9)


def run_waits(rho: float, cv: float, num_requests: int, seed: int) -> list[float]:
    """Every request's wait in one run from an empty queue: unit service, gamma gaps with mean
    ``1 / rho`` and coefficient of variation ``cv``."""
    rng = random.Random(seed)
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rho * shape)
    waits = []
    wait = 0.0
    for _ in range(num_requests):
        waits.append(wait)
        wait = max(0.0, wait + 1.0 - rng.gammavariate(shape, scale))
    return waits


def cell(rho: float, cv: float, num_requests: int, seeds: int) -> dict[str, float]:
    """Measured and predicted longest and p99 wait of a run (means over ``seeds`` runs)."""
    longest = p99 = 0.0
    for seed in range(seeds):
        waits = sorted(run_waits(rho, cv, num_requests, seed))
        longest += waits[-1]
        p99 += waits[min(len(waits) - 1, math.ceil(0.99 * len(waits)) - 1)]
    longest /= seeds
    p99 /= seeds
    burst = max(1.0, cv * cv)  # Kingman's (ca2 + cs2) / (1 + cs2) with cs2 = 0
    eta = decay_rate(rho, "D") / burst
    predicted = window_max_wait(rho, eta, num_requests / rho)
    stationary_p99 = math.log(rho / 0.01) / eta if rho > 0.01 else 0.0
    return {
        "measured_max": longest,
        "measured_p99": p99,
        "predicted_window": predicted,
        "predicted_stationary_p99": stationary_p99,
        "model_tail": min(stationary_p99, predicted),
        "max_over_model": longest / min(stationary_p99, predicted),
        "p99_over_model": p99 / min(stationary_p99, predicted),
    }


def table(
    cells: dict[str, dict[str, float]], header: str, keys: tuple[str, ...], fmt: str
) -> list[str]:
    """A markdown table: a row per utilization, a column per CV, ``keys`` of each cell."""
    lines = [
        "| rho | " + " | ".join(f"CV {cv:g}{': ' + header if header else ''}" for cv in CVS) + " |",
        "|---:|" + "---|" * len(CVS),
    ]
    for rho in RHOS:
        row = [", ".join(format(cells[f"{cv:g}/{rho:g}"][k], fmt) for k in keys) for cv in CVS]
        lines.append(f"| {rho:g} | " + " | ".join(row) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    cells = {
        f"{cv:g}/{rho:g}": cell(rho, cv, args.requests, args.seeds) for cv in CVS for rho in RHOS
    }
    wall = time.perf_counter() - t0
    lines = [
        "# The run-window tail under bursty arrivals (`benchmarks/window_max_bursty.py`)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}; 1-min load average {load0:.2f} at the start; "
        f"{args.seeds} runs of {args.requests} arrivals per cell from an empty queue; "
        f"{wall:.0f} s.",
        "",
        "Unit deterministic service, gamma inter-arrival gaps (CV 1: Poisson). Measured by "
        "Lindley's recursion: the mean over runs of the run's longest wait and of its p99 "
        "wait. Model: `min(stationary p99, window_max_wait(rho, eta / burst, N / lam))`, the "
        "waiting tail `nova.core.nova_model` scores (burst = CV^2, eta: M/D/1's decay rate). "
        "Each cell: measured max / model, measured p99 / model.",
        "",
        *table(cells, "max/model, p99/model", ("max_over_model", "p99_over_model"), ".2f"),
        "",
        "Absolute figures (unit service times): measured max, measured p99, model tail.",
        "",
        *table(cells, "", ("measured_max", "measured_p99", "model_tail"), ".1f"),
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "window_max_bursty.md").write_text("\n".join(lines))
    meta = {"seeds": args.seeds, "requests": args.requests, "wall_s": wall, "loadavg": load0}
    (args.out / "window_max_bursty.json").write_text(
        json.dumps({**meta, "cells": cells}, indent=1) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
