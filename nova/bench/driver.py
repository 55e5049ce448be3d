"""The load driver: sends a ``nova.workload`` workload to an OpenAI-compatible server.

Open loop: each request is sent at its ``arrival_s`` after the start (all at once when the
request rate is ``inf``), whatever the server is doing. Closed loop (``gui_sessions``): each
session starts at its first step's ``arrival_s`` and sends its next step ``think_time_s`` after
the previous answer. ``max_concurrency`` caps requests in flight (arrivals beyond it wait for a
slot, as ``vllm bench serve --max-concurrency``; their wait counts in their latency only from
the moment they are sent).
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import httpx

from nova.bench.client import RequestRecord, stream_request
from nova.bench.payload import request_body
from nova.workload.types import Workload, WorkloadRequest

SESSION_HEADER = "x-session-id"  # sent with every request of a session (and ``user``)


@dataclass(slots=True)
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/chat/completions"
    model: str | None = None  # None: the first model the server lists
    max_concurrency: int | None = None
    all_at_once: bool = False  # request rate inf: every open-loop request (session) at t=0
    api_key: str | None = None
    timeout_s: float = 600.0
    temperature: float = 0.0
    ignore_eos: bool = False
    nova_extensions: bool = True  # send priority / deadline_ms
    disable_tqdm: bool = False

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        endpoint = self.endpoint if self.endpoint.startswith("/") else "/" + self.endpoint
        if base.endswith("/v1") and endpoint.startswith("/v1/"):
            endpoint = endpoint[3:]
        return base + endpoint

    @property
    def models_url(self) -> str:
        base = self.base_url.rstrip("/")
        return base + ("/models" if base.endswith("/v1") else "/v1/models")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(slots=True)
class BenchRun:
    workload: Workload
    config: BenchConfig
    model: str
    records: list[RequestRecord]
    t0_s: float
    duration_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def _client(cfg: BenchConfig) -> httpx.AsyncClient:
    # No proxies from the environment; no client-side connection cap below max_concurrency
    # (a cap would queue requests in the client and hide server latency).
    limits = httpx.Limits(
        max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency
    )
    return httpx.AsyncClient(trust_env=False, limits=limits, timeout=httpx.Timeout(cfg.timeout_s))


async def detect_model(cfg: BenchConfig, client: httpx.AsyncClient | None = None) -> str:
    own = client is None
    client = client or _client(cfg)
    try:
        resp = await client.get(cfg.models_url, headers=cfg.headers)
        resp.raise_for_status()
        data = resp.json().get("data") or []
        if not data:
            raise RuntimeError(f"{cfg.models_url} lists no models; pass --model")
        return str(data[0]["id"])
    finally:
        if own:
            await client.aclose()


async def run_workload(workload: Workload, cfg: BenchConfig) -> BenchRun:
    async with _client(cfg) as client:
        model = cfg.model or await detect_model(cfg, client)
        bodies = {
            r.request_id: request_body(
                r, model, cfg.endpoint, cfg.temperature, cfg.ignore_eos, cfg.nova_extensions
            )
            for r in workload.requests
        }
        return await _drive(workload, cfg, client, model, bodies)


async def _drive(
    workload: Workload,
    cfg: BenchConfig,
    client: httpx.AsyncClient,
    model: str,
    bodies: dict[str, dict[str, Any]],
) -> BenchRun:
    from tqdm.auto import tqdm

    records: list[RequestRecord] = []
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = tqdm(total=len(workload.requests), disable=cfg.disable_tqdm, desc="requests", unit="req")

    async def send(req: WorkloadRequest) -> RequestRecord:
        rec = RequestRecord(req.request_id, req.num_images, req.deadline_s)
        headers = cfg.headers
        if req.session_id is not None:  # a router can keep a session on one replica
            headers = {**headers, SESSION_HEADER: req.session_id}
        async with sem if sem is not None else nullcontext():
            await stream_request(
                client, cfg.url, bodies[req.request_id], rec, headers, cfg.timeout_s
            )
        records.append(rec)
        bar.update(1)
        return rec

    t0 = time.perf_counter()

    async def at(offset_s: float | None) -> None:
        if cfg.all_at_once or offset_s is None:
            return
        wait = t0 + offset_s - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)

    async def session(steps: list[WorkloadRequest]) -> None:
        await at(steps[0].arrival_s)
        for i, step in enumerate(steps):
            if i and step.think_time_s > 0:
                await asyncio.sleep(step.think_time_s)
            await send(step)

    tasks: list[asyncio.Task[Any]] = []
    try:
        if workload.closed_loop:
            sessions = workload.sessions()
            loose = [r for r in workload.requests if r.session_id is None]
            units = sorted(
                [(s[0].arrival_s or 0.0, s) for s in sessions.values()]
                + [(r.arrival_s or 0.0, [r]) for r in loose],
                key=lambda u: u[0],
            )
            tasks = [asyncio.create_task(session(steps)) for _, steps in units]
        else:
            for req in sorted(workload.requests, key=lambda r: r.arrival_s or 0.0):
                await at(req.arrival_s)
                tasks.append(asyncio.create_task(send(req)))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        bar.close()
    duration = time.perf_counter() - t0
    return BenchRun(workload, cfg, model, records, t0, duration)


def rescale_arrivals_note(request_rate: float | None) -> str:
    if request_rate is None:
        return "the workload's own arrival times"
    if math.isinf(request_rate):
        return "all requests at t=0 (rate inf)"
    return f"{request_rate:g} requests/s"
