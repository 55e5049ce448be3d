"""``nova bench``: a streaming load client for OpenAI-compatible servers, driven by
``nova.workload`` workloads; client-side TTFT/TPOT/ITL/E2E, throughput, goodput, deadline
violations; JSON, markdown and CDF-plot results. ``add_bench_parser(subparsers)`` registers it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BenchConfig", "add_bench_parser", "run_workload"]


def __getattr__(name: str) -> Any:
    if name == "add_bench_parser":
        from nova.bench.cli import add_bench_parser

        return add_bench_parser
    if name in ("BenchConfig", "run_workload"):
        from nova.bench import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'nova.bench' has no attribute {name!r}")
