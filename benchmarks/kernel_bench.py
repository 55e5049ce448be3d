"""What the CPU kernel micro-benchmarks share (``cpu_kv_write.py``, ``cpu_sampling.py``): their
command line (``--threads``, ``--rounds``, ``--out``), the intra-op thread count, and Nova's
compiled CPU kernels, or an exit naming the failed build."""

from __future__ import annotations

import argparse
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
