"""Every named ``nova eval`` experiment, and the must-hold checks per point in one table.

Runs the experiments (default: all but the CI smoke one) with their seeds, writes each one's
``results.json`` / ``results.md`` / plots under ``benchmarks/results/eval/<experiment>/``, and
``benchmarks/results/eval/summary.{json,md}``: per experiment and load point the best tuned
baseline, the oracle, nova's ratios to both and which checks pass (the checks are defined in
``nova.sim.eval``: nova's max, p99 and mean latency <= 1.03 x the best tuned baseline's and its
throughput >= 0.98 x wherever that baseline sustains the load; nova's max and mean <= 1.05 x the
oracle's; nova beats the best baseline wherever the oracle beats it by more than 5%).

Usage: ``python benchmarks/eval_all.py [--only NAME ...] [--workers N] [--seeds N]
[--num-requests N] [--summary-only]`` (``--summary-only`` rebuilds the summary from the results
already written). Simulated figures from the cost model, not GPU measurements; the machine and
its load are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from nova.sim.eval import EXPERIMENTS, run_experiment

SMOKE = "quick-a6000"
OUT = Path(__file__).parent / "results" / "eval"


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def summarize(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for name, report in reports.items():
        pols = report["policies"]
        for a in report["analysis"]:

            def at(policy: str | None, a: dict[str, Any] = a) -> dict[str, Any] | None:
                if policy is None:
                    return None
                return next(
                    (
                        p
                        for p in pols.get(policy, [])
                        if p["series"] == a["series"] and p["load"] == a["load"]
                    ),
                    None,
                )

            nova, best, oracle = at("nova"), at(a["best_baseline"]), at(a["oracle"])
            rows.append(
                {
                    "experiment": name,
                    "series": a["series"],
                    "load": a["load"],
                    "load_param": report["load_param"],
                    "must_hold": a["must_hold"],
                    "best_baseline": a["best_baseline"],
                    "oracle": a["oracle"],
                    "nova_max_s": nova and nova["max_latency_s"],
                    "nova_mean_s": nova and nova["mean_latency_s"],
                    "best_max_s": best and best["max_latency_s"],
                    "best_mean_s": best and best["mean_latency_s"],
                    "oracle_max_s": oracle and oracle["max_latency_s"],
                    "nova_vs_best": a.get("nova_vs_best"),
                    "nova_vs_oracle": a.get("nova_vs_oracle"),
                    "oracle_gain": a.get("oracle_gain"),
                    "checks": a.get("checks", {}),
                    "failed": a.get("failed", []),
                    "pass": a["pass"],
                }
            )
    held = [r for r in rows if r["must_hold"]]
    experiments = []
    for name, report in reports.items():
        mine = [r for r in held if r["experiment"] == name]
        gains = [r["nova_vs_best"]["max"] for r in mine if r["nova_vs_best"]]
        oracle = [r["oracle_gain"] for r in mine if r["oracle_gain"] is not None]
        experiments.append(
            {
                "experiment": name,
                "requests_per_point": (
                    None  # closed loop: sessions x steps, not a request count
                    if report["load_param"] == "num_sessions"
                    else report["num_requests_per_point"]
                ),
                "seeds": report["seeds"],
                "points": sum(1 for r in rows if r["experiment"] == name),
                "must_hold_points": len(mine),
                "passing_points": sum(1 for r in mine if r["pass"]),
                "nova_vs_best_max": [min(gains), max(gains)] if gains else None,
                "oracle_gain_max": max(oracle) if oracle else None,
            }
        )
    return {
        "experiments": experiments,
        "rows": rows,
        "points": len(rows),
        "must_hold_points": len(held),
        "passing_points": sum(1 for r in held if r["pass"]),
        "all_pass": all(r["pass"] for r in rows),
    }


def _f(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _carried(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """Which experiments the wall time is for, when the summary also covers results written by
    an earlier run (``--only``, then ``--summary-only``)."""
    ran = meta.get("experiments_run")
    if not ran or set(ran) >= {e["experiment"] for e in summary["experiments"]}:
        return ""
    return (
        f" for {', '.join(ran)} (this run; the other experiments' `results.json` are carried "
        "over from an earlier run)"
    )


def render(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# nova eval: every experiment, the must-hold checks per point",
        "",
        f"Machine: {meta['machine']} (1-min load average at the end: "
        f"{meta.get('loadavg_1min_at_end', '-')}; 2 cores shared with other jobs); wall time "
        f"{meta.get('wall_s', '-')} s{_carried(summary, meta)}. Simulated (the "
        "roofline cost model from evidence, `docs/scheduler.md`), mean over each experiment's "
        "seeds; per-seed values and spreads in each `results.json`."
        + (f" Re-run: nova alone; {meta['reused']}." if meta.get("reused") else ""),
        "",
        f"Points where the best tuned baseline sustains the load: {summary['must_hold_points']} "
        f"of {summary['points']}; all checks pass at {summary['passing_points']} of them.",
        "",
        "| experiment | requests per point | seeds | points | best baseline sustains | all "
        "checks pass | nova / best tuned baseline, max latency (range) | oracle's largest gain "
        "over the best baseline |",
        "|---|---:|---|---:|---:|---:|---|---:|",
        *(
            f"| {e['experiment']} | {e['requests_per_point'] or 'closed loop'} | "
            f"{e['seeds']} | {e['points']} | "
            f"{e['must_hold_points']} | {e['passing_points']} | "
            + (
                "-"
                if e["nova_vs_best_max"] is None
                else f"{e['nova_vs_best_max'][0]:.3f} ... {e['nova_vs_best_max'][1]:.3f}"
            )
            + f" | {_f(e['oracle_gain_max'], '+.1%')} |"
            for e in summary["experiments"]
        ),
        "",
        "| experiment | series | load | best tuned baseline | best max s | nova max s | "
        "nova/best max | p99 | mean | thr | oracle | nova/oracle max | mean | oracle gain | "
        "checks |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in summary["rows"]:
        nb, no = r["nova_vs_best"] or {}, r["nova_vs_oracle"] or {}
        verdict = (
            "no baseline sustains"
            if not r["must_hold"]
            else ("pass" if r["pass"] else "FAIL: " + ", ".join(r["failed"]))
        )
        lines.append(
            f"| {r['experiment']} | {r['series'] or '-'} | {r['load']:g} | "
            f"`{r['best_baseline']}` | {_f(r['best_max_s'])} | {_f(r['nova_max_s'])} | "
            f"{_f(nb.get('max'), '.3f')} | {_f(nb.get('p99'), '.3f')} | "
            f"{_f(nb.get('mean'), '.3f')} | {_f(nb.get('throughput'), '.3f')} | "
            f"`{r['oracle']}` | {_f(no.get('max'), '.3f')} | {_f(no.get('mean'), '.3f')} | "
            f"{_f(r['oracle_gain'], '+.1%')} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", help="experiments to run (default: all but the smoke)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument(
        "--reuse",
        type=Path,
        help="a directory of earlier results (e.g. benchmarks/results/eval): take every policy's "
        "runs but adaptive nova's from its <experiment>/results.json and re-run nova alone",
    )
    args = ap.parse_args(argv)
    names = args.only or [n for n in EXPERIMENTS.names() if n != SMOKE]
    for name in names:
        EXPERIMENTS.lookup(name)  # an unknown name fails before anything runs
    t0 = time.perf_counter()
    meta: dict[str, Any] = {"machine": machine()}
    old = args.out / "summary.json"
    if args.summary_only and old.is_file():  # keep the run's machine, load and wall time
        prev = json.loads(old.read_text())
        keep = ("machine", "wall_s", "loadavg_1min_at_end", "experiments_run", "reused")
        meta = {k: prev[k] for k in keep if k in prev}
    if not args.summary_only:
        for name in names:
            print(f"== {name}", flush=True)
            run_experiment(
                name,
                args.out / name,
                num_requests=args.num_requests,
                seeds=args.seeds,
                workers=args.workers,
                progress=lambda line: print(line, flush=True),
                reuse=(
                    json.loads((args.reuse / name / "results.json").read_text())
                    if args.reuse
                    else None
                ),
            )
        meta["wall_s"] = round(time.perf_counter() - t0)
        meta["experiments_run"] = names
        if args.reuse:
            meta["reused"] = f"every policy's runs but nova's from {args.reuse}"
        meta["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)

    # the experiments named with --only, else every one written under --out but the smoke
    def wanted(name: str) -> bool:
        return name in args.only if args.only else name != SMOKE

    loaded = {
        p.parent.name: json.loads(p.read_text())
        for p in sorted(args.out.glob("*/results.json"))
        if wanted(p.parent.name)
    }
    # results written by an older nova eval (one seed, no checks) cannot be summarized
    reports = {name: r for name, r in loaded.items() if "analysis" in r}
    for name in sorted(set(loaded) - set(reports)):
        print(f"skipped {name}: results.json from an older nova eval (no checks); rerun it")
    summary = summarize(reports)
    (args.out / "summary.json").write_text(json.dumps({**meta, **summary}, indent=1) + "\n")
    (args.out / "summary.md").write_text(render(summary, meta))
    print(render(summary, meta))
    return summary


if __name__ == "__main__":
    main()
