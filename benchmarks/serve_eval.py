"""End-to-end evaluation through the server: ``nova serve`` per policy, driven by ``nova bench``,
then the simulator on the same requests with a profiled cost model (issue 8).

For each policy a ``python -m nova.server`` process is started (same model, device, partition
backend), and each workload point is sent to it through the bench client:

- ``poisson@R``: open-loop Poisson arrivals at R req/s (GUI-agent content: a screenshot, an
  instruction, 30-80 output tokens), ``--num-prompts`` requests;
- ``sessions@N``: N closed-loop GUI-agent sessions (each step waits for the previous answer plus
  a think time).

Requests ask for ``ignore_eos`` so every answer has exactly its ``max_tokens`` tokens (dummy
weights would otherwise stop at random), which is also what the simulator assumes.

Each point is saved as it finishes (``OUT/runs/<policy>/<point>.json``), so an interrupted run
resumes where it stopped; ``--force`` re-measures. At the end (or with ``--report-only``):

- ``OUT/results.json`` + ``OUT/results.md``: per policy, per point ``rate_rps`` (offered),
  ``throughput_rps``, ``max/p99/mean_latency_s``, ``mean_ttft_s``, ``num_requests`` (the schema
  of ``nova eval``), the headline (``nova`` vs the best baseline at the highest load every
  policy sustains) and, with ``--profile``, the simulator's prediction of the same points and
  its error on mean, p99 and max latency;
- plots: latency vs load, latency-throughput, latency CDF (``nova.sim.eval.plot``).

The simulator replays each point's requests with their measured prompt lengths and output
lengths: Poisson points at the workload's arrival times, session points at the times the client
actually sent each step (the closed loop's feedback is the real engine's; the simulator is asked
to predict latency given those arrivals).

GPU run (issue 8), e.g. on an H100::

    python benchmarks/serve_eval.py --model qwen2.5-vl-7b --load-format dummy --dtype bfloat16 \\
        --device cuda --profile nova/cost/profiles/<gpu>-qwen2.5-vl-7b.json \\
        --rates 1 2 4 6 8 --sessions 16 --num-prompts 200 --out benchmarks/results/<gpu>/serve_eval

CPU smoke (what the test suite runs, seconds): ``--smoke``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALL_POLICIES = ("pf_limit", "chunked_prefill", "multi_stream", "static_partition", "nova")


@dataclass(slots=True, frozen=True)
class Point:
    kind: str  # "poisson" | "sessions"
    value: float  # rate (req/s) or number of sessions

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.value:g}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m nova.server`` in a child process; stopped (and its log kept) on exit."""

    def __init__(self, args: argparse.Namespace, policy: str, log_path: Path) -> None:
        self.port = _free_port()
        cmd = [
            sys.executable,
            "-m",
            "nova.server",
            "--model",
            args.model,
            "--load-format",
            args.load_format,
            "--dtype",
            args.dtype,
            "--device",
            args.device,
            "--policy",
            policy,
            "--partition",
            args.partition,
            "--port",
            str(self.port),
            "--max-num-seqs",
            str(args.max_num_seqs),
            "--log-level",
            "warning",
            "--preprocess-workers",
            str(args.preprocess_workers),
        ]
        if args.num_kv_blocks:
            cmd += ["--num-kv-blocks", str(args.num_kv_blocks)]
        cmd += args.server_arg
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.cmd = cmd

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}; see {self.log.name}"
                )
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def build_workload(
    point: Point, args: argparse.Namespace, num_requests: int | None = None, seed: int | None = None
):
    from nova.workload import make_workload

    content = dict(image_width=args.image_width, image_height=args.image_height)
    if args.max_output_tokens:
        content["max_tokens"] = args.max_output_tokens
        content["min_tokens"] = min(args.min_output_tokens, args.max_output_tokens)
    if point.kind == "poisson":
        return make_workload(
            "poisson",
            rate_rps=point.value,
            num_requests=num_requests or args.num_prompts,
            seed=args.seed if seed is None else seed,
            **content,
        )
    return make_workload(
        "gui_sessions",
        num_sessions=int(point.value),
        seed=args.seed,
        steps_per_session=args.steps_per_session,
        think_time_s=args.think_time_s,
        session_start_spread_s=args.session_spread_s,
        **content,
    )


def _bench_config(server: Server, args: argparse.Namespace, **kw: Any):
    from nova.bench.driver import BenchConfig

    base = dict(
        base_url=server.base_url,
        endpoint="/v1/chat/completions",
        model=None,
        max_concurrency=None,
        all_at_once=False,
        api_key=None,
        timeout_s=args.request_timeout_s,
        temperature=0.0,
        ignore_eos=True,
        nova_extensions=True,
        disable_tqdm=True,
    )
    return BenchConfig(**{**base, **kw})


def calibrate_frontend(server: Server, args: argparse.Namespace) -> float | None:
    """Warm the server up with ``--calibration-requests`` requests of the workload's content,
    sent one at a time, and return their mean preparation time (``nova_prepare_seconds``: image
    decode, preprocessing, template, tokenisation): the front-end cost the simulator adds per
    image. Measured apart from the points it is then used to predict."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from nova.bench.driver import run_workload

    if args.calibration_requests < 1:
        return None
    wl = build_workload(
        Point("poisson", 1.0), args, num_requests=args.calibration_requests, seed=args.seed + 1000
    )
    asyncio.run(run_workload(wl, _bench_config(server, args, all_at_once=True, max_concurrency=1)))
    text = httpx.get(server.base_url + "/metrics", timeout=10.0).text
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name in ("nova_prepare_seconds_sum", "nova_prepare_seconds_count")
    }
    count = samples.get("nova_prepare_seconds_count", 0.0)
    return samples["nova_prepare_seconds_sum"] / count if count else None


def run_point(server: Server, point: Point, args: argparse.Namespace) -> dict[str, Any]:
    from nova.bench.driver import run_workload
    from nova.bench.report import summarize_run

    workload = build_workload(point, args)
    run = asyncio.run(run_workload(workload, _bench_config(server, args)))
    s = summarize_run(run)
    ok = [r for r in run.records if r.ok]
    e2e = sorted(r.end_s - r.send_s for r in ok)
    arrival_of = {r.request_id: r.arrival_s for r in workload.requests}
    return {
        "point": point.name,
        "kind": point.kind,
        "value": point.value,
        # Offered load: the Poisson rate; for sessions, what the clients actually sent per second.
        "rate_rps": point.value
        if point.kind == "poisson"
        else len(run.records) / max(s.duration_s, 1e-9),
        "num_requests": len(run.records),
        "num_failed": s.num_failed,
        "throughput_rps": s.request_throughput_rps,
        "max_latency_s": s.e2el.max,
        "p99_latency_s": s.e2el.p99,
        "p90_latency_s": s.e2el.p90,
        "p50_latency_s": s.e2el.p50,
        "mean_latency_s": s.e2el.mean,
        "mean_ttft_s": s.ttft.mean,
        "p99_ttft_s": s.ttft.p99,
        "mean_tpot_s": s.tpot.mean,
        "duration_s": s.duration_s,
        "errors": s.errors[:5],
        "e2e_s": e2e,
        "requests": [
            {
                "id": r.request_id,
                "send_s": r.send_s - run.t0_s,
                "arrival_s": arrival_of.get(r.request_id),
                "num_images": r.num_images,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "e2e_s": (r.end_s - r.send_s) if r.ok else None,
            }
            for r in run.records
        ],
    }


def measure(args: argparse.Namespace, points: list[Point]) -> None:
    runs = args.out / "runs"
    for policy in args.policies:
        todo = [p for p in points if args.force or not (runs / policy / f"{p.name}.json").exists()]
        if not todo:
            print(f"{policy}: all points already measured")
            continue
        server = Server(args, policy, args.out / "logs" / f"{policy}.log")
        try:
            t0 = time.monotonic()
            server.wait_ready(args.startup_timeout_s)
            print(f"{policy}: server ready in {time.monotonic() - t0:.1f} s")
            prepare_s = calibrate_frontend(server, args)
            if prepare_s is not None:
                print(
                    f"{policy}: mean request preparation {1e3 * prepare_s:.1f} ms "
                    f"({args.calibration_requests} warm-up requests)"
                )
            for p in todo:
                res = run_point(server, p, args)
                res["policy"] = policy
                res["server_cmd"] = server.cmd[1:]
                res["frontend_prepare_s"] = prepare_s
                res["preprocess_workers"] = args.preprocess_workers
                path = runs / policy / f"{p.name}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(res, indent=1) + "\n")
                print(
                    f"{policy:16s} {p.name:12s} thr {res['throughput_rps'] or 0:.3f}/s "
                    f"mean {res['mean_latency_s'] or 0:.2f}s p99 {res['p99_latency_s'] or 0:.2f}s "
                    f"max {res['max_latency_s'] or 0:.2f}s failed {res['num_failed']}",
                    flush=True,
                )
        finally:
            server.stop()


def model_spec(args: argparse.Namespace):
    """The cost-model spec of the served model: ``--spec`` by name, else read from the model's
    config (a directory, a shipped config name, or the demo model)."""
    from nova.cost.model_spec import ModelSpec, get_model_spec
    from nova.models.loader import resolve_model_dir

    if args.spec:
        return get_model_spec(args.spec)
    return ModelSpec.from_dir(resolve_model_dir(args.model))


def simulate(
    measured: dict[str, Any], policy: str, args: argparse.Namespace, cost: Any, spec: Any
) -> dict[str, Any]:
    """The simulator's prediction of one measured point (same requests, same policy)."""
    from nova.metrics import percentile, request_metrics, summarize
    from nova.sim.eval import Experiment, build_policy
    from nova.sim.frontend import FrontendModel, through_frontend
    from nova.sim.simulator import SimArrival, Simulator

    exp = Experiment(
        "serve-eval",
        "",
        gpu=cost.gpu().name,
        model=spec.name,
        rates_rps=(),
        num_requests=0,
        max_num_seqs=args.max_num_seqs,
    )
    arrivals = []
    for r in measured["requests"]:
        if r["prompt_tokens"] is None or r["completion_tokens"] is None:
            continue  # failed in the real run: nothing to compare
        at = (
            r["arrival_s"]
            if measured["kind"] == "poisson" and r["arrival_s"] is not None
            else r["send_s"]
        )
        text = max(1, r["prompt_tokens"] - r["num_images"] * spec.image_tokens)
        arrivals.append(SimArrival(r["id"], at, text, r["num_images"], r["completion_tokens"]))
    kv_blocks = args.num_kv_blocks or 1 << 20
    sim = Simulator(build_policy(policy, exp, cost, spec), cost, kv_blocks, 16, spec.image_tokens)
    prepare_s = measured.get("frontend_prepare_s")
    # Requests reach the engine once the server has prepared them (per image, on its pool).
    frontend = FrontendModel(
        per_image_s=prepare_s or 0.0, workers=measured.get("preprocess_workers") or 1
    )
    res = sim.run(through_frontend(arrivals, frontend))
    client_arrival = {a.request_id: a.arrival_s for a in arrivals}
    e2e = sorted(
        r.times.finish_s - client_arrival[r.request_id]
        for r in res.requests
        if r.times.finish_s is not None
    )
    s = summarize([request_metrics(r) for r in res.requests])
    return {
        "mean_latency_s": sum(e2e) / len(e2e),
        "p99_latency_s": percentile(e2e, 99.0),
        "max_latency_s": e2e[-1],
        "throughput_rps": s.request_throughput_rps,
        "frontend_prepare_s": prepare_s,
    }


# The single-run report of this script (one seed, rates as loads): its own headline, table
# and plots; ``nova eval``'s multi-seed report (``nova.sim.eval``) has another schema.
Results = dict[str, list[dict[str, Any]]]  # policy -> its load points


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

    from nova.sim.plots import plot_pareto

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

    plot_pareto(results, report["experiment"], out_dir / "pareto.png", dpi=110)

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


def report(args: argparse.Namespace, points: list[Point]) -> dict[str, Any]:
    results: dict[str, list[dict]] = {}
    by_kind: dict[str, dict[str, list[dict]]] = {"poisson": {}, "sessions": {}}
    if args.profile:  # read once for every point
        from nova.cost.profiled import ProfiledCostModel

        cost, spec = ProfiledCostModel.from_file(args.profile), model_spec(args)
    for policy in args.policies:
        for p in points:
            path = args.out / "runs" / policy / f"{p.name}.json"
            if not path.exists():
                continue
            m = json.loads(path.read_text())
            if args.profile:
                sim = simulate(m, policy, args, cost, spec)
                m["sim"] = sim
                m["sim_error"] = {
                    k: (sim[k] / m[k] - 1.0) if m[k] else None
                    for k in ("mean_latency_s", "p99_latency_s", "max_latency_s")
                }
            results.setdefault(policy, []).append(m)
            by_kind[p.kind].setdefault(policy, []).append(m)
    if not results:
        raise SystemExit(f"no measured points under {args.out / 'runs'}")
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rep = {
        "experiment": "serve-eval",
        "gpu": gpu,
        "model": args.model,
        "device": args.device,
        "partition": args.partition,
        "cost_model": str(args.profile) if args.profile else "none",
        "description": "nova serve per policy, driven by nova bench (Poisson open loop and "
        "closed-loop GUI-agent sessions)",
        "num_requests_per_point": args.num_prompts,
        "seed": args.seed,
        "policies": {
            p: [{k: v for k, v in pt.items() if k not in ("e2e_s", "requests")} for pt in pts]
            for p, pts in results.items()
        },
        "headline": headline(by_kind["poisson"]) if by_kind["poisson"] else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rep, indent=2) + "\n")
    md = render_markdown(rep)
    if args.profile:
        md += (
            "\n## Simulator vs measured\n\n"
            "| policy | point | mean err | p99 err | max err |\n|---|---|---:|---:|---:|\n"
        )
        for policy, pts in results.items():
            for m in pts:
                e = m["sim_error"]
                md += (
                    f"| {policy} | {m['point']} | "
                    + " | ".join(
                        "n/a" if e[k] is None else f"{100 * e[k]:+.1f}%"
                        for k in ("mean_latency_s", "p99_latency_s", "max_latency_s")
                    )
                    + " |\n"
                )
    (args.out / "results.md").write_text(md)
    if by_kind["poisson"]:
        plot(by_kind["poisson"], rep, args.out)
    return rep


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="demo")
    p.add_argument("--spec", default=None, help="cost-model spec name (default: --model)")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--partition", default="auto")
    p.add_argument("--policies", nargs="+", default=list(ALL_POLICIES))
    p.add_argument("--rates", nargs="*", type=float, default=[0.25, 0.5], help="Poisson req/s")
    p.add_argument("--sessions", nargs="*", type=int, default=[], help="closed-loop session counts")
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--steps-per-session", type=int, default=5)
    p.add_argument("--think-time-s", type=float, default=1.0)
    p.add_argument("--session-spread-s", type=float, default=5.0)
    p.add_argument("--image-width", type=int, default=1920)
    p.add_argument("--image-height", type=int, default=1080)
    p.add_argument("--max-output-tokens", type=int, default=None)
    p.add_argument("--min-output-tokens", type=int, default=30)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument(
        "--preprocess-workers", type=int, default=4, help="nova serve --preprocess-workers"
    )
    p.add_argument(
        "--calibration-requests",
        type=int,
        default=4,
        help="warm-up requests per server, sent one at a time; their mean preparation "
        "time is the simulator's front-end cost (0: none)",
    )
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra nova serve flag (repeat)"
    )
    p.add_argument("--profile", type=Path, default=None, help="cost profile for the simulator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--startup-timeout-s", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_eval")
    p.add_argument("--force", action="store_true", help="re-measure points already saved")
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CPU smoke: demo model, 2 policies, 1 small Poisson point and 1 session",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.policies = "demo", "cpu", ["multi_stream", "nova"]
        args.rates, args.sessions, args.num_prompts = [1.0], [1], 3
        args.steps_per_session, args.image_width, args.image_height = 2, 224, 224
        args.max_output_tokens, args.min_output_tokens = 6, 4
        args.num_kv_blocks = args.num_kv_blocks or 256
        if args.profile is None:
            args.profile = ROOT / "nova" / "cost" / "profiles" / "demo-cpu.json"
    unknown = set(args.policies) - set(ALL_POLICIES)
    if unknown:
        p.error(f"unknown policies {sorted(unknown)}; choose from {', '.join(ALL_POLICIES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    points = [Point("poisson", r) for r in args.rates] + [
        Point("sessions", n) for n in args.sessions
    ]
    if not args.report_only:
        measure(args, points)
    rep = report(args, points)
    print((args.out / "results.md").read_text())
    return 0 if rep["policies"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
