"""Incremental detokenization: the text each new token adds to a request's output."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nova.models.inputs import InputProcessor


class IncrementalDetokenizer:
    """One request's output text, delta by delta: decode all tokens so far and emit what was
    added. An incomplete multi-byte character (decoded as U+FFFD) is held back until the token
    that completes it arrives, or emitted as is with the final delta.

    Invariant: the concatenation of the deltas is the decoded text of all tokens, except where
    decoding more tokens rewrote text already emitted (a merge across the boundary): what was
    sent cannot be taken back, so the deltas continue from the emitted length."""

    def __init__(self, processor: InputProcessor) -> None:
        self.processor = processor
        self.emitted = ""

    def delta(self, token_ids: list[int], final: bool) -> str:
        """The new text after ``token_ids`` (all output tokens so far); "" without a
        tokenizer. ``final``: no more tokens follow."""
        if self.processor.tokenizer is None:
            return ""
        text = self.processor.decode(token_ids)
        if text.endswith("\ufffd") and not final:
            return ""
        out = text[len(self.emitted) :]
        self.emitted = text
        return out
