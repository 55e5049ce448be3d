"""Nova's OpenAI-compatible HTTP server (FastAPI + uvicorn).

``create_app(client, config)`` builds the app over an ``EngineClient`` (a started
``AsyncEngine``; tests run it in-process); ``add_serve_parser(subparsers)`` registers the
``nova serve`` command.
Imports are lazy so that ``import nova.server`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerConfig", "add_serve_parser", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from nova.server.app import create_app

        return create_app
    if name == "ServerConfig":
        from nova.server.config import ServerConfig

        return ServerConfig
    if name == "add_serve_parser":
        from nova.server.cli import add_serve_parser

        return add_serve_parser
    raise AttributeError(f"module 'nova.server' has no attribute {name!r}")
