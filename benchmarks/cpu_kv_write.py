"""Writing new keys and values into the paged KV cache on the CPU: Nova's row-copy kernel
(``csrc/cpu_kv_write.cpp``, what ``PagedKVCache.write`` calls) against ``index_copy_``.

The peer model's cache geometry (30 layers, 3 KV heads of 64, bf16, 65,536 slots) and a
forward's writes: one K and one V write per layer at random slots, for a decode step of 64
sequences and a 2,028-token prefill (26 chat prompts of 78 tokens); values are a strided view
of a wider q/k/v tensor, as in the model. Milliseconds per forward's 30 layers, median of
``--rounds`` alternating rounds.

Writes ``benchmarks/results/cpu_kv_write.{json,md}`` with the machine and its load.
Usage: ``.venv/bin/python benchmarks/cpu_kv_write.py [--threads 2] [--rounds 7]``
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

LAYERS, KV_HEADS, HEAD_DIM, SLOTS = 30, 3, 64, 65536


def per_forward_ms(fn: Callable[[], None], repeats: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    from kernel_bench import kernel_bench_setup, machine_line, run_record, write_results

    args, kernels = kernel_bench_setup(__doc__ or "", rounds=7)
    load0 = os.getloadavg()[0]
    shape = (SLOTS, KV_HEADS, HEAD_DIM)
    k_cache = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(LAYERS)]
    v_cache = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(LAYERS)]
    rows = []
    g = torch.Generator().manual_seed(0)
    for case, tokens in (("decode step, 64 sequences", 64), ("prefill, 26 x 78 tokens", 2028)):
        slots = torch.randperm(SLOTS, generator=g)[:tokens]
        qkv = torch.randn(tokens, (9 + 2 * KV_HEADS) * HEAD_DIM, generator=g).bfloat16()
        k = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=g).bfloat16()
        v = qkv[:, -KV_HEADS * HEAD_DIM :].view(tokens, KV_HEADS, HEAD_DIM)

        def eager() -> None:
            for layer in range(LAYERS):
                k_cache[layer].index_copy_(0, slots, k)
                v_cache[layer].index_copy_(0, slots, v)

        def kernel() -> None:
            for layer in range(LAYERS):
                kernels.kv_write(k_cache[layer], v_cache[layer], slots, k, v)

        e_ms, k_ms = [], []
        for _ in range(args.rounds):
            e_ms.append(per_forward_ms(eager))
            k_ms.append(per_forward_ms(kernel))
        e, kk = statistics.median(e_ms), statistics.median(k_ms)
        rows.append(
            {
                "case": case,
                "tokens": tokens,
                "index_copy_ms": round(e, 3),
                "kernel_ms": round(kk, 3),
                "speedup": round(e / kk, 2),
            }
        )
        print(rows[-1], flush=True)
    result = run_record(args, load0, rows=rows)
    lines = [
        "# KV cache writes on the CPU: Nova's row-copy kernel vs index_copy_ (interleaved)",
        "",
        f"{machine_line(result)} Peer model geometry, bf16, "
        f"K and V of {LAYERS} layers per forward; median of {args.rounds} alternating rounds. "
        "`benchmarks/cpu_kv_write.py`.",
        "",
        "| case | index_copy_ ms per forward | kernel ms per forward | speed-up |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['case']} | {r['index_copy_ms']} | {r['kernel_ms']} | {r['speedup']}x |" for r in rows
    ]
    write_results(args.out, "cpu_kv_write", result, lines)


if __name__ == "__main__":
    main()
