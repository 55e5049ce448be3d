"""Optional dependency groups (``pip install 'nova-serve[server]'`` etc.) and the check that names
the group to install when a command needs one that is missing.

The engine (torch, transformers, ...) is a core dependency; the HTTP server, the load client
and the plots are extras. ``scripts/setup.sh`` installs all of them. ``EXTRAS`` mirrors
``[project.optional-dependencies]`` in pyproject.toml (a test keeps them equal).
"""

from __future__ import annotations

import importlib.util

PACKAGE = "nova-serve"

# extra -> {distribution name: import name}
EXTRAS: dict[str, dict[str, str]] = {
    "server": {
        "fastapi": "fastapi",
        "uvicorn": "uvicorn",
        "prometheus-client": "prometheus_client",
        "httpx": "httpx",
    },
    "bench": {"httpx": "httpx", "tqdm": "tqdm", "matplotlib": "matplotlib"},
    "plot": {"matplotlib": "matplotlib"},
    # nova serve --replicas (Ray Serve)
    "ray": {"ray": "ray"},
}


class MissingExtraError(RuntimeError):
    """A command needs an optional dependency group that is not installed."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: present in sys.modules as None (blocked)
        return False


def missing_modules(extra: str) -> list[str]:
    """The import names of ``extra`` that cannot be imported here."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; choose {', '.join(EXTRAS)}")
    return [m for m in EXTRAS[extra].values() if not _importable(m)]


def require_extra(extra: str, what: str) -> None:
    """A ``MissingExtraError`` naming the pip extra to install when ``extra`` is incomplete;
    ``what`` names the command that needs it (``"nova serve"``)."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(
            f"{what} needs {', '.join(missing)}, not installed; install them with "
            f"pip install '{PACKAGE}[{extra}]' (scripts/setup.sh installs every extra)"
        )
