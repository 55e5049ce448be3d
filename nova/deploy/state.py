"""State shared, inside the ingress process, between the ingress and its request router.

Ray builds the router from a copy of ``nova.deploy.router`` pickled by value, so that module's
globals are not the ingress's; this module is imported by reference from both and so is the
one place they meet: the router registers itself in ``ROUTERS`` and counts its decisions in
``ingress_metrics()``. No Ray import.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

# application name -> its replica deployment's router in this process (set by the router when
# the ingress's handle creates it, on the handle's first request)
ROUTERS: dict[str, Any] = {}

DECISIONS = ("primary", "p2c", "spill", "pinned", "random")
REJECTIONS = ("backpressure", "replica_failed", "queue_timeout", "no_replicas")


class IngressMetrics:
    """The ingress's own Prometheus metrics (its ``/metrics`` adds every replica's)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.routed = Counter(
            "nova_ingress_routed",
            "Requests answered by a replica, by the replica that served them",
            ["replica"],
            registry=r,
        )
        self.decisions = Counter(
            "nova_ingress_routing_decisions",
            "Router decisions: primary (the session's ring replica), p2c (it was saturated: "
            "the less loaded of the session's two ring replicas), spill (the chosen replica "
            "was full: sent to the session's next one), pinned (metrics and health calls to "
            "one replica), random (requests without a session)",
            ["decision"],
            registry=r,
        )
        self.affinity = Counter(
            "nova_ingress_affinity",
            "Requests with a session: served by the session's ring replica (hit) or another",
            ["result"],
            registry=r,
        )
        self.sessions = Counter(
            "nova_ingress_session_keys",
            "Where requests' session keys came from",
            ["source"],
            registry=r,
        )
        self.rejected = Counter(
            "nova_ingress_rejected",
            "Requests the ingress answered 503: backpressure (every replica full), "
            "replica_failed (its replica died), queue_timeout (no replica free in time), "
            "no_replicas",
            ["reason"],
            registry=r,
        )
        self.scrape_failures = Counter(
            "nova_ingress_replica_scrape_failures",
            "Replica /metrics calls that failed or timed out",
            registry=r,
        )
        self.replicas = Gauge(
            "nova_ingress_replicas", "Replicas the router can send requests to", registry=r
        )
        for d in DECISIONS:
            self.decisions.labels(d)
        for res in ("hit", "miss"):
            self.affinity.labels(res)
        for reason in REJECTIONS:
            self.rejected.labels(reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_lock = threading.Lock()
_metrics: IngressMetrics | None = None


def ingress_metrics() -> IngressMetrics:
    """This process's ingress metrics (created on first use; the router runs on another
    thread)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = IngressMetrics()
        return _metrics
