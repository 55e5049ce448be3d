"""Nova on the CPU with and without other processes on its cores: the intra-op thread count
that follows contention (``nova.gpu.cpu_contention``, the default) against a fixed count,
libgomp's default spinning and ``OMP_WAIT_POLICY=PASSIVE``.

Each run is a fresh process: ``nova.LLM`` on the peer text model (``peer_model.py``, bf16),
an untimed 8-prompt warm-up, then 64 chat prompts x ``--max-tokens`` forced tokens, timed
(``cpu_omp_wait.timed_generate``).
Conditions: ``quiet`` (nothing added; whatever else runs on the machine is recorded as the load
average), ``hogs`` (one busy-looping process per core, started before the engine and
stopped after it: another job using every core) and ``idle-hogs`` (the same at idle priority,
``SCHED_IDLE``: a job that takes only what Nova leaves). Systems and conditions interleave per round
(A B C, A B C, ...). Writes ``benchmarks/results/cpu_contention.{json,md}``.

Usage: .venv/bin/python benchmarks/cpu_contention.py [--rounds 2] [--max-tokens 64] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
SYSTEMS: dict[str, tuple[dict[str, str], bool]] = {
    # name: (environment, adapt threads to contention)
    "adaptive (default)": ({}, True),
    "fixed threads": ({}, False),
    "fixed threads, PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, False),
}


def _spin(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        pass


def _spin_idle(stop_at: float) -> None:
    """A busy loop at idle priority (``SCHED_IDLE``): a job that only takes what is left."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    _spin(stop_at)


def one_run(adapt: bool, max_tokens: int, num_prompts: int) -> dict[str, Any]:
    """In the child process: the timed engine run."""
    sys.path.insert(0, str(HERE))
    from cpu_omp_wait import timed_generate
    from peer_model import export_text_model

    from nova.llm import LLM

    llm = LLM(
        str(export_text_model()), dtype="bfloat16", policy="multi_stream", cpu_adapt_threads=adapt
    )
    run = timed_generate(llm, max_tokens, num_prompts)
    monitor = getattr(llm.llm_engine.partition_backend, "monitor", None)
    return {
        **run,
        "usable_cores_at_end": monitor.usable if monitor is not None else None,
        "last_on_core_share": round(monitor.share, 2) if monitor is not None else None,
        "thread_count_changes": monitor.num_changes if monitor is not None else None,
    }


def run_system(name: str, condition: str, args: argparse.Namespace) -> dict[str, Any]:
    env_extra, adapt = SYSTEMS[name]
    env = {**os.environ, **env_extra}
    hogs: list[mp.process.BaseProcess] = []
    if condition in ("hogs", "idle-hogs"):
        ctx = mp.get_context("spawn")
        stop_at = time.monotonic() + args.timeout_s
        target = _spin if condition == "hogs" else _spin_idle
        hogs = [ctx.Process(target=target, args=(stop_at,)) for _ in range(os.cpu_count() or 1)]
        for h in hogs:
            h.start()
        time.sleep(1.0)
    load_before = os.getloadavg()[0]
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        json.dumps([adapt, args.max_tokens, args.num_prompts]),
    ]
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s, check=False
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            row: dict[str, Any] = {"error": (proc.stderr or proc.stdout)[-400:]}
        else:
            row = json.loads(lines[-1])
    except subprocess.TimeoutExpired:
        row = {"error": f"timed out after {args.timeout_s} s"}
    finally:
        for h in hogs:
            h.terminate()
            h.join()
    return {"system": name, "condition": condition, "loadavg_1min": round(load_before, 2), **row}


def write(rows: list[dict[str, Any]], args: argparse.Namespace, wall_s: float) -> None:
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    summary: dict[str, dict[str, float | None]] = {}
    for cond in conds:
        for name in SYSTEMS:
            vals = [
                r["output_tok_s"]
                for r in rows
                if r["condition"] == cond and r["system"] == name and "output_tok_s" in r
            ]
            summary.setdefault(cond, {})[name] = round(statistics.median(vals), 1) if vals else None
    data = {
        "machine": machine,
        "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "child"
        },
        "wall_s": round(wall_s, 1),
        "rows": rows,
        "median_output_tok_s": summary,
    }
    stem = "cpu_contention_smoke" if args.smoke else "cpu_contention"
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# Nova on the CPU with other processes on its cores: adaptive thread count vs fixed",
        "",
        f"Machine: {machine}. Written by `benchmarks/cpu_contention.py` in {wall_s:.0f} s. "
        f"64 chat prompts x {args.max_tokens} forced tokens (EOS ignored), peer text model "
        "(SmolLM2-135M-Instruct architecture, bf16), `multi_stream`, offline `nova.LLM`, a fresh "
        "process per run; conditions and systems interleaved per round. `hogs`: one "
        "busy-looping process per core during the run; `idle-hogs`: the same at idle priority "
        "(`SCHED_IDLE`). `quiet`: nothing added (the 1-minute "
        "load average at each start is in the table: other jobs on the machine count).",
        "",
        "| round | condition | system | output tok/s | process CPU s | wall s | usable cores at "
        "end | last on-core share | load 1-min |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['round']} | {r['condition']} | {r['system']} | error: "
                f"{r['error'][-120:]!r} | | | | | {r['loadavg_1min']} |"
            )
            continue
        lines.append(
            f"| {r['round']} | {r['condition']} | {r['system']} | {r['output_tok_s']} | "
            f"{r['process_cpu_s']} | {r['wall_s']} | {r['usable_cores_at_end']} | "
            f"{r['last_on_core_share']} | {r['loadavg_1min']} |"
        )
    lines += ["", "Median output tok/s:", ""]
    lines += ["| condition | " + " | ".join(SYSTEMS) + " |", "|---|" + "---:|" * len(SYSTEMS)]
    for cond in conds:
        cells = [summary[cond][n] for n in SYSTEMS]
        lines.append(
            f"| {cond} | " + " | ".join("-" if c is None else str(c) for c in cells) + " |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--conditions", nargs="+", default=["quiet", "hogs", "idle-hogs"])
    ap.add_argument("--timeout-s", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--smoke", action="store_true", help="1 round, 8 tokens (checks the script)")
    args = ap.parse_args()
    if args.child:
        adapt, max_tokens, num_prompts = json.loads(args.child)
        print(json.dumps(one_run(adapt, max_tokens, num_prompts)), flush=True)
        os._exit(0)  # (skips the engine's shutdown: nothing to flush)
    if args.smoke:
        args.rounds, args.max_tokens, args.timeout_s = 1, 8, 300.0
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        for cond in args.conditions:
            for name in SYSTEMS:
                row = {"round": rnd, **run_system(name, cond, args)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    write(rows, args, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
