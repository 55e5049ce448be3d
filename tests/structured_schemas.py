"""Fifty varied JSON schemas with a prompt each, for the structured-output tests and benchmark:
nested objects, arrays with bounds, enums, bounded numbers, required and optional fields,
anyOf, $defs/$ref, const, nullable fields, string length and pattern limits."""

from __future__ import annotations

from typing import Any


def _obj(props: dict[str, Any], required: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    out["required"] = list(props) if required is None else required
    out.update(kw)
    return out


STR = {"type": "string", "maxLength": 40}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}

SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    (
        "Describe a person.",
        _obj({"name": STR, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    ),
    ("Name a city and its country.", _obj({"city": STR, "country": STR})),
    ("Pick a color.", _obj({"color": {"enum": ["red", "green", "blue"]}})),
    (
        "Rate this movie from 1 to 5.",
        _obj({"rating": {"type": "integer", "minimum": 1, "maximum": 5}}),
    ),
    ("Is water wet?", _obj({"answer": BOOL, "reason": STR})),
    (
        "List three fruits.",
        _obj({"fruits": {"type": "array", "items": STR, "minItems": 3, "maxItems": 3}}),
    ),
    (
        "Give a temperature in Celsius.",
        _obj({"celsius": {"type": "number", "minimum": -50, "maximum": 60}}),
    ),
    (
        "Describe a book.",
        _obj(
            {
                "title": STR,
                "author": STR,
                "year": {"type": "integer", "minimum": 1450, "maximum": 2030},
            }
        ),
    ),
    (
        "Give a point on the screen.",
        _obj(
            {
                "x": {"type": "integer", "minimum": 0, "maximum": 1920},
                "y": {"type": "integer", "minimum": 0, "maximum": 1080},
            }
        ),
    ),
    ("Describe a car.", _obj({"make": STR, "model": STR, "electric": BOOL})),
    ("Plan a click action.", _obj({"action": {"const": "click"}, "target": STR})),
    (
        "Describe a user with an address.",
        _obj(
            {
                "name": STR,
                "address": _obj(
                    {"street": STR, "city": STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}
                ),
            }
        ),
    ),
    ("Give two numbers.", _obj({"a": NUM, "b": NUM})),
    (
        "Choose a direction.",
        _obj(
            {
                "direction": {"enum": ["up", "down", "left", "right"]},
                "steps": {"type": "integer", "minimum": 1, "maximum": 10},
            }
        ),
    ),
    (
        "List some tags.",
        _obj(
            {
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 15},
                    "minItems": 1,
                    "maxItems": 4,
                }
            }
        ),
    ),
    (
        "Describe an animal.",
        _obj(
            {
                "species": STR,
                "legs": {"type": "integer", "minimum": 0, "maximum": 8},
                "can_fly": BOOL,
            }
        ),
    ),
    (
        "Give a date.",
        _obj(
            {
                "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                "month": {"type": "integer", "minimum": 1, "maximum": 12},
                "day": {"type": "integer", "minimum": 1, "maximum": 31},
            }
        ),
    ),
    (
        "Answer yes or no, with confidence.",
        _obj(
            {
                "answer": {"enum": ["yes", "no"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            }
        ),
    ),
    (
        "Describe a product.",
        _obj(
            {
                "name": STR,
                "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 10000},
                "in_stock": BOOL,
            }
        ),
    ),
    (
        "Give a shape.",
        {
            "anyOf": [
                _obj({"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0}}),
                _obj({"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0}}),
            ]
        },
    ),
    (
        "Give an ID.",
        _obj(
            {
                "id": {
                    "anyOf": [
                        {"type": "integer", "minimum": 0},
                        {"type": "string", "maxLength": 12},
                    ]
                }
            }
        ),
    ),
    (
        "Describe a team.",
        _obj(
            {
                "team": STR,
                "members": {
                    "type": "array",
                    "items": _obj({"name": STR, "role": {"enum": ["lead", "dev", "qa"]}}),
                    "minItems": 1,
                    "maxItems": 3,
                },
            }
        ),
    ),
    (
        "Give a matrix.",
        _obj(
            {
                "rows": {
                    "type": "array",
                    "items": {"type": "array", "items": INT, "minItems": 2, "maxItems": 2},
                    "minItems": 2,
                    "maxItems": 2,
                }
            }
        ),
    ),
    (
        "Describe the weather.",
        _obj(
            {
                "condition": {"enum": ["sunny", "rainy", "cloudy", "snowy"]},
                "temperature": {"type": "number", "minimum": -40, "maximum": 50},
                "wind_kmh": {"type": "integer", "minimum": 0, "maximum": 200},
            }
        ),
    ),
    ("Summarize in a title.", _obj({"title": {"type": "string", "minLength": 3, "maxLength": 30}})),
    (
        "Describe a person with an optional nickname.",
        _obj({"name": STR, "nickname": {"anyOf": [STR, {"type": "null"}]}}),
    ),
    (
        "Give a word and its length.",
        _obj(
            {
                "word": {"type": "string", "maxLength": 20},
                "length": {"type": "integer", "minimum": 0, "maximum": 20},
            }
        ),
    ),
    (
        "Describe a GUI element.",
        _obj(
            {
                "type": {"enum": ["button", "link", "input"]},
                "label": STR,
                "bbox": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 4000},
                    "minItems": 4,
                    "maxItems": 4,
                },
            }
        ),
    ),
    (
        "Give a list of scores.",
        _obj(
            {
                "scores": {
                    "type": "array",
                    "items": {"type": "number", "minimum": 0, "maximum": 100},
                    "maxItems": 5,
                }
            }
        ),
    ),
    (
        "Describe a recipe.",
        _obj(
            {
                "dish": STR,
                "ingredients": {"type": "array", "items": STR, "minItems": 1, "maxItems": 3},
                "minutes": {"type": "integer", "minimum": 1, "maximum": 300},
            }
        ),
    ),
    (
        "Describe a planet.",
        {
            "$defs": {"moon": _obj({"name": STR})},
            **_obj(
                {
                    "planet": STR,
                    "moons": {"type": "array", "items": {"$ref": "#/$defs/moon"}, "maxItems": 2},
                }
            ),
        },
    ),
    (
        "Give a key-value setting.",
        _obj(
            {
                "key": {"type": "string", "pattern": "^[a-z_]{1,12}$"},
                "value": {"anyOf": [BOOL, INT, STR]},
            }
        ),
    ),
    (
        "Type some text into a field.",
        _obj({"action": {"const": "type"}, "text": STR, "submit": BOOL}),
    ),
    (
        "Describe a country.",
        _obj(
            {
                "name": STR,
                "capital": STR,
                "population_millions": {"type": "number", "minimum": 0, "maximum": 2000},
            }
        ),
    ),
    (
        "Give an email address.",
        _obj({"email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.(com|org)$"}}),
    ),
    ("Give an HTTP status.", _obj({"code": {"enum": [200, 301, 404, 500]}, "message": STR})),
    (
        "Describe an event with an optional location.",
        _obj({"event": STR, "location": STR}, required=["event"]),
    ),
    (
        "Scroll the page.",
        _obj(
            {
                "action": {"const": "scroll"},
                "direction": {"enum": ["up", "down"]},
                "amount": {"type": "integer", "minimum": 1, "maximum": 5},
            }
        ),
    ),
    (
        "Give a version number.",
        _obj(
            {
                "major": {"type": "integer", "minimum": 0, "maximum": 99},
                "minor": {"type": "integer", "minimum": 0, "maximum": 99},
                "patch": {"type": "integer", "minimum": 0, "maximum": 99},
            }
        ),
    ),
    (
        "Give a tree.",
        {
            "$defs": {"leaf": _obj({"value": INT})},
            **_obj(
                {
                    "root": INT,
                    "children": {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "maxItems": 3},
                }
            ),
        },
    ),
    ("Give a boolean flag.", _obj({"enabled": BOOL})),
    (
        "Describe a song.",
        _obj(
            {
                "title": STR,
                "artist": STR,
                "duration_s": {"type": "integer", "minimum": 30, "maximum": 600},
            }
        ),
    ),
    (
        "Give a list of pairs.",
        _obj(
            {
                "pairs": {
                    "type": "array",
                    "items": _obj({"k": {"type": "string", "maxLength": 8}, "v": INT}),
                    "maxItems": 3,
                }
            }
        ),
    ),
    (
        "Give a nullable number.",
        _obj(
            {
                "value": {
                    "anyOf": [{"type": "number", "minimum": 0, "maximum": 10}, {"type": "null"}]
                }
            }
        ),
    ),
    (
        "Pick a size.",
        _obj(
            {
                "size": {"enum": ["S", "M", "L", "XL"]},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
            }
        ),
    ),
    (
        "Describe a company.",
        _obj(
            {
                "name": STR,
                "founded": {"type": "integer", "minimum": 1800, "maximum": 2025},
                "public": BOOL,
                "ceo": _obj({"name": STR}),
            }
        ),
    ),
    (
        "Open an app.",
        _obj(
            {
                "action": {"const": "open_app"},
                "app": {"enum": ["camera", "settings", "browser", "mail"]},
            }
        ),
    ),
    (
        "Give a coordinate.",
        _obj(
            {
                "lat": {"type": "number", "minimum": -90, "maximum": 90},
                "lon": {"type": "number", "minimum": -180, "maximum": 180},
            }
        ),
    ),
    (
        "Give a list of words.",
        {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "minItems": 2,
            "maxItems": 4,
        },
    ),
    (
        "Classify the sentiment.",
        _obj(
            {
                "sentiment": {"enum": ["positive", "negative", "neutral"]},
                "score": {"type": "number", "minimum": -1, "maximum": 1},
            }
        ),
    ),
]
