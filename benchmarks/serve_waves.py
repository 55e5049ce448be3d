"""How the served benchmark's waves of requests reach ``nova serve``'s prefill.

At a fixed concurrency with equal output lengths (``vllm bench serve``, ``ignore_eos``, as in
``peer_cpu.py``) the requests come in waves: a wave's answers land together and the client sends
the next wave. A wave's TTFT is the prefill steps its requests went into, so this records, from
inside the server, every request's submission and every prompt-carrying batch (its prompts,
decodes, tokens and wall time), and groups them per wave: how many requests, over how many ms
they were submitted and the largest gap between two of them, and the steps that prefilled
them. The client's TTFT p50/p99 and output tok/s per round sit beside them. With ``--peer``
``vllm serve`` runs beside it (started as ``peer_cpu.py`` starts it) and each round is run
against Nova and then vLLM by the same client, as in ``peer_cpu.py --served``, so a round where
Nova's TTFT p99 is above vLLM's can be read against its waves.

The server runs as ``nova serve`` with the executor's ``execute`` and the engine's
``submit_group`` wrapped to log those times (``--serve-traced``, this file re-run as the server
process); nothing else about it changes. Peer model (``peer_model.py``), bf16, the default policy
unless ``--server-flags`` says otherwise.

Writes ``benchmarks/results/serve_waves{--tag}.{json,md}`` with the machine and its load.
Usage: ``.venv/bin/python benchmarks/serve_waves.py --vllm-python /work/peer/venv/bin/python
[--rounds 3] [--concurrency 32] [--peer] [--tag _amd]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# a gap between two submissions longer than this starts a new wave (a wave's requests come
# within tens of ms; waves are a whole generation, seconds, apart)
WAVE_GAP_S = 0.5


def serve_traced(trace: str, argv: list[str]) -> None:
    """``nova serve`` (``argv``) with every batch and submission logged to ``trace`` (JSONL,
    ``time.monotonic`` seconds)."""
    import threading

    from nova.cli import main as nova_main
    from nova.engine import llm_engine
    from nova.executor import torch_executor

    out = open(trace, "a", buffering=1)  # noqa: SIM115 - open for the server's life
    lock = threading.Lock()

    def log(row: dict[str, Any]) -> None:
        with lock:
            out.write(json.dumps(row) + "\n")

    execute = torch_executor.TorchExecutor.execute

    def timed_execute(self: Any, batch: Any) -> Any:
        t0 = time.monotonic()
        result = execute(self, batch)
        prompts = [it for it in batch.items if len(it.token_ids) > 1]
        log(
            {
                "stage": batch.stage.value,
                "t0": t0,
                "t1": time.monotonic(),
                "prompts": len(prompts),
                "decodes": len(batch.items) - len(prompts),
                "prompt_tokens": sum(len(it.token_ids) for it in prompts),
            }
        )
        return result

    submit = llm_engine.LLMEngine.submit_group

    def logged_submit(self: Any, *args: Any, **kwargs: Any) -> Any:
        log({"submit": time.monotonic()})
        return submit(self, *args, **kwargs)

    torch_executor.TorchExecutor.execute = timed_execute  # type: ignore[method-assign]
    llm_engine.LLMEngine.submit_group = logged_submit  # type: ignore[method-assign]
    sys.exit(nova_main(argv))


def waves(rows: list[dict[str, Any]], t0: float, t1: float) -> list[dict[str, Any]]:
    """The waves of one round: submissions grouped by gaps over ``WAVE_GAP_S``, each with the
    prompt-carrying batches that started between its first submission and the next wave's."""
    subs = sorted(r["submit"] for r in rows if "submit" in r and t0 <= r["submit"] <= t1)
    steps = sorted(
        (r for r in rows if "t0" in r and r["prompts"] and t0 <= r["t0"] <= t1),
        key=lambda r: r["t0"],
    )
    groups: list[list[float]] = []
    for s in subs:
        if groups and s - groups[-1][-1] <= WAVE_GAP_S:
            groups[-1].append(s)
        else:
            groups.append([s])
    out = []
    for i, g in enumerate(groups):
        end = groups[i + 1][0] if i + 1 < len(groups) else t1
        mine = [r for r in steps if g[0] <= r["t1"] and r["t0"] < end]
        gaps = [b - a for a, b in itertools.pairwise(g)]
        out.append(
            {
                "requests": len(g),
                "submitted_over_ms": round(1e3 * (g[-1] - g[0]), 1),
                "largest_gap_ms": round(1e3 * max(gaps), 1) if gaps else 0.0,
                "steps": [
                    {
                        "prompts": r["prompts"],
                        "decodes": r["decodes"],
                        "prompt_tokens": r["prompt_tokens"],
                        "ms": round(1e3 * (r["t1"] - r["t0"]), 1),
                        "start_after_first_ms": round(1e3 * (r["t0"] - g[0]), 1),
                    }
                    for r in mine
                ],
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve-traced", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="default: peer_model.py's directory")
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--served-prompts", type=int, default=None, help="default: 4 x concurrency")
    ap.add_argument("--served-input-len", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=8390)
    ap.add_argument("--server-flags", default="", help="extra nova serve flags, one string")
    ap.add_argument("--startup-timeout-s", type=float, default=600.0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--note", default="")
    ap.add_argument(
        "--peer", action="store_true", help="also run vllm serve, each round after Nova's"
    )
    args, rest = ap.parse_known_args()
    if args.serve_traced:
        serve_traced(args.serve_traced, [a for a in rest if a != "--"])
        return
    if not args.vllm_python:
        raise SystemExit("--vllm-python (vLLM's venv) is needed for its benchmark client")
    sys.path.insert(0, str(HERE))
    from peer_cpu import bench_serve, loadavg, machine, start_server, stop_server, wait_healthy
    from peer_model import export_text_model

    args.model = args.model or str(export_text_model())
    tmp = Path(tempfile.mkdtemp(prefix="serve_waves_"))
    trace = tmp / "trace.jsonl"
    cmd = [sys.executable, __file__, "--serve-traced", str(trace), "--", "serve"]
    cmd += ["--model", args.model, "--dtype", "bfloat16", "--port", str(args.port)]
    cmd += ["--served-model-name", "peer", *args.server_flags.split()]
    log = open(tmp / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    peer_port = args.port + 1
    peer = start_server("vllm", args, peer_port) if args.peer else None
    load0 = loadavg()
    rounds = []
    try:
        wait_healthy(f"http://127.0.0.1:{args.port}", proc, args.startup_timeout_s)
        conc = args.concurrency
        bench_serve(args, args.port, conc, tmp, 2 * conc, 1000)  # warm-up (untimed)
        if peer is not None:
            wait_healthy(f"http://127.0.0.1:{peer_port}", peer[0], args.startup_timeout_s)
            bench_serve(args, peer_port, conc, tmp, 2 * conc, 1000)
        for rnd in range(args.rounds):
            before = loadavg()
            t0 = time.monotonic()
            res = bench_serve(args, args.port, conc, tmp, seed=1 + rnd)
            t1 = time.monotonic()
            time.sleep(0.5)  # (the trace's last lines)
            rows = [json.loads(line) for line in trace.read_text().splitlines()]
            rounds.append(
                {
                    "round": rnd,
                    "output_tok_s": round(res["output_throughput"], 1),
                    "ttft_p50_ms": round(res["median_ttft_ms"], 1),
                    "ttft_p99_ms": round(res["p99_ttft_ms"], 1),
                    "tpot_p50_ms": round(res["median_tpot_ms"], 1),
                    "loadavg_before": before,
                    "waves": waves(rows, t0, t1),
                }
            )
            if peer is not None:  # the same prompts (seed) against vLLM, right after
                res = bench_serve(args, peer_port, conc, tmp, seed=1 + rnd)
                rounds[-1]["peer"] = {
                    "system": "vllm",
                    "output_tok_s": round(res["output_throughput"], 1),
                    "ttft_p50_ms": round(res["median_ttft_ms"], 1),
                    "ttft_p99_ms": round(res["p99_ttft_ms"], 1),
                    "tpot_p50_ms": round(res["median_tpot_ms"], 1),
                }
            print(json.dumps(rounds[-1]), flush=True)
    finally:
        stop_server(proc)
        log.close()
        if peer is not None:
            stop_server(peer[0])
            peer[1].close()
    report = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": load0,
        "loadavg_end": loadavg(),
        "model": args.model,
        "concurrency": args.concurrency,
        "server_flags": args.server_flags,
        "note": args.note,
        "rounds": rounds,
    }
    write(report, args.tag)


def write(
    report: dict[str, Any],
    tag: str,
    stem: str = "serve_waves",
    render: Callable[[dict[str, Any]], str] | None = None,
) -> None:
    """``benchmarks/results/{stem}{tag}.json`` (the report) and ``.md`` (``render``'s text,
    printed too; default: this benchmark's ``render``)."""
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = (render or render_waves)(report)
    (out / f"{stem}{tag}.md").write_text(text)
    print(text)


def render_waves(report: dict[str, Any]) -> str:
    """The report as markdown."""
    m = report["machine"]
    peered = any("peer" in r for r in report["rounds"])
    lines = [
        "# Waves of a served benchmark inside `nova serve` (`benchmarks/serve_waves.py`)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {report['date']}; load average at start "
        f"{report['loadavg_start']}, at end {report['loadavg_end']}. Peer model, bf16, "
        f"concurrency {report['concurrency']}, server flags `{report['server_flags'] or '-'}`. "
        f"{report['note']}",
        "",
        "Per wave: requests, the ms over which they were submitted, the largest gap between two "
        "submissions, and each prompt-carrying step after the wave's first submission as "
        "prompts+decodes / prompt tokens / ms (started at +ms)."
        + (
            " vLLM: the same client and prompts against `vllm serve` right after Nova's round "
            "(out tok/s, TTFT p50 / p99 ms)."
            if peered
            else ""
        ),
        "",
        "| round | tok/s | TTFT p50 ms | TTFT p99 ms | "
        + ("vLLM | " if peered else "")
        + "wave | requests | over ms | largest gap ms | steps |",
        "|---:|---:|---:|---:|" + ("---|" if peered else "") + "---:|---:|---:|---:|---|",
    ]
    for r in report["rounds"]:
        for i, w in enumerate(r["waves"]):
            steps = "; ".join(
                f"{s['prompts']}+{s['decodes']} / {s['prompt_tokens']} / {s['ms']:.0f} "
                f"(+{s['start_after_first_ms']:.0f})"
                for s in w["steps"]
            )
            peer = r.get("peer")
            head = (
                f"| {r['round']} | {r['output_tok_s']} | {r['ttft_p50_ms']:.0f} | "
                f"{r['ttft_p99_ms']:.0f} "
                + (
                    f"| {peer['output_tok_s']}, {peer['ttft_p50_ms']:.0f} / "
                    f"{peer['ttft_p99_ms']:.0f} "
                    if peer
                    else ""
                )
                if i == 0
                else "| | | | " + ("| " if peered else "")
            )
            lines.append(
                f"{head}| {i} | {w['requests']} | {w['submitted_over_ms']:.0f} | "
                f"{w['largest_gap_ms']:.0f} | {steps} |"
            )
    split = [len(w["steps"]) for r in report["rounds"] for w in r["waves"] if w["requests"] > 1]
    if peered:
        lower = sum(1 for r in report["rounds"] if r["ttft_p99_ms"] <= r["peer"]["ttft_p99_ms"])
        lines += [
            "",
            f"Nova's TTFT p99 at most vLLM's in {lower} of {len(report['rounds'])} rounds.",
        ]
    if split:
        lines += [
            "",
            f"Waves prefilled in one step: {sum(1 for n in split if n == 1)} of {len(split)}; "
            f"median steps per wave {statistics.median(split)}.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
