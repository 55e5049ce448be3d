"""Typed reading of fields from parsed JSON (``config.json``, processor configs).

Every reader names the field and where it was looked for when it is missing or of the wrong
type, so a bad config gives one clear :class:`ConfigError` (a ``ValueError``). A JSON ``null``
counts as absent, as in ``transformers``. Integers may be written as integral floats (``4096.0``);
booleans are never integers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar, cast

JsonDict = Mapping[str, object]
T = TypeVar("T")
# What a JSON object may be given as (mypy takes no abstract class for a ``type[T]`` argument).
_JSON_OBJECT = cast("type[JsonDict]", Mapping)


class ConfigError(ValueError):
    """A model or processor config that cannot be read as a model shape; the message says why."""


def read_json_dict(
    file: Path, error: Callable[[str], Exception] = ConfigError
) -> dict[str, object]:
    """The JSON object in ``file``; ``error(message)`` (default ``ConfigError``) naming the file
    if it cannot be read or does not hold one."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {file}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise error(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{file} does not hold a JSON object")
    return data


def _opt(d: JsonDict, key: str, where: str, kind: type[T], noun: str) -> T | None:
    """``d[key]`` if it is a ``kind``; None when absent or null; else ``ConfigError`` saying it
    must be ``noun``."""
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: {key!r} must be {noun}, got {value!r}")
    return value


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def _opt_number(d: JsonDict, key: str, where: str, noun: str) -> int | float | None:
    """An int or float (never a bool), or None when absent."""
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: {key!r} must be {noun}, got {value!r}")
    return value


def dict_field(d: JsonDict, key: str, where: str) -> JsonDict | None:
    return _opt(d, key, where, _JSON_OBJECT, "an object")


def opt_int(d: JsonDict, key: str, where: str) -> int | None:
    value = _opt_number(d, key, where, "an integer")
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{where}: {key!r} must be an integer, got {value!r}")
    return None if value is None else int(value)


def req_int(d: JsonDict, key: str, where: str) -> int:
    value = opt_int(d, key, where)
    if value is None:
        raise ConfigError(f"{where} lacks {key!r}")
    return value


def int_or(d: JsonDict, key: str, where: str, default: int) -> int:
    return _or(opt_int(d, key, where), default)


def float_or(d: JsonDict, key: str, where: str, default: float) -> float:
    value = _opt_number(d, key, where, "a number")
    return default if value is None else float(value)


def opt_bool(d: JsonDict, key: str, where: str) -> bool | None:
    return _opt(d, key, where, bool, "true or false")


def bool_or(d: JsonDict, key: str, where: str, default: bool) -> bool:
    return _or(opt_bool(d, key, where), default)


def opt_str(d: JsonDict, key: str, where: str) -> str | None:
    return _opt(d, key, where, str, "a string")


def str_or(d: JsonDict, key: str, where: str, default: str) -> str:
    return _or(opt_str(d, key, where), default)


def int_list(d: JsonDict, key: str, where: str) -> tuple[int, ...] | None:
    """A list of integers, or one integer as a list of one; None when absent."""
    value = d.get(key)
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    out: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ConfigError(
                f"{where}: {key!r} must be an integer or a list of them, got {value!r}"
            )
        out.append(item)
    return tuple(out)
