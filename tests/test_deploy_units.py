"""The Ray-free parts of ``nova.deploy``, without a cluster: the session hash ring, session keys,
driving the ``nova serve`` app in-process (what a replica does with a forwarded request),
merging Prometheus text, the Serve options, ``serve.yaml``'s builder arguments, and that
``nova serve`` without ``--replicas`` never imports Ray."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from nova.deploy.asgi import ResponseStart, drive_asgi
from nova.deploy.config import (
    CONTROL_SLOTS,
    ROUTER_CLASS,
    DeployConfig,
    replica_options,
    saturation_threshold,
)
from nova.deploy.promtext import merge, relabel
from nova.deploy.ring import HashRing, replica_name, ring_owner
from nova.deploy.session import PROMPT_PREFIX_CHARS, session_key
from nova.server.app import create_app
from nova.server.config import ServerConfig
from nova.server.testing import ServerThread

ROOT = Path(__file__).resolve().parents[1]
NAMES = [replica_name(i) for i in range(4)]


# -- the ring ------------------------------------------------------------------------------
def test_ring_owner_is_a_function_of_the_key_and_the_set_of_names():
    keys = [f"s:{i}" for i in range(300)]
    a = HashRing(NAMES)
    b = HashRing(list(reversed(NAMES)))
    assert [a.owner(k) for k in keys] == [b.owner(k) for k in keys]
    assert all(a.owner(k) == ring_owner(k, NAMES) for k in keys)
    assert HashRing([]).owner("s:x") is None and HashRing([]).lookup("s:x", 2) == []


def test_a_departure_moves_only_the_departed_replicas_sessions_and_a_return_restores_them():
    keys = [f"s:{i}" for i in range(2000)]
    full = HashRing(NAMES)
    without = HashRing(NAMES[:2] + NAMES[3:])  # replica-2 left
    before = {k: full.owner(k) for k in keys}
    after = {k: without.owner(k) for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "replica-2"}
    # each moved session goes where the full ring said its second choice was
    assert all(after[k] == full.lookup(k, 2)[1] for k in moved)
    again = HashRing(NAMES)  # the replica is back: a ring built anew
    assert {k: again.owner(k) for k in keys} == before  # the restart takes the same arcs


def test_the_ring_spreads_sessions_and_lookup_gives_distinct_names():
    ring = HashRing(NAMES)
    counts = Counter(ring.owner(f"s:{i}") for i in range(4000))
    assert set(counts) == set(NAMES)
    assert all(600 < c < 1400 for c in counts.values()), counts  # 1000 each if perfectly even
    ranked = HashRing(NAMES).lookup("s:abc", 10)
    assert sorted(ranked) == sorted(NAMES)  # at most one entry per name
    assert HashRing(NAMES).lookup("s:abc", 2) == ranked[:2]
    with pytest.raises(ValueError):
        HashRing(NAMES, vnodes=0)


# -- session keys --------------------------------------------------------------------------
def chat(*messages: dict, **extra) -> bytes:
    return json.dumps({"model": "m", "messages": list(messages), **extra}).encode()


SYSTEM = {"role": "system", "content": "You operate a phone."}
USER1 = {"role": "user", "content": [{"type": "text", "text": "open settings"}]}


def test_session_key_prefers_the_header_then_user_then_the_first_turn():
    body = chat(SYSTEM, USER1, user="agent-7")
    k = session_key({"x-session-id": "abc"}, body)
    assert (k.key, k.source) == ("s:abc", "header")
    k = session_key({}, body)
    assert (k.key, k.source) == ("u:agent-7", "user")
    k = session_key({"x-session-id": "  "}, chat(SYSTEM, USER1))
    assert k.source == "conversation" and k.key and k.key.startswith("c:")


def test_every_step_of_a_conversation_has_its_first_turns_key():
    step1 = session_key({}, chat(SYSTEM, USER1))
    a1 = {"role": "assistant", "content": "tap(3)"}
    u2 = {"role": "user", "content": "now wifi"}
    step3 = session_key({}, chat(SYSTEM, USER1, a1, u2, a1, u2, max_tokens=9))
    assert step1 == step3
    other = session_key({}, chat(SYSTEM, {"role": "user", "content": "open mail"}))
    assert other.key != step1.key
    no_system = session_key({}, chat(USER1))
    assert no_system == session_key({}, chat(USER1, a1, u2))
    assert no_system.key != step1.key


def test_completion_sessions_key_on_the_prompt_prefix():
    head = "x" * PROMPT_PREFIX_CHARS
    assert session_key({}, json.dumps({"prompt": head + "step 1"}).encode()) == session_key(
        {}, json.dumps({"prompt": head + "step 2, longer"}).encode()
    )
    ids = session_key({}, json.dumps({"prompt": [1, 2, 3]}).encode())
    assert ids.source == "conversation" and ids.key != session_key({}, b'{"prompt": "a"}').key


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'{"messages": []}', b"\xff\xfe"])
def test_a_request_without_a_session_has_no_key(body):
    k = session_key({}, body)
    assert (k.key, k.source) == (None, "none")


# -- driving the nova serve app in-process ---------------------------------------------------
def _fake_client():
    from test_server_seam import FakeClient  # the EngineClient fake of the server's seam tests

    return FakeClient()


async def _collect(app, method, path, body=b"", headers=()):
    start, chunks = None, []
    hdrs = [("content-type", "application/json"), *headers]
    async for item in drive_asgi(app, method, path, b"", hdrs, body):
        if isinstance(item, ResponseStart):
            assert start is None
            start = item
        else:
            chunks.append(item)
    assert start is not None
    return start, chunks


@pytest.fixture(scope="module")
def fake_app():
    return create_app(_fake_client(), ServerConfig(served_model_name="fake", api_key="k"))


AUTH = (("authorization", "Bearer k"),)


def test_drive_asgi_answers_as_the_app_does_over_http(fake_app):
    bad = [
        json.dumps({"model": "fake", "prompt": "abc", "max_tokens": -1}).encode(),
        b"{not json",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(),
    ]
    with (
        ServerThread(fake_app) as srv,
        httpx.Client(base_url=srv.base_url, timeout=30, trust_env=False) as http,
    ):
        json_type = {"content-type": "application/json"}
        over_http = [
            http.post("/v1/completions", content=b, headers={**json_type, **dict(AUTH)}).content
            for b in bad
        ]
        unauth = http.post("/v1/completions", content=bad[0], headers=json_type).content
    for body, expected in zip(bad, over_http):
        start, chunks = asyncio.run(_collect(fake_app, "POST", "/v1/completions", body, AUTH))
        assert start.status == 400
        assert b"".join(chunks) == expected
    start, chunks = asyncio.run(_collect(fake_app, "POST", "/v1/completions", bad[0]))
    assert start.status == 401 and b"".join(chunks) == unauth
    ok = json.dumps({"model": "fake", "prompt": "abcdef", "max_tokens": 4}).encode()
    start, chunks = asyncio.run(_collect(fake_app, "POST", "/v1/completions", ok, AUTH))
    assert start.status == 200
    assert json.loads(b"".join(chunks))["choices"][0]["text"] == "fedc"


def test_drive_asgi_streams_server_sent_events(fake_app):
    body = json.dumps(
        {"model": "fake", "prompt": "abcdef", "max_tokens": 4, "stream": True}
    ).encode()
    start, chunks = asyncio.run(_collect(fake_app, "POST", "/v1/completions", body, AUTH))
    assert start.status == 200
    assert dict(start.headers)["content-type"].startswith("text/event-stream")
    events = b"".join(chunks).decode().split("\n\n")
    assert events[-2] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-2]) == "fedc"


def _slow_app(log: list[str]):
    app = FastAPI()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def gen():
            try:
                yield "data: 0\n\n"
                await asyncio.sleep(60)
                yield "data: never\n\n"
            finally:
                log.append("stream closed")

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.get("/wait")
    async def wait(request: Request) -> dict:
        await request.body()
        message = await request.receive()  # what nova's disconnect watcher does
        log.append(message["type"])
        return {}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("boom")

    return app


def test_a_consumer_that_goes_away_disconnects_the_app():
    log: list[str] = []
    app = _slow_app(log)

    async def read_one_chunk_then_leave(path: str):
        gen = drive_asgi(app, "GET", path, b"", [], b"")
        first = await asyncio.wait_for(gen.__anext__(), 10)
        if path == "/stream":
            assert isinstance(first, ResponseStart) and first.status == 200
            assert await asyncio.wait_for(gen.__anext__(), 10) == b"data: 0\n\n"
        await gen.aclose()

    async def cancel_while_waiting():
        task = asyncio.ensure_future(_collect(app, "GET", "/wait"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(read_one_chunk_then_leave("/stream"), 20))
    assert log == ["stream closed"]
    asyncio.run(asyncio.wait_for(cancel_while_waiting(), 20))
    assert log == ["stream closed", "http.disconnect"]


def test_an_app_error_is_the_apps_500():
    start, _chunks = asyncio.run(_collect(_slow_app([]), "GET", "/boom"))
    assert start.status == 500


# -- metrics ---------------------------------------------------------------------------------
def test_replica_metrics_are_labelled_and_joined_into_one_family():
    from nova.server.metrics import ServerMetrics

    texts = {}
    for name, finished in (("replica-0", 2), ("replica-1", 5)):
        m = ServerMetrics(_fake_client(), type("S", (), {"num_unfinished": 1})())
        m.requests.labels("finished").inc(finished)
        m.ttft.observe(0.1)
        texts[name] = m.render().decode()
    out = merge([relabel(t, replica=n) for n, t in texts.items()]).decode()
    assert out.count("# TYPE nova_requests_total counter") == 1
    assert out.count("# TYPE nova_ttft_seconds histogram") == 1
    fams = {f.name: f for f in text_string_to_metric_families(out)}
    finished = {
        s.labels["replica"]: s.value
        for s in fams["nova_requests"].samples
        if s.name == "nova_requests_total" and s.labels["outcome"] == "finished"
    }
    assert finished == {"replica-0": 2.0, "replica-1": 5.0}
    buckets = [s for s in fams["nova_ttft_seconds"].samples if s.name.endswith("_bucket")]
    assert {s.labels["replica"] for s in buckets} == {"replica-0", "replica-1"}
    assert all("le" in s.labels for s in buckets)


# -- options ---------------------------------------------------------------------------------
def test_serve_options_follow_the_server_and_engine_settings():
    deploy = DeployConfig(replicas=3)
    cpu = replica_options(deploy, "cpu", max_num_seqs=64, max_queue=512)
    assert cpu["num_replicas"] == 3
    assert cpu["ray_actor_options"] == {"num_cpus": 1.0}
    assert cpu["max_ongoing_requests"] == 512 + CONTROL_SLOTS
    # a burst the three replicas can admit waits in the ingress, it is not refused there
    assert cpu["max_queued_requests"] == 3 * 512
    router = cpu["request_router_config"]
    assert router["request_router_class"] == ROUTER_CLASS
    assert router["request_router_kwargs"]["saturated_at"] == 64
    gpu = replica_options(deploy, "cuda", max_num_seqs=64, max_queue=16)
    assert gpu["ray_actor_options"]["num_gpus"] == 1.0
    assert gpu["request_router_config"]["request_router_kwargs"]["saturated_at"] == 16
    assert saturation_threshold(DeployConfig(saturated_at=5), 64, 512) == 5
    assert (
        replica_options(DeployConfig(gpus_per_replica=0.5), "cuda", 8, None)["max_queued_requests"]
        == -1
    )
    with pytest.raises(ValueError):
        DeployConfig(replicas=0)


def test_serve_yaml_args_are_nova_serve_flags():
    pytest.importorskip("ray")
    from nova.deploy.app import args_to_argv

    argv = args_to_argv(
        {"model": "demo", "replicas": 2, "max-queue": 8, "cuda_graphs": False, "seed": None}
    )
    assert argv == ["--model", "demo", "--replicas", "2", "--max-queue", "8", "--no-cuda-graphs"]
    assert args_to_argv({"cuda_graphs": True, "allow_remote_media": False}) == []
    with pytest.raises(ValueError, match="unknown argument 'replica'"):
        args_to_argv({"replica": 2})
    with pytest.raises(ValueError, match="true or false"):
        args_to_argv({"cuda_graphs": "no"})


def test_the_serve_yaml_example_builds_and_validates():
    pytest.importorskip("ray")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from nova.deploy.app import build

    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve run` checks first
    [app_cfg] = config["applications"]
    assert app_cfg["import_path"] == "nova.deploy.app:build"
    app = build(app_cfg["args"])
    assert type(app).__name__ == "Application"
    with pytest.raises(ValueError, match="bad args"):
        build({"replicas": "two"})


# -- the command line ------------------------------------------------------------------------
BLOCK_RAY = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ray":
            raise ImportError(f"{name} is blocked by the test (not installed)")
        return None
sys.meta_path.insert(0, Blocker())
from nova.cli import main
code = main(sys.argv[1:])
assert "ray" not in sys.modules, "ray was imported"
sys.exit(code)
"""


def run_without_ray(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_RAY, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_nova_serve_without_replicas_never_imports_ray(tmp_path):
    """It gets as far as loading the (missing) model, with Ray impossible to import."""
    res = run_without_ray("serve", "--model", str(tmp_path / "missing"), "--port", "9")
    assert res.returncode == 2, res.stderr
    assert "nova: error:" in res.stderr and "missing" in res.stderr
    assert "ray" not in res.stderr.lower().replace("array", "")
    res = run_without_ray("serve", "--help")
    assert res.returncode == 0 and "--replicas" in res.stdout and "--ray-address" in res.stdout


def test_replicas_without_ray_name_the_extra():
    res = run_without_ray("serve", "--model", "demo", "--replicas", "2")
    assert res.returncode == 2
    assert "pip install 'nova-serve[ray]'" in res.stderr
    assert "Traceback" not in res.stderr


def test_waiting_body_messages_are_sent_as_one_chunk():
    """A stream whose consumer is slower than the app gets its events joined, in order."""

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(5):
            await send({"type": "http.response.body", "body": f"{i};".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"end", "more_body": False})

    async def read_slowly():
        chunks = []
        async for item in drive_asgi(app, "GET", "/", b"", [], b""):
            await asyncio.sleep(0.05)  # the app runs ahead meanwhile
            if isinstance(item, bytes):
                chunks.append(item)
        return chunks

    chunks = asyncio.run(read_slowly())
    assert b"".join(chunks) == b"0;1;2;3;4;end"
    assert len(chunks) < 6
