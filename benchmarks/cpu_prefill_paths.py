"""The ``cpu`` attention backend's prefill paths, whole prefill forwards, interleaved: ``amx``
(Nova's C++ kernel on AMX tiles, reading the paged cache in place; where the CPU has AMX),
``causal_sdpa`` (PyTorch's causal flash kernel on key-aligned queries) and ``tiled`` (score
tiles: two ``bmm``s and the C++ prefix softmax each), and which one ``auto`` picks.

Peer model (``peer_model.py``, SmolLM2-135M shapes) in bf16 (``--dtype``), ``--threads`` intra-op
threads, ``ModelRunner.forward`` wall time of one prefill batch per shape: fresh prompts (a wave of
the served benchmark's concurrency-32 prompts, 6 x 320 tokens in one 2,048-token step; 26 x 78 chat
prompts; one 2,000-token prompt), prompts on a cached prefix (a chat template's 64 tokens; and the
served benchmark's concurrency-32 wave with the template's 16 tokens cached, 32 x 62), and one chunk
on a long cached prefix (where ``auto`` keeps the tiled path unless it takes ``amx``).
Median of ``--rounds`` rounds, the paths alternating within each.

Writes ``benchmarks/results/cpu_prefill_paths{--tag}.{json,md}`` with the machine and its load.
Usage: ``.venv/bin/python benchmarks/cpu_prefill_paths.py [--threads 2] [--rounds 5]
[--dtype bfloat16|float32] [--tag _amd]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from nova.models.loader import load_model
from nova.runtime.attention_cpu import CpuPagedAttention
from nova.runtime.forward_batch import SeqInput
from nova.runtime.runner import CacheConfig, ModelRunner

# (sequences, new tokens each, cached tokens each)
SHAPES = ((6, 320, 0), (26, 78, 0), (1, 2000, 0), (8, 256, 64), (32, 62, 16), (1, 256, 2048))
PATHS = ("tiled", "causal_sdpa", "amx")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the peer text model (peer_model.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--tag", default="", help="results file suffix (e.g. the machine)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    from kernel_bench import machine_line, run_record, write_results
    from peer_model import export_text_model

    torch.set_num_threads(args.threads)
    model = args.model or str(export_text_model())
    loaded = load_model(model, "auto", dtype, "cpu", 0)
    runner = ModelRunner(loaded, CacheConfig(num_blocks=2048))
    paths = [
        p for p in PATHS if p != "amx" or (CpuPagedAttention().amx and dtype == torch.bfloat16)
    ]
    load0 = os.getloadavg()[0]
    times: dict[tuple[int, str], list[float]] = {}
    picks = {}
    with torch.inference_mode():
        for rnd in range(args.rounds + 1):  # (round 0 warms up: oneDNN's primitives, packing)
            for i, (seqs, new, cached) in enumerate(SHAPES):
                per_seq = -(-(new + cached) // runner.block_size)
                batch = [
                    SeqInput(
                        [(7919 * s + 31 * j) % 40000 + 100 for j in range(new)],
                        cached,
                        list(range(s * per_seq, (s + 1) * per_seq)),
                    )
                    for s in range(seqs)
                ]
                for path in paths:
                    backend = CpuPagedAttention(prefill=path)
                    runner.attention = backend
                    loaded.model.decoder.set_attention_backend(backend)
                    t0 = time.perf_counter()
                    runner.forward(batch)
                    if rnd:
                        times.setdefault((i, path), []).append(time.perf_counter() - t0)
                picks[i] = CpuPagedAttention().prefill_path(new, new + cached, dtype, 64)
    rows: list[dict[str, Any]] = []
    for i, (seqs, new, cached) in enumerate(SHAPES):
        med = {p: statistics.median(times[(i, p)]) * 1e3 for p in paths}
        row: dict[str, Any] = {"sequences": seqs, "new_tokens": new, "cached_tokens": cached}
        for p in paths:
            row[f"{p}_ms"] = round(med[p], 1)
            row[f"{p}_runs_ms"] = [round(t * 1e3, 1) for t in times[(i, p)]]
        row["flash_speedup_over_tiled"] = round(med["tiled"] / med["causal_sdpa"], 2)
        if "amx" in med:
            row["amx_speedup_over_best_other"] = round(
                min(med["tiled"], med["causal_sdpa"]) / med["amx"], 2
            )
        row["auto_picks"] = picks[i]
        rows.append(row)
        print(rows[-1], flush=True)
    result = run_record(args, load0, model=model, dtype=args.dtype, rows=rows)
    lines = [
        "# CPU prefill attention paths: the AMX kernel, the causal flash path, the tiled path "
        "(whole forwards)",
        "",
        f"{machine_line(result)} Peer model in {args.dtype}, "
        f"`ModelRunner.forward` wall time, median of {args.rounds} rounds (paths alternating). "
        "`benchmarks/cpu_prefill_paths.py`.",
        "",
        "| sequences x new tokens | cached each | tiled ms | causal flash ms | flash speed-up "
        "| AMX kernel ms | AMX speed-up over the faster other | auto |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['sequences']} x {r['new_tokens']} | {r['cached_tokens']} | {r['tiled_ms']} | "
        f"{r['causal_sdpa_ms']} | {r['flash_speedup_over_tiled']}x | {r.get('amx_ms', '-')} | "
        f"{str(r['amx_speedup_over_best_other']) + 'x' if 'amx_ms' in r else '-'} | "
        f"{r['auto_picks']} |"
        for r in rows
    ]
    write_results(args.out, f"cpu_prefill_paths{args.tag}", result, lines)


if __name__ == "__main__":
    main()
