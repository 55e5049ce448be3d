"""Prefill and decode throughput of Nova's runtime vs transformers ``generate``, same prompts.

For each batch size B (default 1, 8, 32) both run the same B chat prompts (fixed length,
``--prompt-tokens``) and generate exactly ``--decode-tokens`` tokens (EOS ignored). Nova's side
is the bare runtime, no scheduler or worker threads: one ``ModelRunner.forward`` over all B
prompts, then one batched decode step per token, greedy sampling as the engine does it:
- prefill tokens/s = B * prompt_tokens / time to the first token (one batched prefill);
- decode tokens/s  = B * (decode_tokens - 1) / time from the first token to the last.
transformers is timed as generate(max_new_tokens=1) for prefill and the difference to
generate(max_new_tokens=decode_tokens) for decode (left padding is not needed: equal lengths).
Results go to benchmarks/results/runtime_<device>.json and .md, with the machine described.

Usage: .venv/bin/python benchmarks/runtime_throughput.py [--batch-sizes 1 8 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from nova.models.loader import load_model
from nova.profiling.device import device_name
from nova.runtime.forward_batch import SeqInput
from nova.runtime.runner import CacheConfig, ModelRunner
from nova.runtime.sampler import sample
from nova.sampling_params import SamplingParams

QUESTIONS = [
    "Explain how a bicycle stays upright while moving.",
    "Write a short note reminding a friend about dinner on Friday.",
    "What are three tips for keeping a houseplant alive?",
    "Describe the water cycle to a ten year old.",
    "Summarise why the sky looks blue during the day.",
    "List the steps to make a cup of green tea.",
    "Why do cats purr? Give two possible reasons.",
    "How would you explain recursion to a new programmer?",
]


def make_prompts(tokenizer, batch: int, prompt_tokens: int) -> list[list[int]]:
    """``batch`` different chat prompts, each cut/padded with text to exactly prompt_tokens."""
    prompts = []
    for i in range(batch):
        text = " ".join(QUESTIONS[(i + j) % len(QUESTIONS)] for j in range(40))
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=False
        )
        if hasattr(ids, "input_ids") or isinstance(ids, dict):
            ids = ids["input_ids"]
        prompts.append(list(ids)[:prompt_tokens])
    return prompts


def time_nova(
    runner: ModelRunner, prompts: list[list[int]], decode_tokens: int
) -> tuple[float, float]:
    """(prefill s, decode s): one batched prefill of every prompt to its first token, then
    ``decode_tokens - 1`` batched decode steps (KV blocks grown per step, as the engine does)."""
    params = [SamplingParams(max_tokens=decode_tokens, ignore_eos=True)] * len(prompts)
    generators = [None] * len(prompts)
    bm = runner.block_manager
    ids = [f"b{i}" for i in range(len(prompts))]
    outputs: list[list[int]] = []
    try:
        start = time.perf_counter()
        seqs = [SeqInput(p, 0, bm.allocate(rid, len(p))) for rid, p in zip(ids, prompts)]
        outputs = [[t] for t in sample(runner.forward(seqs), params, generators)]
        first_token = time.perf_counter()
        for _ in range(decode_tokens - 1):
            seqs = []
            for rid, p, out in zip(ids, prompts, outputs):
                context = len(p) + len(out)
                bm.grow(rid, context)
                seqs.append(SeqInput([out[-1]], context - 1, bm.block_table(rid)))
            for out, tok in zip(outputs, sample(runner.forward(seqs), params, generators)):
                out.append(tok)
        last_token = time.perf_counter()
    finally:
        for rid in ids:
            bm.free(rid)
    assert all(len(out) == decode_tokens for out in outputs)
    return first_token - start, last_token - first_token


def time_hf(hf, prompts: list[list[int]], decode_tokens: int) -> tuple[float, float]:
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw
            )
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - start

    prefill = run(1)
    return prefill, run(decode_tokens) - prefill


def machine() -> dict:
    info = {
        "cpu": device_name("cpu"),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = device_name("cuda:0")
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    loaded = load_model(args.model)
    runner = ModelRunner(loaded, CacheConfig(block_size=16))
    cls = LlavaForConditionalGeneration if loaded.model.is_multimodal else AutoModelForCausalLM
    hf = cls.from_pretrained(loaded.model_dir, dtype=torch.float32).eval()
    rows = []
    for batch in args.batch_sizes:
        prompts = make_prompts(loaded.tokenizer, batch, args.prompt_tokens)
        time_nova(runner, prompts[:1], 2)  # warm-up
        time_hf(hf, prompts[:1], 2)
        for system, fn in (
            ("nova", lambda: time_nova(runner, prompts, args.decode_tokens)),
            ("transformers", lambda: time_hf(hf, prompts, args.decode_tokens)),
        ):
            runs = [fn() for _ in range(args.repeats)]
            prefill_s = statistics.median(r[0] for r in runs)
            decode_s = statistics.median(r[1] for r in runs)
            row = {
                "system": system,
                "batch": batch,
                "prompt_tokens": args.prompt_tokens,
                "decode_tokens": args.decode_tokens,
                "prefill_s": round(prefill_s, 4),
                "decode_s": round(decode_s, 4),
                "prefill_tok_s": round(batch * args.prompt_tokens / prefill_s, 1),
                "decode_tok_s": round(batch * (args.decode_tokens - 1) / decode_s, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    report = {
        "benchmark": "runtime_throughput",
        "model": str(args.model),
        "dtype": "float32",
        "repeats": args.repeats,
        "machine": machine(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"runtime_{device}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Runtime throughput: {args.model} ({device})",
        "",
        f"Machine: {report['machine']}",
        "",
        f"Prompts of {args.prompt_tokens} tokens, {args.decode_tokens} generated tokens, "
        f"fp32, median of {args.repeats} runs.",
        "",
        "| batch | system | prefill tok/s | decode tok/s | prefill s | decode s |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['system']} | {r['prefill_tok_s']} | {r['decode_tok_s']} "
            f"| {r['prefill_s']} | {r['decode_s']} |"
        )
    (args.out / f"runtime_{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
