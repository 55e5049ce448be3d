"""Nova's OpenAI-compatible HTTP server (FastAPI + uvicorn).

``create_app(client, config)`` builds the app over an ``EngineClient`` (a started
``AsyncEngine``; tests run it in-process); ``add_serve_parser(subparsers)`` registers the
``nova serve`` command.
Imports are lazy so that ``import nova.server`` stays light.
"""

from __future__ import annotations

from nova.lazy import lazy_attributes

__all__ = ["ServerConfig", "add_serve_parser", "create_app"]

__getattr__ = lazy_attributes(
    "nova.server",
    {
        "create_app": "nova.server.app",
        "ServerConfig": "nova.server.config",
        "add_serve_parser": "nova.server.cli",
    },
)
