"""``NovaReplica``: one Nova engine and its ``nova serve`` app, as a Ray Serve deployment.

The replica builds an ``AsyncEngine`` and ``create_app`` over it, exactly as ``nova serve``
does, and serves each request the ingress forwards by driving that app in-process
(``nova.deploy.asgi``): validation, error bodies, admission (503 beyond ``--max-queue``), SSE,
client-disconnect aborts and ``/metrics`` are the app's own. ``http`` yields the replica's name
first (the ingress sends it as ``x-nova-replica`` before any response header), then the
response's ``ResponseStart`` and body chunks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from nova.config import EngineConfig
from nova.deploy.asgi import Headers, ResponseStart, drive_asgi
from nova.deploy.ring import replica_name
from nova.server.config import ServerConfig

log = logging.getLogger(__name__)


class NovaReplica:
    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig) -> None:
        from nova.engine.async_engine import AsyncEngine
        from nova.server.app import create_app

        ctx = serve.get_replica_context()
        self.rank = int(ctx.rank.rank)
        self.name = replica_name(self.rank)
        self.unique_id = str(ctx.replica_id.unique_id)
        self.engine: Any = AsyncEngine(engine_config)
        self.app = create_app(self.engine, server_config)
        log.info("%s (pid %d) serving %s", self.name, os.getpid(), engine_config.model)

    # -- Serve hooks -----------------------------------------------------------------------
    def record_replica_metadata(self) -> dict[str, Any]:
        """What the router and the ingress's ``/health`` know of this replica."""
        return {
            "rank": self.rank,
            "name": self.name,
            "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),
        }

    def check_health(self) -> None:
        """Serve restarts the replica when this raises (an engine stage worker stopped)."""
        if not self.engine.is_healthy():
            raise RuntimeError(f"{self.name}: the engine stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # -- calls from the ingress ------------------------------------------------------------
    async def http(
        self, method: str, path: str, query: bytes, headers: Headers, body: bytes
    ) -> AsyncIterator[str | ResponseStart | bytes]:
        """One HTTP request through this replica's app: the replica's name, then the
        ``ResponseStart``, then body chunks."""
        yield self.name
        async for item in drive_asgi(self.app, method, path, query, headers, body):
            yield item

    def describe(self) -> dict[str, Any]:
        """The engine's start-up description (what ``nova serve`` prints)."""
        d = self.engine.describe()
        return {
            "replica": self.name,
            "architecture": d.architecture,
            "max_model_len": d.max_model_len,
            "num_kv_blocks": d.num_kv_blocks,
            "block_size_tokens": d.block_size_tokens,
            "policy": d.policy,
            "memory_lines": list(d.memory_lines),
            "partition_backend": d.partition_backend,
        }
