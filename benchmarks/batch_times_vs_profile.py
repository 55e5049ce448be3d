"""Where does the simulator's error on the CPU come from? Real batch durations vs the profile.

Runs a few GUI-agent requests through the real engine (policy ``sequential``: one batch at a
time, so nothing co-runs) on the demo model, times every batch the executor runs, and compares
it with the profiled cost model's prediction for that same batch. Also compares the run's wall
time with the sum of batch times (= the engine's own scheduling overhead).
Writes benchmarks/results/batch_times_vs_profile_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from runtime_throughput import machine

from nova.config import EngineConfig
from nova.cost.base import StageWork
from nova.cost.profiled import ProfiledCostModel
from nova.engine.llm_engine import LLMEngine
from nova.models.inputs import chat_messages
from nova.sampling_params import SamplingParams
from nova.screenshots import make_screenshot

PROFILE = Path(__file__).resolve().parents[1] / "nova" / "cost" / "profiles" / "demo-cpu.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    cost = ProfiledCostModel.from_file(PROFILE)
    nova = LLMEngine(EngineConfig(model="demo", policy="sequential", num_kv_blocks=1024))
    spans = []
    execute = nova.executor.execute

    def timed(batch):
        t0 = time.perf_counter()
        out = execute(batch)
        spans.append((batch, time.perf_counter() - t0))
        return out

    msgs = chat_messages("Open settings and turn on Wi-Fi.", num_images=1)
    # untimed first: the first batch of each stage packs its linear weights once
    # (nova.runtime.cpu_linear), which the profile's warm-up runs leave out too
    nova.run_all(
        [nova.processor.from_chat(msgs, [make_screenshot(10_000, 280, 280)])],
        SamplingParams(max_tokens=2, ignore_eos=True),
    )
    nova.executor.execute = timed
    prompts = [
        nova.processor.from_chat(msgs, [make_screenshot(i, 280, 280)])
        for i in range(args.num_requests)
    ]
    load_before = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    nova.run_all(prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
    wall_s = time.perf_counter() - t0
    load_after = round(os.getloadavg()[0], 2)
    rows = {}
    for batch, measured_s in spans:
        row = rows.setdefault(
            batch.stage.value, {"num_batches": 0, "measured_s": 0.0, "predicted_s": 0.0}
        )
        row["num_batches"] += 1
        row["measured_s"] += measured_s
        row["predicted_s"] += cost.time_s(StageWork.from_batch(batch), 1.0)
    for row in rows.values():
        row["ratio"] = row["measured_s"] / row["predicted_s"]
    meta = cost.metadata
    report = {
        "benchmark": "batch_times_vs_profile",
        "profile": PROFILE.name,
        "machine": machine(),
        "loadavg_1min_before_after": [load_before, load_after],
        "profile_metadata": {
            k: meta.get(k)
            for k in ("date", "timed", "statistic", "passes", "repeats", "loadavg_1min")
        },
        "num_requests": args.num_requests,
        "max_tokens": args.max_tokens,
        "wall_s": wall_s,
        "sum_of_batches_s": sum(d for _, d in spans),
        "stages": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_times_vs_profile_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Real batch times vs the CPU profile (demo model, policy sequential)",
        "",
        f"Machine: {report['machine']}; 1-minute load average before/after the run: "
        f"{load_before}/{load_after}.",
        "",
        f"Profile: {PROFILE.name} ({meta.get('date')}, {meta.get('statistic')}, timed: "
        f"{meta.get('timed')}, "
        f"load during profiling {meta.get('loadavg_1min')}).",
        "",
        f"{args.num_requests} requests, one screenshot each, {args.max_tokens} output tokens. "
        f"Wall {wall_s:.2f} s; sum of batch times {report['sum_of_batches_s']:.2f} s.",
        "",
        "| stage | batches | measured s | profile predicts s | measured / predicted |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage, r in rows.items():
        lines.append(
            f"| {stage} | {r['num_batches']} | {r['measured_s']:.2f} | {r['predicted_s']:.2f} | "
            f"{r['ratio']:.2f} |"
        )
    (args.out / "batch_times_vs_profile_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
