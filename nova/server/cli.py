"""``nova serve``: load a model, start the engine and serve the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

from nova.config import EngineConfig
from nova.deploy.config import DeployConfig
from nova.flags import add_flags, from_flags
from nova.server.config import SERVER_GROUP, ServerConfig

if TYPE_CHECKING:
    from nova.engine.client import EngineDescription

log = logging.getLogger(__name__)


ENGINE_GROUP = "model and engine"
# Flags whose command-line default differs from the config's: no --served-model-name means the
# --model value (ServerConfig.from_args).
SERVE_FLAG_DEFAULTS = {"served_model_name": None}


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``nova serve`` flags: every ``EngineConfig`` and ``ServerConfig`` field that declares
    one (``nova.flags``), and ``--log-level``."""
    groups: dict[str, Any] = {}
    add_flags(p, EngineConfig, group=ENGINE_GROUP, groups=groups)
    add_flags(p, ServerConfig, defaults=SERVE_FLAG_DEFAULTS, groups=groups)
    add_flags(p, DeployConfig, groups=groups)
    groups[SERVER_GROUP].add_argument(
        "--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug")
    )
    return p


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``serve`` on an ``argparse`` subparsers object; ``args.func(args)`` runs it."""
    p = subparsers.add_parser(
        "serve",
        help="serve the OpenAI-compatible API",
        description="Serve a model over the OpenAI-compatible HTTP API "
        "(/v1/chat/completions, /v1/completions, /v1/models, "
        "/health, /metrics).",
    )
    add_serve_args(p)
    p.set_defaults(func=run_serve)
    return p


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The engine's config from ``nova serve`` flags; the image-size limit is the server's
    ``--max-image-pixels`` (0: none)."""
    pixels = args.max_image_pixels if args.max_image_pixels and args.max_image_pixels > 0 else None
    return from_flags(EngineConfig, args, max_image_pixels=pixels)


def print_startup(about: EngineDescription, server_config: ServerConfig) -> None:
    """What ``nova serve`` tells its operator once the engine is up (on stderr)."""
    print(
        f"nova serve: {server_config.served_model_name} ({about.architecture}, "
        f"context {about.max_model_len}, {about.num_kv_blocks} KV blocks of "
        f"{about.block_size_tokens}, policy {about.policy}) on "
        f"http://{server_config.host}:{server_config.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    print("nova serve: " + "\n  ".join(about.memory_lines), file=sys.stderr)
    print(f"nova serve: partitions: {about.partition_backend}", file=sys.stderr, flush=True)


def _check_servable(engine: Any) -> None:
    """A model that could not take a single image request fails at start-up, not per request
    (``load_format=dummy`` serves shapes only: let it through)."""
    from nova.models.errors import ModelLoadError

    problem = engine.llm_engine.unservable_reason()
    if problem is not None:
        raise ModelLoadError(problem)


def run_serve(args: argparse.Namespace) -> int:
    if getattr(args, "replicas", None) is not None:  # Ray Serve; Ray is imported only here
        from nova.deploy.cli import run_replicas

        return run_replicas(args)
    import uvicorn

    from nova.engine.async_engine import AsyncEngine
    from nova.server.app import create_app

    server_config = ServerConfig.from_args(args)
    engine_config = engine_config_from_args(args)
    print(f"nova serve: loading {args.model} ...", file=sys.stderr, flush=True)
    engine = AsyncEngine(engine_config)
    try:
        _check_servable(engine)
        app = create_app(engine, server_config)
        print_startup(engine.describe(), server_config)
        uvicorn.run(
            app,
            host=server_config.host,
            port=server_config.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=5,
        )
    finally:
        engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m nova.server`` (the same flags as ``nova serve``)."""
    from nova.models.errors import InvalidInputError, ModelLoadError

    parser = add_serve_args(argparse.ArgumentParser(prog="nova serve"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_serve(args)
    except (ModelLoadError, InvalidInputError, ValueError) as exc:
        print(f"nova: error: {exc}", file=sys.stderr)
        return 2
