"""``nova bench``: drive an OpenAI-compatible server with a ``nova.workload`` workload and report
client-side latencies. Flags follow ``vllm bench serve`` where the meaning is the same."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nova.bench.driver import BenchConfig, BenchRun, rescale_arrivals_note, run_workload
from nova.bench.report import (
    BenchSummary,
    format_report,
    parse_goodput,
    summarize_run,
    write_results,
)


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or inf), got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_bench_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from nova.workload import WORKLOADS

    g = p.add_argument_group("server")
    g.add_argument(
        "--base-url",
        default=None,
        help="server root, e.g. http://127.0.0.1:8000 (default: from --host/--port)",
    )
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--endpoint", default="/v1/chat/completions")
    g.add_argument(
        "--model", default=None, help="model id (default: the first one /v1/models lists)"
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="Bearer token (default: $OPENAI_API_KEY)",
    )
    g.add_argument("--request-timeout-s", type=float, default=600.0)

    g = p.add_argument_group("workload")
    g.add_argument(
        "--dataset-name",
        default="poisson",
        choices=sorted(WORKLOADS),
        help="a nova.workload workload",
    )
    g.add_argument(
        "--dataset-path",
        default=None,
        help="trace file for azure_lmm/mooncake/burstgpt (default: the bundled sample)",
    )
    g.add_argument(
        "--num-prompts",
        type=_positive_int,
        default=None,
        help="requests to send (default: the workload's own count)",
    )
    g.add_argument(
        "--request-rate",
        type=_rate,
        default=None,
        help="open loop: mean requests/s ('inf': all at once; default: the workload's "
        "own arrival times)",
    )
    g.add_argument(
        "--burstiness",
        type=_rate,
        default=None,
        help="gamma shape of inter-arrival gaps (bursty workload; 1 = Poisson)",
    )
    g.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=None,
        help="at most this many requests in flight",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--num-sessions", type=_positive_int, default=None, help="gui_sessions: sessions"
    )
    g.add_argument(
        "--screenshot-window",
        type=_positive_int,
        default=None,
        help="agent_sessions: screenshots each step resends (the last K; default 5)",
    )
    g.add_argument("--image-width", type=_positive_int, default=None)
    g.add_argument("--image-height", type=_positive_int, default=None)
    g.add_argument("--images-per-request", type=int, default=None)
    g.add_argument(
        "--workload-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other make_workload parameter (VALUE parsed as JSON if it can be); repeatable",
    )

    g = p.add_argument_group("requests")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="ask the server to generate exactly max_tokens (extension)",
    )
    g.add_argument(
        "--no-nova-extensions",
        action="store_true",
        help="do not send priority/deadline_ms (for servers that reject them)",
    )

    g = p.add_argument_group("results")
    g.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="KEY:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2e:4000 (milliseconds)",
    )
    g.add_argument("--save-result", action="store_true", help="write JSON, markdown and a CDF plot")
    g.add_argument("--result-dir", default=None, help="where to write them (implies --save-result)")
    g.add_argument(
        "--result-filename", default=None, help="file stem (default: derived from the run)"
    )
    g.add_argument("--disable-tqdm", action="store_true")
    return p


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on an ``argparse`` subparsers object; ``args.func(args)`` runs it."""
    p = subparsers.add_parser(
        "bench",
        help="load-test an OpenAI-compatible server",
        description="Send a nova.workload workload to an OpenAI-compatible "
        "server (streaming) and report TTFT, TPOT, ITL and E2E "
        "percentiles, throughput, goodput and deadline violations.",
    )
    add_bench_args(p)
    p.set_defaults(func=run_bench)
    return p


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def build_workload(args: argparse.Namespace):
    """The workload the flags describe (``ValueError`` naming a flag that does not apply)."""
    from nova.workload import SAMPLE_TRACES, Workload, make_workload, workload_parameters

    name = args.dataset_name
    params = workload_parameters(name)
    kw: dict[str, Any] = {}
    if "seed" in params:
        kw["seed"] = args.seed
    if "path" in params:
        kw["path"] = args.dataset_path or SAMPLE_TRACES[name]
    elif args.dataset_path:
        raise ValueError(f"--dataset-path: workload {name!r} is generated, it reads no file")
    if args.num_prompts is not None:
        if "num_requests" in params:
            kw["num_requests"] = args.num_prompts
        elif "max_requests" in params:
            kw["max_requests"] = args.num_prompts
    rate = args.request_rate
    if rate is not None and not math.isinf(rate):
        if "rate_rps" not in params:
            raise ValueError(
                f"--request-rate: workload {name!r} is closed loop (its pace is set by "
                "the server's answers and think times); use --max-concurrency"
            )
        kw["rate_rps"] = rate
    if args.burstiness is not None:
        if "burstiness" in params:
            kw["burstiness"] = args.burstiness
        elif args.burstiness != 1.0:
            raise ValueError(
                f"--burstiness: workload {name!r} has no burstiness; use --dataset-name bursty"
            )
    for flag, key in (
        ("num_sessions", "num_sessions"),
        ("screenshot_window", "window"),
        ("image_width", "image_width"),
        ("image_height", "image_height"),
        ("images_per_request", "images_per_request"),
    ):
        value = getattr(args, flag)
        if value is not None:
            if key not in params:
                raise ValueError(
                    f"--{flag.replace('_', '-')}: workload {name!r} has no parameter {key}"
                )
            kw[key] = value
    for item in args.workload_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--workload-arg takes KEY=VALUE, got {item!r}")
        kw[key.strip()] = _parse_value(value)
    workload = make_workload(name, **kw)
    if args.num_prompts is not None and len(workload.requests) > args.num_prompts:
        workload = Workload(
            workload.name,
            workload.requests[: args.num_prompts],
            workload.closed_loop,
            (*workload.notes, f"kept the first {args.num_prompts} requests"),
        )
    return workload


def bench_config(args: argparse.Namespace) -> BenchConfig:
    base = args.base_url or f"http://{args.host}:{args.port}"
    return BenchConfig(
        base_url=base,
        endpoint=args.endpoint,
        model=args.model,
        max_concurrency=args.max_concurrency,
        all_at_once=args.request_rate is not None and math.isinf(args.request_rate),
        api_key=args.api_key,
        timeout_s=args.request_timeout_s,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        nova_extensions=not args.no_nova_extensions,
        disable_tqdm=args.disable_tqdm,
    )


@dataclass(slots=True)
class BenchOutcome:
    run: BenchRun
    summary: BenchSummary
    report: str
    paths: dict[str, Path]


def bench(args: argparse.Namespace) -> BenchOutcome:
    """Build the workload, run it, summarise, and write results if asked."""
    slos = parse_goodput(args.goodput)
    workload = build_workload(args)
    cfg = bench_config(args)
    run = asyncio.run(run_workload(workload, cfg))
    run.extra["arrivals"] = rescale_arrivals_note(args.request_rate)
    summary = summarize_run(run, slos)
    report = format_report(run, summary)
    paths: dict[str, Path] = {}
    if args.save_result or args.result_dir:
        stem = args.result_filename or (
            f"nova-bench-{workload.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        saved = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
        paths = write_results(run, summary, Path(args.result_dir or "."), stem, saved)
    return BenchOutcome(run, summary, report, paths)


def run_bench(args: argparse.Namespace) -> int:
    import httpx

    try:
        out = bench(args)
    except httpx.HTTPError as exc:
        print(
            f"nova: error: talking to the server failed: {exc.__class__.__name__}: {exc}",
            file=sys.stderr,
        )
        return 2
    print(out.report)
    for kind, path in out.paths.items():
        print(f"wrote {kind}: {path}")
    return 0 if out.summary.num_completed > 0 else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m nova.bench`` (the same flags as ``nova bench``)."""
    parser = add_bench_args(argparse.ArgumentParser(prog="nova bench"))
    args = parser.parse_args(argv)
    try:
        return run_bench(args)
    except ValueError as exc:
        print(f"nova: error: {exc}", file=sys.stderr)
        return 2
