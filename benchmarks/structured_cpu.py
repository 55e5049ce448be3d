"""Cost of structured output on the CPU: decode TPOT with a JSON-schema grammar vs without.

The same chat prompt is sent as a burst of B requests (B in ``--batch-sizes``) through Nova's
engine on the demo model, in two conditions that produce the same number of tokens:

- ``unconstrained``: free text, EOS ignored, ``--max-tokens`` tokens;
- ``constrained``: a JSON schema (an array of at least 64 objects with a bounded string, an
  enum, a bounded integer and a boolean: it cannot be finished within ``--max-tokens``, so the
  grammar is live on every step), ``--max-tokens`` tokens; the grammar is compiled once, before
  timing (as the server's cache would have it), each request gets its own matcher.

Rounds interleave the conditions (ABBA order) so machine load drifts hit both alike; each
round's figure is the mean TPOT over the burst's requests; the table gives the median over
rounds and the overhead = constrained / unconstrained - 1. The per-step grammar work (mask fill
and apply) is also timed in isolation. The 1-minute load average is recorded before and after.

Results: benchmarks/results/structured_cpu.{json,md}.
Usage: .venv/bin/python benchmarks/structured_cpu.py [--batch-sizes 1 4 8] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from runtime_throughput import machine

from nova.config import EngineConfig
from nova.engine.llm_engine import LLMEngine
from nova.metrics import request_metrics
from nova.models.inputs import chat_messages
from nova.runtime.sampler import sample
from nova.sampling_params import SamplingParams
from nova.structured import GrammarSpec
from nova.structured.matcher import fill_bitmasks

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "kind": {"enum": ["button", "link", "input", "text"]},
                    "x": {"type": "integer", "minimum": 0, "maximum": 1920},
                    "visible": {"type": "boolean"},
                },
                "required": ["name", "kind", "x", "visible"],
            },
        }
    },
    "required": ["items"],
}
PROMPT = "List the elements on the screen as JSON."


def run_burst(engine: LLMEngine, prompt, params: SamplingParams, batch: int) -> dict:
    reqs = engine.run_all([prompt] * batch, [params] * batch)
    metrics = [request_metrics(r) for r in reqs]
    bad = [r.request_id for r in reqs if len(r.output_token_ids) != params.max_tokens]
    if bad:
        raise RuntimeError(f"requests {bad} did not produce {params.max_tokens} tokens")
    tpots = [m.tpot_s for m in metrics if m.tpot_s is not None]
    return {"tpot_ms": 1000 * statistics.mean(tpots), "e2e_s": max(m.e2e_s or 0 for m in metrics)}


def grammar_step_cost(engine: LLMEngine, grammar, batch: int, steps: int) -> dict:
    """Per decode step, outside the engine: fill the batch's masks, sample with the mask,
    advance the matchers (what the executor adds to a constrained step), on random logits."""
    vocab = engine.runner.vocab_size
    matchers = [grammar.new_matcher() for _ in range(batch)]
    params = [SamplingParams(max_tokens=steps)] * batch
    gen = torch.Generator().manual_seed(0)
    fill_s, sample_masked_s, sample_plain_s = [], [], []
    for _ in range(steps):
        logits = torch.randn(batch, vocab, generator=gen) * 4
        t0 = time.perf_counter()
        mask = fill_bitmasks(matchers, vocab)
        t1 = time.perf_counter()
        toks = sample(logits, params, [None] * batch, allowed_token_bitmask=torch.from_numpy(mask))
        t2 = time.perf_counter()
        sample(logits, params, [None] * batch)
        t3 = time.perf_counter()
        for m, t in zip(matchers, toks):
            if not m.consume(t):
                raise RuntimeError(m.error)
        fill_s.append(t1 - t0)
        sample_masked_s.append(t2 - t1)
        sample_plain_s.append(t3 - t2)
    med = statistics.median
    return {
        "fill_ms": 1000 * med(fill_s),
        "masked_sample_ms": 1000 * med(sample_masked_s),
        "plain_sample_ms": 1000 * med(sample_plain_s),
        "added_ms": 1000 * (med(fill_s) + med(sample_masked_s) - med(sample_plain_s)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    load_before = round(os.getloadavg()[0], 2)
    engine = LLMEngine(EngineConfig(model=args.model))
    prompt = engine.processor.from_chat(chat_messages(PROMPT))
    compiler = engine.processor.grammar_compiler
    assert compiler is not None
    t0 = time.perf_counter()
    grammar = compiler.compile(GrammarSpec.json_schema(SCHEMA))
    compile_s = time.perf_counter() - t0
    conditions = {
        "unconstrained": SamplingParams(max_tokens=args.max_tokens, ignore_eos=True),
        "constrained": SamplingParams(max_tokens=args.max_tokens, structured_output=grammar),
    }
    run_burst(engine, prompt, conditions["constrained"], 1)  # warm-up (lazy lexer states too)
    run_burst(engine, prompt, conditions["unconstrained"], 1)
    rows = []
    for batch in args.batch_sizes:
        per: dict[str, list[float]] = {k: [] for k in conditions}
        for r in range(args.rounds):
            order = list(conditions) if r % 2 == 0 else list(reversed(conditions))
            for name in order:
                per[name].append(run_burst(engine, prompt, conditions[name], batch)["tpot_ms"])
        unc, con = statistics.median(per["unconstrained"]), statistics.median(per["constrained"])
        rows.append(
            {
                "batch": batch,
                "unconstrained_tpot_ms": round(unc, 2),
                "constrained_tpot_ms": round(con, 2),
                "overhead": round(con / unc - 1, 4),
                "rounds_unconstrained_ms": [round(x, 2) for x in per["unconstrained"]],
                "rounds_constrained_ms": [round(x, 2) for x in per["constrained"]],
                "grammar_step": {
                    k: round(v, 3) for k, v in grammar_step_cost(engine, grammar, batch, 48).items()
                },
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    load_after = round(os.getloadavg()[0], 2)
    report = {
        "machine": machine(),
        "loadavg_1min_before_after": [load_before, load_after],
        "model": args.model,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "schema": SCHEMA,
        "first_compile_s": round(compile_s, 3),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Structured output on the CPU: TPOT with a JSON-schema grammar vs without",
        "",
        f"Machine: {report['machine']}; 1-minute load average before/after: "
        f"{load_before}/{load_after}. Model: {args.model}; {args.max_tokens} output tokens per "
        f"request; {args.rounds} interleaved rounds (ABBA); median of the rounds' mean TPOT. "
        f"First compile of the schema (includes building llguidance's tokenizer): "
        f"{compile_s:.2f} s. Produced by `benchmarks/structured_cpu.py`.",
        "",
        "| batch | TPOT unconstrained (ms) | TPOT constrained (ms) | overhead | grammar step: "
        "mask fill (ms) | masked sample (ms) | plain sample (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        g = row["grammar_step"]
        lines.append(
            f"| {row['batch']} | {row['unconstrained_tpot_ms']:.1f} | "
            f"{row['constrained_tpot_ms']:.1f} | {100 * row['overhead']:+.1f}% | "
            f"{g['fill_ms']:.3f} | {g['masked_sample_ms']:.3f} | {g['plain_sample_ms']:.3f} |"
        )
    lines += [
        "",
        "The grammar-step columns time the executor's added work alone, on random logits: "
        "filling the batch's allowed-token bitmask (llguidance) and sampling with the mask "
        "(`nova.runtime.sampler.sample(..., allowed_token_bitmask=...)`) vs without.",
        "",
    ]
    (args.out / "structured_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
