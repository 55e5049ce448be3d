"""Typed reading of fields from parsed JSON (``config.json``, processor configs).

Every reader names the field and where it was looked for when it is missing or of the wrong
type, so a bad config gives one clear :class:`ConfigError` (a ``ValueError``). A JSON ``null``
counts as absent, as in ``transformers``. Integers may be written as integral floats (``4096.0``);
booleans are never integers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

JsonDict = Mapping[str, object]


class ConfigError(ValueError):
    """A model or processor config that cannot be read as a model shape; the message says why."""


def read_json_dict(file: Path) -> dict[str, object]:
    """The JSON object in ``file``; ``ConfigError`` naming the file if it is not one."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {file}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{file} does not hold a JSON object")
    return data


def dict_field(d: JsonDict, key: str, where: str) -> JsonDict | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {key!r} must be an object, got {value!r}")
    return value


def opt_int(d: JsonDict, key: str, where: str) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: {key!r} must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{where}: {key!r} must be an integer, got {value!r}")
    return int(value)


def req_int(d: JsonDict, key: str, where: str) -> int:
    value = opt_int(d, key, where)
    if value is None:
        raise ConfigError(f"{where} lacks {key!r}")
    return value


def int_or(d: JsonDict, key: str, where: str, default: int) -> int:
    value = opt_int(d, key, where)
    return default if value is None else value


def float_or(d: JsonDict, key: str, where: str, default: float) -> float:
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: {key!r} must be a number, got {value!r}")
    return float(value)


def opt_bool(d: JsonDict, key: str, where: str) -> bool | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key!r} must be true or false, got {value!r}")
    return value


def bool_or(d: JsonDict, key: str, where: str, default: bool) -> bool:
    value = opt_bool(d, key, where)
    return default if value is None else value


def opt_str(d: JsonDict, key: str, where: str) -> str | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key!r} must be a string, got {value!r}")
    return value


def str_or(d: JsonDict, key: str, where: str, default: str) -> str:
    value = opt_str(d, key, where)
    return default if value is None else value


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
