"""Micro-benchmark of the sampler (``nova.runtime.sampler``) at batch 1, 8 and 64 over a 49,153-
token vocabulary (the demo model's logits width), against the per-row sampler it replaced
(``reference_sample`` below: main before the batched sampler, kept here as the baseline).

Scenarios: greedy; temperature + top-p 0.95 (seeded); temperature + top-k 50; sampling with
repetition/presence/frequency penalties, a logit bias and min_tokens; greedy with 5 top
logprobs; greedy under a random half allowed-token mask (structured output). The baseline has
no penalties, bias, logprobs or mask: those rows show only the new sampler. Two sources of
logits: ``model``, the demo language model's next-token logits at 64 positions of a text
(README.md), what a server samples from; ``randn``, ``randn * 4`` (a flat distribution: top-p
0.95 needs hundreds to thousands of tokens, the top-p fallback's worst case). The mask is a
random half of the vocabulary (the worst case for a branchy masked fill).

Writes ``benchmarks/results/sampler_cpu.{json,md}``: median microseconds per call over
``--repeats`` calls after a warm-up, the machine, torch threads and load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nova.runtime.sampler import make_generator, make_history, sample_batch  # noqa: E402
from nova.sampling_params import SamplingParams  # noqa: E402

VOCAB = 49153
BATCHES = (1, 8, 64)


def reference_filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The replaced sampler's per-row filter (temperature, top-k, full-sort top-p)."""
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop[0] = False
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def reference_sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list
) -> list[int]:
    """The replaced sampler: argmax for all rows, then a Python loop over sampled rows."""
    greedy = logits.argmax(-1).tolist()
    out: list[int] = []
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.is_greedy:
            out.append(int(greedy[row]))
            continue
        probs = reference_filtered_probs(logits[row].cpu(), p)
        out.append(int(torch.multinomial(probs, 1, generator=gen).item()))
    return out


SCENARIOS: dict[str, tuple[SamplingParams, bool, bool]] = {
    # name: (params, baseline supports it, random half mask)
    "greedy": (SamplingParams(), True, False),
    "temp 0.8 top_p 0.95": (SamplingParams(temperature=0.8, top_p=0.95, seed=1), True, False),
    "temp 0.8 top_k 50": (SamplingParams(temperature=0.8, top_k=50, seed=1), True, False),
    "penalties+bias+min_tokens": (
        SamplingParams(
            temperature=0.8,
            top_p=0.95,
            seed=1,
            repetition_penalty=1.1,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            logit_bias=((11, 5.0), (12, -5.0)),
            min_tokens=4,
            max_tokens=1000,
        ),
        False,
        False,
    ),
    "greedy + 5 logprobs": (SamplingParams(logprobs=5), False, False),
    "greedy + half mask": (SamplingParams(), False, True),
}


def model_logits(rows: int) -> torch.Tensor:
    """The demo LM's next-token logits at ``rows`` positions of README.md (float32)."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from nova.models.demo import build_demo_model

    path = build_demo_model()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok((ROOT / "README.md").read_text()[:6000], return_tensors="pt")["input_ids"][:, :512]
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    step = max(1, logits.shape[0] // rows)
    return logits[step - 1 :: step][:rows].contiguous()


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1e6 * statistics.median(times), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = round(os.getloadavg()[0], 2)
    gen = torch.Generator().manual_seed(0)
    sources = {
        "model": model_logits(max(BATCHES)),
        "randn": torch.randn(max(BATCHES), VOCAB, generator=gen) * 4,
    }
    rows = []
    for (source, all_logits), batch in itertools.product(sources.items(), BATCHES):
        logits = all_logits[:batch]
        prompt = torch.randint(0, VOCAB, (512,), generator=gen).tolist()
        words = (VOCAB + 31) // 32
        half_mask = torch.randint(-(2**31), 2**31 - 1, (batch, words), dtype=torch.int32)
        for name, (params, baseline_ok, masked) in SCENARIOS.items():
            ps = [params] * batch
            gens = [make_generator(q) for q in ps]
            hists = [make_history(q, prompt, VOCAB) for q in ps]
            for h in hists:
                for t in prompt[:100]:  # 100 output tokens so far
                    if h is not None:
                        h.append(t)
            mask = half_mask if masked else None

            def new(ps=ps, gens=gens, hists=hists, mask=mask, logits=logits):
                return sample_batch(logits, ps, gens, allowed_token_bitmask=mask, histories=hists)

            row = {
                "logits": source,
                "batch": batch,
                "scenario": name,
                "new_us": _median_us(new, args.repeats),
            }
            if baseline_ok:
                row["reference_us"] = _median_us(
                    lambda ps=ps, gens=gens, logits=logits: reference_sample(logits, ps, gens),
                    args.repeats,
                )
                row["speedup"] = round(row["reference_us"] / row["new_us"], 2)
            rows.append(row)
            print(row, flush=True)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min": [load_before, round(os.getloadavg()[0], 2)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampler_cpu.json").write_text(
        json.dumps({"machine": machine, "vocab": VOCAB, "rows": rows}, indent=1) + "\n"
    )
    lines = [
        "# Sampler micro-benchmark (CPU)",
        "",
        f"Machine: {machine}. Vocabulary {VOCAB}; median of {args.repeats} calls after a "
        "warm-up; `reference` is the per-row sampler the batched one replaced (no penalties, "
        "bias, logprobs or mask: blank there).",
        "",
        "| logits | batch | scenario | new µs | reference µs | speed-up |",
        "|---|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['logits']} | {r['batch']} | {r['scenario']} | {r['new_us']} | "
        f"{r.get('reference_us', '')} | {r.get('speedup', '')} |"
        for r in rows
    ]
    (args.out / "sampler_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
