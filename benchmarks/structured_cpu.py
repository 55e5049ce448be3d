"""Cost of structured output on the CPU: decode TPOT with a JSON-schema grammar vs without.

The same chat prompt is sent as a burst of B requests (B in ``--batch-sizes``) through Nova's
engine on the demo model, in two conditions that produce the same number of tokens:

- ``unconstrained``: free text, EOS ignored, ``--max-tokens`` tokens;
- ``constrained``: a JSON schema (an array of at least 64 objects with a bounded string, an
  enum, a bounded integer and a boolean: it cannot be finished within ``--max-tokens``, so the
  grammar is live on every step), ``--max-tokens`` tokens; the grammar is compiled once, before
  timing (as the server's cache would have it), each request gets its own matcher.

Rounds interleave the conditions (ABBA order) so machine load drifts hit both alike; each
round's figures are the mean TPOT over the burst's requests and the process's CPU time per
output token; the table gives the medians over rounds and the overheads = constrained /
unconstrained - 1. The per-step grammar work (mask fill, masked vs plain sampling) is also timed
in isolation, in process CPU time with one torch thread and the engine stopped, which a loaded
machine inflates far less than wall time. The 1-minute load average is recorded before and
after.

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

import numpy as np
import torch
from runtime_throughput import machine

from nova.config import EngineConfig
from nova.engine.llm_engine import LLMEngine
from nova.metrics import request_metrics
from nova.models.inputs import chat_messages
from nova.runtime.sampler import sample, unpack_bitmask
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
    """One burst: mean TPOT (wall) and the process's CPU time per output token."""
    cpu0 = time.process_time()
    reqs = engine.run_all([prompt] * batch, [params] * batch)
    cpu_s = time.process_time() - cpu0
    metrics = [request_metrics(r) for r in reqs]
    bad = [r.request_id for r in reqs if len(r.output_token_ids) != params.max_tokens]
    if bad:
        raise RuntimeError(f"requests {bad} did not produce {params.max_tokens} tokens")
    tpots = [m.tpot_s for m in metrics if m.tpot_s is not None]
    return {
        "tpot_ms": 1000 * statistics.mean(tpots),
        "cpu_ms_per_token": 1000 * cpu_s / (batch * params.max_tokens),
    }


def _unpack_numpy(mask: np.ndarray, vocab: int) -> torch.Tensor:
    """bool [R, V] allowed, by numpy's unpackbits (one byte per token)."""
    bits = np.unpackbits(mask.view(np.uint8), axis=-1, bitorder="little")[:, :vocab]
    return torch.from_numpy(bits).bool()


def grammar_step_cost(engine: LLMEngine, grammar, batch: int, steps: int) -> dict:
    """Per decode step, outside the engine, on random logits and one torch thread, in CPU time
    of this thread (so other processes' load does not count): filling the batch's masks,
    sampling with the mask vs without (what the executor adds to a constrained step), and the
    mask unpacking alone, the sampler's unpack_bitmask vs numpy's unpackbits."""
    vocab = engine.runner.vocab_size
    matchers = [grammar.new_matcher() for _ in range(batch)]
    params = [SamplingParams(max_tokens=steps)] * batch
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cost: dict[str, list[float]] = {
        k: [] for k in ("fill", "masked_sample", "plain_sample", "unpack_sampler", "unpack_numpy")
    }

    def timed(name: str, fn):
        t0 = time.process_time()  # the engine is stopped: only this work (and its pool) runs
        out = fn()
        cost[name].append(time.process_time() - t0)
        return out

    try:
        for _ in range(steps):
            logits = torch.randn(batch, vocab, generator=gen) * 4
            mask = timed("fill", lambda: fill_bitmasks(matchers, vocab))
            tmask = torch.from_numpy(mask)
            toks = timed(
                "masked_sample",
                lambda: sample(logits, params, [None] * batch, allowed_token_bitmask=tmask),
            )
            timed("plain_sample", lambda: sample(logits, params, [None] * batch))
            a = timed("unpack_sampler", lambda: unpack_bitmask(tmask, vocab))
            b = timed("unpack_numpy", lambda: _unpack_numpy(mask, vocab))
            assert torch.equal(a, b)
            for m, t in zip(matchers, toks):
                if not m.consume(t):
                    raise RuntimeError(m.error)
    finally:
        torch.set_num_threads(threads)
    med = {k: 1000 * statistics.median(v) for k, v in cost.items()}
    med["added"] = med["fill"] + med["masked_sample"] - med["plain_sample"]
    return {f"{k}_cpu_ms": v for k, v in med.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument(
        "--render", type=Path, help="only rewrite the markdown of this results JSON, then exit"
    )
    args = ap.parse_args()
    if args.render is not None:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(report))
        return

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
        cpu: dict[str, list[float]] = {k: [] for k in conditions}
        for r in range(args.rounds):
            order = list(conditions) if r % 2 == 0 else list(reversed(conditions))
            for name in order:
                out = run_burst(engine, prompt, conditions[name], batch)
                per[name].append(out["tpot_ms"])
                cpu[name].append(out["cpu_ms_per_token"])
        unc, con = statistics.median(per["unconstrained"]), statistics.median(per["constrained"])
        cpu_unc = statistics.median(cpu["unconstrained"])
        cpu_con = statistics.median(cpu["constrained"])
        rows.append(
            {
                "batch": batch,
                "unconstrained_tpot_ms": round(unc, 2),
                "constrained_tpot_ms": round(con, 2),
                "overhead": round(con / unc - 1, 4),
                "unconstrained_cpu_ms_per_token": round(cpu_unc, 2),
                "constrained_cpu_ms_per_token": round(cpu_con, 2),
                "cpu_overhead": round(cpu_con / cpu_unc - 1, 4),
                "rounds_unconstrained_ms": [round(x, 2) for x in per["unconstrained"]],
                "rounds_constrained_ms": [round(x, 2) for x in per["constrained"]],
                "grammar_step": {
                    k: round(v, 3) for k, v in grammar_step_cost(engine, grammar, batch, 96).items()
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
    text = markdown(report)
    (args.out / "structured_cpu.md").write_text(text)
    print(text)


def markdown(report: dict) -> str:
    rows = report["rows"]
    load_before, load_after = report["loadavg_1min_before_after"]
    lines = [
        "# Structured output on the CPU: TPOT with a JSON-schema grammar vs without",
        "",
        f"Machine: {report['machine']}; 1-minute load average before/after: "
        f"{load_before}/{load_after}; {report['date']}. Model: {report['model']}; "
        f"{report['max_tokens']} output tokens per request; {report['rounds']} interleaved "
        f"rounds (ABBA); medians over rounds. First compile of the schema (includes building "
        f"llguidance's tokenizer): {report['first_compile_s']:.2f} s. Produced by "
        "`benchmarks/structured_cpu.py`.",
        "",
        "| batch | TPOT unconstrained (ms) [rounds' range] | TPOT constrained (ms) [range] | "
        "overhead | CPU/token unconstrained (ms) | CPU/token constrained (ms) | CPU overhead | "
        "added CPU per step (ms) | added / fastest TPOT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        g = row["grammar_step"]
        ru, rc = row["rounds_unconstrained_ms"], row["rounds_constrained_ms"]
        lines.append(
            f"| {row['batch']} | {row['unconstrained_tpot_ms']:.1f} "
            f"[{min(ru):.0f}-{max(ru):.0f}] | {row['constrained_tpot_ms']:.1f} "
            f"[{min(rc):.0f}-{max(rc):.0f}] | {100 * row['overhead']:+.1f}% | "
            f"{row['unconstrained_cpu_ms_per_token']:.1f} | "
            f"{row['constrained_cpu_ms_per_token']:.1f} | {100 * row['cpu_overhead']:+.1f}% | "
            f"{g['added_cpu_ms']:.3f} | "
            f"{100 * g['added_cpu_ms'] / min(row['unconstrained_tpot_ms'], min(ru)):.2f}% |"
        )
    lines += [
        "",
        "Per decode step, the executor's added work alone (process CPU ms, one torch thread, "
        "engine stopped, random logits):",
        "",
        "| batch | mask fill (llguidance) | sample with mask | sample without | "
        "unpack: the sampler's unpack_bitmask | unpack: numpy unpackbits |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        g = row["grammar_step"]
        lines.append(
            f"| {row['batch']} | {g['fill_cpu_ms']:.3f} | {g['masked_sample_cpu_ms']:.3f} | "
            f"{g['plain_sample_cpu_ms']:.3f} | {g['unpack_sampler_cpu_ms']:.3f} | "
            f"{g['unpack_numpy_cpu_ms']:.3f} |"
        )
    lines += [
        "",
        "TPOT: wall time in the engine (all rows of a burst constrained, or none); on a loaded "
        "machine the rounds' range shows how much of a difference is noise. CPU/token: the "
        "process's CPU time over the burst per output token (prefill included; threads that "
        "spin while waiting for a core inflate it too). Added CPU per step = mask fill + "
        "sample with mask - sample without (`nova.runtime.sampler.sample(..., "
        "allowed_token_bitmask=...)`); the last column divides it by the fastest "
        "unconstrained TPOT seen: the grammar's work as a share of a decode step, which is "
        "what its TPOT overhead should be on a quiet machine. The unpack columns compare two "
        "ways of turning the packed mask into a boolean [B, V] mask.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
