"""nova against the `chunked_prefill` baseline given the chunk budgets nova used.

The evaluation's tuned baseline chooses its token budget among 128, 256, 512 and 2048 (the
issue's grid). When nova runs a budget outside that grid (``nova[budget_step=S]``), part of any
gain is the finer grid, which a vLLM user could set by hand (``max_num_batched_tokens``) if
they knew which budget to pick. This takes a held-out run (``--run``, an ``eval_heldout.py``
output: its ``per_seed.json`` holds nova's runs with the share of each mode, and the best tuned
baseline's runs), and at every point runs ``chunked_prefill`` at each budget outside the grid in
which nova spent at least ``--min-share`` of its runs (mean share over the seeds), on the same
seeds. The "fine baseline" at a point is the lowest mean max latency among those and the
committed best tuned baseline, picked in hindsight on these very seeds (which favours the
baseline: the minimum of noisy estimates). Reported per point: nova's max, p99 and mean latency
over the fine baseline's (ratios of the means over seeds) and the paired 95% interval of the
max ratio (``eval_heldout.paired_interval``).

Usage: ``python benchmarks/fine_budget_baselines.py --run DIR [--workers 2] [--only NAME ...]
[--out DIR]``;
writes ``fine_budget_baselines.{json,md}`` into ``--out`` (default: ``--run``). Simulated
figures, like ``eval_heldout.py``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from nova.sim.eval import EXPERIMENTS, NOVA, PointTask, run_point_task
from nova.sim.experiments import CHUNKED_BUDGETS  # the tuned baseline's grid (the issue's)

sys.path.insert(0, str(Path(__file__).parent))
from eval_all import machine
from eval_heldout import paired_interval, point_name

CHUNKED = "chunked:"
Key = tuple[str, str, float]


def nova_budgets(per_seed: list[dict[str, Any]], min_share: float) -> dict[Key, list[int]]:
    """Per point, the budgets outside ``CHUNKED_BUDGETS`` in which nova spent at least
    ``min_share`` of its runs, mean over the seeds."""
    shares: dict[Key, dict[int, float]] = {}
    seeds: dict[Key, set[int]] = {}
    for row in per_seed:
        if row["policy"] != NOVA:
            continue
        key = (row["experiment"], row["series"], row["load"])
        seeds.setdefault(key, set()).add(row["seed"])
        cell = shares.setdefault(key, {})
        for mode, share in (row["metrics"].get("modes") or {}).items():
            if mode.startswith(CHUNKED):
                budget = int(mode[len(CHUNKED) :])
                cell[budget] = cell.get(budget, 0.0) + share
    return {
        key: sorted(
            b
            for b, total in cell.items()
            if b not in CHUNKED_BUDGETS and total / len(seeds[key]) >= min_share
        )
        for key, cell in shares.items()
    }


def runs_by_point(per_seed: list[dict[str, Any]]) -> dict[Key, dict[str, dict[int, dict]]]:
    out: dict[Key, dict[str, dict[int, dict]]] = {}
    for row in per_seed:
        key = (row["experiment"], row["series"], row["load"])
        out.setdefault(key, {}).setdefault(row["policy"], {})[row["seed"]] = row["metrics"]
    return out


def _mean(runs: dict[int, dict], metric: str) -> float:
    return statistics.fmean(runs[s][metric] for s in sorted(runs))


def compare(point: dict[str, Any], runs: dict[str, dict[int, dict]]) -> dict[str, Any]:
    """nova against the fine baseline (the lowest mean max among the baselines in ``runs``)."""
    baselines = [p for p in runs if p != NOVA and p in point["candidates"]]
    fine = min(baselines, key=lambda p: _mean(runs[p], "max_latency_s"))
    nova = runs[NOVA]
    seeds = sorted(nova)
    ratios = {
        k: _mean(nova, f"{k}_latency_s") / _mean(runs[fine], f"{k}_latency_s")
        for k in ("max", "p99", "mean")
    }
    gm, low, high = paired_interval(
        [nova[s]["max_latency_s"] for s in seeds], [runs[fine][s]["max_latency_s"] for s in seeds]
    )
    return {
        **point,
        "fine_baseline": fine,
        "nova_vs_fine": ratios,
        "max_ratio_paired": {"geomean": gm, "low95": low, "high95": high},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="an eval_heldout.py output directory")
    ap.add_argument("--out", type=Path, help="default: --run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--min-share", type=float, default=0.10)
    ap.add_argument("--only", nargs="+", help="experiments (default: every one in --run)")
    args = ap.parse_args(argv)
    out_dir = args.out or args.run
    summary = json.loads((args.run / "summary.json").read_text())
    per_seed = json.loads((args.run / "per_seed.json").read_text())
    seeds = summary["seeds"]
    budgets = nova_budgets(per_seed, args.min_share)
    runs = runs_by_point(per_seed)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    points: list[dict[str, Any]] = []
    tasks: list[tuple[Key, PointTask]] = []
    for row in summary["points"]:
        if args.only and row["experiment"] not in args.only:
            continue
        key = (row["experiment"], row["series"], row["load"])
        extra = [f"chunked_prefill[budget={b}]" for b in budgets.get(key, [])]
        points.append(
            {
                "experiment": row["experiment"],
                "series": row["series"],
                "load": row["load"],
                "best_baseline": row["best_baseline"],
                "nova_budgets_outside_grid": budgets.get(key, []),
                "candidates": [row["best_baseline"], *extra],
            }
        )
        if not extra:
            continue
        exp = EXPERIMENTS.lookup(row["experiment"])
        exp = replace(exp, seeds=tuple(seeds))
        index = [s.label for s in exp.all_series()].index(row["series"])
        for seed in seeds:
            tasks.append((key, PointTask(exp, index, row["load"], seed, tuple(extra), False)))
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for done, ((key, _), (_, _, seed, out)) in enumerate(
            zip(tasks, pool.map(run_point_task, [t for _, t in tasks])), 1
        ):
            for policy, metrics in out.items():
                runs.setdefault(key, {}).setdefault(policy, {})[seed] = metrics
            if done % 20 == 0 or done == len(tasks):
                print(f"[{done}/{len(tasks)} {time.perf_counter() - t0:.0f}s]", flush=True)
    rows = [compare(p, runs[(p["experiment"], p["series"], p["load"])]) for p in points]
    result = {
        "benchmark": "fine_budget_baselines",
        "machine": machine(),
        "loadavg_1min_start_end": [load0, os.getloadavg()[0]],
        "wall_s": round(time.perf_counter() - t0, 1),
        "run": str(args.run),
        "nova": summary.get("nova", NOVA),
        "seeds": seeds,
        "min_share": args.min_share,
        "points": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fine_budget_baselines.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "fine_budget_baselines.md").write_text(render(result))
    print(render(result))
    return result


def render(result: dict[str, Any]) -> str:
    rows = result["points"]
    finer = [r for r in rows if r["nova_budgets_outside_grid"]]
    above = [r for r in rows if r["max_ratio_paired"]["low95"] > 1.0]
    below = [r for r in rows if r["max_ratio_paired"]["high95"] < 1.0]
    within = [r for r in rows if all(v <= 1.03 for v in r["nova_vs_fine"].values())]
    lines = [
        "# nova against `chunked_prefill` given the budgets nova used "
        "(`benchmarks/fine_budget_baselines.py`)",
        "",
        f"Machine: {result['machine']}; 1-min load average at the start and end: "
        f"{result['loadavg_1min_start_end']}; wall time {result['wall_s']} s. Held-out run: "
        f"`{result['run']}` (`{result['nova']}`), seeds {result['seeds'][0]}-"
        f"{result['seeds'][-1]}. Fine baseline: the lowest mean max latency on these seeds among "
        "the committed best tuned baseline and `chunked_prefill` at each budget outside "
        f"128/256/512/2048 where nova spent >= {result['min_share']:.0%} of its runs.",
        "",
        f"Points: {len(rows)}; nova used a budget outside the grid at {len(finer)}. nova's max, "
        f"p99 and mean all <= 1.03x the fine baseline's at {len(within)}. Paired 95% interval "
        f"of nova's max over the fine baseline's entirely above 1 at {len(above)}"
        + (f" ({', '.join(point_name(r) for r in above)})" if above else "")
        + f", entirely below 1 at {len(below)}.",
        "",
        "| experiment | series | load | nova's budgets outside the grid | fine baseline | "
        "max | max 95% | p99 | mean |",
        "|---|---|---:|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        nf, ci = r["nova_vs_fine"], r["max_ratio_paired"]
        lines.append(
            f"| {r['experiment']} | {r['series']} | {r['load']:g} | "
            f"{', '.join(map(str, r['nova_budgets_outside_grid'])) or '-'} | "
            f"`{r['fine_baseline']}` | {nf['max']:.3f} | {ci['low95']:.3f}-{ci['high95']:.3f} | "
            f"{nf['p99']:.3f} | {nf['mean']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
