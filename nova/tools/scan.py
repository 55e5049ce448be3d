"""An incremental scanner for one tool call's JSON object, ``{"name": ..., "arguments": ...}``.

Text arrives in pieces; the scanner tracks strings, escapes and nesting character by character
and reports, as soon as they are known, the function name (once its string is complete) and the
raw text of the arguments value (``"arguments"`` or ``"parameters"``), growing, so arguments can
be streamed as the model writes them. The arguments are passed on exactly as written (valid JSON
text of the value), never re-serialised, so streamed fragments and a non-streamed response agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ARGUMENT_KEYS = ("arguments", "parameters")
WHITESPACE = " \t\r\n"


class ScanError(ValueError):
    """The text is not a JSON object of the expected shape."""


@dataclass(slots=True)
class _Value:
    key: str
    start: int  # index in the scanned text of the value's first character
    composite: bool  # an object, array or string: every character up to its end belongs to it


class CallScanner:
    """Feed text with ``feed``; read ``name``, ``arguments_text()``, ``done`` and ``end``
    (index just past the closing brace in the text fed so far)."""

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0  # characters scanned
        self.started = False  # the opening brace was seen
        self.done = False
        self.end = -1
        self.name: str | None = None
        self.depth = 0
        self.in_string = False
        self.escape = False
        # Top level (depth 1) grammar: key -> colon -> value -> comma/close.
        self.expect = "key_or_close"  # key_or_close | key | colon | value | comma_or_close
        self.key_start = -1
        self.current_key: str | None = None
        self.value: _Value | None = None
        self.arguments: tuple[int, int] | None = None  # finished span
        self.arguments_start = -1  # span start while the arguments value is being written

    def feed(self, text: str) -> None:
        self.text += text
        while self.pos < len(self.text) and not self.done:
            self._step(self.text[self.pos])
            self.pos += 1

    @property
    def rest(self) -> str:
        """Text after the closing brace (empty until ``done``)."""
        return self.text[self.end :] if self.done else ""

    def arguments_text(self) -> str | None:
        """The arguments value written so far (complete once ``arguments_complete``); None
        before it starts. A number or literal is only reported once complete."""
        if self.arguments is not None:
            return self.text[self.arguments[0] : self.arguments[1]]
        if self.arguments_start >= 0 and self.value is not None and self.value.composite:
            return self.text[self.arguments_start : self.pos]
        return None

    @property
    def arguments_complete(self) -> bool:
        return self.arguments is not None

    # -- the state machine ---------------------------------------------------------------
    def _step(self, c: str) -> None:
        if not self.started:
            if c in WHITESPACE:
                return
            if c != "{":
                raise ScanError(f"expected '{{', got {c!r}")
            self.started, self.depth = True, 1
            return
        if self.in_string:
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.in_string = False
                if self.depth == 1:
                    self._string_closed_at_top()
            return
        if self.depth > 1:  # inside a nested value of the top-level object
            if c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1:
                    self._value_ended(self.pos + 1)
            return
        self._top_level(c)

    def _top_level(self, c: str) -> None:
        expect = self.expect
        if expect == "value" and self.value is not None and not self.value.composite:
            # inside a number / true / false / null
            if c in WHITESPACE or c in ",}":
                self._value_ended(self.pos)
                if c in ",}":
                    self._top_level(c)
            return
        if c in WHITESPACE:
            return
        if expect in ("key_or_close", "comma_or_close") and c == "}":
            self.depth = 0
            self.done, self.end = True, self.pos + 1
            return
        if expect in ("key_or_close", "key") and c == '"':
            self.in_string, self.key_start = True, self.pos
            return
        if expect == "colon" and c == ":":
            self.expect = "value"
            return
        if expect == "value" and self.value is None:
            key = self.current_key or ""
            composite = c in '{["'
            self.value = _Value(key, self.pos, composite)
            if key in ARGUMENT_KEYS:
                self.arguments_start = self.pos
            if c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif not (c.isalnum() or c in "-+."):
                raise ScanError(f"unexpected {c!r} for the value of {key!r}")
            return
        if expect == "comma_or_close" and c == ",":
            self.expect = "key"
            return
        raise ScanError(f"unexpected {c!r} in the tool call object")

    def _string_closed_at_top(self) -> None:
        if self.expect in ("key_or_close", "key"):
            self.current_key = json.loads(self.text[self.key_start : self.pos + 1])
            self.expect = "colon"
        elif self.value is not None:  # a string value
            self._value_ended(self.pos + 1)

    def _value_ended(self, end: int) -> None:
        value = self.value
        if value is None:
            return
        raw = self.text[value.start : end]
        if value.key == "name":
            try:
                name = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ScanError(f"the function name is not a JSON string: {raw!r}") from exc
            if not isinstance(name, str):
                raise ScanError(f"the function name is not a string: {raw!r}")
            self.name = name
        elif value.key in ARGUMENT_KEYS:
            self.arguments = (value.start, end)
            self.arguments_start = -1
        self.value = None
        self.current_key = None
        self.expect = "comma_or_close"
