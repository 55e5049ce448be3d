"""The order of an engine's batches on ``engine_latency.py``'s screenshot burst, per policy.

Each policy's engine serves the same 64-request burst once; the batches are printed in the order
they started, as ``V8`` (a vision batch of 8 images), ``P24`` (a prefill batch of 24 requests),
``D31`` (31 decode steps in a row), and written to ``benchmarks/results/batch_order_<device>.md``.
It shows how stages take turns on a CPU that cannot split its cores (``docs/cpu.md``).
Usage: .venv/bin/python benchmarks/batch_order.py [--policies multi_stream sequential]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from engine_latency import BatchTrace, build_prompts, parse_policy, run_engine
from runtime_throughput import machine

from nova.config import EngineConfig
from nova.engine.llm_engine import LLMEngine
from nova.sampling_params import SamplingParams


def order(rows: list[tuple[str, float, float, int, int]]) -> str:
    """``V8 P24 D31 ...``: front batches with their sizes, runs of decode steps counted."""
    out: list[list] = []
    for stage, _start, _end, n, _cores in sorted(rows, key=lambda r: r[1]):
        tag = stage[0].upper()
        if tag == "D" and out and out[-1][0] == "D":
            out[-1][1] += 1
        else:
            out.append([tag, 1 if tag == "D" else n])
    return " ".join(f"{t}{n}" for t, n in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", nargs="+", default=["multi_stream", "sequential"])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    loaded = None
    lines = [
        f"# Batch order on the screenshot burst ({args.num_requests} requests, "
        f"{args.max_tokens} tokens, float32, caches off)",
        "",
        f"Written by `benchmarks/batch_order.py`. Machine: {machine()}.",
        "",
        "| policy | load | wall s | batches in start order |",
        "|---|---:|---:|---|",
    ]
    for spec in args.policies:
        policy, limits = parse_policy(spec)
        engine = LLMEngine(
            EngineConfig(
                model="demo",
                policy=policy,
                dtype="float32",
                prefix_caching=False,
                encoder_cache_bytes=0,
                **limits,
            ),
            loaded=loaded,
        )
        loaded = engine.loaded
        trace = BatchTrace(engine)
        prompts = build_prompts(engine, args.num_requests)
        load = os.getloadavg()[0]
        trace.take()
        _, wall = run_engine(engine, prompts, params)
        row = f"| {spec} | {load:.1f} | {wall:.2f} | {order(trace.take())} |"
        print(row)
        lines.append(row)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    (args.out / f"batch_order_{device}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
