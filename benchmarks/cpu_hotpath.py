"""Where a decode step's time goes on the CPU: thread CPU time per step and the op profile.

The peer workload's shape without the engine around it: ``--batch`` chat-length prompts
(``--prompt-tokens``) prefilled in one forward, then ``--steps`` batched decode steps through
``ModelRunner.forward`` and greedy sampling, on one intra-op thread by default. Thread CPU
time (``time.thread_time``) is what a step costs on one core whatever else runs on the machine,
so two code versions can be compared on a shared machine; wall time is printed beside it.
``--profile`` adds ``torch.profiler``'s op table (self CPU time, calls) over a few steps.

Run it against another checkout to compare before/after, interleaved:
  PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/cpu_hotpath.py --tag before
Writes nothing unless ``--out FILE`` (a JSON line per run is appended).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import nova
from nova.models.loader import load_model
from nova.runtime.forward_batch import SeqInput
from nova.runtime.runner import CacheConfig, ModelRunner
from nova.runtime.sampler import sample
from nova.sampling_params import SamplingParams


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    loaded = load_model(args.model, "auto", dtype, "cpu", 0)
    kwargs = {} if args.attention is None else {"attention_backend": args.attention}
    runner = ModelRunner(loaded, CacheConfig(num_blocks=4096), **kwargs)
    bm = runner.block_manager
    ids = [f"s{i}" for i in range(args.batch)]
    vocab = runner.vocab_size
    prompts = [
        [(7919 * i + 31 * j) % (vocab - 200) + 100 for j in range(args.prompt_tokens)]
        for i in range(args.batch)
    ]
    params = [SamplingParams(max_tokens=1 << 20, ignore_eos=True)] * args.batch
    generators = [None] * args.batch
    outputs: list[list[int]] = []

    def prefill() -> None:
        seqs = [SeqInput(p, 0, bm.allocate(rid, len(p))) for rid, p in zip(ids, prompts)]
        outputs[:] = [[t] for t in sample(runner.forward(seqs), params, generators)]

    def step() -> None:
        seqs = []
        for rid, p, out in zip(ids, prompts, outputs):
            context = len(p) + len(out)
            bm.grow(rid, context)
            seqs.append(SeqInput([out[-1]], context - 1, bm.block_table(rid)))
        for out, tok in zip(outputs, sample(runner.forward(seqs), params, generators)):
            out.append(tok)

    with torch.inference_mode():
        c0, w0 = time.thread_time(), time.perf_counter()
        prefill()
        prefill_cpu_s, prefill_wall_s = time.thread_time() - c0, time.perf_counter() - w0
        for _ in range(args.warmup):
            step()
        cpu_ms, wall_ms = [], []
        for _ in range(args.steps):
            c0, w0 = time.thread_time(), time.perf_counter()
            step()
            cpu_ms.append((time.thread_time() - c0) * 1e3)
            wall_ms.append((time.perf_counter() - w0) * 1e3)
        table = None
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile):
                    step()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    return {
        "tag": args.tag,
        "nova": str(Path(nova.__file__).parent),
        "dtype": args.dtype,
        "threads": args.threads,
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "prefill_cpu_s": round(prefill_cpu_s, 4),
        "prefill_wall_s": round(prefill_wall_s, 4),
        "decode_step_cpu_ms_median": round(statistics.median(cpu_ms), 3),
        "decode_step_cpu_ms_min": round(min(cpu_ms), 3),
        "decode_step_wall_ms_median": round(statistics.median(wall_ms), 3),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "profile": table,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the peer text model (peer_model.py)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attention", default=None, help="attention backend (default: auto)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.model is None:
        from peer_model import export_text_model

        args.model = str(export_text_model())
    result = run(args)
    table = result.pop("profile")
    print(json.dumps(result))
    if table:
        print(table)
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
