"""What the CPU kernel micro-benchmarks share (``cpu_kv_write.py``, ``cpu_sampling.py``,
``cpu_prefill_paths.py``, ``cpu_fused_elementwise.py``): their command line (``--threads``,
``--rounds``, ``--out``), the intra-op thread count, Nova's compiled CPU kernels (or an exit
naming the failed build), a result's header (the machine, threads, rounds and the load around
the run) and its page's opening line, and writing a result as ``<name>.json`` and
``<name>.md``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from nova.runtime import cpu_kernels

RESULTS = Path(__file__).parent / "results"


def kernel_bench_setup(doc: str, rounds: int) -> tuple[argparse.Namespace, ModuleType]:
    """Parse the shared flags (``doc``'s first line is the description), set the thread count,
    load the kernels."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels.load()
    if kernels is None:
        raise SystemExit("Nova's CPU kernels did not build (see the log above)")
    return args, kernels


def run_record(args: argparse.Namespace, load0: float, **fields: Any) -> dict[str, Any]:
    """A result's header: the machine, ``args.threads`` and ``args.rounds``, the 1-minute load
    average at the start (``load0``) and now; then ``fields``."""
    from runtime_throughput import machine

    return {
        "machine": machine(),
        "threads": args.threads,
        "rounds": args.rounds,
        "loadavg_1min_start_end": [load0, os.getloadavg()[0]],
        **fields,
    }


def machine_line(result: dict[str, Any]) -> str:
    """A results page's opening sentence, from ``run_record``'s header."""
    return (
        f"Machine: {result['machine']}; {result['threads']} intra-op threads; 1-min load "
        f"average at the start and end: {result['loadavg_1min_start_end']}."
    )


def write_results(out: Path, name: str, result: dict, lines: list[str]) -> None:
    """``out/name.json`` (``result``) and ``out/name.md`` (``lines``); the table is printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
