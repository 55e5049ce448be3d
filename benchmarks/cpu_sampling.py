"""Sampling on the CPU: Nova's kernels (``csrc/cpu_sampling.cpp``) against the PyTorch ops they
replace, interleaved.

1. Greedy argmax: ``greedy_argmax`` against ``torch.argmax``, logits in fp32 (what the sampler
   gets: the LM head's output is widened to fp32) and bf16.
2. ``sample_batch`` as the engine calls it, greedy rows and temperature-1.0 rows (seeded, no
   top-k/top-p/min-p: an OpenAI client's default), with the kernels on and off
   (``NOVA_CPU_KERNELS``, read per call); off, temperature rows take the tensor path (divide,
   ``nan_to_num``, softmax, cumsum, searchsorted).

Logits of the peer model's vocabulary (49,152) for a decode step of 1-64 sequences. Each timed
call takes the next of four logits tensors, so a call does not find its input in the cache (a
decode step's logits are fresh from the LM head). Median over ``--rounds`` alternating rounds.

Writes ``benchmarks/results/cpu_sampling.{json,md}`` with the machine and its load.
Usage: ``.venv/bin/python benchmarks/cpu_sampling.py [--threads 2] [--rounds 9]``
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from nova.runtime.sampler import make_generator, sample_batch
from nova.sampling_params import SamplingParams

VOCAB = 49152


def time_calls(fn: Callable[[torch.Tensor], Any], inputs: list[torch.Tensor], calls: int) -> float:
    """Microseconds per call, cycling through ``inputs``."""
    cycle = itertools.cycle(inputs)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(next(cycle))
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    from kernel_bench import kernel_bench_setup, machine_line, run_record, write_results

    args, kernels = kernel_bench_setup(__doc__ or "", rounds=9)
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
    batch_rows = []
    for kind, temperature in (("greedy", 0.0), ("temperature 1.0", 1.0)):
        for rows in (8, 32, 64):
            inputs = [torch.randn(rows, VOCAB, generator=g) * 3 for _ in range(4)]
            params = [
                SamplingParams(max_tokens=8, temperature=temperature, seed=i) for i in range(rows)
            ]
            gens = [make_generator(p) for p in params]
            calls = max(20, 1000 // rows)
            on_us, off_us = [], []
            for _ in range(args.rounds):
                for on, acc in ((False, off_us), (True, on_us)):
                    os.environ["NOVA_CPU_KERNELS"] = "1" if on else "0"
                    acc.append(time_calls(lambda x: sample_batch(x, params, gens), inputs, calls))
            os.environ["NOVA_CPU_KERNELS"] = "1"
            off, on = statistics.median(off_us), statistics.median(on_us)
            batch_rows.append(
                {
                    "rows_kind": kind,
                    "rows": rows,
                    "kernels_off_us": round(off, 1),
                    "kernels_on_us": round(on, 1),
                    "speedup": round(off / on, 2),
                }
            )
            print(batch_rows[-1], flush=True)
    result = run_record(args, load0, vocab=VOCAB, argmax=rows_out, sample_batch=batch_rows)
    lines = [
        "# Sampling on the CPU: Nova's kernels vs the PyTorch ops they replace (interleaved)",
        "",
        f"{machine_line(result)} Logits [rows, {VOCAB}], four "
        f"tensors cycled; median of {args.rounds} alternating rounds. "
        "`benchmarks/cpu_sampling.py`.",
        "",
        "## Greedy argmax: `greedy_argmax` vs `torch.argmax`",
        "",
        "| dtype | rows | torch.argmax us | Nova kernel us | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['dtype']} | {r['rows']} | {r['torch_us']} | {r['nova_us']} | {r['speedup']}x |"
        for r in rows_out
    ]
    lines += [
        "",
        "## `sample_batch`, fp32 logits, kernels off vs on",
        "",
        "| rows | batch | kernels off us | kernels on us | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['rows_kind']} | {r['rows']} | {r['kernels_off_us']} | {r['kernels_on_us']} | "
        f"{r['speedup']}x |"
        for r in batch_rows
    ]
    write_results(args.out, "cpu_sampling", result, lines)


if __name__ == "__main__":
    main()
