"""``nova bench``: a streaming load client for OpenAI-compatible servers, driven by
``nova.workload`` workloads; client-side TTFT/TPOT/ITL/E2E, throughput, goodput, deadline
violations; JSON, markdown and CDF-plot results. ``add_bench_parser(subparsers)`` registers it.
"""

from __future__ import annotations

from nova.lazy import lazy_attributes

__all__ = ["BenchConfig", "add_bench_parser", "run_workload"]

__getattr__ = lazy_attributes(
    "nova.bench",
    {
        "add_bench_parser": "nova.bench.cli",
        "BenchConfig": "nova.bench.driver",
        "run_workload": "nova.bench.driver",
    },
)
