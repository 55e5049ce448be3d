"""One request's position in its grammar, and the allowed-token bitmasks of a batch.

Bitmask layout (shared by llguidance and xgrammar): int32 ``[rows, ceil(vocab / 32)]``; token
``t`` is allowed in row ``r`` iff bit ``t % 32`` of ``mask[r, t // 32]`` is set. A row of all
ones (-1) allows every token. Torch-free (numpy); ``nova.structured.apply`` applies masks to
logits.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

# Matchers per batch above which the masks are filled on llguidance's thread pool (the pool
# hand-off costs more than one mask of a typical JSON state, a few to tens of µs).
PARALLEL_FILL_MIN_ROWS = 4
_local = threading.local()  # one llguidance executor per engine worker thread


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(rows: int, vocab_size: int) -> np.ndarray:
    """``[rows, ceil(vocab_size / 32)]`` int32, every token allowed."""
    return np.full((rows, bitmask_words(vocab_size)), -1, dtype=np.int32)


class GrammarMatcher:
    """A request's matcher: which tokens may come next, advanced by each sampled token.

    Used by one thread at a time (a request is in one stage at a time). ``num_consumed`` is the
    number of output tokens consumed, so the executor can check it is in step with the
    request."""

    __slots__ = ("_m", "num_consumed", "vocab_size")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._m = matcher
        self.vocab_size = vocab_size
        self.num_consumed = 0

    def consume(self, token_id: int) -> bool:
        """Advance by a sampled token; False puts the matcher in its error state (the token
        was not allowed)."""
        ok = bool(self._m.consume_token(int(token_id)))
        if ok:
            self.num_consumed += 1
        return ok

    @property
    def is_error(self) -> bool:
        return bool(self._m.is_error())

    @property
    def error(self) -> str:
        return str(self._m.get_error())

    @property
    def is_stopped(self) -> bool:
        """Only EOS may follow (the grammar is complete), or the matcher is in error."""
        return bool(self._m.is_stopped())

    @property
    def is_accepting(self) -> bool:
        return bool(self._m.is_accepting())

    def copy(self) -> GrammarMatcher:
        """An independent matcher in the same state (a request forked into several
        sequences continues each from here)."""
        out = GrammarMatcher(self._m.deep_copy(), self.vocab_size)
        out.num_consumed = self.num_consumed
        return out

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        llg_numpy.fill_next_token_bitmask(self._m, bitmask, row)

    def allowed_tokens(self) -> list[int]:
        """The allowed next tokens (for tests and debugging: O(vocab))."""
        mask = allocate_bitmask(1, self.vocab_size)
        self.fill(mask, 0)
        return allowed_token_ids(mask[0], self.vocab_size)

    def llguidance_matcher(self) -> Any:
        return self._m


def allowed_token_ids(row: np.ndarray, vocab_size: int) -> list[int]:
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits).tolist()


def fill_bitmasks(matchers: Sequence[GrammarMatcher | None], vocab_size: int) -> np.ndarray | None:
    """The bitmask of a batch: row ``i`` from ``matchers[i]``, all ones where it is None. None
    when no row has a matcher (the unconstrained batch pays nothing)."""
    rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    mask = allocate_bitmask(len(matchers), vocab_size)
    if len(rows) < PARALLEL_FILL_MIN_ROWS:
        for m, i in rows:
            m.fill(mask, i)
    else:
        llg_numpy.fill_next_token_bitmask_par(
            _executor(), [(m.llguidance_matcher(), i) for m, i in rows], mask
        )
    return mask


def _executor() -> Any:
    ex = getattr(_local, "executor", None)
    if ex is None:
        ex = _local.executor = llguidance.LLExecutor(num_threads=min(4, os.cpu_count() or 1))
    return ex
