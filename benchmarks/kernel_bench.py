"""What the CPU kernel micro-benchmarks share (``cpu_kv_write.py``, ``cpu_sampling.py``,
``cpu_prefill_paths.py``): their command line (``--threads``, ``--rounds``, ``--out``), the
intra-op thread count, Nova's compiled CPU kernels (or an exit naming the failed build), and
writing a result as ``<name>.json`` and ``<name>.md``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

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


def write_results(out: Path, name: str, result: dict, lines: list[str]) -> None:
    """``out/name.json`` (``result``) and ``out/name.md`` (``lines``); the table is printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
