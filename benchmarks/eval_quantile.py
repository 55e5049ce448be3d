"""nova's evaluation with another ``unlucky_quantile`` (``nova.core.nova_model.QueueModel``).

The quantile only moves the plans of the adaptive ``nova`` policy: the baselines and nova's
pinned static modes (``nova[mode=...]``, the oracle's candidates) never re-plan, and the
simulator is deterministic per seed. So this re-runs ``nova`` alone on every experiment's
points and seeds with each quantile given, takes every other configuration's per-seed results
from an existing full evaluation (``--base``, default ``benchmarks/results/eval``), and rebuilds
the reports and the must-hold checks with ``nova.sim.eval``'s own functions. With the default
quantile (0.995) it is the quick check of any change to nova's planning that leaves the
baselines and the pinned modes alone (``--out`` elsewhere, e.g.
``benchmarks/results/eval_early``). It writes ``<out>/q<quantile>/<experiment>/results.json``,
``<out>/q<quantile>/summary.{json,md}`` and ``<out>/summary.md``: the pass counts per
experiment for the base and each quantile, and every point whose verdict differs from the
base's.

Usage: ``python benchmarks/eval_quantile.py --quantiles 0.995 0.998 [--only NAME ...]
[--base DIR] [--out DIR] [--summary-only]``. Each ``results.json`` written keeps the per-point
results of nova and of the configurations its analysis names (the rest are ``--base``'s);
``--summary-only`` rebuilds ``<out>/summary.md`` from the runs already under ``--out`` (and
slims their ``results.json`` so). Simulated figures, like ``eval_all.py``'s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from nova.core.nova_model import QueueModel
from nova.sim.eval import (
    EXPERIMENTS,
    NOVA,
    ORACLE,
    PointTask,
    build_policy,
    build_report,
    experiment_cost_model,
    experiment_spec,
    render_markdown,
    run_point_task,
    simulate,
    workload_arrivals,
)

sys.path.insert(0, str(Path(__file__).parent))
from eval_all import machine, render, summarize

HERE = Path(__file__).parent / "results"


@contextmanager
def unlucky_quantile(q: float) -> Iterator[None]:
    """Inside: ``q`` is the default of every QueueModel built (nova builds its own); restored
    after."""
    init = QueueModel.__init__

    def patched(self: QueueModel, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("unlucky_quantile", q)
        init(self, *args, **kwargs)

    QueueModel.__init__ = patched  # type: ignore[method-assign]
    try:
        yield
    finally:
        QueueModel.__init__ = init  # type: ignore[method-assign]


def rerun(name: str, base: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """``base``'s report with nova's per-seed results replaced by a fresh run of nova."""
    exp = EXPERIMENTS.lookup(name)
    exp = replace(exp, seeds=tuple(base["seeds"]))
    if not exp.closed_loop:
        exp = replace(exp, num_requests=base["num_requests_per_point"])
    spec = experiment_spec(exp)
    cost = experiment_cost_model(exp, spec)
    labels = [s.label for s in exp.all_series()]
    policies = [p for p in base["policies"] if p != ORACLE]
    raw: dict[tuple[int, float], dict[str, dict[int, dict[str, Any]]]] = {}
    for p in policies:
        for point in base["policies"][p]:
            cell = raw.setdefault((labels.index(point["series"]), point["load"]), {})
            cell[p] = {s["seed"]: dict(s) for s in point["seeds"]}
    for (i, load), cell in sorted(raw.items()):
        for seed in exp.seeds:
            _, _, _, out = run_point_task(PointTask(exp, i, load, seed, (NOVA,), False))
            cell[NOVA][seed] = {"seed": seed, **out[NOVA]}
            if progress:
                m = out[NOVA]
                print(
                    f"{name} {labels[i]} {load:g} seed {seed}: nova max "
                    f"{m['max_latency_s']:.2f}s modes {m.get('modes')}",
                    flush=True,
                )
    return build_report(
        exp, cost, policies, base["baselines"], base["static_modes"], base["compared"], raw
    )


def committed(path: Path) -> str:
    """ ", as committed in <hash>" for the last commit that touched ``path`` (if clean)."""
    try:
        git = ["git", "-C", str(path), "log", "-1", "--format=%h", "--", "."]
        h = subprocess.run(git, capture_output=True, text=True, check=True).stdout.strip()
        dirty = ["git", "-C", str(path), "status", "--porcelain", "--", "."]
        if h and not subprocess.run(dirty, capture_output=True, text=True).stdout.strip():
            return f", as committed in {h}"
    except (OSError, subprocess.CalledProcessError):
        pass
    return ""


def ratio(row: dict[str, Any], to: str, metric: str) -> float:
    """nova's ``metric`` over the best baseline's (``to`` "best") or the oracle's; nan if none."""
    r = row.get(f"nova_vs_{to}")
    return float(r[metric]) if r else float("nan")


def worst_requests(name: str, load: float, quantiles: list[float], top: int = 3) -> str:
    """At one point (first series) and each of its seeds: the ``top`` slowest requests (latency,
    arrival index, arrival time) under nova with each quantile and under the point's best
    tuned baseline run alone, and nova's mode switches (time, mode): whether the max is made
    before or after nova's plan moves."""
    exp = EXPERIMENTS.lookup(name)
    spec = experiment_spec(exp)
    cost = experiment_cost_model(exp, spec)
    series = exp.all_series()[0]
    base = json.loads((HERE / "eval" / name / "results.json").read_text())
    best = next(a for a in base["analysis"] if a["load"] == load)["best_baseline"]
    lines = [
        f"# {name} {exp.load_param} {load:g}: the slowest requests, nova per quantile and `{best}`",
        "",
        "Written by `benchmarks/eval_quantile.py --worst`. Requests as (latency s, arrival "
        "index, arrival time s); switches as (time s, mode). Simulated.",
        "",
        "| seed | policy | slowest requests | nova's mode switches |",
        "|---:|---|---|---|",
    ]
    runs = [(f"nova, q={q}", q) for q in quantiles] + [(f"`{best}`", None)]
    for seed in exp.seeds:
        arrivals = workload_arrivals(exp, series, load, seed)
        for label, q in runs:
            with unlucky_quantile(q) if q is not None else nullcontext():
                policy = build_policy(NOVA if q is not None else best, exp, cost, spec)
                res = simulate(exp, policy, cost, spec, arrivals)
            reqs = sorted(res.requests, key=lambda r: r.times.arrival_s)
            lat = sorted(
                (
                    (r.times.finish_s - r.times.arrival_s, i, r.times.arrival_s)
                    for i, r in enumerate(reqs)
                ),
                reverse=True,
            )[:top]
            log = getattr(policy, "mode_log", []) if q is not None else []
            lines.append(
                f"| {seed} | {label} | "
                + ", ".join(f"({e:.2f}, {i}, {t:.1f})" for e, i, t in lat)
                + " | "
                + (", ".join(f"({t:.1f}, {m})" for t, m in log) or "-")
                + " |"
            )
    return "\n".join(lines) + "\n"


def slim(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` with the per-point results of nova, the oracle and the configurations the
    analysis names (the best baseline, the oracle's pick) only: the rest are the base run's."""
    named = {NOVA, ORACLE} | {a[k] for a in report["analysis"] for k in ("best_baseline", "oracle")}
    pols = {p: v for p, v in report["policies"].items() if p in named}
    return {**report, "policies": pols}


def verdicts(summary: dict[str, Any]) -> dict[tuple[str, str, float], dict[str, Any]]:
    return {(r["experiment"], r["series"], r["load"]): r for r in summary["rows"]}


def compare(base: dict[str, Any], runs: dict[str, dict[str, Any]], base_dir: Path) -> str:
    """Pass counts per experiment (base and each quantile) and every point that flips."""
    names = sorted({r["experiment"] for r in base["rows"]})
    b = verdicts(base)
    lines = [
        "# nova re-run alone (the code as run) with each `unlucky_quantile`: the must-hold "
        "checks against the base run",
        "",
        "Written by `benchmarks/eval_quantile.py`. Base: "
        f"`{base_dir}/summary.md`{committed(base_dir)}. "
        "For each quantile nova alone was re-run on every point and seed; "
        "every other configuration's per-seed results are the base run's (they do not depend "
        "on the quantile). Simulated figures.",
        "",
        "| experiment | must-hold points | base passes | "
        + " | ".join(f"q={q}" for q in runs)
        + " |",
        "|---|---:|---:|" + "---:|" * len(runs),
    ]
    for n in [*names, "all"]:
        rows = [r for r in base["rows"] if r["must_hold"] and n in ("all", r["experiment"])]
        cells = [str(sum(r["pass"] for r in rows))]
        for s in runs.values():
            v = verdicts(s)
            cells.append(
                str(sum(v[(r["experiment"], r["series"], r["load"])]["pass"] for r in rows))
            )
        lines.append(f"| {n} | {len(rows)} | " + " | ".join(cells) + " |")
    for q, s in runs.items():
        v = verdicts(s)
        lines += [
            "",
            f"## q={q}: every point whose verdict or nova/best max ratio moved",
            "",
            "| experiment | series | load | base | q | nova/best max base -> q | "
            "nova/oracle max base -> q | mean ratio base -> q | failed (q) |",
            "|---|---|---:|---|---|---|---|---|---|",
        ]
        for key, r in b.items():
            w = v[key]
            if (
                r["pass"] == w["pass"]
                and abs(ratio(w, "best", "max") - ratio(r, "best", "max")) < 5e-4
            ):
                continue
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]:g} | {'pass' if r['pass'] else 'FAIL'} | "
                f"{'pass' if w['pass'] else 'FAIL'} | "
                + " | ".join(
                    f"{ratio(r, *k):.3f} -> {ratio(w, *k):.3f}"
                    for k in (("best", "max"), ("oracle", "max"), ("best", "mean"))
                )
                + f" | {', '.join(w['failed']) or '-'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quantiles", type=float, nargs="+", required=True)
    ap.add_argument("--only", nargs="+", help="experiments (default: every one in --base)")
    ap.add_argument("--base", type=Path, default=HERE / "eval")
    ap.add_argument("--out", type=Path, default=HERE / "eval_quantile")
    ap.add_argument("--quiet", dest="progress", action="store_false")
    ap.add_argument(
        "--summary-only",
        action="store_true",
        help="only rebuild <out>/summary.md from the quantile runs already written",
    )
    ap.add_argument(
        "--worst",
        nargs=2,
        metavar=("EXPERIMENT", "LOAD"),
        help="only write <out>/worst_requests.md for this point (see worst_requests)",
    )
    args = ap.parse_args(argv)
    if args.worst:
        text = worst_requests(args.worst[0], float(args.worst[1]), args.quantiles)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "worst_requests.md").write_text(text)
        print(text)
        return {}
    base_reports = {
        p.parent.name: json.loads(p.read_text()) for p in sorted(args.base.glob("*/results.json"))
    }
    if args.only:
        base_reports = {n: r for n, r in base_reports.items() if n in args.only}
    base = summarize(base_reports)
    runs: dict[str, dict[str, Any]] = {}
    if args.summary_only:  # the quantiles' summaries already written under --out
        for q in args.quantiles:
            runs[str(q)] = json.loads((args.out / f"q{q}" / "summary.json").read_text())
            for path in sorted((args.out / f"q{q}").glob("*/results.json")):
                path.write_text(json.dumps(slim(json.loads(path.read_text())), indent=1) + "\n")
    for q in [] if args.summary_only else args.quantiles:
        t0 = time.perf_counter()
        with unlucky_quantile(q):
            reports = {n: rerun(n, r, args.progress) for n, r in base_reports.items()}
        out = args.out / f"q{q}"
        for n, rep in reports.items():
            (out / n).mkdir(parents=True, exist_ok=True)
            (out / n / "results.json").write_text(json.dumps(slim(rep), indent=1) + "\n")
            (out / n / "results.md").write_text(render_markdown(rep))
        meta = {"machine": machine(), "wall_s": round(time.perf_counter() - t0)}
        s = summarize(reports)
        (out / "summary.json").write_text(json.dumps({**meta, **s}, indent=1) + "\n")
        (out / "summary.md").write_text(render(s, meta))
        runs[str(q)] = s
    args.out.mkdir(parents=True, exist_ok=True)
    text = compare(base, runs, args.base)
    (args.out / "summary.md").write_text(text)
    print(text)
    return {"base": base, **runs}


if __name__ == "__main__":
    main()
