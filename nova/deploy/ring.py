"""A consistent-hash ring over replica names (pure; no Ray).

Each name owns ``vnodes`` points on a 64-bit ring; a key belongs to the first point clockwise
of its hash. Invariants: the owner of a key is a function of the key and the *set* of names
only (not of insertion order or of which process computes it), so every ingress agrees; removing
a name moves only the keys it owned (to their next distinct name clockwise), and adding it back
restores exactly the previous assignment. Names are stable replica names (``replica-<rank>``),
so a restarted replica takes back its predecessor's sessions.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

DEFAULT_VNODES = 128


def hash64(data: str) -> int:
    """A stable 64-bit hash (blake2b; the same in every process, unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class HashRing:
    """An immutable ring; build a new one when the set of names changes."""

    __slots__ = ("_hashes", "_owners", "names", "vnodes")

    def __init__(self, names: Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self.names = frozenset(names)
        self.vnodes = vnodes
        points = sorted((hash64(f"{n}#{i}"), n) for n in self.names for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._owners = [n for _, n in points]

    def lookup(self, key: str, k: int = 1) -> list[str]:
        """The first ``k`` distinct names clockwise of ``key`` (fewer if the ring has fewer);
        ``[0]`` is the key's owner, ``[1]`` where it goes when the owner leaves."""
        if not self._hashes or k < 1:
            return []
        start = bisect.bisect_right(self._hashes, hash64(key))
        out: list[str] = []
        n = len(self._hashes)
        for j in range(n):
            name = self._owners[(start + j) % n]
            if name not in out:
                out.append(name)
                if len(out) == k or len(out) == len(self.names):
                    break
        return out

    def owner(self, key: str) -> str | None:
        found = self.lookup(key, 1)
        return found[0] if found else None


def ring_owner(key: str, names: Iterable[str], vnodes: int = DEFAULT_VNODES) -> str | None:
    """The replica name that owns ``key`` among ``names`` (what the router picks while that
    replica is not saturated)."""
    return HashRing(names, vnodes).owner(key)


def replica_name(rank: int) -> str:
    """The stable name of the replica of rank ``rank`` (the ``x-nova-replica`` header)."""
    return f"replica-{rank}"
