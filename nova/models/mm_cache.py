"""The encoder cache's tensors: image embeddings kept on the device under their image key.

Which entries exist is decided by the scheduler's torch-free accounting
(``nova.core.encoder_cache``); the executor stores and drops tensors as the batches say, and
the input processor reads entries, so a request whose image is cached skips decoding,
preprocessing and the vision encoder. A ``CachedImage`` carries what building the prompt needs
without the pixels (the image's token count and, for Qwen-VL, its grid) and the embeddings.

This module imports no torch: the tensors are opaque here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, frozen=True)
class CachedImage:
    """One image's encoder output: ``embeds`` ``[num_tokens, hidden]`` on the device, and on
    CUDA the event recorded after the vision batch that produced them (``ready``)."""

    key: str
    num_tokens: int
    grid: tuple[int, int, int] | None
    embeds: Any
    ready: Any = None

    @property
    def num_bytes(self) -> int:
        t = self.embeds
        return int(t.numel() * t.element_size())


@dataclass(slots=True, frozen=True)
class KeyedImage:
    """A decoded image (PIL) whose key the caller already computed from its raw bytes, so the
    processor does not hash its pixels again."""

    key: str
    image: Any


class EmbeddingStore:
    """Image key -> ``CachedImage``; thread-safe (the vision worker writes, the prefill worker
    and the server's preparation threads read)."""

    def __init__(self) -> None:
        self._entries: dict[str, CachedImage] = {}
        self._lock = threading.Lock()

    def get(self, key: str | None) -> CachedImage | None:
        if key is None:
            return None
        with self._lock:
            return self._entries.get(key)

    def put(self, entry: CachedImage) -> None:
        """Keep ``entry`` unless its key is present (the first one stays)."""
        with self._lock:
            self._entries.setdefault(entry.key, entry)

    def drop(self, keys: tuple[str, ...] | list[str]) -> None:
        with self._lock:
            for key in keys:
                self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def num_bytes(self) -> int:
        with self._lock:
            return sum(e.num_bytes for e in self._entries.values())
