"""Stop strings over a stream of text deltas (server side).

``StopMatcher.feed(delta)`` returns the text that is safe to emit now: everything up to the
first stop string to complete (which, with everything after it, is dropped), and otherwise
all but the longest tail that could still grow into a stop string (held back until the next
delta or ``flush``). So no emitted text ever contains a stop string or its start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, delta: str, armed: bool = True) -> str:
        """``armed=False``: the text is passed through unsearched (before ``min_tokens``)."""
        if self.stopped:
            return ""
        if not self.stops or (not armed and not self.pending):
            return delta
        self.pending += delta
        # the occurrence that completes first wins (ties: the one that starts first), as when
        # checking after every token; the result does not depend on how the text was chunked
        best: tuple[int, int] | None = None
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best):
                best = (i + len(s), i)
                self.matched = s
        if best is not None:
            out, self.pending, self.stopped = self.pending[: best[1]], "", True
            return out
        hold = self._held_tail()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        """The held-back tail, at the end of generation."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _held_tail(self) -> int:
        """Length of the longest suffix of ``pending`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best


def single_token_stop_ids(tokenizer: Any, stops: Sequence[str]) -> tuple[int, ...]:
    """Token ids of the stop strings that are exactly one token (round trip through the
    tokenizer), to pass as ``stop_token_ids`` so the engine stops without a wasted step."""
    if tokenizer is None:
        return ()
    ids: list[int] = []
    for s in stops:
        try:
            enc = tokenizer.encode(s, add_special_tokens=False)
        except Exception:  # noqa: BLE001 - an odd string is simply not a single token
            continue
        if len(enc) == 1 and tokenizer.decode(enc) == s:
            ids.append(int(enc[0]))
    return tuple(dict.fromkeys(ids))
