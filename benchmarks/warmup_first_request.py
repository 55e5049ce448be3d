"""The start-up warm-up (``EngineConfig.warmup``, ``nova.runtime.warmup``): what it costs at
start-up and what it saves the first requests, with it on (the default) and off
(``--no-warmup``), interleaved.

Each variant runs in its own process (weight packing is per process), in turn, for
``--rounds`` rounds: the demo model on this CPU, its default dtype and policy. After start-up
the engine serves the same pair of requests ``--bursts`` times, one pair after the other: an
agent step (a 1080p screenshot and an instruction) and a text question, sent together, 8
output tokens each. Per burst: TTFT of each request and the burst's wall time. The first burst
is the one a server's first user meets; the later ones show the steady state.
Writes ``benchmarks/results/warmup_first_request_cpu.{json,md}`` with the machine and its load.

Usage: ``python benchmarks/warmup_first_request.py [--rounds 2] [--bursts 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("warm-up on", "warm-up off")


def child(warmup: bool, bursts: int) -> None:
    from nova.config import EngineConfig
    from nova.engine.llm_engine import LLMEngine
    from nova.metrics import request_metrics
    from nova.models.inputs import chat_messages
    from nova.runtime.cpu_linear import packed_weight_bytes
    from nova.sampling_params import SamplingParams
    from nova.screenshots import make_screenshot

    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(model="demo", warmup=warmup))
    startup_s = time.perf_counter() - t0
    report = engine.warm_up_report
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    out: dict = {
        "startup_s": startup_s,
        "warm_up": None if report is None else report.line(),
        "policy": engine.config.resolved_policy,
        "dtype": str(engine.loaded.dtype),
        "bursts": [],
    }
    for b in range(bursts):
        # a new screenshot and question each burst: no cache hit makes a later burst cheaper
        prompts = [
            engine.processor.from_chat(
                chat_messages(f"Step {b}: open the Wi-Fi settings.", num_images=1),
                [make_screenshot(seed=100 + b)],
            ),
            engine.processor.from_chat(chat_messages(f"Question {b}: name three colors.")),
        ]
        t = time.perf_counter()
        reqs = engine.run_all(prompts, [params, params], [f"img{b}", f"txt{b}"])
        wall = time.perf_counter() - t
        ttft = [request_metrics(r).ttft_s for r in reqs]
        out["bursts"].append({"wall_s": wall, "ttft_image_s": ttft[0], "ttft_text_s": ttft[1]})
    out["packed_weight_bytes"] = packed_weight_bytes(engine.loaded.model)
    out["reported_packed_bytes"] = engine.runner.memory.weights_packed_bytes
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.child:
        child(args.child == "on", args.bursts)
        return
    from runtime_throughput import machine

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    loads = []
    for _ in range(args.rounds):
        for variant in VARIANTS:
            loads.append(round(os.getloadavg()[0], 2))
            flag = "on" if variant == "warm-up on" else "off"
            proc = subprocess.run(
                [sys.executable, __file__, "--child", flag, "--bursts", str(args.bursts)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(variant, runs[variant][-1], flush=True)
    result = {
        "benchmark": "warmup_first_request",
        "machine": machine(),
        "loadavg_1min_at_each_start": loads,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "warmup_first_request_cpu"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    first = runs[VARIANTS[0]][0]
    lines = [
        "# Start-up warm-up: its cost at start-up, the first requests' latency with it and without",
        "",
        f"Machine: {result['machine']}; 1-min load average at each start: {loads}. The demo "
        f"model, {first['dtype']}, policy {first['policy']}; each variant in its own process, "
        "in turn (on, off, on, off, ...). Each burst: an agent step (1080p screenshot) and a "
        "text question sent together, 8 output tokens each; a new screenshot and question "
        "every burst. Written by `benchmarks/warmup_first_request.py`.",
        "",
        "| variant | round | start-up s | warm-up | burst | wall ms | TTFT ms, screenshot "
        "| TTFT ms, text |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        for r, run in enumerate(runs[variant]):
            for b, burst in enumerate(run["bursts"]):
                lines.append(
                    f"| {variant} | {r} | {run['startup_s']:.2f} | {run['warm_up'] or '-'} "
                    f"| {b} | {1e3 * burst['wall_s']:.0f} | {1e3 * burst['ttft_image_s']:.0f} "
                    f"| {1e3 * burst['ttft_text_s']:.0f} |"
                )
    packed = {v: [run["packed_weight_bytes"] / 2**20 for run in runs[v]] for v in VARIANTS}
    lines += [
        "",
        f"Packed weights after the last burst (MiB, each round): {packed}. Without the "
        "warm-up the first requests pack them; the start-up memory report then shows none.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
