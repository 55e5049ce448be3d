"""Where does the simulator's error on the CPU come from? Real batch durations vs the profile.

Runs a few GUI-agent requests through the real engine (policy ``sequential``: one batch at a
time, so nothing co-runs) on the demo model, times every batch the executor runs, and compares
it with the profiled cost model's prediction for that same batch. Also compares the run's wall
time with the sum of batch times (= the engine's own scheduling overhead).
The profile is the one the engine plans with on this CPU (``shipped_profile_for``: this CPU's
own if one is shipped, else another CPU's) unless ``--profile`` names a file.
Writes benchmarks/results/batch_times_vs_profile_cpu{--tag}.{json,md}.
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
from nova.cost.profiled import ProfiledCostModel, shipped_profile_for
from nova.engine.llm_engine import LLMEngine
from nova.models.inputs import chat_messages
from nova.profiling.device import device_name
from nova.sampling_params import SamplingParams
from nova.screenshots import make_screenshot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--profile", type=Path, default=None, help="default: the engine's on this CPU")
    ap.add_argument("--tag", default="", help="results file suffix (e.g. the machine)")
    args = ap.parse_args()

    profile = args.profile or shipped_profile_for("demo", "cpu", "float32", device_name("cpu"))
    if profile is None:
        raise SystemExit("no shipped float32 profile of the demo model on the CPU")
    cost = ProfiledCostModel.from_file(profile)
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
        "profile": profile.name,
        "profile_device": meta.get("device_name"),
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
    (args.out / f"batch_times_vs_profile_cpu{args.tag}.json").write_text(
        json.dumps(report, indent=2) + "\n"
    )
    lines = [
        "# Real batch times vs the CPU profile (demo model, policy sequential)",
        "",
        f"Machine: {report['machine']}; 1-minute load average before/after the run: "
        f"{load_before}/{load_after}.",
        "",
        f"Profile: {profile.name}, measured on {meta.get('device_name')!r} "
        f"({meta.get('date')}, {meta.get('statistic')}, timed: "
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
    (args.out / f"batch_times_vs_profile_cpu{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
