"""Encoder-cache accounting: which images' embeddings are kept, bounded by bytes, LRU.

Torch-free: the scheduler decides with it (the real engine and the simulator alike) and tells
the executor, through plain data on the batches, which embeddings to keep and which to drop
(``BatchItem.cache_images``, ``Batch.evict_mm_hashes``); the executor holds the tensors.

An entry is an image key (``nova.core.hashing.image_key``) and its size in bytes
(``num_tokens * bytes_per_token``). Its life: ``reserve`` (when its vision batch is built:
room is made by evicting the least recently used unpinned entries; the entry is pending and
pinned by the request) -> ``mark_ready`` (the batch completed: the embeddings exist) or
``discard`` (it failed). A ready entry is found by ``lookup``, which pins it for the asking
request. Pinned entries are never evicted: a request's pins last until ``release`` (its
prefill has taken the embeddings, or it ended).

Invariants (``check_integrity``): ``used_bytes`` is the sum of the entries' sizes and never
exceeds ``capacity_bytes``; pins name live entries and agree with the per-owner index.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Entry:
    num_bytes: int
    ready: bool = False
    owners: set[str] = field(default_factory=set)  # requests pinning it


class EncoderCacheAccounting:
    """See the module docstring. ``capacity_bytes`` 0 disables the cache (every lookup misses,
    nothing is kept, nothing is counted)."""

    def __init__(self, capacity_bytes: int, bytes_per_token: int = 1) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        if bytes_per_token < 1:
            raise ValueError(f"bytes_per_token must be >= 1, got {bytes_per_token}")
        self.capacity_bytes = capacity_bytes
        self.bytes_per_token = bytes_per_token
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # first = least recently used
        self._pins: dict[str, set[str]] = {}  # owner -> keys it pins
        self.used_bytes = 0
        self.num_queried_images = 0
        self.num_hit_images = 0
        self.num_evictions = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    def entry_bytes(self, num_tokens: int) -> int:
        return num_tokens * self.bytes_per_token

    def __contains__(self, key: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.ready

    def _pin(self, key: str, entry: _Entry, owner: str) -> None:
        entry.owners.add(owner)
        self._pins.setdefault(owner, set()).add(key)

    def lookup(self, key: str | None, owner: str, count: bool = True) -> bool:
        """Whether ``key``'s embeddings are cached and ready; a hit pins the entry for
        ``owner`` and makes it the most recently used. ``count``: add to the query/hit
        counters (per image asked about)."""
        if not self.enabled or key is None:
            return False
        entry = self._entries.get(key)
        hit = entry is not None and entry.ready
        if count:
            self.num_queried_images += 1
            self.num_hit_images += hit
        if entry is not None and hit:
            self._entries.move_to_end(key)
            self._pin(key, entry, owner)
        return hit

    def count(self, num_queried: int, num_hit: int) -> None:
        """Count images answered without ``lookup`` (embeddings the front end supplied)."""
        if self.enabled:
            self.num_queried_images += num_queried
            self.num_hit_images += num_hit

    def reserve(self, key: str, num_tokens: int, owner: str) -> list[str] | None:
        """Make room for ``key`` (``num_tokens`` image tokens) and add it, pending and pinned by
        ``owner``; returns the evicted keys, or None (nothing changed) when it cannot fit: the
        cache is off, the entry is larger than the cache, or pinned entries fill it. A key
        already present (pending for another request, or ready) is pinned and not re-added:
        None as well (no one needs to store it again)."""
        if not self.enabled:
            return None
        entry = self._entries.get(key)
        if entry is not None:
            self._pin(key, entry, owner)
            return None
        size = self.entry_bytes(num_tokens)
        if size > self.capacity_bytes:
            return None
        need = self.used_bytes + size - self.capacity_bytes
        victims: list[str] = []
        if need > 0:
            freed = 0
            for k, e in self._entries.items():
                if not e.owners and e.ready:
                    victims.append(k)
                    freed += e.num_bytes
                    if freed >= need:
                        break
            if freed < need:
                return None
        for k in victims:
            self.used_bytes -= self._entries.pop(k).num_bytes
        self.num_evictions += len(victims)
        entry = _Entry(size)
        self._entries[key] = entry
        self.used_bytes += size
        self._pin(key, entry, owner)
        return victims

    def mark_ready(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.ready = True

    def discard(self, key: str) -> None:
        """Drop a pending entry whose encoding failed (a ready one stays)."""
        entry = self._entries.get(key)
        if entry is None or entry.ready:
            return
        for owner in entry.owners:
            keys = self._pins.get(owner)
            if keys is not None:
                keys.discard(key)
        del self._entries[key]
        self.used_bytes -= entry.num_bytes

    def release(self, owner: str) -> None:
        """Unpin every entry ``owner`` pins (idempotent). A pending entry nobody pins any more
        (its request ended before its vision batch completed) is dropped."""
        for key in self._pins.pop(owner, ()):
            entry = self._entries.get(key)
            if entry is None:
                continue
            entry.owners.discard(owner)
            if not entry.owners and not entry.ready:
                del self._entries[key]
                self.used_bytes -= entry.num_bytes

    def pinned_keys(self, owner: str) -> set[str]:
        return set(self._pins.get(owner, ()))

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` if an invariant in the module docstring is broken."""
        assert self.used_bytes == sum(e.num_bytes for e in self._entries.values())
        assert self.used_bytes <= self.capacity_bytes, (self.used_bytes, self.capacity_bytes)
        for key, entry in self._entries.items():
            for owner in entry.owners:
                assert key in self._pins.get(owner, ()), (key, owner)
        for owner, keys in self._pins.items():
            for key in keys:
                assert key in self._entries and owner in self._entries[key].owners, (owner, key)
