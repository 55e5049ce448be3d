"""``nova serve --replicas N [--ray-address ADDR]``: start (or join) Ray, run the Serve
application and block until SIGINT or SIGTERM, then shut Serve down."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
from typing import Any

from nova.deploy.config import DeployConfig
from nova.extras import require_extra

# How long start-up may wait for the ingress to describe the replicas.
DESCRIBE_TIMEOUT_S = 120.0
# How long stopping Serve may take (its replicas' graceful shutdown is 5 s) before Ray is shut
# down anyway: a signal sent to the whole process group (Ctrl-C, `timeout`) may already have
# stopped Ray's own processes, and then serve.shutdown() would wait for them.
SERVE_SHUTDOWN_TIMEOUT_S = 20.0


def ray_init_kwargs(deploy: DeployConfig, log_level: str) -> dict[str, Any]:
    """``ray.init`` arguments: a private local instance unless ``--ray-address`` (``"local"``
    always starts one; a bare ``ray.init()`` would join whatever cluster RAY_ADDRESS or a stale
    ``ray start`` left behind). A local instance gets at least the CPUs the replicas reserve
    (Ray's CPU counts are for placement only)."""
    verbose = log_level in ("info", "debug")
    kwargs: dict[str, Any] = {
        "address": deploy.ray_address or "local",
        "include_dashboard": False,
        "logging_level": logging.INFO if verbose else logging.WARNING,
        "log_to_driver": verbose,
    }
    if deploy.ray_address is None:
        wanted = math.ceil((deploy.replicas or 1) * deploy.cpus_per_replica)
        kwargs["num_cpus"] = max(os.cpu_count() or 1, wanted)
    return kwargs


def _check_resources(ray: Any, deploy: DeployConfig, device: str) -> None:
    gpus = deploy.num_gpus(device) * (deploy.replicas or 1)
    have = float(ray.cluster_resources().get("GPU", 0))
    if gpus > have:
        print(
            f"nova serve: warning: {deploy.replicas} replicas need {gpus:g} GPUs and the Ray "
            f"cluster has {have:g}; the rest wait until GPUs join (start-up blocks until then)",
            file=sys.stderr,
            flush=True,
        )


def _bounded(fn: Any, timeout_s: float) -> bool:
    """Run ``fn()`` on a daemon thread; False if it had not returned after ``timeout_s``."""
    done = threading.Event()

    def run() -> None:
        try:
            fn()
        finally:
            done.set()

    threading.Thread(target=run, name="nova-serve-shutdown", daemon=True).start()
    return done.wait(timeout_s)


def _wait_for_signal() -> None:
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    while not stop.wait(1.0):
        pass


def run_replicas(args: argparse.Namespace) -> int:
    require_extra("ray", "nova serve --replicas")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from nova.deploy.app import build_from_args
    from nova.server.config import ServerConfig

    if args.log_level not in ("info", "debug"):
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    deploy = DeployConfig.from_args(args)
    server_config = ServerConfig.from_args(args)
    app = build_from_args(args)
    where = deploy.ray_address or "a private local Ray instance"
    print(
        f"nova serve: starting {deploy.replicas} replicas of {args.model} on {where} ...",
        file=sys.stderr,
        flush=True,
    )
    ray.init(**ray_init_kwargs(deploy, args.log_level))
    try:
        _check_resources(ray, deploy, args.device)
        serve.start(
            http_options={"host": server_config.host, "port": server_config.port},
            logging_config={"log_level": args.log_level.upper(), "enable_access_log": False},
        )
        handle = serve.run(app, name=deploy.app_name, route_prefix="/")
        about = handle.describe.remote().result(timeout_s=DESCRIBE_TIMEOUT_S)
        print(
            f"nova serve: {server_config.served_model_name} ({about['architecture']}, context "
            f"{about['max_model_len']}, {about['num_kv_blocks']} KV blocks of "
            f"{about['block_size_tokens']} per replica, policy {about['policy']}) on "
            f"http://{server_config.host}:{server_config.port}/v1 by "
            f"{', '.join(about['replicas'])}",
            file=sys.stderr,
            flush=True,
        )
        print(f"nova serve: partitions: {about['partition_backend']}", file=sys.stderr, flush=True)
        _wait_for_signal()
        print("nova serve: shutting down", file=sys.stderr, flush=True)
    finally:
        if not _bounded(serve.shutdown, SERVE_SHUTDOWN_TIMEOUT_S):
            print(
                f"nova serve: Serve did not stop within {SERVE_SHUTDOWN_TIMEOUT_S:g} s; "
                "stopping Ray",
                file=sys.stderr,
                flush=True,
            )
        ray.shutdown()
    return 0
