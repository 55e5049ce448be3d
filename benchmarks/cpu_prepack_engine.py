"""Prepacked oneDNN linear layers in the engine: decode step and prefill batch times with the
packed weights (the default) and with ``NOVA_CPU_PREPACK=0`` (``F.linear``), interleaved.

Each variant runs in its own process (the switch is read once per process), in turn, for
``--rounds`` rounds: the demo model on this CPU, policy ``sequential`` (one batch at a time),
for each batch size ``k`` a batch of ``k`` text prompts of ~230 tokens prefilled together, then
decoded for 32 tokens. Per batch size: the median decode step of ``k`` sequences and the
prefill batch's time (wall ms, from ``engine_latency.BatchTrace``); then one vision batch of
8 screenshots (the vision tower's linear layers are packed too).
Writes ``benchmarks/results/cpu_prepack_engine_<dtype>.{json,md}``.

``--dtypes``: instead, the packed path in float32 and in bfloat16 (what ``--dtype auto`` runs
a bfloat16 checkpoint in on a CPU with bfloat16 support), interleaved the same way; writes
``benchmarks/results/cpu_prepack_engine_dtypes.{json,md}``.

Usage: ``python benchmarks/cpu_prepack_engine.py [--dtype float32 | --dtypes] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BATCHES = (1, 2, 4, 8, 16)
VISION_IMAGES = 8
PROMPT = "Describe the next step of the agent on the settings page and click the button. " * 12


def child(dtype: str) -> None:
    from engine_latency import BatchTrace

    from nova.config import EngineConfig
    from nova.engine.llm_engine import LLMEngine
    from nova.models.inputs import chat_messages
    from nova.sampling_params import SamplingParams
    from nova.screenshots import make_screenshot

    engine = LLMEngine(
        EngineConfig(
            model="demo",
            policy="sequential",
            dtype=dtype,
            prefix_caching=False,
            encoder_cache_bytes=0,
        )
    )
    trace = BatchTrace(engine)
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    engine.run_all(  # warm-up (first calls pack the weights)
        [engine.processor.from_chat(chat_messages(PROMPT))], [params], ["warm"]
    )
    trace.take()
    out = {}
    for k in BATCHES:
        prompts = [engine.processor.from_chat(chat_messages(f"{i} {PROMPT}")) for i in range(k)]
        engine.run_all(prompts, [params] * k, [f"k{k}r{i}" for i in range(k)])
        rows = trace.take()
        decode = [e - s for stage, s, e, n, _ in rows if stage == "decode" and n == k]
        prefill = [e - s for stage, s, e, n, _ in rows if stage == "prefill"]
        out[k] = {
            "decode_step_ms": 1e3 * statistics.median(decode),
            "prefill_ms": 1e3 * sum(prefill),
            "prompt_tokens": sum(len(p.token_ids) for p in prompts),
        }
    # a vision batch: 8 requests with a 1080p screenshot each (one vision batch of 8 images)
    images = [make_screenshot(seed=i) for i in range(VISION_IMAGES)]
    prompts = [
        engine.processor.from_chat(chat_messages("Click OK.", num_images=1), [image])
        for image in images
    ]
    engine.run_all(prompts, [params] * VISION_IMAGES, [f"v{i}" for i in range(VISION_IMAGES)])
    vision = [e - s for stage, s, e, n, _ in trace.take() if stage == "vision"]
    out["vision"] = {"batches": len(vision), "vision_ms": 1e3 * sum(vision)}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtypes", action="store_true", help="float32 vs bfloat16, both packed")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.child:
        child(args.dtype)
        return
    # variant -> (dtype, NOVA_CPU_PREPACK)
    variants = (
        {"float32": ("float32", "1"), "bfloat16": ("bfloat16", "1")}
        if args.dtypes
        else {"packed": (args.dtype, "1"), "F.linear": (args.dtype, "0")}
    )
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    loads = []
    for _ in range(args.rounds):
        for variant, (dtype, prepack) in variants.items():
            env = dict(os.environ, NOVA_CPU_PREPACK=prepack)
            loads.append(round(os.getloadavg()[0], 2))
            proc = subprocess.run(
                [sys.executable, __file__, "--child", "--dtype", dtype],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(variant, runs[variant][-1], flush=True)
    if args.dtypes:
        write(
            args.out / "cpu_prepack_engine_dtypes",
            {"benchmark": "cpu_prepack_engine --dtypes"},
            runs,
            loads,
            "# Packed oneDNN linear layers in float32 and in bfloat16 in the engine (demo model)",
            "(float32, bfloat16, float32, ...); one figure per round. The demo checkpoint is "
            "float32; bfloat16 is what `--dtype auto` runs a bfloat16 checkpoint in on this CPU. "
            "Written by `benchmarks/cpu_prepack_engine.py --dtypes`.",
        )
        return
    write(
        args.out / f"cpu_prepack_engine_{args.dtype}",
        {"benchmark": "cpu_prepack_engine", "dtype": args.dtype},
        runs,
        loads,
        f"# Prepacked oneDNN linear vs F.linear in the engine ({args.dtype}, demo model)",
        "(packed, F.linear, packed, ...); one figure per round. Written by "
        "`benchmarks/cpu_prepack_engine.py`.",
    )


def write(
    stem: Path, head: dict, runs: dict[str, list[dict]], loads: list, title: str, how: str
) -> None:
    """``stem``.json (``head``, the machine, the loads, the runs) and ``stem``.md: the two
    variants' decode step and prefill times per batch size and their vision batches."""
    from runtime_throughput import machine

    a, b = runs  # the two variants, in the order they ran
    result = {**head, "machine": machine(), "loadavg_1min_at_each_start": loads, "runs": runs}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")

    def cells(variant: str, k: int, key: str) -> str:
        return " / ".join(f"{r[str(k)][key]:.0f}" for r in runs[variant])

    lines = [
        title,
        "",
        f"Machine: {result['machine']}; 1-min load average at each start: {loads}. Policy "
        "`sequential`; per batch size k: k text prompts prefilled in one batch, then 32 decode "
        f"steps; each variant in its own process, in turn {how}",
        "",
        f"| k | prompt tokens | decode step ms, {a} | decode step ms, {b} | prefill ms, {a} "
        f"| prefill ms, {b} |",
        "|---:|---:|---|---|---|---|",
    ]
    for k in BATCHES:
        tokens = runs[a][0][str(k)]["prompt_tokens"]
        lines.append(
            f"| {k} | {tokens} | {cells(a, k, 'decode_step_ms')} | {cells(b, k, 'decode_step_ms')} "
            f"| {cells(a, k, 'prefill_ms')} | {cells(b, k, 'prefill_ms')} |"
        )
    vision = " / ".join(
        f"{x['vision']['vision_ms']:.0f} ms {a}, {y['vision']['vision_ms']:.0f} ms {b}"
        for x, y in zip(runs[a], runs[b])
    )
    lines += [
        "",
        f"Vision encoder, {VISION_IMAGES} requests with a 1080p screenshot each (one vision "
        f"batch of {VISION_IMAGES} images, per round): {vision}.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
