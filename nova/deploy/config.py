"""The ``nova serve --replicas`` settings and the Ray Serve options they give (pure; no Ray).

Each field's metadata declares its flag (``nova.flags``), so ``nova serve --help`` lists them
without importing Ray. ``replica_options``/``ingress_options`` turn them, with the engine's and
the server's configs, into ``@serve.deployment`` options; ``deploy/serve.yaml`` sets the same
options by deployment name.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from nova.flags import check_minimums, flag, from_flags, no_flag

DEPLOY_GROUP = "replicas (Ray Serve)"
APP_NAME = "nova"
REPLICA_DEPLOYMENT = "NovaReplica"
INGRESS_DEPLOYMENT = "NovaIngress"
ROUTER_CLASS = "nova.deploy.router.NovaRouter"
# Serve-level slots a replica keeps beyond --max-queue for the ingress's own calls (metrics and
# health fan-out), so a full replica still answers them and its own admission (503 with
# Retry-After, as `nova serve`) is what a request beyond --max-queue meets.
CONTROL_SLOTS = 8
# A replica's Serve-level concurrency when the server's queue is unbounded.
UNBOUNDED_MAX_ONGOING = 4096
# Requests one ingress replica may hold at once (each is a coroutine waiting on a replica).
INGRESS_MAX_ONGOING = 100_000
# A replica's liveness check (the engine's stage workers are alive); a process that dies is
# noticed at once without it. Serve's defaults are 10 s and 30 s.
HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# How long a stopping replica waits for its requests in flight.
GRACEFUL_SHUTDOWN_TIMEOUT_S = 5.0


@dataclass(slots=True, frozen=True)
class DeployConfig:
    replicas: int | None = field(
        default=None,
        metadata=flag(
            "serve N replicas of the model on Ray Serve, with session affinity (without it: "
            "one engine in this process; Ray is not used)",
            minimum=1,
            metavar="N",
            group=DEPLOY_GROUP,
        ),
    )
    ray_address: str | None = field(
        default=None,
        metadata=flag(
            "join this Ray cluster ('auto': the one 'ray start' runs on this machine) instead "
            "of starting a private one",
            group=DEPLOY_GROUP,
        ),
    )
    gpus_per_replica: float | None = field(
        default=None,
        metadata=flag(
            "GPUs each replica reserves (default: 1 with a cuda --device, else 0)",
            minimum=0,
            group=DEPLOY_GROUP,
        ),
    )
    cpus_per_replica: float = field(
        default=1.0,
        metadata=flag(
            "CPU cores each replica reserves (Ray also sets its OMP_NUM_THREADS to this, at "
            "least 1)",
            minimum=0,
            group=DEPLOY_GROUP,
        ),
    )
    queue_timeout_s: float = field(
        default=30.0,
        metadata=flag(
            "seconds a request may wait for a free replica before it gets 503",
            minimum=0.1,
            group=DEPLOY_GROUP,
        ),
    )
    saturated_at: int | None = field(
        default=None,
        metadata=flag(
            "requests in flight on a session's replica from which new requests go to the less "
            "loaded of the session's two ring replicas (default: --max-num-seqs, at most "
            "--max-queue)",
            minimum=1,
            group=DEPLOY_GROUP,
        ),
    )
    ring_vnodes: int = field(
        default=128,
        metadata=flag("points per replica on the session hash ring", minimum=1, group=DEPLOY_GROUP),
    )
    app_name: str = field(
        default=APP_NAME, metadata=no_flag("one Nova application per Serve instance")
    )

    def __post_init__(self) -> None:
        check_minimums(self)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DeployConfig:
        return from_flags(cls, args)

    def num_gpus(self, device: str) -> float:
        if self.gpus_per_replica is not None:
            return self.gpus_per_replica
        return 1.0 if device.startswith("cuda") else 0.0


def saturation_threshold(deploy: DeployConfig, max_num_seqs: int, max_queue: int | None) -> int:
    """In-flight requests on a replica from which the router offers a session's second ring
    replica too (the less loaded of the two gets the request)."""
    if deploy.saturated_at is not None:
        return deploy.saturated_at
    return min(max_num_seqs, max_queue) if max_queue is not None else max_num_seqs


def router_config(deploy: DeployConfig, max_num_seqs: int, max_queue: int | None) -> dict[str, Any]:
    """The replica deployment's ``request_router_config``."""
    return {
        "request_router_class": ROUTER_CLASS,
        "request_router_kwargs": {
            "num_virtual_nodes": deploy.ring_vnodes,
            "num_fallback_replicas": 1,
            "saturated_at": saturation_threshold(deploy, max_num_seqs, max_queue),
        },
    }


def replica_options(
    deploy: DeployConfig, device: str, max_num_seqs: int, max_queue: int | None
) -> dict[str, Any]:
    """``NovaReplica``'s deployment options. Serve admits up to ``max_queue`` +
    ``CONTROL_SLOTS`` requests per replica; the replica's own admission answers 503 beyond
    ``max_queue``. ``max_queued_requests``: requests waiting in the ingress for a replica
    beyond which the ingress answers 503 at once; it is the whole deployment's admission
    (``max_queue`` times the replicas), because a burst waits there while Serve assigns it,
    and a smaller bound refused part of a burst the replicas had room for (on a loaded
    2-core machine, 5 of 12 requests with 8 free slots)."""
    actor: dict[str, Any] = {"num_cpus": deploy.cpus_per_replica}
    gpus = deploy.num_gpus(device)
    if gpus > 0:
        actor["num_gpus"] = gpus
    return {
        "num_replicas": deploy.replicas or 1,
        "ray_actor_options": actor,
        "max_ongoing_requests": (max_queue or UNBOUNDED_MAX_ONGOING) + CONTROL_SLOTS,
        "max_queued_requests": max_queue * (deploy.replicas or 1) if max_queue is not None else -1,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_TIMEOUT_S,
        "request_router_config": router_config(deploy, max_num_seqs, max_queue),
    }


def ingress_options() -> dict[str, Any]:
    """``NovaIngress``: no CPU reserved (it must not take a replica's slot), many requests."""
    return {
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": INGRESS_MAX_ONGOING,
    }
