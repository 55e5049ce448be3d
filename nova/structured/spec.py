"""What output a request is constrained to: a ``GrammarSpec`` (plain, hashable data).

The API's ``response_format`` / ``structured_outputs`` / tool-call modes become one of these
before anything is compiled; the compiled-grammar cache (``nova.structured.compiler``) is keyed
by it. The JSON source keeps the schema's key order: property order in a JSON schema is the
order the grammar generates them in, so two schemas that differ only in key order are two
grammars.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

GrammarKind = Literal["json_schema", "regex", "choice", "grammar"]
GRAMMAR_KINDS: tuple[GrammarKind, ...] = ("json_schema", "regex", "choice", "grammar")

# JSON schema of "any JSON object" (response_format json_object).
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}

# How JSON is laid out (llguidance's options; a schema's top-level "x-guidance" key overrides
# them): ", " and ": " separators as Python's json.dumps writes them, and no other whitespace.
# With llguidance's default (any whitespace between tokens) a small model can write newlines
# until max_tokens.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
# Fraction digits a generated JSON number may have (``generation_schema`` adds ``multipleOf``
# 1e-6 to number schemas that set none): a small model otherwise repeats a digit until
# max_tokens ("1.25888888..."); six places keep coordinates, scores and prices exact enough.
FRACTION_DIGITS = 6
# Keywords whose subschemas are schemas (for walking a schema).
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = (
    "items",
    "additionalProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "additionalItems",
)


class GrammarError(ValueError):
    """A spec the grammar engine cannot compile; the message names the problem."""


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """``kind`` and its source text: a JSON schema (serialised JSON), a regular expression, a
    JSON list of strings (choice), or a grammar (Lark in llguidance's dialect, or GBNF)."""

    kind: GrammarKind
    source: str

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; one of {GRAMMAR_KINDS}")
        if not isinstance(self.source, str):
            raise GrammarError(f"a {self.kind} grammar's source must be text")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str, tighten: bool = True) -> GrammarSpec:
        """A JSON schema given as a dict (or ``true``), or as its JSON text.
        ``tighten``: see ``generation_schema``."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError(
                f"a JSON schema must be an object (or true), got {type(schema).__name__}"
            )
        if tighten:
            schema = generation_schema(schema)
        try:
            source = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise GrammarError(f"the JSON schema cannot be serialised: {exc}") from exc
        return cls("json_schema", source)

    @classmethod
    def json_object(cls) -> GrammarSpec:
        return cls.json_schema(ANY_JSON_OBJECT)

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        if not pattern:
            raise GrammarError("the regular expression is empty")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str]) -> GrammarSpec:
        if not options:
            raise GrammarError("choice needs at least one option")
        if not all(isinstance(o, str) and o for o in options):
            raise GrammarError("choice options must be non-empty strings")
        return cls("choice", json.dumps(list(options), ensure_ascii=False))

    @classmethod
    def grammar(cls, text: str) -> GrammarSpec:
        if not text.strip():
            raise GrammarError("the grammar is empty")
        return cls("grammar", text)


def generation_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with ``"additionalProperties": false`` on every object schema that lists
    ``properties`` and says nothing about other keys (no ``additionalProperties``,
    ``patternProperties`` or ``unevaluatedProperties``).

    JSON Schema allows any extra key there; a small model given that freedom keeps inventing
    keys until ``max_tokens`` and the JSON never closes. Generating only the declared keys is
    what OpenAI's strict mode requires of a schema and what vLLM's default grammar backend
    (xgrammar in strict mode) does; the output still validates against the original schema.
    A schema that uses ``allOf`` is left as it is (closing each branch would forbid the other
    branches' keys).

    Likewise every ``number`` schema without ``multipleOf`` gets ``multipleOf: 1e-6`` (at
    most ``FRACTION_DIGITS`` digits after the point): the value still validates against the
    original schema. Returns a new dict; ``schema`` is not changed."""
    return _tighten(schema, close=not _uses_all_of(schema))


def _uses_all_of(node: Any) -> bool:
    if isinstance(node, dict):
        return "allOf" in node or any(_uses_all_of(v) for v in node.values())
    if isinstance(node, list):
        return any(_uses_all_of(v) for v in node)
    return False


def _tighten(node: Any, close: bool) -> Any:
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in _SCHEMA_MAPS:
        sub = out.get(key)
        if isinstance(sub, dict):
            out[key] = {k: _tighten(v, close) for k, v in sub.items()}
    for key in (*_SCHEMA_LISTS, "allOf"):
        sub = out.get(key)
        if isinstance(sub, list):
            out[key] = [_tighten(v, close) for v in sub]
    for key in _SCHEMA_ONE:
        if key in out:
            out[key] = _tighten(out[key], close)
    if (
        close
        and isinstance(out.get("properties"), dict)
        and not (
            {"additionalProperties", "patternProperties", "unevaluatedProperties"} & out.keys()
        )
    ):
        out["additionalProperties"] = False
    kind = out.get("type")
    if (kind == "number" or (isinstance(kind, list) and "number" in kind)) and (
        "multipleOf" not in out
    ):
        out["multipleOf"] = 10.0**-FRACTION_DIGITS
    return out
