"""The session key of a request (pure; no Ray): which agent session it belongs to, so that every
step of one session goes to the same replica and hits its prefix and encoder caches.

In order: the ``x-session-id`` header; else the body's ``user`` field; else a hash of the
conversation's first turn (chat: the messages up to and including the first ``user`` message,
which every later step of the conversation repeats unchanged; completions: the prompt's first
``PROMPT_PREFIX_CHARS`` characters or ``PROMPT_PREFIX_TOKENS`` token ids). A request with none
of these (not JSON, no messages or prompt) has no key and is spread at random.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SESSION_HEADER = "x-session-id"
SOURCES = ("header", "user", "conversation", "none")
# A completions prompt has no turn boundaries: its first characters (or token ids) stand for
# the session's first turn. Long enough to tell sessions with different instructions apart,
# short enough that the first step's prompt usually covers it.
PROMPT_PREFIX_CHARS = 512
PROMPT_PREFIX_TOKENS = 128


@dataclass(frozen=True, slots=True)
class SessionKey:
    key: str | None  # None: no session (the router spreads such requests at random)
    source: str  # one of SOURCES


def _digest(obj: Any) -> str:
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


def first_turn(messages: list[Any]) -> list[Any] | None:
    """The messages up to and including the first ``user`` message (all of them when there is
    none); None when ``messages`` is empty."""
    if not messages:
        return None
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return messages[: i + 1]
    return messages


def _prompt_prefix(prompt: Any) -> Any:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch of prompts: the first stands for the request
    if isinstance(prompt, str):
        return prompt[:PROMPT_PREFIX_CHARS] or None
    if isinstance(prompt, list) and prompt:
        return prompt[:PROMPT_PREFIX_TOKENS]
    return None


def session_key(headers: Mapping[str, str], body: bytes) -> SessionKey:
    """``headers``: the request's headers with lower-case names; ``body``: its raw body."""
    sid = headers.get(SESSION_HEADER, "").strip()
    if sid:
        return SessionKey("s:" + sid, "header")
    try:
        obj = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return SessionKey(None, "none")
    if not isinstance(obj, dict):
        return SessionKey(None, "none")
    user = obj.get("user")
    if isinstance(user, str) and user.strip():
        return SessionKey("u:" + user.strip(), "user")
    messages = obj.get("messages")
    if isinstance(messages, list):
        turn = first_turn(messages)
        if turn is not None:
            return SessionKey("c:" + _digest(turn), "conversation")
    prefix = _prompt_prefix(obj.get("prompt"))
    if prefix is not None:
        return SessionKey("p:" + _digest(prefix), "conversation")
    return SessionKey(None, "none")
