"""The ``cpu`` attention backend's prefill tiles: one prefill forward of the demo model at a few
prompt shapes, untiled vs tiles of a few sizes, on a worker thread, one intra-op thread.

Timed in thread CPU time (``time.thread_time``: what the forward costs on one core whatever
else runs on the machine), on a thread other than the main one because the engine's stage
workers are such threads (glibc serves their allocations above 64 MB with a fresh ``mmap``,
the main thread's from its heap). ``untiled`` is one tile as large as the whole score matrix.
Variants alternate within each round. Writes ``--out`` (default
benchmarks/results/cpu_prefill_tiles.{json,md}).
Usage: .venv/bin/python benchmarks/cpu_prefill_tiles.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from runtime_throughput import machine

from nova.models.loader import load_model
from nova.runtime.attention_cpu import CpuPagedAttention
from nova.runtime.forward_batch import SeqInput
from nova.runtime.runner import CacheConfig, ModelRunner

UNTILED_BYTES = 1 << 40  # one tile holds any score matrix
# (new tokens, cached tokens): the session benchmark's last step without and with the caches,
# its uncached part alone, and its first step
SHAPES = [(1453, 0), (1069, 384), (1069, 0), (548, 0)]


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    loaded = load_model(args.model, "auto", torch.float32, "cpu", 0, "auto")
    runner = ModelRunner(loaded, CacheConfig(num_blocks=256))
    variants = {"untiled": UNTILED_BYTES, **{f"{m} MiB": m << 20 for m in args.tiles_mib}}
    rows = []
    with torch.inference_mode():
        for rnd in range(args.rounds):
            for new, cached in SHAPES:
                blocks = list(range(-(-(new + cached) // runner.block_size)))
                for name, tile in variants.items():
                    backend = CpuPagedAttention(tile, prefill="tiled")
                    runner.attention = backend
                    loaded.model.decoder.set_attention_backend(backend)
                    t0 = time.thread_time()
                    runner.forward([SeqInput([1] * new, cached, blocks)])
                    cpu_s = time.thread_time() - t0
                    rows.append(
                        {
                            "round": rnd,
                            "new": new,
                            "cached": cached,
                            "variant": name,
                            "cpu_s": cpu_s,
                        }
                    )
                    print(f"round {rnd} {new} on {cached}: {name} {cpu_s:.3f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tiles-mib", type=int, nargs="+", default=[1, 2, 4, 16])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    load_start = [round(x, 2) for x in os.getloadavg()]
    out: list[list[dict[str, Any]]] = []
    t = threading.Thread(target=lambda: out.append(measure(args)))
    t.start()
    t.join()
    if not out:
        raise RuntimeError("the measurement thread failed")
    rows = out[0]
    report = {
        "machine": machine(),
        "load_start": load_start,
        "load_end": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
    }
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = [
        "# CPU prefill attention: untiled vs tiles (thread CPU s, one thread, worker thread)",
        "",
        f"Machine: {report['machine']}. Load average (1/5/15 min) at the start: {load_start}, "
        f"at the end: {report['load_end']} (other jobs; thread CPU time does not count them). "
        f"Demo model, fp32, one prefill forward per cell; median of {args.rounds} rounds "
        "(variants alternate within a round).",
        "",
        "| prompt | " + " | ".join(variants) + " |",
        "|---|" + "---:|" * len(variants),
    ]
    for new, cached in SHAPES:
        cells = [
            statistics.median(
                r["cpu_s"]
                for r in rows
                if (r["new"], r["cached"], r["variant"]) == (new, cached, v)
            )
            for v in variants
        ]
        what = f"{new} tokens" + (f" on {cached} cached" if cached else "")
        lines.append(f"| {what} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_prefill_tiles.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "cpu_prefill_tiles.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
