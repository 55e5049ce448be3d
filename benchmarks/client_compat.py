"""Do the usual benchmark clients measure Nova right? Runs whichever of ``vllm bench serve``,
aiperf and guidellm is installed against ``nova serve --model demo`` and compares what each
reports with the server's own ``/metrics`` (scraped before and after each client's run):

- ``vllm bench serve --backend openai-chat``: its mean TTFT within 10% of the mean of the
  server's TTFT histogram (``nova_ttft_seconds``). vLLM's client times the first SSE chunk that
  has ``choices``, whatever its content, so a role-only chunk sent before prefill would make it
  report a TTFT of a few milliseconds.
- aiperf and guidellm: the number of completed requests and the output (and, where the client
  takes them from the server's usage, input) tokens equal the deltas of
  ``nova_requests_total{outcome="finished"}``, ``nova_generation_tokens_total`` and
  ``nova_prompt_tokens_total``.

Each client lives in its own virtual environment outside the repository (their pins clash with
Nova's): pass ``--vllm``, ``--aiperf``, ``--guidellm`` (the executables) or ``--peers DIR``
holding ``vllm/``, ``aiperf/``, ``guidellm/`` venvs (the vLLM-CPU recipe is in the peers notes);
a client not found is reported as skipped. Keep runs short on a shared machine:
``--num-prompts`` requests of ``--input-len`` random tokens and ``--output-len`` forced output
tokens (``ignore_eos``), one at a time (``--concurrency``).

Writes ``benchmarks/results/client_compat.{json,md}`` (``--label`` names the server variant,
``--nova-python``/``--nova-cwd`` serve another checkout for a before/after comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TTFT_TOLERANCE = 0.10  # vLLM's mean TTFT vs the server's, relative
MODEL_ID = "demo"


def scrape(base_url: str) -> dict[str, float]:
    """The /metrics samples this script compares, as plain numbers."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", timeout=30, trust_env=False).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("nova_ttft_seconds_sum", "nova_ttft_seconds_count"):
                out[s.name] = s.value
            elif s.name == "nova_requests_total" and s.labels.get("outcome") == "finished":
                out["finished"] = s.value
            elif s.name in ("nova_generation_tokens_total", "nova_prompt_tokens_total"):
                out[s.name] = s.value
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    count = d.get("nova_ttft_seconds_count", 0.0)
    d["server_mean_ttft_ms"] = 1e3 * d.get("nova_ttft_seconds_sum", 0.0) / count if count else 0.0
    return d


class NovaServer:
    def __init__(self, python: str, cwd: Path, port: int, log: Path) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = log.open("w")
        env = {**os.environ, "PYTHONPATH": str(cwd)}
        self.proc = subprocess.Popen(
            [python, "-m", "nova.server", "--model", "demo", "--port", str(port)],
            cwd=cwd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nova serve exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2, trust_env=False).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError("nova serve did not come up")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def run(cmd: list[str], env: dict[str, str] | None = None, timeout_s: float = 1800) -> str:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout_s
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{out[-3000:]}")
    return out


def run_vllm(exe: str, base_url: str, tokenizer: str, args: argparse.Namespace, work: Path):
    env = {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    run(
        [
            exe,
            "bench",
            "serve",
            "--backend",
            "openai-chat",
            "--endpoint",
            "/v1/chat/completions",
            "--base-url",
            base_url,
            "--model",
            MODEL_ID,
            "--tokenizer",
            tokenizer,
            "--dataset-name",
            "random",
            "--random-input-len",
            str(args.input_len),
            "--random-output-len",
            str(args.output_len),
            "--num-prompts",
            str(args.num_prompts),
            "--max-concurrency",
            str(args.concurrency),
            "--ignore-eos",
            "--seed",
            "1",
            "--save-result",
            "--result-dir",
            str(work),
            "--result-filename",
            "vllm.json",
            "--disable-tqdm",
        ],
        env,
    )
    r = json.loads((work / "vllm.json").read_text())
    return {
        "completed": r.get("completed"),
        "mean_ttft_ms": r.get("mean_ttft_ms"),
        "median_ttft_ms": r.get("median_ttft_ms"),
        "mean_tpot_ms": r.get("mean_tpot_ms"),
        "input_tokens": r.get("total_input_tokens"),
        "output_tokens": r.get("total_output_tokens"),
    }


def hub_cache_with(tokenizer_dir: str, cache: Path, repo: str = "nova/demo") -> str:
    """A Hugging Face hub cache in ``cache`` holding ``tokenizer_dir``'s files as ``repo``:
    aiperf loads tokenizers offline only from a hub cache, never from a plain directory."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    snap = entry / "snapshots" / "local"
    snap.mkdir(parents=True, exist_ok=True)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text("local")
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, snap / f.name)
    return repo


def run_aiperf(
    exe: str,
    base_url: str,
    tokenizer: str,
    args: argparse.Namespace,
    work: Path,
    server_counts: bool = True,
):
    """aiperf, counting tokens from the server's usage (``--use-server-token-count``) or, with
    ``server_counts=False``, its default: re-tokenising the streamed text on the client, which
    need not give back the generated token count (the decoded text of random tokens can
    re-tokenise with more merges): that run's output tokens are informational."""
    out_dir = work / ("aiperf" if server_counts else "aiperf-client-tokens")
    cache = work / "hf-hub"
    tokenizer = hub_cache_with(tokenizer, cache)
    run(
        [
            exe,
            "profile",
            "--model",
            MODEL_ID,
            "--url",
            base_url,
            "--endpoint-type",
            "chat",
            "--streaming",
            "--tokenizer",
            tokenizer,
            "--request-count",
            str(args.num_prompts),
            "--concurrency",
            str(args.concurrency),
            "--prompt-input-tokens-mean",
            str(args.input_len),
            "--prompt-input-tokens-stddev",
            "0",
            "--prompt-output-tokens-mean",
            str(args.output_len),
            "--prompt-output-tokens-stddev",
            "0",
            "--extra-inputs",
            "ignore_eos:true",
            "--random-seed",
            "1",
            "--output-artifact-dir",
            str(out_dir),
            "--ui-type",
            "none",
            "--no-server-metrics",
            "--no-gpu-telemetry",
            "--workers-max",
            "1",
            *(["--use-server-token-count"] if server_counts else []),
        ],
        {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)},
    )
    [summary] = list(out_dir.rglob("profile_export_aiperf.json"))
    r = json.loads(summary.read_text())

    def stat(name: str, key: str = "avg") -> Any:
        m = r.get(name) or {}
        return m.get(key) if isinstance(m, dict) else None

    records = [json.loads(x) for x in next(out_dir.rglob("profile_export.jsonl")).open()]

    def total(metric: str) -> int:
        return int(
            sum((rec.get("metrics", {}).get(metric) or {}).get("value", 0) or 0 for rec in records)
        )

    out = {
        "completed": stat("request_count"),
        "mean_ttft_ms": stat("time_to_first_token"),
        "input_tokens": total("input_sequence_length"),
        "output_tokens": total("output_sequence_length"),
    }
    if not server_counts:  # client-side counts: shown, not checked
        out["client_output_tokens"] = out.pop("output_tokens")
        out["client_input_tokens"] = out.pop("input_tokens")
    return out


def run_guidellm(exe: str, base_url: str, tokenizer: str, args: argparse.Namespace, work: Path):
    out = work / "guidellm.json"
    run(
        [
            exe,
            "run",
            "--backend",
            f"kind=openai_http,target={base_url},model={MODEL_ID},"
            "request_format=/v1/chat/completions",
            "--profile",
            f"kind=concurrent,streams={args.concurrency}",
            "--constraint",
            f"kind=max_requests,count={args.num_prompts}",
            "--data",
            f"kind=synthetic_text,prompt_tokens={args.input_len},output_tokens={args.output_len}",
            "--tokenizer",
            f"kind=huggingface_auto,model={tokenizer}",
            "--output",
            f"kind=json,path={out}",
            "--disable-progress",
        ],
        {"HF_HUB_OFFLINE": "1"},
    )
    [bench] = json.loads(out.read_text())["benchmarks"]
    m = bench["metrics"]

    def total(metric: str) -> int:
        return int(m[metric]["successful"]["total_sum"])

    return {
        "completed": int(m["request_totals"]["successful"]),
        "mean_ttft_ms": m["time_to_first_token_ms"]["successful"]["mean"],
        # guidellm takes both counts from the server's usage
        "input_tokens": total("prompt_token_count"),
        "output_tokens": total("output_token_count"),
    }


def judge(name: str, client: dict[str, Any], server: dict[str, float]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    checks["requests_equal"] = client.get("completed") == int(server.get("finished", -1))
    if client.get("output_tokens") is not None:
        checks["output_tokens_equal"] = int(client["output_tokens"]) == int(
            server.get("nova_generation_tokens_total", -1)
        )
    if client.get("input_tokens") is not None:
        checks["input_tokens_equal"] = int(client["input_tokens"]) == int(
            server.get("nova_prompt_tokens_total", -1)
        )
    if name == "vllm":
        mean = float(client["mean_ttft_ms"] or 0.0)
        ref = server["server_mean_ttft_ms"]
        rel = abs(mean - ref) / ref if ref else float("inf")
        checks["ttft_rel_diff"] = round(rel, 4)
        checks["ttft_within_10pct"] = rel <= TTFT_TOLERANCE
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=Path, default=Path(os.environ.get("NOVA_PEERS", "/nonexistent")))
    p.add_argument("--vllm")
    p.add_argument("--aiperf")
    p.add_argument("--guidellm")
    p.add_argument("--num-prompts", type=int, default=12)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--nova-python", default=sys.executable)
    p.add_argument("--nova-cwd", type=Path, default=ROOT)
    p.add_argument("--label", default="this branch")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="client_compat", help="results file name")
    args = p.parse_args(argv)

    exes = {}
    for name in ("vllm", "aiperf", "guidellm"):
        given = getattr(args, name)
        found = given or shutil.which(name) or str(args.peers / name / "bin" / name)
        exes[name] = found if Path(found).is_file() else None
    from nova.models.demo import build_demo_model

    tokenizer = str(build_demo_model())
    load_before = round(os.getloadavg()[0], 2)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = NovaServer(args.nova_python, args.nova_cwd, args.port, work / "server.log")
        try:
            server.wait()
            # one warm-up request: the first forward pays one-time costs
            httpx.post(
                f"{server.base_url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                timeout=300,
                trust_env=False,
            )
            runners = {
                "vllm": run_vllm,
                "aiperf": run_aiperf,
                "aiperf (client tokenizer)": lambda *a: run_aiperf(*a, server_counts=False),
                "guidellm": run_guidellm,
            }
            for name in runners:
                exe = exes[name.split()[0]]
                if exe is None:
                    results[name] = {"skipped": "not installed"}
                    continue
                before = scrape(server.base_url)
                try:
                    client = runners[name](exe, server.base_url, tokenizer, args, work)
                except Exception as exc:  # noqa: BLE001 - one client's failure is a result
                    results[name] = {"error": str(exc)[-2000:]}
                    continue
                server_delta = delta(before, scrape(server.base_url))
                results[name] = {
                    "client": client,
                    "server": {k: round(v, 3) for k, v in server_delta.items()},
                    "checks": judge(name, client, server_delta),
                }
                print(name, json.dumps(results[name], indent=1), flush=True)
        finally:
            server.stop()
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "loadavg_1min": [load_before, round(os.getloadavg()[0], 2)],
    }
    setup = {
        "server": args.label,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "concurrency": args.concurrency,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(
        json.dumps({"machine": machine, "setup": setup, "results": results}, indent=1) + "\n"
    )
    lines = [
        f"# Benchmark clients against `nova serve --model demo` ({args.label})",
        "",
        f"Machine: {machine}. {args.num_prompts} chat requests, {args.input_len} random input "
        f"tokens, {args.output_len} forced output tokens, concurrency {args.concurrency}, "
        "streamed.",
        "",
        "| client | requests (client / server) | output tokens (client / server) | "
        "input tokens (client / server) | mean TTFT ms (client / server) | checks |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "client" not in r:
            lines.append(f"| {name} | {r} | | | | |")
            continue
        c, s = r["client"], r["server"]
        lines.append(
            f"| {name} | {c.get('completed')} / {s.get('finished')} | "
            f"{c.get('output_tokens', c.get('client_output_tokens'))} / "
            f"{s.get('nova_generation_tokens_total')} | "
            f"{c.get('input_tokens', c.get('client_input_tokens', '-'))} / "
            f"{s.get('nova_prompt_tokens_total')} | "
            f"{_ms(c.get('mean_ttft_ms'))} / {_ms(s.get('server_mean_ttft_ms'))} | "
            f"{', '.join(f'{k}={v}' for k, v in r['checks'].items())} |"
        )
    lines += [
        "",
        "Checked: requests, and tokens where the client takes them from the server's usage "
        "(vLLM, guidellm, aiperf with --use-server-token-count) must equal the /metrics "
        "deltas; vLLM's mean TTFT must be within 10% of the server's. Client TTFT includes "
        "the HTTP round trip and the request's preparation (chat template, tokenisation), the "
        "server's histogram starts at the engine. aiperf (client tokenizer) counts tokens by "
        "tokenising text on the client (input: the prompt without the chat template; output: "
        "the streamed text, which random tokens need not re-tokenise to): shown, not checked.",
    ]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [
        n
        for n, r in results.items()
        if "checks" in r and not all(v for k, v in r["checks"].items() if isinstance(v, bool))
    ]
    return 1 if failed else 0


def _ms(v: Any) -> str:
    return f"{float(v):.1f}" if isinstance(v, (int, float)) else "-"


if __name__ == "__main__":
    raise SystemExit(main())
