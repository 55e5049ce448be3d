"""Memory read bandwidth of this CPU as the cost model's ``cpu`` entry uses it: the time to read
a tensor far larger than the caches (a sum over it), on all cores' intra-op threads.

Writes ``benchmarks/results/cpu_bandwidth.{json,md}``: the best and median GB/s of
``--repeats`` reads of ``--mib`` MiB (float32), with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    from runtime_throughput import machine

    x = torch.ones(args.mib * 2**20 // 4)
    x.sum()  # first touch
    load = [round(v, 2) for v in os.getloadavg()]
    gbps = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        x.sum()
        gbps.append(x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    result = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "mib": args.mib,
        "loadavg_1min_5min_15min_at_start": load,
        "read_gbps": [round(g, 2) for g in gbps],
        "best_gbps": round(max(gbps), 2),
        "median_gbps": round(statistics.median(gbps), 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_bandwidth.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "cpu_bandwidth.md").write_text(
        "# CPU memory read bandwidth (`benchmarks/cpu_bandwidth.py`)\n\n"
        f"Machine: {result['machine']}; {result['threads']} intra-op threads; load average at "
        f"start {load}. A sum over {args.mib} MiB of float32, {args.repeats} times: best "
        f"**{result['best_gbps']} GB/s**, median {result['median_gbps']} GB/s "
        f"(each: {result['read_gbps']}).\n"
    )
    print(result)


if __name__ == "__main__":
    main()
