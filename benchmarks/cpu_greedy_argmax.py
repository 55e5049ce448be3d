"""Greedy sampling's argmax on the CPU: Nova's kernel (``csrc/cpu_sampling.cpp``, through
``nova.runtime.sampler.greedy_tokens``) against ``torch.argmax``, interleaved.

Logits of the peer model's vocabulary (49,152) for a decode step of 1-64 sequences, in fp32
(what the sampler gets: the LM head's output is widened to fp32) and bf16. Each timed call
takes the next of four logits tensors, so a call does not find its input in the cache (a
decode step's logits are fresh from the LM head). Median over ``--rounds`` alternating rounds.

Writes ``benchmarks/results/cpu_greedy_argmax.{json,md}`` with the machine and its load.
Usage: ``.venv/bin/python benchmarks/cpu_greedy_argmax.py [--threads 2] [--rounds 9]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nova.runtime import cpu_kernels

VOCAB = 49152


def time_calls(fn: Callable[[torch.Tensor], Any], inputs: list[torch.Tensor], calls: int) -> float:
    """Microseconds per call, cycling through ``inputs``."""
    cycle = itertools.cycle(inputs)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(next(cycle))
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    from runtime_throughput import machine

    torch.set_num_threads(args.threads)
    kernels = cpu_kernels.load()
    if kernels is None:
        raise SystemExit("Nova's CPU kernels did not build (see the log above)")
    load0 = os.getloadavg()[0]
    rows_out = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 8, 32, 64):
            inputs = [torch.randn(rows, VOCAB, generator=g).to(dtype) for _ in range(4)]
            for x in inputs:
                assert torch.equal(kernels.greedy_argmax(x), x.argmax(dim=-1))
            calls = max(20, 2000 // rows)
            torch_us, nova_us = [], []
            for _ in range(args.rounds):
                torch_us.append(time_calls(lambda x: x.argmax(dim=-1), inputs, calls))
                nova_us.append(time_calls(kernels.greedy_argmax, inputs, calls))
            t, n = statistics.median(torch_us), statistics.median(nova_us)
            rows_out.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "rows": rows,
                    "torch_us": round(t, 1),
                    "nova_us": round(n, 1),
                    "speedup": round(t / n, 2),
                }
            )
            print(rows_out[-1], flush=True)
    result = {
        "machine": machine(),
        "threads": args.threads,
        "rounds": args.rounds,
        "vocab": VOCAB,
        "loadavg_1min_start_end": [load0, os.getloadavg()[0]],
        "rows": rows_out,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "cpu_greedy_argmax"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Greedy argmax: Nova's CPU kernel vs torch.argmax (interleaved)",
        "",
        f"Machine: {result['machine']}; {args.threads} intra-op threads; 1-min load average at "
        f"the start and end: {result['loadavg_1min_start_end']}. Logits [rows, {VOCAB}], four "
        f"tensors cycled; median of {args.rounds} alternating rounds. "
        "`benchmarks/cpu_greedy_argmax.py`.",
        "",
        "| dtype | rows | torch.argmax us | Nova kernel us | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['dtype']} | {r['rows']} | {r['torch_us']} | {r['nova_us']} | {r['speedup']}x |"
        for r in rows_out
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
