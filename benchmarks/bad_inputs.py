"""The bad inputs of the API issue against ``nova serve --model demo`` over HTTP: each must get a
4xx naming the problem within a second, the server's memory must come back to its baseline,
and the next request must be served. Measures, per input: status, error code, the time to the
answer (client-side, the body's upload included) and the server's resident memory after it
(``/proc/PID/status`` VmRSS). Writes ``benchmarks/results/bad_inputs_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def png_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def cases() -> list[tuple[str, str, bytes]]:
    """(name, path, raw JSON body)."""

    def chat(content, **extra) -> bytes:
        body = {"model": "demo", "messages": [{"role": "user", "content": content}], **extra}
        return json.dumps(body).encode()

    image = {"type": "image_url", "image_url": {"url": png_url()}}
    return [
        ("50 MB of text", "/v1/chat/completions", chat("word " * 10_000_000, max_tokens=4)),
        ("20 MB of text", "/v1/chat/completions", chat("word " * 4_000_000, max_tokens=4)),
        (
            "text over the context (54 KB)",
            "/v1/chat/completions",
            chat("hello " * 9000, max_tokens=4),
        ),
        (
            "<image> typed, no image (served: it is text)",
            "/v1/chat/completions",
            chat("<image> hi", max_tokens=2),
        ),
        (
            "195 <image> typed + 1 image (served: one image's tokens)",
            "/v1/chat/completions",
            chat([image, {"type": "text", "text": "<image>" * 195}], max_tokens=2),
        ),
        ("invalid UTF-8", "/v1/completions", b'{"prompt": "ab\xff\xfe", "max_tokens": 2}'),
        ("unknown model", "/v1/chat/completions", chat("hi", model="gpt-4o")),
        (
            "top_logprobs: false",
            "/v1/chat/completions",
            chat("hi", logprobs=True, top_logprobs=False),
        ),
        ("logprobs: 0 (chat)", "/v1/chat/completions", chat("hi", logprobs=0)),
        ('prompt: ""', "/v1/completions", json.dumps({"prompt": ""}).encode()),
        (
            'image_url.url: ""',
            "/v1/chat/completions",
            chat([{"type": "image_url", "image_url": {"url": ""}}]),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8125)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    base = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "nova.server", "--model", "demo", "--port", str(args.port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows = []
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2, trust_env=False).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("nova serve did not come up")
            time.sleep(1)
        good = json.dumps(
            {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        ).encode()
        with httpx.Client(base_url=base, timeout=120, trust_env=False) as http:
            headers = {"content-type": "application/json"}
            http.post("/v1/chat/completions", content=good, headers=headers)
            baseline = rss_mb(server.pid)
            for name, path, body in cases():
                t0 = time.perf_counter()
                r = http.post(path, content=body, headers=headers)
                took = time.perf_counter() - t0
                err = r.json().get("error") if r.status_code >= 400 else None
                after = rss_mb(server.pid)
                ok = http.post("/v1/chat/completions", content=good, headers=headers)
                rows.append(
                    {
                        "input": name,
                        "body_mb": round(len(body) / 1e6, 2),
                        "status": r.status_code,
                        "code": err and err.get("code"),
                        "param": err and err.get("param"),
                        "message": err and err.get("message")[:140],
                        "seconds": round(took, 3),
                        "rss_after_mb": round(after, 1),
                        "next_request": ok.status_code,
                    }
                )
                print(rows[-1], flush=True)
            final = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    result = {
        "machine": machine,
        "baseline_rss_mb": round(baseline, 1),
        "final_rss_mb": round(final, 1),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bad_inputs_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Bad inputs against `nova serve --model demo` (benchmarks/bad_inputs.py)",
        "",
        f"Machine: {machine}. Server RSS after a warm-up request: {baseline:.0f} MB; after all "
        f"cases: {final:.0f} MB. Time: client-side, upload of the body included.",
        "",
        "| input | body MB | status | code | s | server RSS after, MB | next request |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['input']} | {r['body_mb']} | {r['status']} | {r['code'] or ''} | {r['seconds']} | "
        f"{r['rss_after_mb']} | {r['next_request']} |"
        for r in rows
    ]
    (args.out / "bad_inputs_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
