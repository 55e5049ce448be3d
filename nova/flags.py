"""Command-line flags generated from config dataclasses.

A config dataclass declares, in each field's metadata, either the field's flag
(``metadata=flag("help", ...)``) or why it has none (``metadata=no_flag("reason")``).
``add_flags`` turns those declarations into ``argparse`` arguments and ``from_flags`` builds the
dataclass back from the parsed namespace, so flag names, types, choices and defaults live only in
the dataclass. The same metadata's ``minimum`` is what ``check_minimums`` enforces when the
dataclass is built in code.

Rules (the flag's ``dest`` is always the field name):

- the flag is ``--`` + the field name with ``_`` -> ``-`` (``name=`` overrides it);
- a ``bool`` field defaulting to False is ``--name`` (store true); one defaulting to True is
  ``--no-name`` (store false);
- ``int``/``float``/``str`` fields, optional or not, take one value of that type; ``minimum``
  rejects smaller numbers at parse time, ``choices`` other strings;
- the default is the dataclass's, unless the caller overrides it (``defaults=``) or ``env=``
  names an environment variable that is set.

Torch-free and free of every other Nova module, so any command line can use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

METADATA_KEY = "nova.flag"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FlagSpec:
    """How one config field appears on the command line."""

    help: str
    name: str | None = None  # flag name without the dashes; None: the field name, "_" -> "-"
    choices: tuple[str, ...] | None = None
    minimum: int | float | None = None  # smallest accepted value of a numeric field
    metavar: str | None = None
    group: str | None = None  # argument group title; None: the caller's group
    env: str | None = None  # environment variable whose value, when set, is the default


@dataclass(frozen=True, slots=True)
class NoFlag:
    """A field deliberately left off the command line, and why."""

    reason: str


def flag(
    help: str,  # noqa: A002 - the argparse keyword
    *,
    name: str | None = None,
    choices: Collection[str] | None = None,
    minimum: int | float | None = None,
    metavar: str | None = None,
    group: str | None = None,
    env: str | None = None,
) -> dict[str, Any]:
    """Field metadata declaring the field's flag: ``field(default=..., metadata=flag(...))``."""
    spec = FlagSpec(
        help, name, tuple(choices) if choices is not None else None, minimum, metavar, group, env
    )
    return {METADATA_KEY: spec}


def no_flag(reason: str) -> dict[str, Any]:
    """Field metadata declaring that the field has no flag (``reason`` says why)."""
    return {METADATA_KEY: NoFlag(reason)}


def flag_spec(f: dataclasses.Field[Any]) -> FlagSpec | NoFlag:
    """The declaration of a field; a TypeError when it has none (every field must say)."""
    spec = f.metadata.get(METADATA_KEY)
    if not isinstance(spec, FlagSpec | NoFlag):
        raise TypeError(f"field {f.name!r} declares neither flag(...) nor no_flag(...)")
    return spec


def flag_name(f: dataclasses.Field[Any], spec: FlagSpec) -> str:
    """The option string of a field's flag, e.g. ``--no-cuda-graphs``."""
    name = spec.name or f.name.replace("_", "-")
    if _value_type(f) is bool and f.default is True:
        name = "no-" + name
    return "--" + name


def flagged_fields(cls: type) -> Iterator[tuple[dataclasses.Field[Any], FlagSpec]]:
    """The fields of ``cls`` that have a flag, in declaration order."""
    for f in dataclasses.fields(cls):
        spec = flag_spec(f)
        if isinstance(spec, FlagSpec):
            yield f, spec


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    include: Collection[str] | None = None,
    exclude: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
    group: str | None = None,
    groups: dict[str, Any] | None = None,
) -> list[str]:
    """Add the flags of ``cls``'s fields to ``parser``; returns the field names added.

    ``include``: only these fields (default: every field with a flag); ``exclude``: not these;
    ``defaults``: per-field defaults replacing the dataclass's. A field goes into the argument
    group its spec names, else into ``group``, else into ``parser`` itself; each group is
    created once per ``groups`` dict (pass the same dict to share groups between calls)."""
    defaults = dict(defaults or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = (set(include or ()) | set(exclude) | set(defaults)) - known
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
    groups = {} if groups is None else groups
    added = []
    for f, spec in flagged_fields(cls):
        if (include is not None and f.name not in include) or f.name in exclude:
            continue
        target: Any = parser
        title = spec.group or group
        if title is not None:
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        _add_one(target, f, spec, defaults.get(f.name, _default(f, spec)))
        added.append(f.name)
    return added


def from_flags(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """An instance of ``cls`` from the parsed flags in ``args`` (fields without a flag in
    ``args`` keep their defaults); ``overrides`` win over both."""
    kwargs = {
        f.name: getattr(args, f.name) for f, _ in flagged_fields(cls) if hasattr(args, f.name)
    }
    kwargs.update(overrides)
    return cls(**kwargs)


def check_minimums(obj: Any) -> None:
    """A ValueError naming the first field of ``obj`` below its flag's ``minimum`` (None values
    pass: they mean "not set")."""
    for f, spec in flagged_fields(type(obj)):
        value = getattr(obj, f.name)
        if spec.minimum is not None and value is not None and value < spec.minimum:
            raise ValueError(f"{f.name} must be >= {spec.minimum}, got {value}")


# --------------------------------------------------------------------------------------------


def _value_type(f: dataclasses.Field[Any]) -> type:
    """``int`` for ``int``, ``int | None`` and ``Optional[int]`` (string annotations resolved)."""
    hint: Any = f.type
    if isinstance(hint, str):
        hint = {"int": int, "float": float, "str": str, "bool": bool}.get(
            hint.replace(" ", "").removesuffix("|None").removeprefix("None|"), hint
        )
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    if hint not in (int, float, str, bool):
        raise TypeError(f"field {f.name!r}: no flag for a field of type {f.type!r}")
    return typing.cast(type, hint)


def _default(f: dataclasses.Field[Any], spec: FlagSpec) -> Any:
    if spec.env is not None and os.environ.get(spec.env) is not None:
        return os.environ[spec.env]
    if f.default is dataclasses.MISSING:
        raise TypeError(f"field {f.name!r} has a flag but no default")
    return f.default


def _bounded(kind: type, minimum: int | float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: ..."
    return parse


def _add_one(target: Any, f: dataclasses.Field[Any], spec: FlagSpec, default: Any) -> None:
    kind = _value_type(f)
    option = flag_name(f, spec)
    if kind is bool:
        action = "store_false" if f.default is True else "store_true"
        target.add_argument(option, dest=f.name, action=action, default=default, help=spec.help)
        return
    kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": spec.help}
    if spec.choices is not None:
        kwargs["choices"] = spec.choices
    if kind is not str:
        kwargs["type"] = _bounded(kind, spec.minimum) if spec.minimum is not None else kind
    if spec.metavar is not None:
        kwargs["metavar"] = spec.metavar
    target.add_argument(option, **kwargs)
