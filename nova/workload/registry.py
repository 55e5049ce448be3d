"""The workload registry and the parameter checks the workload builders share.

A builder is a function taking keyword-only parameters and returning a :class:`Workload`. Builders
of generated GUI-agent requests take a ``content: GuiContentConfig`` parameter;
:func:`make_workload` also accepts that config's fields flat (``image_width=...``), which is
what a command line passes.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

from nova.registry import Registry
from nova.workload.types import Workload

WorkloadBuilder = Callable[..., Workload]

WORKLOADS: Registry[WorkloadBuilder] = Registry("workload")


def register_workload(name: str) -> Callable[[WorkloadBuilder], WorkloadBuilder]:
    """Decorator: register a builder under ``name`` (unique)."""
    return WORKLOADS.register(name)


def make_workload(name: str, **kwargs: Any) -> Workload:
    """Build the workload registered as ``name``.

    Raises ``ValueError`` naming the known workloads for an unknown name, and naming the
    parameter for an unknown, missing or bad parameter.
    """
    builder = WORKLOADS.lookup(name)
    return builder(**_bind_kwargs(name, builder, kwargs))


def workload_parameters(name: str) -> dict[str, Any]:
    """Parameter name -> default (``inspect.Parameter.empty`` if required) of a registered
    workload, with the content config's fields flattened in, as :func:`make_workload` takes them."""
    out: dict[str, Any] = {}
    for pname, param in inspect.signature(WORKLOADS.lookup(name)).parameters.items():
        if pname == "content":
            out.update({f.name: f.default for f in dataclasses.fields(_content_config_cls())})
        else:
            out[pname] = param.default
    return out


def _content_config_cls() -> type:
    from nova.workload.gui_agent import GuiContentConfig  # gui_agent imports this module

    return GuiContentConfig


def _bind_kwargs(name: str, builder: WorkloadBuilder, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(builder).parameters
    kwargs = dict(kwargs)
    if "content" in params:
        cls = _content_config_cls()
        flat = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls) if f.name in kwargs}
        if flat and "content" in kwargs:
            raise ValueError(
                f"workload {name!r}: give either content= or its fields "
                f"({', '.join(flat)}), not both"
            )
        if flat:
            kwargs["content"] = cls(**flat)
    for key in kwargs:
        if key not in params:
            known = ", ".join(workload_parameters(name))
            raise ValueError(f"workload {name!r} has no parameter {key!r}; its parameters: {known}")
    for pname, param in params.items():
        if param.default is inspect.Parameter.empty and pname not in kwargs:
            raise ValueError(f"workload {name!r} needs parameter {pname!r}")
    return kwargs


# --- parameter checks: each raises ValueError naming the parameter ---------------------------


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: Any) -> float:
    """A finite number >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, minimum: int) -> int:
    """An integer >= ``minimum`` (bools refused), as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_seed(value: Any) -> int:
    """Any integer (bools refused), as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {value!r}")
    return int(value)
