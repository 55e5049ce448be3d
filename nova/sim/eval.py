"""``nova eval``: named experiments run in the simulator, with results files and plots.

An experiment fixes a GPU, a model shape, a cost model, a workload family and a list of load
points, and runs every policy at every load point on the same seeded requests. It writes
``DIR/results.json`` (per policy, a list of load points with ``rate_rps``, ``throughput_rps``,
``max_latency_s``, ``p99_latency_s``, ``mean_latency_s``, ``mean_ttft_s``, ``num_requests`` and
more), ``DIR/results.md`` and plots: latency vs load, the latency-throughput Pareto view, and the
E2E latency CDF at the highest sustained load.

"Highest sustained load": the highest rate at which every policy's throughput is within 5% of
the offered rate (above it some policy's queue grows without bound and latencies just measure
the run's length). The headline compares ``nova`` against the best baseline there, per metric.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nova.core.policy import Policy, StageLimits, make_policy
from nova.cost.base import CostModel, make_cost_model
from nova.cost.model_spec import ModelSpec, get_model_spec
from nova.metrics import request_metrics, summarize
from nova.registry import Registry
from nova.sim.simulator import SimArrival, Simulator, arrivals_from_workload
from nova.workload import make_workload

BASELINES_PAPER = ("pf_limit", "chunked_prefill", "multi_stream")


@dataclass(slots=True, frozen=True)
class Experiment:
    name: str
    description: str
    gpu: str
    model: str
    rates_rps: tuple[float, ...]
    num_requests: int
    policies: tuple[str, ...] = (*BASELINES_PAPER, "nova")
    cost_kind: str = "roofline"
    workload: str = "poisson"
    workload_kwargs: dict[str, Any] = field(default_factory=dict)
    min_decode_sms: int | None = None  # the paper's minimum decode share on its GPU
    max_num_seqs: int = 64
    seed: int = 0
    # Caches across requests, modelled with the engine's own code (nova.core): the prefix
    # cache over each request's content (``request_segments``) and an encoder cache of
    # ``encoder_cache_gib`` (embeddings of ``text_hidden`` values of the model's dtype per
    # image token). Off: every request computes everything (the paper's setup).
    caches: bool = False
    encoder_cache_gib: float = 4.0


EXPERIMENTS: Registry[Experiment] = Registry("experiment")


def register_experiment(exp: Experiment) -> Experiment:
    """Register ``exp`` under its name (once)."""
    return EXPERIMENTS.add(exp.name, exp)


register_experiment(
    Experiment(
        "paper-a6000",
        "The Nova paper's setup: CogAgent-9B-shaped VLM on an RTX A6000 (cost model calibrated to "
        "the paper's stage times), GUI-agent requests (one 1120x1120 screenshot, 30-80 output "
        "tokens), Poisson arrivals up to 0.8 req/s.",
        gpu="a6000",
        model="cogagent-9b",
        rates_rps=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
        num_requests=400,
        min_decode_sms=12,
    )
)
register_experiment(
    Experiment(
        "paper-h100",
        "The same experiment on an H100 SXM (same calibration constants, H100 specs); loads "
        "scaled to the H100's capacity.",
        gpu="h100-sxm",
        model="cogagent-9b",
        rates_rps=(0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0),
        num_requests=600,
        min_decode_sms=16,
    )
)
register_experiment(
    Experiment(
        "quick-a6000",
        "A small version of paper-a6000 for smoke tests (3 loads, 80 requests each).",
        gpu="a6000",
        model="cogagent-9b",
        rates_rps=(0.2, 0.5, 0.8),
        num_requests=80,
        min_decode_sms=12,
    )
)


register_experiment(
    Experiment(
        "agent-sessions-h100",
        "UI-TARS-style agent sessions (10 steps; each step resends the system prompt, the "
        "history and the last 5 screenshots of 1120x1120) on a Qwen2.5-VL-7B-shaped VLM on an "
        "H100 SXM, with the prefix cache and a 4 GiB encoder cache modelled; session starts "
        "Poisson, loads in requests/s.",
        gpu="h100-sxm",
        model="qwen2.5-vl-7b",
        rates_rps=(0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
        num_requests=200,
        workload="agent_sessions",
        workload_kwargs={"image_width": 1120, "image_height": 1120, "think_time_s": 1.0},
        min_decode_sms=16,
        caches=True,
    )
)


def num_kv_blocks(cost: CostModel, spec: ModelSpec, block_size: int) -> int:
    """KV blocks of ``block_size`` tokens that fit the cost model's GPU after ``spec``'s
    weights and a 2 GiB activation reserve (at least 64)."""
    gpu = cost.gpu()
    free = gpu.memory_gib * 2**30 - spec.num_params() * spec.bytes_per_param - 2 * 2**30
    per_block = spec.kv_bytes_per_token * block_size
    return max(64, int(free // per_block))


def build_policy(name: str, exp: Experiment, cost: CostModel, spec: ModelSpec) -> Policy:
    """Policy ``name`` as ``exp`` runs it (nova: planning on ``cost``'s GPU grid)."""
    limits = StageLimits(max_num_seqs=exp.max_num_seqs)
    if name != "nova":
        return make_policy(name, limits=limits)
    gpu = cost.gpu()
    grid = gpu.sm_granularity / gpu.num_sms
    steps = max(2, round(1.0 / grid))
    grid = 1.0 / min(steps, 24)  # at most 24 steps: enough resolution, bounded planning time
    min_decode = (exp.min_decode_sms or gpu.sm_granularity) / gpu.num_sms
    return make_policy(
        "nova",
        limits=limits,
        cost_model=cost,
        image_tokens=spec.image_tokens,
        sm_granularity_share=grid,
        min_decode_share=min_decode,
    )


def run_point(
    exp: Experiment,
    policy: str,
    rate_rps: float,
    cost: CostModel,
    spec: ModelSpec,
    arrivals: list[SimArrival],
) -> dict[str, Any]:
    block_size = 16
    encoder_bytes = int(exp.encoder_cache_gib * 2**30) if exp.caches else 0
    # the encoder cache's device memory comes out of the KV cache's
    kv_blocks = num_kv_blocks(cost, spec, block_size)
    kv_blocks -= int(encoder_bytes // (spec.kv_bytes_per_token * block_size))
    sim = Simulator(
        build_policy(policy, exp, cost, spec),
        cost,
        max(64, kv_blocks),
        block_size,
        spec.image_tokens,
        prefix_caching=exp.caches,
        encoder_cache_bytes=encoder_bytes,
        embed_bytes_per_token=max(1, int(spec.text_hidden * spec.bytes_per_param)),
    )
    t0 = time.perf_counter()
    res = sim.run(arrivals)
    metrics = [request_metrics(r) for r in res.requests]
    s = summarize(metrics)
    e2e = sorted(m.e2e_s for m in metrics if m.e2e_s is not None)
    return {
        "rate_rps": rate_rps,
        "num_requests": len(res.requests),
        "throughput_rps": s.request_throughput_rps,
        "max_latency_s": s.e2e.max,
        "p99_latency_s": s.e2e.p99,
        "p90_latency_s": s.e2e.p90,
        "p50_latency_s": s.e2e.p50,
        "mean_latency_s": s.e2e.mean,
        "mean_ttft_s": s.ttft.mean,
        "p99_ttft_s": s.ttft.p99,
        "mean_tpot_s": s.tpot.mean,
        "num_preemptions": res.num_preemptions,
        "prefix_cache_hit_rate": (
            res.prefix_cache_hit_tokens / res.prefix_cache_queried_tokens
            if res.prefix_cache_queried_tokens
            else None
        ),
        "encoder_cache_hit_rate": (
            res.encoder_cache_hit_images / res.encoder_cache_queried_images
            if res.encoder_cache_queried_images
            else None
        ),
        "sim_wall_s": round(time.perf_counter() - t0, 3),
        "e2e_s": e2e,
    }


Results = dict[str, list[dict[str, Any]]]  # policy -> its load points (``run_point``)


def _sustained(results: Results, tolerance: float = 0.05) -> float | None:
    rates = sorted({p["rate_rps"] for pts in results.values() for p in pts})
    ok = [
        r
        for r in rates
        if all(
            p["throughput_rps"] is not None and p["throughput_rps"] >= (1 - tolerance) * r
            for pts in results.values()
            for p in pts
            if p["rate_rps"] == r
        )
    ]
    return max(ok) if ok else None


def headline(results: Results, ours: str = "nova") -> dict[str, Any] | None:
    rate = _sustained(results)
    if rate is None or ours not in results:
        return None
    at = {name: next(p for p in pts if p["rate_rps"] == rate) for name, pts in results.items()}
    baselines = {k: v for k, v in at.items() if k != ours}
    out: dict[str, Any] = {"rate_rps": rate, "ours": ours}
    for metric in ("max_latency_s", "mean_latency_s", "p99_latency_s"):
        best_name = min(baselines, key=lambda k: baselines[k][metric])
        best = baselines[best_name][metric]
        out[metric] = {
            "nova": at[ours][metric],
            "best_baseline": best_name,
            "baseline": best,
            "reduction": 1.0 - at[ours][metric] / best,
        }
    best_tp_name = max(baselines, key=lambda k: baselines[k]["throughput_rps"])
    best_tp = baselines[best_tp_name]["throughput_rps"]
    out["throughput_rps"] = {
        "nova": at[ours]["throughput_rps"],
        "best_baseline": best_tp_name,
        "baseline": best_tp,
        "ratio": at[ours]["throughput_rps"] / best_tp,
    }
    return out


def run_experiment(
    name: str,
    out_dir: Path,
    num_requests: int | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    exp = EXPERIMENTS.lookup(name)
    spec = get_model_spec(exp.model)
    cost = make_cost_model(exp.cost_kind, exp.gpu, spec)
    n = num_requests or exp.num_requests
    results: Results = {p: [] for p in exp.policies}
    for rate in exp.rates_rps:
        wl = make_workload(
            exp.workload, rate_rps=rate, num_requests=n, seed=exp.seed, **exp.workload_kwargs
        )
        arrivals = arrivals_from_workload(wl, segments=exp.caches)
        for policy in exp.policies:
            point = run_point(exp, policy, rate, cost, spec, arrivals)
            results[policy].append(point)
            progress(
                f"{name} {policy:16s} rate {rate:5.2f}/s: thr {point['throughput_rps']:.3f}/s "
                f"mean {point['mean_latency_s']:.2f}s p99 {point['p99_latency_s']:.2f}s "
                f"max {point['max_latency_s']:.2f}s ({point['sim_wall_s']:.1f}s sim)"
            )
    report = {
        "experiment": name,
        "description": exp.description,
        "gpu": exp.gpu,
        "model": exp.model,
        "cost_model": cost.name,
        "workload": exp.workload,
        "num_requests_per_point": n,
        "seed": exp.seed,
        "policies": {
            p: [{k: v for k, v in pt.items() if k != "e2e_s"} for pt in pts]
            for p, pts in results.items()
        },
        "headline": headline(results),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "results.md").write_text(render_markdown(report))
    plot(results, report, out_dir)
    return report


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# {report['experiment']}",
        "",
        report["description"],
        "",
        f"GPU `{report['gpu']}`, model `{report['model']}`, cost model `{report['cost_model']}`, "
        f"{report['num_requests_per_point']} requests per load point, seed {report['seed']}.",
        "",
        "| policy | rate req/s | throughput req/s | mean s | p99 s | max s | mean TTFT s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for policy, pts in report["policies"].items():
        for p in pts:
            lines.append(
                f"| {policy} | {p['rate_rps']:.2f} | {p['throughput_rps']:.3f} | "
                f"{p['mean_latency_s']:.2f} | {p['p99_latency_s']:.2f} | {p['max_latency_s']:.2f} "
                f"| {p['mean_ttft_s']:.2f} |"
            )
    h = report["headline"]
    lines += ["", "## Headline", ""]
    if h is None:
        lines.append("No load point was sustained by every policy; no headline comparison.")
    else:
        lines.append(f"At the highest load every policy sustains ({h['rate_rps']:.2f} req/s):")
        lines.append("")
        for metric in ("max_latency_s", "mean_latency_s", "p99_latency_s"):
            m = h[metric]
            lines.append(
                f"- {metric}: nova {m['nova']:.2f} s vs best baseline {m['best_baseline']} "
                f"{m['baseline']:.2f} s: {100 * m['reduction']:+.1f}% reduction"
            )
        t = h["throughput_rps"]
        lines.append(
            f"- throughput: nova {t['nova']:.3f} vs {t['best_baseline']} {t['baseline']:.3f} req/s "
            f"(ratio {t['ratio']:.3f})"
        )
    return "\n".join(lines) + "\n"


def plot(results: Results, report: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for policy, pts in results.items():
        rates = [p["rate_rps"] for p in pts]
        axes[0].plot(rates, [p["max_latency_s"] for p in pts], marker="o", label=policy)
        axes[1].plot(rates, [p["mean_latency_s"] for p in pts], marker="o", label=policy)
    for ax, title in zip(axes, ("max E2E latency", "mean E2E latency")):
        ax.set_xlabel("offered load (req/s)")
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(report["experiment"])
    fig.tight_layout()
    fig.savefig(out_dir / "latency_vs_load.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, pts in results.items():
        ax.plot(
            [p["throughput_rps"] for p in pts],
            [p["p99_latency_s"] for p in pts],
            marker="o",
            label=policy,
        )
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("p99 E2E latency (s)")
    ax.set_yscale("log")
    ax.set_title(f"{report['experiment']}: latency-throughput")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "pareto.png", dpi=110)
    plt.close(fig)

    rate = (report["headline"] or {}).get("rate_rps") or max(
        p["rate_rps"] for p in next(iter(results.values()))
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, pts in results.items():
        e2e = next(p["e2e_s"] for p in pts if p["rate_rps"] == rate)
        ax.plot(e2e, [(i + 1) / len(e2e) for i in range(len(e2e))], label=policy)
    ax.set_xlabel("E2E latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{report['experiment']}: latency CDF at {rate:.2f} req/s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "latency_cdf.png", dpi=110)
    plt.close(fig)
