"""Plots of a ``nova eval`` report (matplotlib, the ``plot`` extra): latency vs load for nova,
the best tuned baseline at each point, the oracle and the paper's baseline settings; the
latency-throughput view; the latency CDF at the highest load the best baseline sustains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nova.sim.experiments import NOVA, ORACLE, PAPER_SETTINGS


def _series_points(report: dict[str, Any], policy: str, series: str) -> list[dict[str, Any]]:
    return [p for p in report["policies"].get(policy, []) if p["series"] == series]


def plot_pareto(
    curves: dict[str, list[dict[str, Any]]],
    experiment: str,
    path: Path,
    dpi: int = 100,
    legend_fontsize: float | None = None,
) -> None:
    """p99 E2E latency against throughput, one line per policy (policies without points are
    left out), written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, pts in curves.items():
        if pts:
            ax.plot(
                [p["throughput_rps"] for p in pts],
                [p["p99_latency_s"] for p in pts],
                marker="o",
                label=policy,
            )
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("p99 E2E latency (s)")
    ax.set_yscale("log")
    ax.set_title(f"{experiment}: latency-throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_report(
    report: dict[str, Any],
    raw: dict[tuple[int, float], dict[str, dict[int, dict[str, Any]]]],
    out_dir: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load_label = "sessions" if report["load_param"] == "num_sessions" else "offered load (req/s)"
    series_labels = report["series"]
    fig, axes = plt.subplots(
        len(series_labels), 2, figsize=(11, 3.6 * len(series_labels)), squeeze=False
    )
    for row, label in enumerate(series_labels):
        best = [a for a in report["analysis"] if a["series"] == label]
        for col, metric in enumerate(("max_latency_s", "mean_latency_s")):
            ax = axes[row][col]
            for policy in (NOVA, ORACLE, *PAPER_SETTINGS):
                pts = _series_points(report, policy, label)
                if pts:
                    ax.plot(
                        [p["load"] for p in pts],
                        [p[metric] for p in pts],
                        marker="o",
                        lw=2.2 if policy in (NOVA, ORACLE) else 1.0,
                        zorder=3 if policy == NOVA else 2,  # on top where a line is nova's too
                        label=policy,
                    )
            bb = []
            for a in best:
                pts = [
                    p
                    for p in report["policies"].get(a["best_baseline"] or "", [])
                    if p["series"] == label and p["load"] == a["load"]
                ]
                if pts:
                    bb.append((a["load"], pts[0][metric]))
            if bb:
                ax.plot(*zip(*bb), ls="--", color="black", label="best tuned baseline")
            ax.set_xlabel(load_label)
            ax.set_ylabel("seconds")
            ax.set_yscale("log")
            ax.set_title(f"{label + ': ' if label else ''}{metric.replace('_s', '')}")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.suptitle(report["experiment"])
    fig.tight_layout()
    fig.savefig(out_dir / "latency_vs_load.png", dpi=100)
    plt.close(fig)

    label0 = series_labels[0]
    curves = {p: _series_points(report, p, label0) for p in (NOVA, ORACLE, *PAPER_SETTINGS)}
    plot_pareto(curves, report["experiment"], out_dir / "pareto.png", dpi=100, legend_fontsize=7)

    h = report["headline"]
    if h is None:
        return
    index = series_labels.index(h["series"])
    cell = raw.get((index, h["load"]), {})
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in (NOVA, h["best_baseline"], *PAPER_SETTINGS):
        seeds = cell.get(policy, {})
        if not seeds:
            continue
        e2e = seeds[min(seeds)].get("e2e_s") or []
        if e2e:
            # nova on top, dashed: where it runs a baseline's discipline its curve is that one's
            mine = policy == NOVA
            ax.plot(
                e2e,
                [(i + 1) / len(e2e) for i in range(len(e2e))],
                label=policy,
                ls="--" if mine else "-",
                lw=2.0 if mine else 1.2,
                zorder=3 if mine else 2,
            )
    ax.set_xlabel("E2E latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{report['experiment']}: latency CDF at {h['load']:g} (first seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "latency_cdf.png", dpi=100)
    plt.close(fig)
