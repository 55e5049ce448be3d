"""nova on every held-out seed set at once: per point and per experiment, how often it passes
the evaluation's checks, and nova's max latency over the best tuned baseline's pooled over all
the sets' seeds (a paired 95% interval over 40 seeds is about half as wide as one set's).

Reads the ``summary.json`` and ``per_seed.json`` that ``benchmarks/eval_heldout.py`` wrote for
each set (default: the four sets nova's default policy was run on, seeds 3-42); every set must
have run the same nova spec. Writes ``DIR/heldout_sets.{md,json}``. Simulated figures; nothing
is re-run.

Usage: ``python benchmarks/heldout_sets.py [--sets DIR ...] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from nova.core.nova_model import Mode
from nova.core.policy import parse_policy_name
from nova.sim.eval import NOVA

sys.path.insert(0, str(Path(__file__).parent))
from eval_heldout import paired_interval

HERE = Path(__file__).parent / "results"
SETS = (
    HERE / "eval_heldout_both",
    HERE / "eval_fresh_seeds_both",
    HERE / "eval_seeds_23_32_both",
    HERE / "eval_seeds_33_42_both",
)
Key = tuple[str, str, float]


def _key(row: dict[str, Any]) -> Key:
    return (row["experiment"], row["series"], float(row["load"]))


Maxes = dict[Key, dict[str, dict[int, float]]]
Modes = dict[Key, dict[int, dict[str, float]]]


def load_set(path: Path) -> tuple[dict[str, Any], Maxes, Modes]:
    """A set's summary, its per-seed max latency per point and policy, and the share of each
    nova run spent in each mode."""
    summary = json.loads((path / "summary.json").read_text())
    maxes: Maxes = {}
    modes: Modes = {}
    for row in json.loads((path / "per_seed.json").read_text()):
        by_policy = maxes.setdefault(_key(row), {}).setdefault(row["policy"], {})
        by_policy[row["seed"]] = row["metrics"]["max_latency_s"]
        if row["policy"] == NOVA:
            modes.setdefault(_key(row), {})[row["seed"]] = row["metrics"].get("modes") or {}
    return summary, maxes, modes


def baseline_mode(policy: str) -> str | None:
    """nova's mode label for a ``chunked_prefill[budget=B]`` baseline (None for others)."""
    base, params = parse_policy_name(policy)
    budget = params.get("budget")
    return Mode.chunked(int(budget)).label if base == "chunked_prefill" and budget else None


def _shown(path: Path) -> str:
    """A set's directory relative to the repository when it lies inside it."""
    root = HERE.parent.parent
    resolved = path.resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def _mark(low: float, high: float) -> str:
    return "below" if high < 1.0 else "above" if low > 1.0 else ""


def pool(sets: list[Path]) -> dict[str, Any]:
    loaded = [(path, *load_set(path)) for path in sets]
    specs = {summary["nova"] for _, summary, _, _ in loaded}
    if len(specs) != 1:
        raise SystemExit(f"the sets ran different nova specs: {sorted(specs)}")
    points: dict[Key, dict[str, Any]] = {}
    labels: list[str] = []
    for path, summary, maxes, modes in loaded:
        label = f"{min(summary['seeds'])}-{max(summary['seeds'])}"
        if label in labels:  # two sets of the same seeds: tell them apart by directory
            label += f" ({path.name})"
        labels.append(label)
        for p in summary["points"]:
            key = _key(p)
            row = points.setdefault(
                key,
                {
                    "best_baseline": p["best_baseline"],
                    "oracle": p["oracle"],
                    "sets": {},
                    "nova": [],
                    "best": [],
                    "oracle_max": [],
                    "share": [],
                },
            )
            if row["best_baseline"] != p["best_baseline"]:
                raise SystemExit(f"{path}: {key} has another best baseline")
            paired = p["max_ratio_paired"]
            row["sets"][label] = {
                "pass": p["pass"],
                "failed": p["failed"],
                "max": p["nova_vs_best"]["max"],
                "mean": p["nova_vs_best"]["mean"],
                "beyond_noise": _mark(paired["low95"], paired["high95"]),
            }
            seeds = sorted(maxes[key][NOVA])
            row["nova"] += [maxes[key][NOVA][s] for s in seeds]
            row["best"] += [maxes[key][p["best_baseline"]][s] for s in seeds]
            row["oracle_max"] += [maxes[key][p["oracle"]][s] for s in seeds]
            own = baseline_mode(p["best_baseline"])
            row["share"] += [modes[key][s].get(own, 0.0) if own else None for s in seeds]
    out = []
    for (experiment, series, load), row in sorted(points.items()):
        gm, low, high = paired_interval(row["nova"], row["best"])
        ogm, olow, ohigh = paired_interval(row["oracle_max"], row["best"])
        out.append(
            {
                "experiment": experiment,
                "series": series,
                "load": load,
                "best_baseline": row["best_baseline"],
                "oracle": row["oracle"],
                "sets": row["sets"],
                "passes": sum(s["pass"] for s in row["sets"].values()),
                "pooled_seeds": len(row["nova"]),
                "pooled_max": {"geomean": gm, "low95": low, "high95": high},
                "pooled_beyond_noise": _mark(low, high),
                "pooled_oracle_max": {"geomean": ogm, "low95": olow, "high95": ohigh},
                # per seed: nova's max over the best baseline's, and the share of nova's run
                # spent in that baseline's own mode (None: the baseline is not a chunked budget)
                "per_seed": [
                    {"max_ratio": a / b, "baseline_mode_share": sh}
                    for a, b, sh in zip(row["nova"], row["best"], row["share"])
                ],
            }
        )
    return {
        "nova": specs.pop(),
        "sets": [_shown(p) for p in sets],
        "points": out,
    }


def per_experiment(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in points:
        e = out.setdefault(
            p["experiment"],
            {
                "experiment": p["experiment"],
                "points": 0,
                "cells": 0,
                "passes": 0,
                "pooled_below": [],
                "pooled_above": [],
                "ratios": [],
            },
        )
        e["points"] += 1
        e["cells"] += len(p["sets"])
        e["passes"] += p["passes"]
        label = f"{p['series']} {p['load']:g}".strip()
        gm = p["pooled_max"]["geomean"]
        e["ratios"].append(gm)
        if p["pooled_beyond_noise"] == "below":
            e["pooled_below"].append(f"{label} ({gm:.3f})")
        elif p["pooled_beyond_noise"] == "above":
            e["pooled_above"].append(f"{label} ({gm:.3f})")
    return list(out.values())


SHARE_BINS = ((0.9, 1.0), (0.5, 0.9), (0.0, 0.5))


def by_share(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed runs binned by the share of nova's run spent in the best baseline's own mode: per
    bin the number of runs, the geometric mean of nova's max over the baseline's, and how many
    of them are over 1.03."""
    out = []
    for low, high in SHARE_BINS:
        ratios = [
            r["max_ratio"]
            for r in runs
            if r["baseline_mode_share"] is not None
            and low <= r["baseline_mode_share"] <= high
            and not (high < 1.0 and r["baseline_mode_share"] == high)
        ]
        gm = math.exp(statistics.fmean(math.log(x) for x in ratios)) if ratios else math.nan
        out.append(
            {
                "share": f"{low:g}-{high:g}",
                "runs": len(ratios),
                "geomean": gm,
                "over_1_03": sum(x > 1.03 for x in ratios),
            }
        )
    return out


def render(result: dict[str, Any]) -> str:
    labels = list(result["points"][0]["sets"])
    lines = [
        "# nova on every held-out seed set (`benchmarks/heldout_sets.py`)",
        "",
        f"nova: `{result['nova']}`. Sets: "
        + ", ".join(f"`{s}`" for s in result["sets"])
        + ". Simulated; each set re-ran nova, the best tuned baseline and the oracle's "
        "configuration chosen on seeds 0-2 (`benchmarks/results/eval`).",
        "",
        "Per set: nova's max over the best baseline's (mean over the set's seeds), `-`/`+` when "
        "the set's paired 95% interval lies entirely below/above 1, `x` when the point fails a "
        "check on that set. Pooled: the paired interval of nova's max over the best baseline's "
        "across every seed of every set (geometric mean, low-high); oracle: the same for the "
        "oracle's configuration (chosen on seeds 0-2) over the best baseline's, `-` where the "
        "two are one configuration.",
        "",
        "## Per experiment",
        "",
        "| experiment | points | passes (point x set) | pooled max ratio, range | pooled below 1 "
        "(nova lower beyond noise) | pooled above 1 |",
        "|---|---:|---:|---|---|---|",
    ]
    for e in per_experiment(result["points"]):
        lines.append(
            f"| {e['experiment']} | {e['points']} | {e['passes']} of {e['cells']} | "
            f"{min(e['ratios']):.3f} ... {max(e['ratios']):.3f} | "
            f"{', '.join(e['pooled_below']) or '-'} | {', '.join(e['pooled_above']) or '-'} |"
        )
    chunked = [r for p in result["points"] for r in p["per_seed"]]
    hard = [p for p in result["points"] if p["passes"] <= 1]
    lines += [
        "",
        "## The baseline's own mode",
        "",
        "Where the best tuned baseline is a `chunked_prefill` budget: every seed run binned by the "
        "share of nova's run spent in that budget's own mode (`chunked:B`, the same decisions), "
        "with nova's max over the baseline's (geometric mean) and the runs over 1.03. All such "
        "points, then each point that passes on at most one set.",
        "",
        "| points | share of the run in the baseline's mode | runs | max ratio | runs over 1.03 |",
        "|---|---|---:|---:|---:|",
    ]
    for label, runs in [("all", chunked)] + [
        (f"{p['experiment']} {p['series']} {p['load']:g}".replace("  ", " "), p["per_seed"])
        for p in hard
    ]:
        for b in by_share(runs):
            if b["runs"]:
                lines.append(
                    f"| {label} | {b['share']} | {b['runs']} | {b['geomean']:.3f} | "
                    f"{b['over_1_03']} |"
                )
    total = sum(p["passes"] for p in result["points"])
    cells = sum(len(p["sets"]) for p in result["points"])
    per_set = {lab: sum(p["sets"][lab]["pass"] for p in result["points"]) for lab in labels}
    lines += [
        "",
        f"Passes: {total} of {cells} point-set cells; per set "
        + ", ".join(f"seeds {lab}: {n} of {len(result['points'])}" for lab, n in per_set.items())
        + ".",
        "",
        "## Per point",
        "",
        "| experiment | series | load | best baseline | "
        + " | ".join(f"seeds {lab}" for lab in labels)
        + " | passes | pooled max (95%) | oracle (95%) |",
        "|---|---|---:|---|" + "---:|" * len(labels) + "---:|---|---|",
    ]
    for p in result["points"]:
        cells_txt = []
        for lab in labels:
            s = p["sets"][lab]
            mark = {"below": "-", "above": "+", "": ""}[s["beyond_noise"]]
            cells_txt.append(f"{s['max']:.3f}{mark}{'' if s['pass'] else ' x'}")
        pm, om = p["pooled_max"], p["pooled_oracle_max"]
        oracle = (
            "-"
            if p["oracle"] == p["best_baseline"]
            else f"{om['geomean']:.3f} ({om['low95']:.3f}-{om['high95']:.3f})"
        )
        lines.append(
            f"| {p['experiment']} | {p['series'] or '-'} | {p['load']:g} | "
            f"`{p['best_baseline']}` | "
            + " | ".join(cells_txt)
            + f" | {p['passes']}/{len(labels)} | {pm['geomean']:.3f} "
            f"({pm['low95']:.3f}-{pm['high95']:.3f}) | {oracle} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", type=Path, nargs="+", default=list(SETS))
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    result = pool(args.sets)
    text = render(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heldout_sets.md").write_text(text)
    (args.out / "heldout_sets.json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
