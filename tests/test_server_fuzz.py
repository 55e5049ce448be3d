"""Schemathesis against the server's own OpenAPI schema, on a tiny random model with a real
tokenizer: its CLI with every check (``--checks all``; ``positive_data_acceptance`` replaced by
``tests/schemathesis_hooks.py``'s stricter-about-codes version) over the coverage phase (every
boundary value, enum member, missing field, wrong type and undeclared HTTP method) and a short
fuzzing phase, through a real socket; then nothing is left in the engine, every KV block is free
and a good request works. ``benchmarks/schemathesis_long.py`` runs the long version."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from nova.config import EngineConfig  # noqa: E402
from nova.engine.async_engine import AsyncEngine  # noqa: E402
from nova.server.app import create_app  # noqa: E402
from nova.server.config import ServerConfig  # noqa: E402
from nova.server.testing import ServerThread, build_tiny_chat_model  # noqa: E402

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
FUZZ_EXAMPLES = 40  # fuzzing examples per operation (the coverage phase's cases are fixed)
CALL_TIMEOUT_S = 30.0  # a response slower than this counts as a hang


def run_schemathesis(base_url: str, max_examples: int, extra: list[str] | None = None):
    # deterministic in CI (a fixed seed): benchmarks/schemathesis_long.py draws new ones
    """The schemathesis CLI against ``base_url``: (exit code, output)."""
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{base_url}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--phases",
        "coverage,fuzzing",
        "--max-examples",
        str(max_examples),
        "--workers",
        "1",
        "--request-timeout",
        str(CALL_TIMEOUT_S),
        "--max-response-time",
        str(CALL_TIMEOUT_S),
        "--continue-on-failure",
        "--max-failures",
        "100",
        *(extra if extra is not None else ["--seed", "1", "--generation-deterministic"]),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "NO_COLOR": "1",
    }
    with tempfile.TemporaryDirectory() as cwd:  # schemathesis keeps a cache in its cwd
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=cwd)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def fuzz_engine(tmp_path_factory):
    # Context 64: the longest valid generation is ~35 decode steps of a 3M-parameter model.
    model_dir = build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat") / "m", max_model_len=64)
    engine = AsyncEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64, block_size=16))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def fuzz_app(fuzz_engine):
    return create_app(
        fuzz_engine,
        ServerConfig(
            served_model_name="tiny", max_images_per_request=2, max_image_pixels=256 * 256
        ),
    )


def test_schema_has_every_endpoint_and_no_422(fuzz_app):
    raw = fuzz_app.openapi()
    assert set(raw["paths"]) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/metrics",
    }
    for path in raw["paths"].values():
        for op in path.values():
            assert "422" not in op["responses"]


def test_schemathesis_coverage_and_fuzzing_find_nothing(fuzz_app, fuzz_engine):
    t0 = time.monotonic()
    with ServerThread(fuzz_app) as srv:
        code, out = run_schemathesis(srv.base_url, FUZZ_EXAMPLES)
    tail = out[-6000:]
    print(f"\nschemathesis took {time.monotonic() - t0:.1f} s\n{out[-600:]}")
    assert code == 0, tail
    assert "No issues found" in out, tail
    m = re.search(r"(\d+) generated, (\d+) passed", out)
    assert m is not None, tail
    # the coverage phase alone makes well over a thousand cases across the five operations
    assert int(m.group(1)) >= 1000 and m.group(1) == m.group(2), tail

    # afterwards: nothing left in the engine, every KV block free, and a good request works
    llm_engine = fuzz_engine.llm_engine
    deadline = time.monotonic() + 10
    while llm_engine.scheduler.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not llm_engine.scheduler.has_unfinished()
    bm = llm_engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    import httpx

    app = create_app(fuzz_engine, ServerConfig(served_model_name="tiny"))

    async def good():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            return await c.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            )

    import asyncio

    resp = asyncio.run(good())
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4


def test_extreme_sampling_values_are_served(fuzz_engine):
    """Regressions found by fuzzing: a top_p that underflows float32, tiny temperatures."""
    import asyncio

    import httpx

    app = create_app(fuzz_engine, ServerConfig(served_model_name="tiny"))
    bodies = [
        {"prompt": "hi", "top_p": 8.7e-297, "max_tokens": 3},
        {"prompt": "hi", "temperature": 1e-5, "max_tokens": 3},
        {
            "prompt": "hi",
            "temperature": 2.0,
            "top_p": 5e-324,
            "top_k": 10**30,
            "seed": -(2**63),
            "max_tokens": 3,
        },
        # float32 turns 5e-324 into 0: an infinite penalty, finite logits and logprobs still
        {"prompt": "hi", "repetition_penalty": 5e-324, "logprobs": 3, "max_tokens": 3},
        {"prompt": "hi", "temperature": 1.0, "seed": 2**70, "max_tokens": 3},
    ]

    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            return [await c.post("/v1/completions", json=b) for b in bodies]

    for resp in asyncio.run(go()):
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 3
