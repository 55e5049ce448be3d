"""Aggregate a bench run (``nova.metrics``: distributions, throughput, goodput) and write it out:
JSON, markdown and a latency CDF plot. Latencies in the outputs are milliseconds."""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nova.bench.driver import BenchRun
from nova.metrics import Distribution, RequestMetrics, distribution, goodput_rps, summarize

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E"))
SLO_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2e", "e2el": "e2e"}


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50", "e2e:4000"]`` (milliseconds) -> ``{"ttft": 0.5, ...}`` seconds."""
    out: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(
                f"--goodput takes KEY:MILLISECONDS with KEY in ttft, tpot, e2e; got {item!r}"
            )
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(
                f"--goodput {item!r}: {value!r} is not a number of milliseconds"
            ) from None
        if not (ms > 0 and math.isfinite(ms)):
            raise ValueError(f"--goodput {item!r}: the bound must be > 0 ms")
        out[SLO_KEYS[key]] = ms / 1000.0
    return out


@dataclass(slots=True)
class BenchSummary:
    num_sent: int
    num_completed: int
    num_failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput_rps: float | None
    output_throughput_tps: float | None
    total_token_throughput_tps: float | None
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2el: Distribution
    goodput_slos_s: dict[str, float]
    goodput_rps: float | None
    deadline_violation_rate: float | None
    num_with_deadline: int
    errors: list[str]


def request_metrics_of(run: BenchRun) -> list[RequestMetrics]:
    return [rec.metrics(run.t0_s) for rec in run.records]


def summarize_run(run: BenchRun, slos_s: dict[str, float] | None = None) -> BenchSummary:
    slos_s = slos_s or {}
    metrics = request_metrics_of(run)
    s = summarize(metrics, duration_s=run.duration_s if run.duration_s > 0 else None)
    good = (
        goodput_rps(
            metrics,
            s.duration_s,
            max_ttft_s=slos_s.get("ttft"),
            max_tpot_s=slos_s.get("tpot"),
            max_e2e_s=slos_s.get("e2e"),
        )
        if slos_s
        else None
    )
    errors: dict[str, int] = {}
    for rec in run.records:
        if rec.error:
            errors[rec.error] = errors.get(rec.error, 0) + 1
    return BenchSummary(
        num_sent=len(run.records),
        num_completed=s.num_finished,
        num_failed=len(run.records) - s.num_finished,
        duration_s=run.duration_s,
        total_input_tokens=s.num_prompt_tokens,
        total_output_tokens=s.num_output_tokens,
        request_throughput_rps=s.request_throughput_rps,
        output_throughput_tps=s.output_throughput_tps,
        total_token_throughput_tps=s.total_throughput_tps,
        ttft=s.ttft,
        tpot=s.tpot,
        itl=distribution(x for m in metrics for x in m.itl_s),
        e2el=s.e2e,
        goodput_slos_s=dict(slos_s),
        goodput_rps=good,
        deadline_violation_rate=s.deadline_violation_rate,
        num_with_deadline=sum(1 for m in metrics if m.deadline_met is not None),
        errors=[f"{n} x {msg}" for msg, n in sorted(errors.items(), key=lambda kv: -kv[1])][:10],
    )


def _ms(d: Distribution) -> dict[str, float | int | None]:
    return {
        k: (None if v is None else v * 1000.0) if k != "count" else v for k, v in asdict(d).items()
    }


def result_dict(
    run: BenchRun, summary: BenchSummary, args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON result: run parameters, ``vllm bench serve``-style flat keys (ms), nested
    distributions and one entry per request."""
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "backend": "openai-chat",
        "base_url": run.config.base_url,
        "endpoint": run.config.endpoint,
        "model_id": run.model,
        "dataset_name": run.workload.name,
        "closed_loop": run.workload.closed_loop,
        "workload_notes": list(run.workload.notes),
        "max_concurrency": run.config.max_concurrency,
        "machine": platform.platform(),
        "args": args or {},
        "num_prompts": summary.num_sent,
        "completed": summary.num_completed,
        "failed": summary.num_failed,
        "duration": summary.duration_s,
        "total_input_tokens": summary.total_input_tokens,
        "total_output_tokens": summary.total_output_tokens,
        "request_throughput": summary.request_throughput_rps,
        "output_throughput": summary.output_throughput_tps,
        "total_token_throughput": summary.total_token_throughput_tps,
        "request_goodput": summary.goodput_rps,
        "goodput_slos_ms": {k: v * 1000.0 for k, v in summary.goodput_slos_s.items()},
        "deadline_violation_rate": summary.deadline_violation_rate,
        "num_with_deadline": summary.num_with_deadline,
        "errors": summary.errors,
    }
    for key, _label in LATENCIES:
        d: Distribution = getattr(summary, key)
        out[f"mean_{key}_ms"] = None if d.mean is None else d.mean * 1000.0
        out[f"median_{key}_ms"] = None if d.p50 is None else d.p50 * 1000.0
        for q in ("p90", "p99", "max"):
            v = getattr(d, q)
            out[f"{q}_{key}_ms"] = None if v is None else v * 1000.0
        out[key] = _ms(d)
    out["requests"] = [rec.to_dict(run.t0_s) for rec in sorted(run.records, key=lambda r: r.send_s)]
    return out


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def format_report(run: BenchRun, summary: BenchSummary) -> str:
    """Markdown: a header, the latency table (ms) and the run's counts and rates."""
    lines = [
        f"# nova bench: {run.workload.name} against {run.model}",
        "",
        f"- server: {run.config.url}",
        f"- requests: {summary.num_sent} sent, {summary.num_completed} completed, "
        f"{summary.num_failed} failed ({'closed loop' if run.workload.closed_loop else 'open loop'}"
        f"{_concurrency_note(run.config.max_concurrency)})",
        f"- duration: {summary.duration_s:.2f} s",
        f"- tokens: input {summary.total_input_tokens}, output {summary.total_output_tokens}",
        f"- throughput: {_f(summary.request_throughput_rps, '.3f')} req/s, output "
        f"{_f(summary.output_throughput_tps)} tok/s, total "
        f"{_f(summary.total_token_throughput_tps)} tok/s",
    ]
    if summary.goodput_slos_s:
        slos = ", ".join(f"{k} <= {v * 1000:g} ms" for k, v in summary.goodput_slos_s.items())
        lines.append(f"- goodput ({slos}): {_f(summary.goodput_rps, '.3f')} req/s")
    if summary.num_with_deadline:
        lines.append(
            f"- deadline violations: {summary.deadline_violation_rate:.1%} of "
            f"{summary.num_with_deadline} requests with a deadline"
        )
    lines += [
        "",
        "| metric (ms) | n | mean | p50 | p90 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in LATENCIES:
        d: Distribution = getattr(summary, key)
        cells = [
            _f(None if v is None else v * 1000.0) for v in (d.mean, d.p50, d.p90, d.p99, d.max)
        ]
        lines.append(f"| {label} | {d.count} | " + " | ".join(cells) + " |")
    if summary.errors:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in summary.errors]
    return "\n".join(lines) + "\n"


def plot_cdf(run: BenchRun, path: Path) -> Path:
    """Empirical CDFs of TTFT, TPOT, ITL and E2E (ms), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = request_metrics_of(run)
    series: dict[str, list[float | None]] = {
        "TTFT": [m.ttft_s for m in metrics],
        "TPOT": [m.tpot_s for m in metrics],
        "ITL": [x for m in metrics for x in m.itl_s],
        "E2E": [m.e2e_s for m in metrics],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (label, values) in zip(axes.flat, series.items()):
        xs = sorted(v * 1000.0 for v in values if v is not None)
        if xs:
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post")
        ax.set_title(f"{label} (n={len(xs)})")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if label != "ITL" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(f"nova bench: {run.workload.name}, {run.model}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _json_safe(obj: Any) -> Any:
    """Non-finite floats (``--request-rate inf``) as strings, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_results(
    run: BenchRun,
    summary: BenchSummary,
    result_dir: Path,
    stem: str,
    args: dict[str, Any] | None = None,
) -> dict[str, Path]:
    result_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": result_dir / f"{stem}.json",
        "md": result_dir / f"{stem}.md",
        "plot": result_dir / f"{stem}_cdf.png",
    }
    data = _json_safe(result_dict(run, summary, args))
    paths["json"].write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    paths["md"].write_text(format_report(run, summary))
    plot_cdf(run, paths["plot"])
    return paths


def _concurrency_note(max_concurrency: int | None) -> str:
    return f", max concurrency {max_concurrency}" if max_concurrency else ""
