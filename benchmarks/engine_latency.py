"""Latency and throughput of the engine vs one-at-a-time vs transformers batched, same requests.

The same N agent-like requests (default 64: 3/4 are GUI steps with a generated screenshot and an
instruction, 1/4 text questions; ``--max-tokens`` each, EOS ignored so every system does the
same work) arrive together as one burst at t=0, and each system serves them:

- ``engine:<policy>``: Nova's engine (three concurrent stage workers), per policy;
- ``one_at_a_time``: Nova's engine with policy ``sequential``, given one request after another
  (request i is submitted when i-1 has finished, so it waits for all before it);
- ``transformers_batched``: ``LlavaForConditionalGeneration.generate`` on all N at once
  (left padding); per-token times come from a streamer hook, so TTFT is the batch's first token.

Latencies are measured from the burst (t=0). Every engine batch is traced (stage, wall time,
size, cores granted), and the report splits the decode steps into those that ran alone and those
that ran beside a vision or prefill batch (on a CPU, shared partitions split the cores among the
stages running, or they take turns when a split would leave a stage fewer than
``--cpu-min-split-cores``; a batch's time counts from when it got its cores). A policy can be
given front-stage limits: ``multi_stream/512/2`` = at most 512 prefill tokens and 2 images per
batch; and a CPU split floor: ``multi_stream@1`` = split down to 1 core per stage (no turns).
Results: benchmarks/results/engine_<device>.{json,md}.
Usage: .venv/bin/python benchmarks/engine_latency.py [--num-requests 64] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from runtime_throughput import machine

from nova.config import EngineConfig
from nova.demo import AGENT_INSTRUCTIONS, AGENT_SYSTEM, TEXT_QUESTIONS
from nova.engine.llm_engine import LLMEngine
from nova.metrics import format_summary_table, request_metrics, summarize, summary_to_dict
from nova.models.inputs import PromptInput, chat_messages
from nova.sampling_params import SamplingParams
from nova.screenshots import make_screenshot
from nova.types import Batch, Request, RequestStatus, RequestTimes, Stage, StageResult


class BatchTrace:
    """Records every batch ``engine`` runs: (stage, start s, end s, requests, cores granted;
    cores are -1 where the partition backend grants none). A batch starts when it got its
    cores (on a CPU it may wait for a turn first)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.rows: list[tuple[str, float, float, int, int]] = []
        executor = engine.executor
        run = executor.execute
        broker = getattr(executor.partition_backend, "broker", None)
        granted_s: dict[Stage, float] = {}
        if broker is not None:
            acquire = broker.acquire

            def timed_acquire(stage: Stage, *args: Any, **kwargs: Any) -> Any:
                grant = acquire(stage, *args, **kwargs)
                granted_s[stage] = time.perf_counter()
                return grant

            broker.acquire = timed_acquire

        def execute(batch: Batch) -> StageResult:
            start = time.perf_counter()
            out = run(batch)
            grant = broker.last.get(batch.stage) if broker is not None else None
            cores = grant.num_cores if grant is not None else -1
            start = max(start, granted_s.get(batch.stage, start))
            self.rows.append(
                (batch.stage.value, start, time.perf_counter(), len(batch.items), cores)
            )
            return out

        executor.execute = execute  # type: ignore[method-assign]

    def take(self) -> list[tuple[str, float, float, int, int]]:
        rows, self.rows = self.rows, []
        return rows


def decode_overlap(rows: list[tuple[str, float, float, int, int]]) -> dict[str, Any]:
    """Decode steps alone vs beside a vision/prefill batch (overlapping it in time): count,
    mean wall ms, mean cores granted, mean sequences; and the front stages' busy time."""
    front = [r for r in rows if r[0] != Stage.DECODE.value]
    decode = [r for r in rows if r[0] == Stage.DECODE.value]

    def beside(d: tuple[str, float, float, int, int]) -> bool:
        return any(f[1] < d[2] and f[2] > d[1] for f in front)

    def stats(xs: list[tuple[str, float, float, int, int]]) -> dict[str, float]:
        if not xs:
            return {"steps": 0}
        return {
            "steps": len(xs),
            "mean_ms": 1e3 * statistics.mean(x[2] - x[1] for x in xs),
            "mean_cores": statistics.mean(x[4] for x in xs),
            "mean_seqs": statistics.mean(x[3] for x in xs),
        }

    out: dict[str, Any] = {
        "alone": stats([d for d in decode if not beside(d)]),
        "beside_front": stats([d for d in decode if beside(d)]),
    }
    for stage in (Stage.VISION, Stage.PREFILL):
        xs = [r for r in front if r[0] == stage.value]
        out[f"{stage.value}_batches"] = len(xs)
        out[f"{stage.value}_mean_ms"] = 1e3 * statistics.mean(x[2] - x[1] for x in xs) if xs else 0
    if rows:
        out["span_s"] = max(r[2] for r in rows) - min(r[1] for r in rows)
        out["idle_s"] = out["span_s"] - busy_s(rows)
    return out


def busy_s(rows: list[tuple[str, float, float, int, int]]) -> float:
    """Seconds in which at least one batch ran (the union of the batches' intervals): the span
    less this is the time the device sat idle between batches (hand-offs, turns, planning)."""
    total, end = 0.0, -math.inf
    for _stage, start, stop, _n, _cores in sorted(rows, key=lambda r: r[1]):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def parse_policy(spec: str) -> tuple[str, dict[str, int]]:
    """``policy[/max_prefill_tokens[/max_vision_images]][@cpu_min_split_cores]`` ->
    (policy, EngineConfig fields)."""
    usage = f"bad policy spec {spec!r}: policy[/max_prefill_tokens[/max_images]][@min_split_cores]"
    head, at, split = spec.partition("@")
    name, *limits = head.split("/")
    numbers = [*limits, split] if at else limits
    if len(limits) > 2 or not all(x.isdigit() and int(x) > 0 for x in numbers):
        raise SystemExit(usage)
    fields = dict(zip(("max_prefill_tokens", "max_vision_images"), map(int, limits)))
    if at:
        fields["cpu_min_split_cores"] = int(split)
    return name, fields


def build_prompts(nova: LLMEngine, n: int) -> list[PromptInput]:
    prompts = []
    for i in range(n):
        if i % 4 == 3:
            q = TEXT_QUESTIONS[i % len(TEXT_QUESTIONS)]
            prompts.append(nova.processor.from_chat(chat_messages(q)))
        else:
            instr = AGENT_INSTRUCTIONS[i % len(AGENT_INSTRUCTIONS)]
            msgs = chat_messages(instr, num_images=1, system=AGENT_SYSTEM)
            prompts.append(nova.processor.from_chat(msgs, [make_screenshot(seed=i)]))
    return prompts


def synthetic_request(rid: str, prompt: PromptInput, n_out: int, times: RequestTimes) -> Request:
    """A finished Request carrying externally measured times, for nova.metrics."""
    r = Request(rid, list(prompt.token_ids), SamplingParams(max_tokens=n_out))
    r.output_token_ids = [0] * n_out
    r.times = times
    r.status = RequestStatus.FINISHED
    return r


def run_engine(nova: LLMEngine, prompts, params) -> tuple[list[Request], float]:
    t0 = time.perf_counter()
    reqs = nova.run_all(prompts, params, [f"r{i}" for i in range(len(prompts))])
    wall = time.perf_counter() - t0
    base = min(r.times.arrival_s for r in reqs)
    for r in reqs:  # burst: latencies from the first submission (submitting takes ~ms)
        r.times.arrival_s = base
    return reqs, wall


def run_one_at_a_time(nova: LLMEngine, prompts, params) -> tuple[list[Request], float]:
    """Each request alone through a sequential engine on the same model, back to back; its
    latencies count from the burst (the first submission), like the engine's."""
    alone = LLMEngine(dataclasses.replace(nova.config, policy="sequential"), loaded=nova.loaded)
    reqs: list[Request] = []
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        reqs += alone.run_all([p], [params], [f"r{i}"])
    wall = time.perf_counter() - t0
    base = reqs[0].times.arrival_s  # the engine's clock: one clock for all of them
    for r in reqs:
        r.times.arrival_s = base
    return reqs, wall


class _TokenClock:
    """A generate() streamer that only records when each new token arrives."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.token_s: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first put() is the prompt
            self._prompt_seen = True
            return
        self.token_s.append(time.perf_counter() - self.t0)

    def end(self) -> None:
        pass


def run_transformers(nova: LLMEngine, prompts, max_tokens: int) -> tuple[list[Request], float]:
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(
        nova.loaded.model_dir, dtype=torch.float32
    ).eval()
    pad = nova.loaded.tokenizer.pad_token_id or 0
    width = max(len(p.token_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p.token_ids) :] = torch.tensor(p.token_ids)
        mask[i, width - len(p.token_ids) :] = 1
    pixels = torch.cat([p.pixel_values for p in prompts if p.pixel_values is not None])
    clock = _TokenClock()
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels,
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            streamer=clock,
        )
    wall = time.perf_counter() - clock.t0
    assert out.shape[1] == width + max_tokens and len(clock.token_s) == max_tokens
    reqs = []
    for i, p in enumerate(prompts):
        times = RequestTimes(
            arrival_s=0.0,
            prefill_start_s=0.0,
            prefill_end_s=clock.token_s[0],
            token_s=list(clock.token_s),
            finish_s=clock.token_s[-1],
        )
        reqs.append(synthetic_request(f"r{i}", p, max_tokens, times))
    return reqs, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--policies",
        nargs="+",
        default=["multi_stream", "nova", "sequential"],
        help="policy[/max_prefill_tokens[/max_vision_images]][@cpu_min_split_cores] each",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--rounds", type=int, default=1, help="run the policies in turn this many times"
    )
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-one-at-a-time", action="store_true")
    ap.add_argument(
        "--caches",
        action="store_true",
        help="keep the prefix and encoder caches on (off by default: every round repeats the "
        "same requests on the same engines, so later rounds would measure cache hits)",
    )
    ap.add_argument("--tag", default="", help="results file suffix (e.g. the load it ran under)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    engines: dict[str, LLMEngine] = {}
    traces: dict[str, BatchTrace] = {}
    loaded = None
    for spec in args.policies:
        policy, limits = parse_policy(spec)
        engines[spec] = LLMEngine(
            EngineConfig(
                model=args.model,
                policy=policy,
                dtype=args.dtype,
                prefix_caching=args.caches,
                encoder_cache_bytes=EngineConfig.encoder_cache_bytes if args.caches else 0,
                **limits,
            ),
            loaded=loaded,
        )
        traces[spec] = BatchTrace(engines[spec])
        loaded = engines[spec].loaded
    nova = engines[args.policies[-1]]
    prompts = build_prompts(nova, args.num_requests)
    results: list[tuple[str, int, list[Request], float, float]] = []
    overlaps: list[tuple[str, int, dict[str, Any]]] = []
    modes: dict[str, list[list[str]]] = {}  # the nova policy's modes per round, in order
    for rnd in range(args.rounds):  # interleaved: A B C A B C ...
        for policy, engine in engines.items():
            load = os.getloadavg()[0]
            mode_log = getattr(engine.scheduler.policy, "mode_log", None)
            seen = len(mode_log) if mode_log is not None else 0
            traces[policy].take()
            reqs, wall = run_engine(engine, prompts, params)
            results.append((f"engine:{policy}", rnd, reqs, wall, load))
            overlaps.append((f"engine:{policy}", rnd, decode_overlap(traces[policy].take())))
            if mode_log is not None:  # the mode it started the round in, then its switches
                current = mode_log[seen - 1][1] if seen else ""
                modes.setdefault(policy, []).append(
                    [current, *(label for _, label in mode_log[seen:])]
                )
    if not args.skip_one_at_a_time:
        load = os.getloadavg()[0]
        results.append(("one_at_a_time", 0, *run_one_at_a_time(nova, prompts, params), load))
    if not args.skip_transformers:
        load = os.getloadavg()[0]
        reqs, wall = run_transformers(nova, prompts, args.max_tokens)
        results.append(("transformers_batched", 0, reqs, wall, load))

    device = "gpu" if torch.cuda.is_available() else "cpu"
    report = {
        "benchmark": "engine_latency",
        "model": args.model,
        "dtype": args.dtype,
        "num_requests": args.num_requests,
        "num_with_image": sum(p.pixel_values is not None for p in prompts),
        "max_tokens": args.max_tokens,
        "arrivals": "one burst at t=0",
        "machine": machine(),
        "partition_backend": nova.partition_backend.describe(),
        "systems": {},
    }
    lines = [
        f"# Engine latency: {args.num_requests} requests in one burst, {args.model} ({device})",
        "",
        f"Machine: {report['machine']}; {args.dtype}; caches {'on' if args.caches else 'off'}; "
        "partition backend: "
        f"{report['partition_backend']}",
        "",
        f"{report['num_with_image']} with a screenshot, the rest text; {args.max_tokens} output "
        "tokens each (EOS ignored); latencies from the burst; systems run in turn "
        f"({args.rounds} round(s)), 1-min load average at each start. OpenMP environment: "
        f"{ {k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')} }.",
        "",
        "| system | round | load | wall s | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms "
        "| TPOT p50 ms | E2E mean ms | E2E p50 ms | E2E p99 ms | E2E max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rnd, reqs, wall, load in results:
        s = summarize([request_metrics(r) for r in reqs], duration_s=wall)
        key = name if args.rounds == 1 else f"{name}#{rnd}"
        report["systems"][key] = {
            "wall_s": round(wall, 3),
            "loadavg_1min": round(load, 2),
            **summary_to_dict(s),
        }
        print(format_summary_table(s, title=key), flush=True)
        ms = lambda v: f"{v * 1e3:.0f}"  # noqa: E731
        lines.append(
            f"| {name} | {rnd} | {load:.1f} | {wall:.2f} | {s.request_throughput_rps:.2f} | "
            f"{s.output_throughput_tps:.1f} "
            f"| {ms(s.ttft.p50)} | {ms(s.ttft.p99)} | {ms(s.tpot.p50)} | {ms(s.e2e.mean)} "
            f"| {ms(s.e2e.p50)} | {ms(s.e2e.p99)} | {ms(s.e2e.max)} |"
        )
    report["decode_overlap"] = [{"system": n, "round": r, **o} for n, r, o in overlaps]
    lines += [
        "",
        "Decode steps alone vs beside a vision or prefill batch (overlapping it in time): "
        "steps, mean wall ms, mean cores granted, mean sequences per step; the front stages' "
        "batches and their mean wall ms; idle: the time between the first batch's start and "
        "the last one's end in which no batch ran (hand-offs, turns, planning).",
        "",
        "| system | round | decode alone | decode beside front | prefill batches | "
        "vision batches | idle ms |",
        "|---|---:|---|---|---|---|---:|",
    ]
    for name, rnd, o in overlaps:

        def cell(d: dict[str, float]) -> str:
            if not d["steps"]:
                return "0"
            return (
                f"{d['steps']} x {d['mean_ms']:.0f} ms, {d['mean_cores']:.2f} cores, "
                f"{d['mean_seqs']:.1f} seqs"
            )

        lines.append(
            f"| {name} | {rnd} | {cell(o['alone'])} | {cell(o['beside_front'])} | "
            f"{o['prefill_batches']} x {o['prefill_mean_ms']:.0f} ms | "
            f"{o['vision_batches']} x {o['vision_mean_ms']:.0f} ms | "
            f"{1e3 * o.get('idle_s', math.nan):.0f} |"
        )
    if modes:
        report["nova_modes"] = modes
        lines += ["", "Modes the nova policy ran in, per round (start, then each switch):", ""]
        lines += [f"- {p}: " + "; ".join(" -> ".join(r) for r in rs) for p, rs in modes.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"engine_{device}{('_' + args.tag) if args.tag else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
