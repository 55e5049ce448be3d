"""Where ``nova serve``'s time goes under a served load: the CPU time of each of its threads, and
(with py-spy installed) which thread holds the interpreter lock doing what.

Starts ``nova serve`` on the peer model (``peer_model.py``), warms it up, then drives it with
``vllm bench serve`` (``peer_cpu.py``'s client: random dataset, ``ignore_eos``) at
``--concurrency`` while reading every thread's CPU time from ``/proc`` before and after and,
when ``py-spy`` is on the PATH or next to this Python, sampling the thread holding the GIL
(``py-spy record --gil``). The server's own thread (HTTP, preparation, detokenisation, SSE) is
the process's main thread; the stage workers and their OpenMP teams are the rest.

Writes benchmarks/results/serve_profile_cpu.{json,md} (``--tag`` adds a suffix) with the machine
and its load average.

Usage:
  .venv/bin/python benchmarks/serve_profile.py --vllm-python /work/peer/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peer_cpu  # noqa: E402 - a sibling script

# The server thread's GIL samples by what they were doing: the first category whose marker
# appears in the stack (frames are "function (file:line)").
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("socket write (uvicorn)", ("httptools_impl.py:544", "httptools_impl.py:524")),
    ("detokenisation", ("IncrementalDetokenizer", "InputProcessor.decode")),
    ("SSE encoding", ("sse_event", "sse_events.<locals>.chunk", "sse_events.<locals>.general")),
    ("preparation (template, tokens)", ("RequestPreparer", "from_chat")),
    ("request parsing and validation", ("fastapi/routing.py", "pydantic")),
    ("engine front (generate, delivery)", ("AsyncEngine", "LoopDelivery")),
    ("service (stops, pieces, metrics)", ("NovaService", "StopMatcher", "ServerMetrics")),
    ("ASGI layers (starlette, uvicorn)", ("starlette", "uvicorn")),
)


def thread_cpu_s(pid: int) -> dict[str, tuple[str, float]]:
    """Thread id -> (name, user + system CPU seconds so far)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def categorise(raw: Path) -> dict[str, Any]:
    """py-spy's raw output (one ``stack count`` per line) -> GIL samples per thread kind and,
    for the server thread, per category."""
    threads: Counter[str] = Counter()
    server: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        if not stack.startswith("_run_module_as_main"):
            threads["stage workers"] += n
            continue
        threads["server thread"] += n
        for name, markers in CATEGORIES:
            if any(m in stack for m in markers):
                server[name] += n
                break
        else:
            server["event loop and other"] += n
    return {"gil_samples": dict(threads), "server_thread_gil_samples": dict(server.most_common())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: peer_model.py's directory")
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"), required=False)
    ap.add_argument("--system", default="nova", choices=list(peer_cpu.SERVED_NOVA_ENV))
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--served-prompts", type=int, default=64)
    ap.add_argument("--served-input-len", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=8360)
    ap.add_argument("--rate-hz", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--startup-timeout-s", type=float, default=600.0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    if not peer_cpu.vllm_available(args.vllm_python):
        ap.error(
            "--vllm-python must name a Python with vllm (its 'vllm bench serve' is the client)"
        )
    if args.model is None:
        from peer_model import export_text_model

        args.model = str(export_text_model())
    tmp = Path(tempfile.mkdtemp(prefix="serve_profile_"))
    report: dict[str, Any] = {
        "benchmark": "serve_profile",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": peer_cpu.machine(),
        "model": args.model,
        "system": args.system,
        "concurrency": args.concurrency,
        "served_prompts": args.served_prompts,
        "max_tokens": args.max_tokens,
        "loadavg_start": peer_cpu.loadavg(),
        "note": args.note,
    }
    proc, log = peer_cpu.start_server(args.system, args, args.port)
    try:
        peer_cpu.wait_healthy(f"http://127.0.0.1:{args.port}", proc, args.startup_timeout_s)
        peer_cpu.bench_serve(args, args.port, args.concurrency, tmp, args.concurrency)  # warm-up
        # nova.cli runs in the server's process (no shell in between)
        pid = proc.pid
        before = thread_cpu_s(pid)
        spy = py_spy()
        raw = tmp / "gil.txt"
        sampler = None
        if spy:
            cmd = [spy, "record", "-p", str(pid), "--gil", "-r", str(args.rate_hz), "-f", "raw"]
            sampler = subprocess.Popen(
                [*cmd, "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            time.sleep(1.0)  # attached
        t0 = time.monotonic()
        res = peer_cpu.bench_serve(args, args.port, args.concurrency, tmp)
        wall_s = time.monotonic() - t0
        after = thread_cpu_s(pid)
        if sampler is not None:
            sampler.send_signal(2)  # SIGINT: py-spy writes what it has
            sampler.wait(timeout=60)
        report["loadavg_end"] = peer_cpu.loadavg()
        report["client"] = {k: res.get(k) for k in peer_cpu.SERVED_KEYS}
        rows = []
        for tid, (name, cpu_s) in after.items():
            spent = cpu_s - before.get(tid, (name, 0.0))[1]
            if spent > 0.01:
                rows.append({"tid": tid, "name": name, "cpu_s": round(spent, 2)})
        rows.sort(key=lambda r: -r["cpu_s"])
        server = next((r for r in rows if r["tid"] == str(pid)), {"cpu_s": 0.0})
        tokens = res.get("total_output_tokens") or 0
        report.update(
            wall_s=round(wall_s, 1),
            threads=rows,
            process_cpu_s=round(sum(r["cpu_s"] for r in rows), 2),
            server_thread_cpu_s=server["cpu_s"],
            server_thread_us_per_token=round(1e6 * server["cpu_s"] / tokens, 1) if tokens else None,
        )
        if sampler is not None and raw.exists():
            report.update(categorise(raw))
    finally:
        peer_cpu.stop_server(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    write(report, args.tag)


def write(report: dict[str, Any], tag: str) -> None:
    stem = peer_cpu.RESULTS / f"serve_profile_cpu{('_' + tag) if tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    m, c = report["machine"], report["client"]
    lines = [
        f"# Where `nova serve`'s time goes ({report['system']}, concurrency "
        f"{report['concurrency']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {report['date']}; load average at start "
        f"{report['loadavg_start']}, at end {report['loadavg_end']}. {report['note']}",
        "",
        f"Client (`vllm bench serve`, {report['served_prompts']} prompts x "
        f"{report['max_tokens']} tokens): {c['output_throughput']:.1f} output tok/s, TTFT p50 "
        f"{c['median_ttft_ms']:.0f} / p99 {c['p99_ttft_ms']:.0f} ms, TPOT p50 "
        f"{c['median_tpot_ms']:.1f} ms; {report['wall_s']} s.",
        "",
        f"Process CPU {report['process_cpu_s']} s; the server thread (HTTP, preparation, "
        f"detokenisation, SSE) {report['server_thread_cpu_s']} s, "
        f"{report['server_thread_us_per_token']} us per output token.",
        "",
        "| thread | name | CPU s |",
        "|---|---|---:|",
    ]
    lines += [f"| {r['tid']} | {r['name']} | {r['cpu_s']} |" for r in report["threads"][:12]]
    if "gil_samples" in report:
        total = sum(report["gil_samples"].values()) or 1
        server = sum(report["server_thread_gil_samples"].values()) or 1
        lines += ["", "GIL-holding samples (py-spy --gil):", "", "| holder | samples | share |"]
        lines += ["|---|---:|---:|"]
        lines += [
            f"| {k} | {v} | {100 * v / total:.0f}% |" for k, v in report["gil_samples"].items()
        ]
        lines += ["", "The server thread's, by what it was doing:", ""]
        lines += ["| doing | samples | share of the server thread's |", "|---|---:|---:|"]
        lines += [
            f"| {k} | {v} | {100 * v / server:.0f}% |"
            for k, v in report["server_thread_gil_samples"].items()
        ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
