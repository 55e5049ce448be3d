"""What the successor hold costs independent agents, and what it gives lock-step clients.

On a CPU an idle engine waits, within ``--arrival-wait-ms`` (150 ms there), for the next
requests of clients whose answers it just sent, once one of them has arrived
(``nova.engine.arrivals.Successors``): clients stepping in lock-step then start each round in
one prefill step (``benchmarks/serve_waves.py``). Agents that step independently, each thinking
a while after its answer, can pay for it: one agent's request waits for the successors of
other agents' answers that landed in the same decode step, which come only after their own
think times.

Two ``nova serve`` processes on the demo model run side by side, one as by default (``hold``)
and one with ``--no-successor-hold`` (``no_hold``); the same client (``python -m nova.bench``,
a process of its own) runs each workload against one then the other, the order flipped every
round, so drift on a shared machine hits both alike:

- ``gui_sessions``: independent closed-loop GUI-agent sessions (a generated screenshot, the
  task and the history each step), ``--sessions`` of them, think time exponential with mean
  ``--think-s`` (each value a workload of its own), starts spread over 2 s;
- ``lockstep``: the same screenshot requests at a fixed concurrency, no think time, every output
  64 tokens (``ignore_eos``): clients whose rounds land together, as the hold was made for.
  (The first run, ``successor_hold_amd.md``, drew output lengths from 30-80 tokens there, so its
  "lockstep" clients did not step together.)

Each round and workload draws its own seed (the first two runs, ``successor_hold_amd.md`` and
``_amd_learned.md``, used one per round, so each round's later workloads found the earlier
one's screenshots and prompts in the caches). Per run: TTFT p50/p99, E2E mean/p99 and output
tok/s from the client. Writes
``benchmarks/results/successor_hold{--tag}.{json,md}`` with the machine and its load.

Usage: ``.venv/bin/python benchmarks/successor_hold.py [--rounds 3] [--think-s 0.1 0.5]
[--tag _amd]`` (about 15 minutes on a 2-core CPU with the defaults).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODES = {"hold": [], "no_hold": ["--no-successor-hold"]}
# --control: two servers as by default, the same comparison (how far two identical servers'
# figures lie apart on this machine)
CONTROL_MODES: dict[str, list[str]] = {"hold": [], "hold_too": []}
KEYS = (
    "completed",
    "failed",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_e2el_ms",
    "p99_e2el_ms",
    "median_tpot_ms",
)


def workloads(args: argparse.Namespace) -> dict[str, list[str]]:
    """Workload name -> ``nova bench`` flags (the seed is added per round)."""
    out = {}
    for think in args.think_s:
        out[f"gui_sessions think {think:g} s"] = [
            "--dataset-name", "gui_sessions", "--num-sessions", str(args.sessions),
            "--workload-arg", f"think_time_s={think}", "--workload-arg",
            "session_start_spread_s=2", "--workload-arg", f"steps_per_session={args.steps}",
        ]  # fmt: skip
    out[lockstep_name(args)] = [
        "--dataset-name", "poisson", "--request-rate", "inf",
        "--num-prompts", str(args.sessions * args.steps),
        "--max-concurrency", str(args.sessions),
        "--workload-arg", f"min_tokens={LOCKSTEP_TOKENS}",
        "--workload-arg", f"max_tokens={LOCKSTEP_TOKENS}",
    ]  # fmt: skip
    return out


# every lock-step request's output length (equal lengths: a wave's answers land together)
LOCKSTEP_TOKENS = 64


def lockstep_name(args: argparse.Namespace) -> str:
    return f"lockstep c={args.sessions}, {LOCKSTEP_TOKENS} tokens each"


def run_client(port: int, flags: list[str], seed: int, tmp: Path) -> dict[str, Any]:
    name = f"bench_{port}_{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "nova.bench", "--port", str(port), "--ignore-eos"]
    cmd += ["--seed", str(seed), "--disable-tqdm", "--result-dir", str(tmp)]
    cmd += ["--result-filename", name, *flags]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    res = json.loads((tmp / f"{name}.json").read_text())
    return {k: res.get(k) for k in KEYS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="steps per session")
    ap.add_argument("--think-s", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--port", type=int, default=8420)
    ap.add_argument("--startup-timeout-s", type=float, default=900.0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--note", default="")
    ap.add_argument("--control", action="store_true", help="both servers as by default (A/A)")
    args = ap.parse_args()
    modes = CONTROL_MODES if args.control else MODES
    sys.path.insert(0, str(HERE))
    from peer_cpu import loadavg, machine, stop_server, wait_healthy
    from serve_waves import write

    tmp = Path(tempfile.mkdtemp(prefix="successor_hold_"))
    ports = {mode: args.port + i for i, mode in enumerate(modes)}
    servers = {}
    load0 = loadavg()
    rows: list[dict[str, Any]] = []
    try:
        for mode, port in ports.items():
            cmd = [sys.executable, "-m", "nova.cli", "serve", "--model", args.model]
            cmd += ["--port", str(port), *modes[mode]]
            log = open(tmp / f"serve_{mode}.log", "w")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            servers[mode] = (proc, log)
            # one at a time: two first starts on two cores would each take twice as long
            wait_healthy(f"http://127.0.0.1:{port}", proc, args.startup_timeout_s)
        loads = workloads(args)
        for port in ports.values():  # warm-up (untimed): one short lock-step run each
            run_client(port, loads[lockstep_name(args)], 1000, tmp)
        for rnd in range(args.rounds):
            for wi, (name, flags) in enumerate(loads.items()):
                order = list(ports) if rnd % 2 == 0 else list(reversed(ports))
                # a seed per round and workload: workloads of one seed share their screenshots
                # and prompts, so a later one would find them in the prefix and encoder caches
                seed = 1 + rnd * len(loads) + wi
                for mode in order:
                    before = loadavg()
                    row = run_client(ports[mode], flags, seed, tmp)
                    row.update(workload=name, mode=mode, round=rnd, loadavg_before=before)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        for proc, log in servers.values():
            stop_server(proc)
            log.close()
    report = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": load0,
        "loadavg_end": loadavg(),
        "model": args.model,
        "sessions": args.sessions,
        "steps": args.steps,
        "note": args.note,
        "modes": {m: " ".join(f) or "(defaults)" for m, f in modes.items()},
        "rows": rows,
    }
    write(report, args.tag, "successor_hold", render)


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    modes = report.get("modes", {name: " ".join(f) for name, f in MODES.items()})
    first, second = list(modes)
    lines = [
        "# The successor hold: on (`hold`, the default) and off (`--no-successor-hold`)",
        "",
        "Servers: " + "; ".join(f"`{k}`: {v or '(defaults)'}" for k, v in modes.items()) + ".",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {report['date']}; load average at start "
        f"{report['loadavg_start']}, at end {report['loadavg_end']}. Model `{report['model']}`, "
        f"{report['sessions']} sessions (or concurrency) x {report['steps']} steps, "
        f"`ignore_eos`; `benchmarks/successor_hold.py`. {report['note']}",
        "",
        "| workload | round | mode | out tok/s | TTFT p50 ms | TTFT p99 ms | E2E mean ms | "
        "E2E p99 ms | TPOT p50 ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['workload']} | {r['round']} | {r['mode']} | {r['output_throughput']:.1f} | "
            f"{r['median_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | {r['mean_e2el_ms']:.0f} | "
            f"{r['p99_e2el_ms']:.0f} | {r['median_tpot_ms']:.1f} |"
        )
    lines += [
        "",
        f"Per workload, the median over rounds of `{first}`'s figure over `{second}`'s in the "
        f"same round (below 1: `{first}` lower):",
        "",
        "| workload | rounds | TTFT p50 | TTFT p99 | E2E mean | E2E p99 | out tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, ratios in ratios_by_workload(report["rows"], first, second).items():
        cells = " | ".join(f"{statistics.median(ratios[k]):.3f}" for k in RATIO_KEYS)
        lines.append(f"| {name} | {len(ratios[RATIO_KEYS[0]])} | {cells} |")
    return "\n".join(lines) + "\n"


RATIO_KEYS = (
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_e2el_ms",
    "p99_e2el_ms",
    "output_throughput",
)


def ratios_by_workload(
    rows: list[dict[str, Any]], first: str = "hold", second: str = "no_hold"
) -> dict[str, dict[str, list[float]]]:
    """Workload -> key -> ``first`` / ``second`` per round where both ran."""
    by: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["workload"], r["round"]), {})[r["mode"]] = r
    out: dict[str, dict[str, list[float]]] = {}
    for (name, _rnd), pair in by.items():
        if set(pair) != {first, second}:
            continue
        ratios = out.setdefault(name, {k: [] for k in RATIO_KEYS})
        for k in RATIO_KEYS:
            ratios[k].append(pair[first][k] / pair[second][k])
    return out


if __name__ == "__main__":
    main()
