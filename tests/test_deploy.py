"""``nova serve --replicas 2`` end to end on this CPU machine: a real ``nova serve`` process
running a private Ray instance with two replicas of a tiny random LLaVA model (the demo model's
tokenizer and chat template), driven over HTTP by the official ``openai`` client and httpx.

What must hold: plain, streamed and image chat; bad input answered with the same 400 bodies as
``nova serve``; every step of a session served by the same replica (``x-nova-replica``), both
replicas serving some sessions; a saturated replica spilling to its session's second replica and
every replica full giving 503 with Retry-After; per-replica and ingress metrics; a replica killed
mid-run: nothing hangs, in-flight requests finish or get a 503 / an error event, later requests
succeed and Serve brings the replica back (and its sessions with it).

One server for the whole module (start-up is Ray plus two model loads); the fault test runs last.
Every HTTP call has a timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from clients import http_client, openai_client  # noqa: E402

from nova.config import EngineConfig  # noqa: E402
from nova.deploy.ring import ring_owner  # noqa: E402
from nova.deploy.session import session_key  # noqa: E402
from nova.server.testing import ServerThread, build_tiny_chat_model, free_port  # noqa: E402

pytestmark = pytest.mark.slow

MODEL_NAME = "tiny"
REPLICAS = ["replica-0", "replica-1"]
MAX_QUEUE = 4  # per replica: the overload test fills both
MAX_IMAGES = 2
MAX_PIXELS = 256 * 256
KV_BLOCKS = 256  # 4 requests of ~830 tokens per replica fit
LONG_TOKENS = 800  # ~2 s of decoding on a loaded 2-core machine
START_TIMEOUT_S = 300
HTTP_TIMEOUT_S = 60
RESTART_TIMEOUT_S = 240
SERVE_FLAGS = [
    "--served-model-name",
    MODEL_NAME,
    "--num-kv-blocks",
    str(KV_BLOCKS),
    "--max-queue",
    str(MAX_QUEUE),
    "--max-images-per-request",
    str(MAX_IMAGES),
    "--max-image-pixels",
    str(MAX_PIXELS),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("deploy") / "tiny", max_model_len=1024)


class NovaServe:
    """``nova serve --replicas 2`` in its own process group; stopped with SIGTERM."""

    def __init__(self, model: Path, workdir: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "nova-serve.log"
        env = dict(
            os.environ,
            RAY_TMPDIR=str(workdir),  # Ray's session files (and its socket paths) stay short
            RAY_AUTH_MODE="disabled",  # no token written to ~/.ray on a private local instance
            RAY_USAGE_STATS_ENABLED="0",
        )
        cmd = [sys.executable, "-c", "import sys; from nova.cli import main; sys.exit(main())"]
        args = ["serve", "--model", str(model), "--replicas", "2", "--port", str(self.port)]
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [*cmd, *args, *SERVE_FLAGS],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def log_tail(self) -> str:
        return self.log_path.read_text()[-4000:]

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nova serve exited early:\n{self.log_tail()}")
            try:
                r = httpx.get(self.base_url + "/health", timeout=10, trust_env=False)
                body = r.json()
                names = sorted(x["name"] for x in body["replicas"] if x["status"] == "ok")
                if r.status_code == 200 and names == REPLICAS:
                    return body
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(1)
        raise RuntimeError(f"nova serve not ready in {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    srv = NovaServe(tiny_model, tmp_path_factory.mktemp("ray"))
    t0 = time.monotonic()
    try:
        srv.wait_ready()
        print(f"\nnova serve --replicas 2 ready in {time.monotonic() - t0:.1f} s")
        yield srv
    finally:
        t1 = time.monotonic()
        srv.stop()
        print(f"\nnova serve --replicas 2 stopped in {time.monotonic() - t1:.1f} s")
    assert srv.proc.returncode == 0, srv.log_tail()


@pytest.fixture(scope="module")
def http(server):
    with http_client(server.base_url, HTTP_TIMEOUT_S) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    return openai_client(server.base_url, HTTP_TIMEOUT_S)


def png_data_url(size: int = 32) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


# -- the API through the official client -----------------------------------------------------
def test_plain_streamed_and_image_chat_with_the_openai_client(oai):
    raw = oai.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=[user("What is the capital of France?")], max_tokens=8
    )
    assert raw.headers["x-nova-replica"] in REPLICAS
    done = raw.parse()
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens >= 1

    chunks = list(
        oai.chat.completions.create(
            model=MODEL_NAME,
            messages=[user("Count to three.")],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8

    image = oai.chat.completions.create(
        model=MODEL_NAME,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url()}},
                    {"type": "text", "text": "What is on the screen?"},
                ],
            }
        ],
        max_tokens=6,
    )
    # the tiny model's 32x32 images are 16 image tokens; the text alone is fewer tokens
    text_only = oai.chat.completions.create(
        model=MODEL_NAME, messages=[user("What is on the screen?")], max_tokens=6
    )
    assert image.usage.prompt_tokens >= text_only.usage.prompt_tokens + 16
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


BAD_REQUESTS = [
    ("POST", "/v1/chat/completions", b"{not json"),
    ("POST", "/v1/chat/completions", json.dumps({"messages": []}).encode()),
    (
        "POST",
        "/v1/chat/completions",
        json.dumps({"messages": [user("hi")], "max_tokens": -1}).encode(),
    ),
    ("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "robot"}]}).encode()),
    (
        "POST",
        "/v1/chat/completions",
        json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:x"}}],
                    }
                ]
            }
        ).encode(),
    ),
    (
        "POST",
        "/v1/chat/completions",
        json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": png_data_url()}}]
                        * (MAX_IMAGES + 1),
                    }
                ]
            }
        ).encode(),
    ),
    (
        "POST",
        "/v1/chat/completions",
        json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": png_data_url(300)}}],
                    }
                ]
            }
        ).encode(),
    ),
    ("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 100000}).encode()),
    ("POST", "/v1/completions", json.dumps({"prompt": "hi", "temperature": "hot"}).encode()),
    ("GET", "/v1/chat/completions", b""),
    ("GET", "/v1/nothing-here", b""),
]


@pytest.fixture(scope="module")
def reference(tiny_model):
    """``nova serve``'s app (one engine, in this process) on the same model and flags."""
    from nova.engine.async_engine import AsyncEngine
    from nova.server.app import create_app
    from nova.server.config import ServerConfig

    engine = AsyncEngine(
        EngineConfig(model=str(tiny_model), num_kv_blocks=KV_BLOCKS, max_image_pixels=MAX_PIXELS)
    )
    config = ServerConfig(
        served_model_name=MODEL_NAME,
        max_queue=MAX_QUEUE,
        max_images_per_request=MAX_IMAGES,
        max_image_pixels=MAX_PIXELS,
    )
    try:
        with (
            ServerThread(create_app(engine, config)) as srv,
            httpx.Client(base_url=srv.base_url, timeout=HTTP_TIMEOUT_S, trust_env=False) as c,
        ):
            yield c
    finally:
        engine.shutdown()


def test_bad_input_gets_the_same_bodies_as_nova_serve(http, reference):
    headers = {"content-type": "application/json"}
    for method, path, body in BAD_REQUESTS:
        want = reference.request(method, path, content=body or None, headers=headers)
        got = http.request(method, path, content=body or None, headers=headers)
        assert want.status_code in (400, 404, 405), (path, body[:80], want.text)
        assert (got.status_code, got.json()) == (want.status_code, want.json()), body[:80]
        assert got.headers["x-nova-replica"] in REPLICAS


def test_the_openai_client_raises_on_bad_input(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL_NAME, messages=[user("hi")], max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"


# -- session affinity ------------------------------------------------------------------------
def _sessions() -> list[dict]:
    """Four sessions, two on each replica by the ring (so the test does not depend on how four
    random ids happen to fall): two keyed by the x-session-id header, one by the ``user`` field
    and one by its conversation's first turn."""
    want = ["replica-0", "replica-1", "replica-0", "replica-1"]
    kinds = ["header", "user", "header", "conversation"]
    out: list[dict] = []
    n = 0
    for kind, replica in zip(kinds, want):
        while True:
            n += 1
            s = {"kind": kind, "id": f"agent-{n}", "first": user(f"Task {n}: open the settings.")}
            body = json.dumps(
                {"messages": [s["first"]], "user": s["id"]}
                if kind == "user"
                else {"messages": [s["first"]]}
            ).encode()
            hdrs = {"x-session-id": s["id"]} if kind == "header" else {}
            key = session_key(hdrs, body)
            assert key.source == kind
            if ring_owner(key.key, REPLICAS) == replica:
                s["owner"] = replica
                out.append(s)
                break
    return out


def test_every_step_of_a_session_is_served_by_the_same_replica(oai, http):
    sessions = _sessions()
    served: dict[str, list[str]] = {s["id"]: [] for s in sessions}
    history = {s["id"]: [s["first"]] for s in sessions}
    for step in range(5):
        for s in sessions:  # interleaved, as concurrent agents would be
            kw: dict = {}
            if s["kind"] == "header":
                kw["extra_headers"] = {"x-session-id": s["id"]}
            if s["kind"] == "user":
                kw["user"] = s["id"]
            raw = oai.chat.completions.with_raw_response.create(
                model=MODEL_NAME, messages=history[s["id"]], max_tokens=4, **kw
            )
            answer = raw.parse().choices[0].message.content
            served[s["id"]].append(raw.headers["x-nova-replica"])
            history[s["id"]] += [
                {"role": "assistant", "content": answer},
                user(f"Step {step + 2}: tap the next item."),
            ]
    for s in sessions:
        assert served[s["id"]] == [s["owner"]] * 5, (s["kind"], served[s["id"]])
    assert {r for names in served.values() for r in names} == set(REPLICAS)

    metrics = http.get("/metrics").text
    for source in ("header", "user", "conversation"):
        assert _sample(metrics, "nova_ingress_session_keys_total", source=source) >= 5
    assert _sample(metrics, "nova_ingress_affinity_total", result="hit") >= 20


def _sample(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_metrics_are_labelled_by_replica_and_include_the_ingress(http):
    text = http.get("/metrics").text
    for replica in REPLICAS:
        assert _sample(text, "nova_requests_total", replica=replica, outcome="finished") >= 1
        assert _sample(text, "nova_ingress_routed_total", replica=replica) >= 1
        assert f'nova_kv_cache_free_blocks{{replica="{replica}"}}' in text
    assert text.count("# TYPE nova_requests_total counter") == 1
    assert _sample(text, "nova_ingress_replicas") == 2
    assert _sample(text, "nova_ingress_routing_decisions_total", decision="primary") >= 1
    assert _sample(text, "nova_ingress_routing_decisions_total", decision="pinned") >= 2
    assert _sample(text, "nova_ingress_replica_scrape_failures_total") == 0
    health = http.get("/health").json()
    assert sorted(r["name"] for r in health["replicas"]) == REPLICAS
    assert all(r["status"] == "ok" and r["pid"] for r in health["replicas"])


# -- overload ----------------------------------------------------------------------------------
async def _hold_streams(base_url: str, n: int, session: str) -> list[tuple[int, dict, bytes]]:
    """``n`` long streamed requests of one session at once; each is held open (not read) until
    every one has its status, then all are closed (the client going away aborts them)."""
    results: list[tuple[int, dict, bytes]] = []
    everyone = asyncio.Event()
    body = {
        "model": MODEL_NAME,
        "messages": [user("Describe the screen.")],
        "max_tokens": LONG_TOKENS,
        "stream": True,
    }

    async def one(client: httpx.AsyncClient) -> None:
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"x-session-id": session}
        ) as r:
            content = b"" if r.status_code == 200 else await r.aread()
            results.append((r.status_code, dict(r.headers), content))
            if len(results) == n:
                everyone.set()
            await asyncio.wait_for(everyone.wait(), HTTP_TIMEOUT_S)

    async with httpx.AsyncClient(base_url=base_url, timeout=HTTP_TIMEOUT_S) as client:
        await asyncio.wait_for(asyncio.gather(*[one(client) for _ in range(n)]), 120)
    return results


def _wait_replicas_idle(http, timeout_s: float = HTTP_TIMEOUT_S) -> None:
    """Until no replica holds an unfinished request (earlier tests' aborted streams drain
    asynchronously: one still held takes a queue slot of the next test)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = http.get("/metrics").text
        busy = _sample(text, "nova_server_unfinished_requests")
        if busy == 0:
            return
        assert time.monotonic() < deadline, f"replicas still hold {busy} requests"
        time.sleep(0.2)


def test_a_full_replica_spills_and_full_replicas_answer_503(server, http):
    _wait_replicas_idle(http)
    before = http.get("/metrics").text
    results = asyncio.run(_hold_streams(server.base_url, 3 * MAX_QUEUE, "burst"))
    ok = [h["x-nova-replica"] for status, h, _ in results if status == 200]
    rejected = [(h, body) for status, h, body in results if status == 503]
    assert len(ok) + len(rejected) == 3 * MAX_QUEUE, [r[0] for r in results]
    # one session, yet both replicas took its requests: a full replica spills to the session's
    # next one, and nothing is refused while either has room
    after = http.get("/metrics").text
    refused = {
        reason: _sample(after, "nova_ingress_rejected_total", reason=reason)
        - _sample(before, "nova_ingress_rejected_total", reason=reason)
        for reason in ("backpressure", "queue_timeout", "no_replicas", "replica_failed")
    }
    spilled = _sample(after, "nova_ingress_routing_decisions_total", decision="spill") - _sample(
        before, "nova_ingress_routing_decisions_total", decision="spill"
    )
    why = f"{ok}; ingress refusals {refused}; spills {spilled}"
    assert set(ok) == set(REPLICAS), why
    assert len(ok) >= 2 * MAX_QUEUE, why
    assert rejected, "every replica was full, so some requests must be refused"
    for headers, body in rejected:
        assert headers["retry-after"] == "1"
        assert json.loads(body)["error"]["code"] == "overloaded"
    name = "nova_ingress_routing_decisions_total"
    assert _sample(after, name, decision="spill") > _sample(before, name, decision="spill")


# -- faults (last: it kills a replica) ---------------------------------------------------------
async def _stream_until_end(client: httpx.AsyncClient, session: str, out: dict) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [user("Describe the screen in detail.")],
        "max_tokens": LONG_TOKENS,
        "stream": True,
    }
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"x-session-id": session}
    ) as r:
        out["status"] = r.status_code
        out["replica"] = r.headers.get("x-nova-replica")
        events = []
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    out["started"].set()  # a token has arrived: the request is in flight
        out["events"] = events


async def _unary(client: httpx.AsyncClient, session: str, out: dict) -> None:
    body = {"model": MODEL_NAME, "messages": [user("Say a lot.")], "max_tokens": LONG_TOKENS}
    r = await client.post("/v1/chat/completions", json=body, headers={"x-session-id": session})
    out.update(status=r.status_code, headers=dict(r.headers), body=r.json())


def _session_on(replica: str, prefix: str) -> str:
    n = 0
    while ring_owner(session_key({"x-session-id": f"{prefix}{n}"}, b"").key, REPLICAS) != replica:
        n += 1
    return f"{prefix}{n}"


def test_a_killed_replica_fails_its_requests_cleanly_and_comes_back(server, http):
    health = http.get("/health").json()
    victim = next(r for r in health["replicas"] if r["name"] == "replica-0")
    victim_sessions = [_session_on("replica-0", f"v{i}-") for i in range(2)]
    survivor_session = _session_on("replica-1", "s-")

    async def run() -> tuple[list[dict], dict, float]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=HTTP_TIMEOUT_S) as c:
            streams = [{"started": asyncio.Event()} for _ in range(3)]
            unary: dict = {}
            tasks = [
                asyncio.ensure_future(_stream_until_end(c, victim_sessions[0], streams[0])),
                asyncio.ensure_future(_stream_until_end(c, victim_sessions[1], streams[1])),
                asyncio.ensure_future(_stream_until_end(c, survivor_session, streams[2])),
                asyncio.ensure_future(_unary(c, victim_sessions[0], unary)),
            ]
            await asyncio.wait_for(asyncio.gather(*[s["started"].wait() for s in streams]), 60)
            os.kill(victim["pid"], signal.SIGKILL)
            t_kill = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*tasks), 90)  # nothing hangs
            return streams, unary, time.monotonic() - t_kill

    streams, unary, settle_s = asyncio.run(run())
    t_back = time.monotonic() - settle_s  # the kill, on this clock
    print(f"\nin-flight requests settled {settle_s:.2f} s after the kill")

    def ended_cleanly(s: dict) -> str:
        """'finished' (a finish reason, then [DONE]) or 'failed' (an error event, then
        [DONE])."""
        assert s["status"] == 200 and s["events"][-1] == "[DONE]", s
        last = json.loads(s["events"][-2])
        if "error" in last:
            assert last["error"]["code"] == "replica_unavailable", last
            return "failed"
        assert last["choices"][0]["finish_reason"] == "length", last
        return "finished"

    assert [s["replica"] for s in streams] == ["replica-0", "replica-0", "replica-1"]
    outcomes = [ended_cleanly(s) for s in streams]
    print(f"streams: {outcomes}; the unary request: {unary['status']}")
    assert outcomes[2] == "finished"  # the other replica's stream is untouched
    assert "failed" in outcomes[:2], "the victim's streams were in flight when it was killed"
    if unary["status"] != 200:
        assert unary["status"] == 503, unary
        assert unary["body"]["error"]["code"] == "replica_unavailable"
        assert unary["headers"]["retry-after"] == "1"

    # new requests of the victim's sessions succeed at once, on the survivor (or the restart)
    for session in victim_sessions:
        r = http.post(
            "/v1/chat/completions",
            json={"model": MODEL_NAME, "messages": [user("still there?")], "max_tokens": 4},
            headers={"x-session-id": session},
        )
        assert r.status_code == 200, r.text
        if r.headers["x-nova-replica"] == "replica-0":  # only if it is the restarted one
            now = {x["name"]: x["pid"] for x in http.get("/health").json()["replicas"]}
            assert now.get("replica-0") not in (None, victim["pid"])
        else:
            assert r.headers["x-nova-replica"] == "replica-1"
    metrics = http.get("/metrics").text
    assert _sample(metrics, "nova_ingress_rejected_total", reason="replica_failed") >= 1

    # Serve restarts it: same name, new process; the victim's sessions return to it
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    back = None
    while time.monotonic() < deadline and back is None:
        replicas = http.get("/health").json()["replicas"]
        back = next(
            (
                r
                for r in replicas
                if r["name"] == "replica-0" and r["pid"] != victim["pid"] and r["status"] == "ok"
            ),
            None,
        )
        time.sleep(1)
    assert back is not None, f"replica-0 was not restarted:\n{server.log_tail()}"
    print(f"replica-0 back (pid {back['pid']}) {time.monotonic() - t_back:.1f} s after the kill")
    r = http.post(
        "/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": [user("back?")], "max_tokens": 4},
        headers={"x-session-id": victim_sessions[0]},
    )
    assert r.status_code == 200 and r.headers["x-nova-replica"] == "replica-0"
