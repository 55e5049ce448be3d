"""Log-probabilities in the OpenAI response formats.

Chat: ``choices[i].logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs":
[{"token", "logprob", "bytes"}, ...]}, ...], "refusal": null}``. Completions: ``logprobs =
{"tokens", "token_logprobs", "top_logprobs": [{token: logprob, ...}], "text_offset"}``, where
each ``top_logprobs`` dict also holds the sampled token (so up to n + 1 entries, as vLLM).
Streamed, each chunk carries the entries of the tokens it delivers (``text_offset`` keeps
counting from the start of the output).

``token`` is the token's text (special tokens included, e.g. ``<|im_end|>``); ``bytes`` its
exact UTF-8 bytes (a byte-level BPE token may hold part of a character: its ``token`` then
shows U+FFFD, its ``bytes`` the real bytes, which concatenate to the output). -inf is sent as
-9999.0 (JSON has no infinity), as vLLM does.
"""

from __future__ import annotations

import contextlib
import math
from functools import lru_cache
from typing import Any

from nova.types import TokenLogprobs

NEG_INF_LOGPROB = -9999.0


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenTexts:
    """Each token id's text and bytes under one tokenizer (cached; thread-safe enough: the
    cache only ever holds the same value for a key)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        kind = ""
        with contextlib.suppress(AttributeError):
            kind = type(tokenizer.backend_tokenizer.decoder).__name__
        self._byte_level = kind == "ByteLevel"
        self._bytes_of = _byte_decoder() if self._byte_level else {}
        self.text = lru_cache(maxsize=1 << 16)(self._text)
        self.bytes = lru_cache(maxsize=1 << 16)(self._bytes)

    def _text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    def _bytes(self, token_id: int) -> list[int] | None:
        if self.tokenizer is None:
            return None
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self._byte_level and all(c in self._bytes_of for c in piece):
                return [self._bytes_of[c] for c in piece]
            if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
                try:  # SentencePiece byte fallback
                    return [int(piece[3:5], 16)]
                except ValueError:
                    pass
        return list(self._text(token_id).encode("utf-8"))


def _lp(value: float) -> float:
    return value if math.isfinite(value) else NEG_INF_LOGPROB


def chat_entries(entries: list[TokenLogprobs], texts: TokenTexts) -> list[dict[str, Any]]:
    """``logprobs.content`` items for the tokens of ``entries``."""
    out = []
    for e in entries:
        out.append(
            {
                "token": texts.text(e.token_id),
                "logprob": _lp(e.logprob),
                "bytes": texts.bytes(e.token_id),
                "top_logprobs": [
                    {"token": texts.text(t), "logprob": _lp(v), "bytes": texts.bytes(t)}
                    for t, v in e.top
                ],
            }
        )
    return out


def chat_logprobs(entries: list[TokenLogprobs], texts: TokenTexts) -> dict[str, Any]:
    return {"content": chat_entries(entries, texts), "refusal": None}


def completion_logprobs(
    entries: list[TokenLogprobs], texts: TokenTexts, offset: int = 0
) -> tuple[dict[str, Any], int]:
    """(the ``logprobs`` object for ``entries``, the text offset after them); ``offset``: the
    characters of output before the first of them."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for e in entries:
        text = texts.text(e.token_id)
        tokens.append(text)
        token_lps.append(_lp(e.logprob))
        top = {texts.text(t): _lp(v) for t, v in e.top}
        top.setdefault(text, _lp(e.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    body = {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
    return body, offset
