"""The long schemathesis run against Nova's API: every check (``--checks all``, with
``tests/schemathesis_hooks.py``'s ``positive_data_acceptance_nova`` in place of
``positive_data_acceptance``), the coverage phase and a long fuzzing phase with a fresh seed,
on the tiny random chat model (``nova.server.testing.build_tiny_chat_model``, context 64) served
over a real socket. CI runs a short, fixed-seed version (tests/test_server_fuzz.py). Writes
``benchmarks/results/schemathesis_long.md``: the seed, the case counts and any failures.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-examples", type=int, default=1000, help="fuzzing cases per operation")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)

    from nova.config import EngineConfig
    from nova.engine.async_engine import AsyncEngine
    from nova.server.app import create_app
    from nova.server.config import ServerConfig
    from nova.server.testing import ServerThread, build_tiny_chat_model

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_chat_model(Path(tmp) / "m", max_model_len=64)
        engine = AsyncEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64, block_size=16))
        app = create_app(
            engine,
            ServerConfig(
                served_model_name="tiny", max_images_per_request=2, max_image_pixels=256 * 256
            ),
        )
        cmd = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--phases",
            "coverage,fuzzing",
            "--max-examples",
            str(args.max_examples),
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--max-response-time",
            "30",
            "--continue-on-failure",
            "--seed",
            str(seed),
        ]
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT / "tests"),
            "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
            "NO_COLOR": "1",
        }
        t0 = time.monotonic()
        try:
            with ServerThread(app) as srv:
                proc = subprocess.run(
                    [*cmd, f"{srv.base_url}/openapi.json"],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=tmp,  # schemathesis keeps a cache in its cwd
                )
        finally:
            engine.shutdown()
        wall_s = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    m = re.search(r"(\d+) generated, (.*)", out)
    summary = m.group(0) if m else "(no summary)"
    failures = re.findall(r"^- (ST\d+ .*)$", out, flags=re.M)
    lines = [
        "# schemathesis, long run (benchmarks/schemathesis_long.py)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.2f}. Tiny random chat model (context 64). Seed {seed}; "
        f"{args.max_examples} fuzzing cases per operation plus the coverage phase; "
        f"{wall_s:.0f} s.",
        "",
        f"- exit code {proc.returncode}",
        f"- {summary}",
        f"- failures: {len(failures)}",
        *[f"  - {f}" for f in dict.fromkeys(failures)],
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "schemathesis_long.md").write_text("\n".join(lines) + "\n")
    print(out[-3000:])
    print("\n".join(lines))
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
