"""Named registries: one behaviour for every table of named things Nova looks up.

Policies, cost models, GPUs, workloads, experiments and model architectures are each a
``Registry``: a read-only mapping from name to entry, filled by ``add`` or the ``register``
decorator. The rules are the same for all of them:

- a name is registered once; registering it again raises ``DuplicateNameError`` (a
  ``ValueError``), so two plugins cannot silently shadow each other;
- ``lookup`` of an unknown name raises the registry's error type (a ``ValueError`` subclass,
  so command lines report it like other bad input) with the message
  ``unknown <kind> '<name>'; choose one of <the names, sorted>``;
- ``names()`` lists the names sorted; iteration and ``in`` work as on any mapping.

Torch-free, with no imports from the rest of Nova.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

T = TypeVar("T")


class DuplicateNameError(ValueError):
    """A name registered twice in the same registry."""


class Registry(Mapping[str, T]):
    """name -> entry, for entries of type ``T``; see the module docstring for the rules.

    ``kind`` names what the entries are in error messages ("policy", "GPU", ...); ``error``
    is the exception type ``lookup`` raises for an unknown name (default ``ValueError``).
    """

    __slots__ = ("_entries", "error", "kind")

    def __init__(self, kind: str, error: type[ValueError] = ValueError) -> None:
        self.kind = kind
        self.error = error
        self._entries: dict[str, T] = {}

    # -- filling ---------------------------------------------------------------------------
    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; returns ``entry``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise DuplicateNameError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of ``add``: ``@registry.register("name")``."""

        def wrap(entry: T) -> T:
            return self.add(name, entry)

        return wrap

    # -- looking up ------------------------------------------------------------------------
    def lookup(self, name: str) -> T:
        """The entry called ``name``; raises ``self.error`` naming the choices if unknown."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise self.unknown(name) from None

    def unknown(self, name: object) -> ValueError:
        """The error ``lookup`` raises for ``name`` (for callers that look up differently,
        e.g. case-insensitively)."""
        return self.error(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    # -- Mapping ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
