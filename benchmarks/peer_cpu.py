"""Nova against vLLM-CPU on the same CPU, same model, same prompts, interleaved in one run.

Offline: SmolLM2-135M-Instruct (the demo's language model as a plain ``LlamaForCausalLM``
directory, ``peer_model.py``), ``--num-prompts`` chat prompts x ``--max-tokens`` forced output
tokens (``ignore_eos``), greedy. Each system lives in its own long-lived worker process (Nova in
this venv; vLLM in ``--vllm-python``'s venv, ``LLM.chat``), warmed up with one untimed run of
the whole workload (vLLM's compile cache and Nova's first-forward work happen there), then the
rounds alternate: A B C ... A B C ... Each timed run is one ``generate``/``chat`` call over all
prompts; output tok/s = output tokens / its wall time. Every run's messages start with a
salt of its own ("Warm-up. ", "Run 0. ", ...), so no engine's prefix cache answers a run from
an earlier one. Nova runs in its default configuration
(bf16, policy ``auto``: ``chunked_prefill[budget=2048]`` on a CPU; decode attention through
Nova's C++ kernel), and in fp32, ``sequential``, ``multi_stream`` (``nova-multistream``, the
default before) and with eager decode attention (``nova-eager``) for reference.

Served (``--served``): ``nova serve`` and ``vllm serve`` on the same model, both driven by the
same client (``vllm bench serve``, random dataset, ``ignore_eos``) at each ``--concurrency``,
alternating between the servers; TTFT, TPOT and output tok/s from the client. Each round has
its own prompt seed per concurrency (the servers see the same prompts in a round at one
concurrency, none from an earlier run).
``--served-systems`` adds ``nova-passive`` (``nova serve`` with ``OMP_WAIT_POLICY=PASSIVE``) and
``nova-fixed`` (``--no-cpu-adapt-threads``: the thread count ignores other processes) and
``nova-chunked`` (``--policy chunked_prefill``: prompt chunks fused into the decode steps, the
paper's budget of 128), ``nova-multistream`` and ``nova-eager``.

Writes benchmarks/results/peer_cpu.{json,md} (``--tag`` adds a suffix) with the machine and
its load average before and after every run. Without vLLM installed (no ``--vllm-python``
or it cannot import vllm) only Nova's rows are written.

Usage:
  .venv/bin/python benchmarks/peer_cpu.py --vllm-python /work/peer/venv/bin/python
  .venv/bin/python benchmarks/peer_cpu.py --vllm-python ... --served --concurrency 8 32
The worker processes import only the standard library at module level, so this file runs
in vLLM's venv too (``--worker vllm``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LOGS = Path(tempfile.gettempdir())  # the workers' and servers' own output: LOGS/peer_*.log

TOPICS = (
    "how a bicycle stays upright",
    "why the sky is blue",
    "how to keep a houseplant alive",
    "the water cycle",
    "how vaccines train the immune system",
    "what a hash table is",
    "why cats purr",
    "how to make green tea",
    "what recursion is",
    "how tides work",
    "why leaves change colour in autumn",
    "how a refrigerator keeps food cold",
    "what inflation means",
    "how airplanes fly",
    "why we dream",
    "how solar panels make electricity",
)
STYLES = (
    "Explain {t} to a ten year old.",
    "Write a short paragraph about {t}.",
    "Give three facts about {t}.",
    "Summarise {t} in plain words.",
)

NOVA_SYSTEMS = {
    # name -> LLM kwargs; "nova" is the default configuration (bf16; the default policy)
    "nova": {"dtype": "bfloat16"},
    "nova-fp32": {"dtype": "float32"},
    "nova-sequential": {"dtype": "bfloat16", "policy": "sequential"},
    "nova-policy-nova": {"dtype": "bfloat16", "policy": "nova"},
    "nova-chunked": {"dtype": "bfloat16", "policy": "chunked_prefill"},
    "nova-chunked2048": {"dtype": "bfloat16", "policy": "chunked_prefill[budget=2048]"},
    "nova-multistream": {"dtype": "bfloat16", "policy": "multi_stream"},  # the default until s5
    # decode attention without Nova's C++ kernel (gather + bmm), the default before it
    "nova-eager": {"dtype": "bfloat16", "attention_backend": "cpu_eager"},
}


def chat_prompts(n: int, salt: str = "") -> list[list[dict[str, str]]]:
    """``n`` different one-turn chats (the same list for every system). ``salt`` starts every
    message: each run gets its own (the warm-up and every round), so that no engine's prefix
    cache answers a run from an earlier one (the chat template's own prefix stays shared)."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        style = STYLES[(i // len(TOPICS)) % len(STYLES)]
        out.append([{"role": "user", "content": salt + style.format(t=topic)}])
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- workers (one process per system family) ---------------------------------------------------
class NovaWorker:
    def __init__(self, model: str, num_prompts: int, max_tokens: int) -> None:
        self.model, self.max_tokens, self.num_prompts = model, max_tokens, num_prompts
        self.llms: dict[str, Any] = {}

    def _llm(self, system: str) -> Any:
        from nova.llm import LLM

        if system not in self.llms:
            self.llms[system] = LLM(self.model, **NOVA_SYSTEMS[system])
        return self.llms[system]

    def run(self, system: str, num_prompts: int | None = None, salt: str = "") -> dict[str, Any]:
        from nova.sampling_params import SamplingParams

        llm = self._llm(system)
        params = SamplingParams(max_tokens=self.max_tokens, ignore_eos=True)
        chats = chat_prompts(self.num_prompts, salt)
        inputs = [{"messages": m} for m in chats[:num_prompts]]
        t0 = time.perf_counter()
        outs = llm.generate(inputs, params)
        wall = time.perf_counter() - t0
        return {
            "wall_s": wall,
            "output_tokens": sum(len(o.output_token_ids) for o in outs),
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
            "errors": sum(o.error is not None for o in outs),
            "sample": outs[0].text[:120] if outs[0].text else "",
        }

    def describe(self) -> dict[str, Any]:
        import torch

        return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


class VllmWorker:
    def __init__(self, model: str, num_prompts: int, max_tokens: int) -> None:
        from vllm import LLM, SamplingParams

        self.num_prompts = num_prompts
        self.params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        self.llm = LLM(model=model, dtype="bfloat16", max_num_seqs=max(num_prompts, 1))

    def run(self, system: str, num_prompts: int | None = None, salt: str = "") -> dict[str, Any]:
        chats = chat_prompts(self.num_prompts, salt)
        t0 = time.perf_counter()
        outs = self.llm.chat(chats[:num_prompts], self.params, use_tqdm=False)
        wall = time.perf_counter() - t0
        return {
            "wall_s": wall,
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
            "errors": 0,
            "sample": outs[0].outputs[0].text[:120],
        }

    def describe(self) -> dict[str, Any]:
        import torch
        import vllm

        return {"torch": torch.__version__, "vllm": vllm.__version__}


def worker_main(kind: str, model: str, num_prompts: int, max_tokens: int) -> None:
    """JSON lines on stdin ({"run": system} or {"quit": true}); one JSON line per answer on
    stdout (anything else the libraries print goes to stderr)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # libraries' prints go to stderr; stdout carries only answers
    worker = (NovaWorker if kind == "nova" else VllmWorker)(model, num_prompts, max_tokens)
    out.write(json.dumps({"ready": worker.describe()}) + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("quit"):
            break
        answer = worker.run(msg["run"], msg.get("num_prompts"), msg.get("salt", ""))
        out.write(json.dumps(answer) + "\n")


def vllm_env(cores: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "4"),
        VLLM_HOST_IP="127.0.0.1",
        VLLM_CPU_OMP_THREADS_BIND=env.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}"),
        VLLM_CPU_NUM_OF_RESERVED_CPU=env.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
    )
    return env


class Worker:
    def __init__(self, python: str, kind: str, args: argparse.Namespace, env=None) -> None:
        cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--model", args.model]
        cmd += ["--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens)]
        self.kind = kind
        self.log = open(LOGS / f"peer_{kind}.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=str(HERE),
        )
        self.info = self._read().get("ready", {})

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} worker exited; see {self.log.name}")
        return json.loads(line)

    def run(self, system: str, num_prompts: int | None = None, salt: str = "") -> dict[str, Any]:
        assert self.proc.stdin is not None
        msg = {"run": system, "num_prompts": num_prompts, "salt": salt}
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.log.close()


def vllm_available(python: str | None) -> bool:
    if not python:
        return False
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, env=vllm_env(1))
    return probe.returncode == 0


def run_offline(args: argparse.Namespace, systems: list[str], on_run: Any = None) -> dict[str, Any]:
    """Warm-up per system (``--warmup-prompts`` of the prompts, untimed), then ``--rounds``
    rounds of every system in turn; systems other than ``nova`` and ``vllm`` run in the first
    ``--reference-rounds`` rounds only. ``on_run(partial_result)`` after every timed run."""
    workers: dict[str, Worker] = {}
    cores = os.cpu_count() or 1
    if any(s.startswith("nova") for s in systems):
        workers["nova"] = Worker(sys.executable, "nova", args)
    if "vllm" in systems:
        workers["vllm"] = Worker(args.vllm_python, "vllm", args, vllm_env(cores))
    runs: list[dict[str, Any]] = []
    try:
        for system in systems:  # warm-up: one untimed run each
            r = workers[system.split("-")[0]].run(system, args.warmup_prompts, "Warm-up. ")
            print(f"warm-up {system}: {r['output_tokens'] / r['wall_s']:.1f} tok/s", flush=True)
        for rnd in range(args.rounds):
            for system in systems:
                if system not in ("nova", "vllm") and rnd >= args.reference_rounds:
                    continue
                before = loadavg()
                r = workers[system.split("-")[0]].run(system, None, f"Run {rnd}. ")
                r.update(
                    system=system,
                    round=rnd,
                    output_tok_s=r["output_tokens"] / r["wall_s"],
                    loadavg_before=before,
                    loadavg_after=loadavg(),
                )
                runs.append(r)
                print(
                    f"round {rnd} {system}: {r['output_tok_s']:.1f} tok/s "
                    f"({r['output_tokens']} tokens, {r['wall_s']:.2f} s, load {before[0]})",
                    flush=True,
                )
                if on_run is not None:
                    on_run(_offline_result(workers, runs, systems))
    finally:
        for w in workers.values():
            w.close()
    return _offline_result(workers, runs, systems)


def _offline_result(
    workers: dict[str, Worker], runs: list[dict[str, Any]], systems: list[str]
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for system in systems:
        rates = [r["output_tok_s"] for r in runs if r["system"] == system]
        if not rates:
            continue
        summary[system] = {
            "best_tok_s": round(max(rates), 1),
            "median_tok_s": round(statistics.median(rates), 1),
            "runs_tok_s": [round(x, 1) for x in rates],
        }
    if "nova" in summary and "vllm" in summary:
        summary["nova_over_vllm_best"] = round(
            summary["nova"]["best_tok_s"] / summary["vllm"]["best_tok_s"], 3
        )
        summary["nova_over_vllm_median"] = round(
            summary["nova"]["median_tok_s"] / summary["vllm"]["median_tok_s"], 3
        )
    return {
        "workers": {k: w.info for k, w in workers.items()},
        "runs": runs,
        "summary": summary,
    }


# -- served ------------------------------------------------------------------------------------
def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"{url} not healthy after {timeout_s} s")


# served Nova variants -> environment of their ``nova serve`` ("nova": as it is started by
# default; "nova-passive": libgomp's idle team threads sleep instead of spinning, which libgomp
# reads once, when torch loads it; "nova-fixed": the intra-op thread count stays at the cores
# whatever else runs on them)
SERVED_NOVA_ENV: dict[str, dict[str, str]] = {
    "nova": {},
    "nova-passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "nova-fixed": {},
    "nova-chunked": {},
    "nova-chunked2048": {},
    "nova-multistream": {},
    "nova-eager": {},
}
SERVED_NOVA_FLAGS: dict[str, list[str]] = {
    "nova-fixed": ["--no-cpu-adapt-threads"],
    "nova-chunked": ["--policy", "chunked_prefill"],  # prompts fused into decode steps
    # (a step of 2048 tokens: a wave of 32 short prompts in one or two steps, as vLLM's budget)
    "nova-chunked2048": ["--policy", "chunked_prefill[budget=2048]"],
    "nova-multistream": ["--policy", "multi_stream"],
    "nova-eager": ["--attention-backend", "cpu_eager"],
}


def start_server(kind: str, args: argparse.Namespace, port: int) -> tuple[subprocess.Popen, Any]:
    log = open(LOGS / f"serve_{kind}.log", "w")  # noqa: SIM115 - closed by the caller
    if kind.startswith("nova"):
        cmd = [sys.executable, "-m", "nova.cli", "serve", "--model", args.model]
        cmd += ["--dtype", "bfloat16", "--port", str(port), "--served-model-name", "peer"]
        cmd += SERVED_NOVA_FLAGS.get(kind, [])
        env = dict(os.environ)
        env.update(SERVED_NOVA_ENV[kind])
    else:
        vllm = str(Path(args.vllm_python).parent / "vllm")
        cmd = [vllm, "serve", args.model, "--dtype", "bfloat16", "--port", str(port)]
        cmd += ["--served-model-name", "peer"]
        env = vllm_env(os.cpu_count() or 1)
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    return proc, log


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def bench_serve(
    args: argparse.Namespace,
    port: int,
    concurrency: int,
    tmp: Path,
    num: int | None = None,
    seed: int = 0,
) -> dict:
    """``vllm bench serve`` against the server on ``port`` (``num`` prompts; default
    ``--served-prompts``); its saved result dict. ``seed``: the random prompts' seed (each round
    its own, so that no server answers prompts it has already cached in an earlier round)."""
    vllm = str(Path(args.vllm_python).parent / "vllm")
    name = f"bench_{port}_{concurrency}_{time.monotonic_ns()}.json"
    num = num or args.served_prompts or max(4 * concurrency, 64)
    cmd = [
        vllm, "bench", "serve", "--backend", "openai-chat",
        "--endpoint", "/v1/chat/completions", "--base-url", f"http://127.0.0.1:{port}",
        "--model", "peer", "--tokenizer", args.model, "--dataset-name", "random",
        "--random-input-len", str(args.served_input_len),
        "--random-output-len", str(args.max_tokens), "--ignore-eos",
        "--num-prompts", str(num), "--max-concurrency", str(concurrency),
        "--request-rate", "inf", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99", "--save-result", "--result-dir", str(tmp),
        "--result-filename", name,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, env=vllm_env(1), stdout=sys.stderr)
    return json.loads((tmp / name).read_text())


def prefix_cache_tokens(port: int) -> tuple[float, float] | None:
    """(hit, queried) prompt tokens of a Nova server's prefix cache so far (its /metrics)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    wanted = ("nova_prefix_cache_hit_tokens_total", "nova_prefix_cache_queried_tokens_total")
    found = {
        s.name: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name in wanted
    }
    if len(found) != 2:
        return None
    return found[wanted[0]], found[wanted[1]]


SERVED_CLIENT = "vllm bench serve (random dataset, ignore_eos)"
SERVED_KEYS = (
    "completed",
    "output_throughput",
    "request_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "median_e2el_ms",
    "p99_e2el_ms",
    "duration",
)


def run_served(args: argparse.Namespace, on_row: Any = None) -> dict[str, Any]:
    ports = {kind: args.port + i for i, kind in enumerate(args.served_systems)}
    servers = {}
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="peer_serve_"))
    try:
        for kind, port in ports.items():
            servers[kind] = start_server(kind, args, port)
        for kind, port in ports.items():
            wait_healthy(f"http://127.0.0.1:{port}", servers[kind][0], args.startup_timeout_s)
        for port in ports.values():  # warm-up (untimed)
            bench_serve(args, port, min(args.concurrency), tmp, 2 * min(args.concurrency), 1000)
        for rnd in range(args.rounds):
            for ci, conc in enumerate(args.concurrency):
                for kind, port in ports.items():
                    before = loadavg()
                    cached0 = prefix_cache_tokens(port) if kind.startswith("nova") else None
                    # (a seed per round and concurrency: a run at one concurrency would
                    # otherwise repeat the prompts of the run before it at another)
                    seed = 0 if args.same_seed else 1 + rnd * len(args.concurrency) + ci
                    res = bench_serve(args, port, conc, tmp, seed=seed)
                    row = {k: res.get(k) for k in SERVED_KEYS}
                    cached1 = prefix_cache_tokens(port) if kind.startswith("nova") else None
                    if cached0 is not None and cached1 is not None:
                        # prompt tokens the server's prefix cache answered during the run
                        row["prefix_cache_hit_tokens"] = cached1[0] - cached0[0]
                        row["prefix_cache_queried_tokens"] = cached1[1] - cached0[1]
                    row.update(
                        system=kind,
                        concurrency=conc,
                        round=rnd,
                        loadavg_before=before,
                        loadavg_after=loadavg(),
                    )
                    rows.append(row)
                    if on_row is not None:
                        on_row({"client": SERVED_CLIENT, "rows": rows})
                    print(
                        f"served round {rnd} c={conc} {kind}: "
                        f"{row['output_throughput']:.1f} tok/s, TTFT p99 {row['p99_ttft_ms']:.0f}"
                        f" ms, TPOT p50 {row['median_tpot_ms']:.1f} ms",
                        flush=True,
                    )
    finally:
        for proc, log in servers.values():
            stop_server(proc)
            log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"client": SERVED_CLIENT, "rows": rows}


# -- report ------------------------------------------------------------------------------------
def write_report(report: dict[str, Any], tag: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"peer_cpu{('_' + tag) if tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = [
        "# Nova vs vLLM-CPU on the same CPU (interleaved in one run)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {report['date']}; load average at start "
        f"{report['loadavg_start']}, at end {report['loadavg_end']}.",
        f"Model: {report['model']} (bf16 unless named). {report['note']}"
        + ("" if report.get("complete") else " **Partial: the run was still going.**"),
        "",
    ]
    off = report.get("offline")
    if off:
        lines += [
            f"## Offline: {report['num_prompts']} chat prompts x {report['max_tokens']} output "
            "tokens (ignore_eos), greedy",
            "",
            "| system | best tok/s | median tok/s | runs | load 1-min during runs |",
            "|---|---:|---:|---|---|",
        ]
        for system, s in off["summary"].items():
            if not isinstance(s, dict):
                continue
            loads = [r["loadavg_before"][0] for r in off["runs"] if r["system"] == system]
            lines.append(
                f"| {system} | {s['best_tok_s']} | {s['median_tok_s']} | "
                f"{', '.join(map(str, s['runs_tok_s']))} | {', '.join(map(str, loads))} |"
            )
        if "nova_over_vllm_best" in off["summary"]:
            lines += [
                "",
                f"Nova (default) / vLLM-CPU: {off['summary']['nova_over_vllm_best']} (best), "
                f"{off['summary']['nova_over_vllm_median']} (median).",
            ]
        lines.append("")
    served = report.get("served")
    if served:
        lines += [
            f"## Served: {served['client']}",
            "",
            "| system | concurrency | round | out tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
            "| TPOT p99 ms | load 1-min | prompt tokens from Nova's prefix cache |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in served["rows"]:
            hit, queried = r.get("prefix_cache_hit_tokens"), r.get("prefix_cache_queried_tokens")
            cached = f"{hit:.0f} of {queried:.0f}" if hit is not None and queried else "-"
            lines.append(
                f"| {r['system']} | {r['concurrency']} | {r['round']} | "
                f"{r['output_throughput']:.1f} | {r['median_ttft_ms']:.0f} | "
                f"{r['p99_ttft_ms']:.0f} | {r['median_tpot_ms']:.1f} | {r['p99_tpot_ms']:.1f} | "
                f"{r['loadavg_before'][0]} | {cached} |"
            )
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))
    return stem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=["nova", "vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="default: peer_model.py's directory")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--reference-rounds",
        type=int,
        default=None,
        help="rounds of the systems other than nova and vllm (default: --rounds)",
    )
    ap.add_argument(
        "--warmup-prompts", type=int, default=None, help="prompts of the warm-up run (default: all)"
    )
    ap.add_argument(
        "--systems",
        nargs="+",
        default=["nova", "vllm", "nova-fp32", "nova-sequential"],
        help=f"any of vllm, {', '.join(NOVA_SYSTEMS)}",
    )
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"))
    ap.add_argument("--no-offline", action="store_true")
    ap.add_argument("--served", action="store_true")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument(
        "--served-systems",
        nargs="+",
        default=["nova", "vllm"],
        choices=[*SERVED_NOVA_ENV, "vllm"],
        help="servers to compare, each on its own port (default: nova vllm)",
    )
    ap.add_argument("--served-prompts", type=int, default=None, help="default: 4 x concurrency")
    ap.add_argument(
        "--same-seed",
        action="store_true",
        help="every served round with prompt seed 0 (as before: later rounds repeat prompts)",
    )
    ap.add_argument("--served-input-len", type=int, default=48)
    ap.add_argument("--port", type=int, default=8310)
    ap.add_argument("--startup-timeout-s", type=float, default=600.0)
    ap.add_argument("--tag", default="", help="results file suffix (e.g. the load it ran under)")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    if args.worker:
        worker_main(args.worker, args.model, args.num_prompts, args.max_tokens)
        return
    if args.model is None:
        sys.path.insert(0, str(HERE))
        from peer_model import export_text_model

        args.model = str(export_text_model())
    have_vllm = vllm_available(args.vllm_python)
    systems = [s for s in args.systems if s != "vllm" or have_vllm]
    unknown = [s for s in systems if s != "vllm" and s not in NOVA_SYSTEMS]
    if unknown:
        ap.error(f"unknown systems {unknown}")
    if not have_vllm:
        print("vLLM not available (--vllm-python): Nova's rows only", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.reference_rounds is None:
        args.reference_rounds = args.rounds
    report: dict[str, Any] = {
        "benchmark": "peer_cpu",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "model": args.model,
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "reference_rounds": args.reference_rounds,
        "warmup_prompts": args.warmup_prompts,
        "served_prompts": args.served_prompts,
        "served_systems": args.served_systems if args.served else None,
        "loadavg_start": loadavg(),
        "note": args.note,
    }
    report["loadavg_end"] = None  # (a partial report until the end)

    def save(part: str) -> Any:
        def update(value: dict[str, Any]) -> None:
            report[part] = value
            report["loadavg_end"] = loadavg()
            write_report(report, args.tag)

        return update

    if not args.no_offline:
        report["offline"] = run_offline(args, systems, save("offline"))
    if args.served and have_vllm:
        report["served"] = run_served(args, save("served"))
    report["loadavg_end"] = loadavg()
    report["complete"] = True
    stem = write_report(report, args.tag)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
