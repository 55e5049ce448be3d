"""Incremental detokenization: the text each new token adds to a request's output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nova.models.inputs import InputProcessor


class IncrementalDetokenizer:
    """One request's output text, delta by delta, decoding only a short window per token.

    The window starts at ``_prefix``, the start of the tokens behind the last delta, and
    ``_read`` marks the end of what that delta covered: a new delta is
    ``decode(ids[_prefix:]) - decode(ids[_prefix:_read])``. Decoding from a token boundary that
    was already emitted keeps a tokenizer's word-boundary handling (a leading space marker is
    treated the same in both decodes), and the work per token does not grow with the output's
    length. An incomplete multi-byte character (decoded as U+FFFD) is held back until the token
    that completes it arrives, or emitted as is with the final delta.

    Invariant (checked against whole-output decoding in ``tests/test_detokenizer.py``): the
    concatenation of the deltas equals the decoded text of all tokens, except where decoding
    more tokens rewrites text already sent (it cannot be taken back): the deltas then continue
    from the length already sent.
    """

    def __init__(self, processor: InputProcessor) -> None:
        self.processor = processor
        self.token_ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, new_token_ids: Sequence[int], final: bool) -> str:
        """The new text after appending ``new_token_ids``; "" without a tokenizer.
        ``final``: no more tokens follow."""
        self.token_ids.extend(new_token_ids)
        if self.processor.tokenizer is None:
            return ""
        ids = self.token_ids
        before = self.processor.decode(ids[self._prefix : self._read])
        text = self.processor.decode(ids[self._prefix :])
        if text.endswith("\ufffd") and not final:
            return ""
        self._prefix, self._read = self._read, len(ids)
        return text[len(before) :]

    def delta(self, token_ids: Sequence[int], final: bool) -> str:
        """The new text given all output tokens so far (the tokens beyond those already
        pushed are pushed)."""
        return self.push(token_ids[len(self.token_ids) :], final)
