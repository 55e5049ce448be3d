"""Prepacked oneDNN bf16 linear vs ``F.linear`` on the decoder's GEMM shapes, interleaved.

SmolLM2-135M's projections (fused q/k/v, o, fused gate/up, down, lm_head) at a few token
counts, one intra-op thread, timed in thread CPU time (``time.thread_time``): what a GEMM costs
on one core whatever else runs on the machine. Per round, both variants run back to back; the
figure per variant is 30 layers x (qkv + o + gate_up + down) + lm_head, i.e. the GEMM time of
one forward. Writes ``--out`` (default benchmarks/results/cpu_linear.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from nova.runtime.cpu_linear import PACK_BATCH_HINT

# (out_features, in_features) of SmolLM2-135M (hidden 576, 9 q heads + 2x3 kv heads of 64,
# intermediate 1536, vocabulary 49152, 30 layers).
SHAPES = {
    "qkv": (960, 576),
    "o": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
    "lm_head": (49152, 576),
}
NUM_LAYERS = 30


def _time_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    start = time.thread_time()
    for _ in range(reps):
        fn()
    return (time.thread_time() - start) / reps * 1e3


def _forward_ms(tokens: int, packed: bool, reps: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(tokens)
    out: dict[str, float] = {}
    for name, (n, k) in SHAPES.items():
        w = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
        x = torch.randn(tokens, k, generator=gen).bfloat16()
        if packed:
            pw = torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT)
            fn: Callable[[], object] = lambda x=x, pw=pw: torch.ops.mkldnn._linear_pointwise(  # noqa: E731
                x, pw, None, "none", [], ""
            )
        else:
            fn = lambda x=x, w=w: F.linear(x, w)  # noqa: E731
        out[name] = _time_ms(fn, max(1, reps // 10) if name == "lm_head" else reps)
    out["forward"] = (
        NUM_LAYERS * sum(out[k] for k in ("qkv", "o", "gate_up", "down")) + out["lm_head"]
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 64, 1024])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/cpu_linear")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start = [round(v, 2) for v in os.getloadavg()]
    rows = []
    with torch.inference_mode():
        for tokens in args.tokens:
            reps = 50 if tokens <= 128 else 5
            runs: dict[str, list[float]] = {"F.linear": [], "packed": []}
            for _ in range(args.rounds):
                for variant in runs:
                    ms = _forward_ms(tokens, variant == "packed", reps)["forward"]
                    runs[variant].append(round(ms, 2))
            plain, packed = statistics.median(runs["F.linear"]), statistics.median(runs["packed"])
            rows.append({"tokens": tokens, **runs, "packed_over_plain": round(packed / plain, 3)})
            print(tokens, runs, f"packed/plain {packed / plain:.3f}", flush=True)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start_end": [load_start, [round(v, 2) for v in os.getloadavg()]],
        "unit": "thread CPU ms of one forward's GEMMs, 1 thread",
        "rows": rows,
    }
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Prepacked oneDNN bf16 linear vs F.linear (SmolLM2-135M GEMM shapes)",
        "",
        f"Machine {result['machine']}, torch {result['torch']}, {result['date']}; load average "
        f"at start {load_start}, at end {result['loadavg_start_end'][1]}. Thread CPU ms of one "
        "forward's GEMMs (30 layers x qkv, o, gate_up, down + lm_head), 1 intra-op thread, "
        "variants interleaved per round (`benchmarks/cpu_linear.py`).",
        "",
        "| tokens | F.linear ms (rounds) | packed ms (rounds) | packed / F.linear (medians) |",
        "|---:|---|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {', '.join(map(str, r['F.linear']))} | "
            f"{', '.join(map(str, r['packed']))} | {r['packed_over_plain']} |"
        )
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
