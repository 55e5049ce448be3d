"""``nova serve``: load a model, start the engine and serve the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from nova.config import ATTENTION_NAMES, PARTITION_NAMES
from nova.server.config import DEFAULT_MAX_QUEUE, ServerConfig

if TYPE_CHECKING:
    from nova.engine.client import EngineDescription

log = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _policies() -> list[str]:
    try:
        from nova.core.policy import available_policies

        return list(available_policies())
    except ImportError:  # pragma: no cover - older engine
        from nova.core.policy import POLICIES

        return sorted(POLICIES)


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default="demo",
        help="a Hugging Face model directory, a shipped config name, or 'demo'",
    )
    g.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "dummy"))
    g.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    g.add_argument("--device", default="cpu")
    g.add_argument(
        "--policy", default="multi_stream", help="scheduling policy: " + ", ".join(_policies())
    )
    g.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=64,
        help="decode batch cap (and prefill requests per batch)",
    )
    g.add_argument(
        "--num-kv-blocks",
        type=_positive_int,
        default=None,
        help="KV-cache blocks (default: sized from memory)",
    )
    g.add_argument("--block-size", type=_positive_int, default=16)
    g.add_argument("--max-prefill-tokens", type=_positive_int, default=4096)
    g.add_argument("--seed", type=int, default=0, help="seed of dummy weights")
    g.add_argument(
        "--partition",
        default="auto",
        choices=PARTITION_NAMES,
        help="SM partition backend: green contexts on a GPU that has them, else none",
    )
    g.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="run decode eagerly on CUDA (graphs are never used on a CPU)",
    )
    g.add_argument("--attention-backend", default="auto", choices=ATTENTION_NAMES)
    g.add_argument(
        "--vision-offload-layers",
        type=int,
        default=0,
        metavar="K",
        help="keep vision-encoder weights in host memory, K layers resident at a time",
    )
    g.add_argument(
        "--min-pixels",
        type=_positive_int,
        default=None,
        help="Qwen2-VL family: override the processor's min_pixels",
    )
    g.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=None,
        help="Qwen2-VL family: override the processor's max_pixels",
    )

    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--served-model-name", default=None, help="model id in the API (default: --model)"
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("NOVA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $NOVA_API_KEY)",
    )
    g.add_argument(
        "--max-queue",
        type=_positive_int,
        default=DEFAULT_MAX_QUEUE,
        help="unfinished requests beyond which the server answers 503 with Retry-After",
    )
    g.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=128 * 1024 * 1024,
        help="largest HTTP request body accepted (413 beyond)",
    )
    g.add_argument(
        "--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug")
    )

    g = p.add_argument_group("media")
    g.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        help="largest image (width*height) accepted; 0: no limit",
    )
    g.add_argument("--max-images-per-request", type=int, default=8)
    g.add_argument(
        "--preprocess-workers",
        type=_positive_int,
        default=4,
        help="threads decoding and preprocessing request images (default 4)",
    )
    g.add_argument(
        "--max-media-bytes",
        type=_positive_int,
        default=20 * 1024 * 1024,
        help="largest encoded image accepted",
    )
    g.add_argument(
        "--allow-remote-media",
        action="store_true",
        help="fetch http(s) image URLs (public addresses only)",
    )
    g.add_argument("--media-fetch-timeout-s", type=float, default=10.0)
    g.add_argument(
        "--allowed-local-media-path",
        default=None,
        help="allow file:// image URLs under this directory",
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


def engine_config_from_args(args: argparse.Namespace):
    from nova.config import EngineConfig

    pixels = args.max_image_pixels if args.max_image_pixels and args.max_image_pixels > 0 else None
    return EngineConfig(
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        policy=args.policy,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs,
        max_prefill_tokens=args.max_prefill_tokens,
        max_image_pixels=pixels,
        seed=args.seed,
        partition=args.partition,
        cuda_graphs=args.cuda_graphs,
        attention_backend=args.attention_backend,
        vision_offload_layers=args.vision_offload_layers,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )


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


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from nova.engine.async_engine import AsyncEngine
    from nova.server.app import create_app

    server_config = ServerConfig.from_args(args)
    engine_config = engine_config_from_args(args)
    print(f"nova serve: loading {args.model} ...", file=sys.stderr, flush=True)
    engine = AsyncEngine(engine_config)
    try:
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
