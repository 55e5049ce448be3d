"""Nova's fused elementwise CPU kernels against the eager PyTorch ops they replace, interleaved.

Two levels, both in one process with the kernels switched per call (``NOVA_CPU_KERNELS`` is
read at every call of ``nova.runtime.cpu_fused.kernels_for``; decode attention keeps its own
kernel in both arms, so what differs is the elementwise work and, in prefill, the causal
softmax of the attention's score tiles, ``prefix_softmax_``). Since the committed results were
taken, the same switch also turns the greedy argmax, temperature sampling and KV-cache write
kernels on and off, and prompts go through PyTorch's causal flash kernel in both arms (no
``prefix_softmax_``); a new run measures that mix:

- per piece (RMSNorm, residual add + RMSNorm, SiLU-and-multiply, RoPE on the q/k/v view), on
  the peer model's shapes (hidden 576, MLP 1536, 9 + 3 heads of 64) for a decode step's rows
  (32) and a prefill chunk's (2,048);
- the decoder: prefill forwards (26 prompts x 78 tokens, as one wave of the served benchmark's
  concurrency-32 prompts; 4 x 512) and batched decode steps (32 and 64 sequences after
  100-token prompts) of the peer model (``peer_model.py``), through ``ModelRunner.forward``
  and greedy sampling, kernels on and off alternating, median of ``--rounds``.

Writes ``benchmarks/results/cpu_fused_elementwise.{json,md}`` with the machine and its load.
Usage: ``.venv/bin/python benchmarks/cpu_fused_elementwise.py [--threads 2] [--rounds 7]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nova.runtime import cpu_kernels

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 9, 3, 64


def set_kernels(on: bool) -> None:
    os.environ["NOVA_CPU_KERNELS"] = "1" if on else "0"


def eager_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
    return w * x32.to(x.dtype)


def eager_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def pieces(rows: int, dtype: torch.dtype) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (eager, kernel) on fresh inputs of the peer model's shapes."""
    k = cpu_kernels.load()
    assert k is not None
    x, r = torch.randn(rows, HIDDEN).to(dtype), torch.randn(rows, HIDDEN).to(dtype)
    w = torch.rand(HIDDEN).to(dtype)
    gu = torch.randn(rows, 2 * INTER).to(dtype)
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM).to(dtype)
    qk = qkv[:, : (HEADS + KV_HEADS) * HEAD_DIM].view(rows, HEADS + KV_HEADS, HEAD_DIM)
    cos, sin = torch.randn(rows, HEAD_DIM).to(dtype), torch.randn(rows, HEAD_DIM).to(dtype)
    return {
        "rms_norm": (lambda: eager_norm(x, w), lambda: k.rms_norm(x, w, 1e-5)),
        "add_rms_norm": (
            lambda: (x + r, eager_norm(x + r, w)),
            lambda: k.add_rms_norm(x, r, w, 1e-5),
        ),
        "silu_mul": (
            lambda: F.silu(gu[:, :INTER]) * gu[:, INTER:],
            lambda: k.silu_mul(gu),
        ),
        "rope": (
            lambda: eager_rope(qk, cos, sin),
            lambda: k.rope(qk, cos, sin),
        ),
    }


def time_call(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def piece_rows(dtype: torch.dtype, rounds: int) -> list[dict[str, Any]]:
    out = []
    for rows, calls in ((32, 400), (2048, 20)):
        for name, (eager, fused) in pieces(rows, dtype).items():
            eager(), fused()
            e, f = [], []
            for _ in range(rounds):
                e.append(time_call(eager, calls))
                f.append(time_call(fused, calls))
            e_us, f_us = statistics.median(e), statistics.median(f)
            out.append(
                {
                    "piece": name,
                    "rows": rows,
                    "dtype": str(dtype).removeprefix("torch."),
                    "eager_us": round(e_us, 1),
                    "kernel_us": round(f_us, 1),
                    "speedup": round(e_us / f_us, 2),
                }
            )
    return out


class Decoder:
    """The peer model behind ``ModelRunner`` with prefill and decode-step drivers."""

    def __init__(self, model: str, dtype: torch.dtype) -> None:
        from nova.models.loader import load_model
        from nova.runtime.runner import CacheConfig, ModelRunner

        self.runner = ModelRunner(
            load_model(model, "auto", dtype, "cpu", 0), CacheConfig(num_blocks=8192)
        )
        self.vocab = self.runner.vocab_size
        self.count = 0

    def prompts(self, batch: int, tokens: int) -> list[list[int]]:
        self.count += 1
        return [
            [(7919 * i + 31 * j + self.count) % (self.vocab - 200) + 100 for j in range(tokens)]
            for i in range(batch)
        ]

    def prefill(self, batch: int, tokens: int) -> float:
        from nova.runtime.forward_batch import SeqInput
        from nova.runtime.sampler import sample
        from nova.sampling_params import SamplingParams

        bm = self.runner.block_manager
        ids = [f"p{self.count}-{i}" for i in range(batch)]
        prompts = self.prompts(batch, tokens)
        params = [SamplingParams(max_tokens=1, ignore_eos=True)] * batch
        t0 = time.perf_counter()
        seqs = [SeqInput(p, 0, bm.allocate(rid, len(p))) for rid, p in zip(ids, prompts)]
        sample(self.runner.forward(seqs), params, [None] * batch)
        elapsed = time.perf_counter() - t0
        for rid in ids:
            bm.free(rid)
        return elapsed * 1e3

    def decode_session(self, batch: int, tokens: int) -> Callable[[], float]:
        """Prefill ``batch`` prompts once; the returned function runs one decode step (ms)."""
        from nova.runtime.forward_batch import SeqInput
        from nova.runtime.sampler import sample
        from nova.sampling_params import SamplingParams

        bm = self.runner.block_manager
        ids = [f"d{self.count}-{i}" for i in range(batch)]
        prompts = self.prompts(batch, tokens)
        params = [SamplingParams(max_tokens=1 << 20, ignore_eos=True)] * batch
        seqs = [SeqInput(p, 0, bm.allocate(rid, len(p))) for rid, p in zip(ids, prompts)]
        outs = [[t] for t in sample(self.runner.forward(seqs), params, [None] * batch)]

        def step() -> float:
            t0 = time.perf_counter()
            seqs = []
            for rid, p, out in zip(ids, prompts, outs):
                context = len(p) + len(out)
                bm.grow(rid, context)
                seqs.append(SeqInput([out[-1]], context - 1, bm.block_table(rid)))
            for out, tok in zip(outs, sample(self.runner.forward(seqs), params, [None] * batch)):
                out.append(tok)
            return (time.perf_counter() - t0) * 1e3

        return step


def decoder_rows(model: str, dtype: torch.dtype, rounds: int) -> list[dict[str, Any]]:
    dec = Decoder(model, dtype)
    cases: list[tuple[str, Callable[[], float]]] = [
        ("prefill 26 x 78", lambda: dec.prefill(26, 78)),
        ("prefill 4 x 512", lambda: dec.prefill(4, 512)),
    ]
    for batch in (32, 64):
        step = dec.decode_session(batch, 100)
        cases.append((f"decode step, {batch} sequences", lambda step=step: (step() + step()) / 2))
    out = []
    for name, fn in cases:
        for on in (False, True, False, True):  # warm both arms
            set_kernels(on)
            fn()
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for on in (False, True):
                set_kernels(on)
                times[on].append(fn())
        e_ms, f_ms = statistics.median(times[False]), statistics.median(times[True])
        out.append(
            {
                "case": name,
                "dtype": str(dtype).removeprefix("torch."),
                "eager_ms": round(e_ms, 2),
                "kernels_ms": round(f_ms, 2),
                "speedup": round(e_ms / f_ms, 3),
                "eager_all_ms": [round(t, 1) for t in times[False]],
                "kernels_all_ms": [round(t, 1) for t in times[True]],
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the peer text model (peer_model.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    from kernel_bench import machine_line, run_record, write_results
    from peer_model import export_text_model

    model = args.model or str(export_text_model())
    torch.set_num_threads(args.threads)
    if cpu_kernels.load() is None:
        raise SystemExit("Nova's CPU kernels did not build (see the log above)")
    load0 = os.getloadavg()[0]
    piece_table, decoder_table = [], []
    with torch.inference_mode():
        for name in args.dtypes:
            dtype = getattr(torch, name)
            piece_table += piece_rows(dtype, args.rounds)
            decoder_table += decoder_rows(model, dtype, args.rounds)
    set_kernels(True)
    result = run_record(args, load0, model=model, pieces=piece_table, decoder=decoder_table)
    lines = [
        "# Fused elementwise CPU kernels (and the prefill causal softmax) vs the eager ops they "
        "replace (interleaved)",
        "",
        f"{machine_line(result)} Peer model "
        f"(SmolLM2-135M shapes); median of {args.rounds} alternating rounds. "
        "`benchmarks/cpu_fused_elementwise.py`.",
        "",
        "## The decoder (ModelRunner.forward + greedy sampling)",
        "",
        "| case | dtype | eager ms | kernels ms | speed-up |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['case']} | {r['dtype']} | {r['eager_ms']} | {r['kernels_ms']} | {r['speedup']}x |"
        for r in decoder_table
    ]
    lines += [
        "",
        "## Per piece (one call, microseconds)",
        "",
        "| piece | rows | dtype | eager us | kernel us | speed-up |",
        "|---|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['piece']} | {r['rows']} | {r['dtype']} | {r['eager_us']} | {r['kernel_us']} | "
        f"{r['speedup']}x |"
        for r in piece_table
    ]
    write_results(args.out, "cpu_fused_elementwise", result, lines)


if __name__ == "__main__":
    main()
