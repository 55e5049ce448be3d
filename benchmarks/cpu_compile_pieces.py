"""``torch.compile`` of the decoder's elementwise pieces on a CPU, against eager, per call.

The decode step's time outside its GEMMs and attention is elementwise work: the residual add
and RMSNorm (7 eager ops), RoPE (6) and SiLU-and-multiply (3), each op a few microseconds on
the demo model's rows. Compiling those pieces (Inductor, ``dynamic=True`` so one compile serves
every batch size) fuses each into one generated kernel, but every call of a compiled function
also pays its guards and wrapper. This times both per call on the demo model's shapes (hidden
576, MLP 1536, 9 heads of 64), eager and compiled interleaved per piece, for decode batches of
1 and 16 rows and a 512-token prefill chunk, float32, on the machine's cores.
Writes ``benchmarks/results/cpu_compile_pieces.{json,md}`` with the machine and its load.

Usage: ``python benchmarks/cpu_compile_pieces.py [--calls 2000]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HIDDEN, INTER, HEADS, HEAD_DIM = 576, 1536, 9, 64
ROWS = (1, 16, 512)


def add_rmsnorm(h: torch.Tensor, d: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    h = h + d
    x32 = h.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
    return h, w * x32.to(h.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    n = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :n]) * gate_up[:, n:]


def inputs(piece: str, rows: int) -> tuple[torch.Tensor, ...]:
    if piece == "add_rmsnorm":
        return torch.randn(rows, HIDDEN), torch.randn(rows, HIDDEN), torch.randn(HIDDEN)
    if piece == "rope":
        return (
            torch.randn(rows, HEADS, HEAD_DIM),
            torch.randn(rows, HEAD_DIM),
            torch.randn(rows, HEAD_DIM),
        )
    return (torch.randn(rows, 2 * INTER),)


def per_call_us(fn, args: tuple[torch.Tensor, ...], calls: int) -> float:
    for _ in range(20):
        fn(*args)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    from runtime_throughput import machine

    pieces = {"add_rmsnorm": add_rmsnorm, "rope": rope, "silu_mul": silu_mul}
    load0 = os.getloadavg()[0]
    rows_out = []
    with torch.inference_mode():
        for name, fn in pieces.items():
            compiled = torch.compile(fn, dynamic=True)
            t0 = time.perf_counter()
            compiled(*inputs(name, 2))  # the compile (dynamic: every later size reuses it)
            compile_s = time.perf_counter() - t0
            for rows in ROWS:
                a = inputs(name, rows)
                compiled(*a)
                eager_us, comp_us = [], []
                for _ in range(args.rounds):  # interleaved
                    eager_us.append(per_call_us(fn, a, args.calls))
                    comp_us.append(per_call_us(compiled, a, args.calls))
                rows_out.append(
                    {
                        "piece": name,
                        "rows": rows,
                        "eager_us": statistics.median(eager_us),
                        "compiled_us": statistics.median(comp_us),
                        "compile_s": compile_s,
                    }
                )
                print(rows_out[-1], flush=True)
    result = {
        "benchmark": "cpu_compile_pieces",
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min_start_end": [load0, os.getloadavg()[0]],
        "rows": rows_out,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "cpu_compile_pieces"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# torch.compile of the decoder's elementwise pieces vs eager, per call (CPU, float32)",
        "",
        f"Machine: {result['machine']}; 1-min load average at the start and end: "
        f"{result['loadavg_1min_start_end']}. Demo-model shapes; median of {args.rounds} "
        f"interleaved rounds of {args.calls} calls; Inductor, `dynamic=True`. Written by "
        "`benchmarks/cpu_compile_pieces.py`.",
        "",
        "| piece | rows | eager us/call | compiled us/call | compiled / eager | compile s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows_out:
        lines.append(
            f"| {r['piece']} | {r['rows']} | {r['eager_us']:.1f} | {r['compiled_us']:.1f} "
            f"| {r['compiled_us'] / r['eager_us']:.2f} | {r['compile_s']:.1f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
