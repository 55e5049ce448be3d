"""The Serve application: ``build_app`` (from configs), ``build`` (for ``serve run``: a
``serve.yaml`` ``args:`` mapping of ``nova serve`` flags) and ``build_from_args`` (parsed
``nova serve`` flags)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application

from nova.config import EngineConfig
from nova.deploy.config import (
    INGRESS_DEPLOYMENT,
    REPLICA_DEPLOYMENT,
    DeployConfig,
    ingress_options,
    replica_options,
)
from nova.deploy.ingress import NovaIngress
from nova.deploy.replica import NovaReplica
from nova.flags import flag_name, flagged_fields
from nova.server.config import ServerConfig


def build_app(
    engine_config: EngineConfig, server_config: ServerConfig, deploy_config: DeployConfig
) -> Application:
    """``NovaIngress`` over ``deploy_config.replicas`` ``NovaReplica``s (each builds its engine
    from ``engine_config`` and serves it with ``server_config``)."""
    if os.path.isdir(engine_config.model):  # replicas may start in another working directory
        engine_config = dataclasses.replace(
            engine_config, model=os.path.abspath(engine_config.model)
        )
    replica = serve.deployment(
        NovaReplica,
        name=REPLICA_DEPLOYMENT,
        **replica_options(
            deploy_config, engine_config.device, engine_config.max_num_seqs, server_config.max_queue
        ),
    )
    ingress = serve.deployment(NovaIngress, name=INGRESS_DEPLOYMENT, **ingress_options())
    return ingress.bind(replica.bind(engine_config, server_config), server_config, deploy_config)


def build_from_args(args: argparse.Namespace) -> Application:
    """The application for parsed ``nova serve`` flags."""
    from nova.server.cli import engine_config_from_args

    return build_app(
        engine_config_from_args(args), ServerConfig.from_args(args), DeployConfig.from_args(args)
    )


def args_to_argv(args: Mapping[str, Any]) -> list[str]:
    """``{"model": "demo", "replicas": 2, "cuda_graphs": False}`` -> ``nova serve`` flags. Keys
    are flag names without the dashes (``-`` or ``_``); a boolean gives its switch when it
    differs from the default; None is left out."""
    fields = {
        f.name: (f, spec)
        for cls in (EngineConfig, ServerConfig, DeployConfig)
        for f, spec in flagged_fields(cls)
    }
    argv: list[str] = []
    for key, value in args.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise ValueError(
                f"unknown argument {key!r} in the application's args (use nova serve's flag "
                "names, e.g. model, replicas, device, max_queue)"
            )
        f, spec = fields[name]
        if isinstance(f.default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"argument {key!r} takes true or false, got {value!r}")
            if value != f.default:
                argv.append(flag_name(f, spec))
        elif value is not None:
            argv += [flag_name(f, spec), str(value)]
    return argv


class _ArgsError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _ArgsError(message)


def build(args: dict[str, Any]) -> Application:
    """The application builder ``serve run`` calls (``import_path: nova.deploy.app:build``)
    with the config file's ``args:``: ``nova serve`` flags by name."""
    from nova.server.cli import add_serve_args

    parser = add_serve_args(_Parser(prog="nova.deploy.app:build"))
    try:
        ns = parser.parse_args(args_to_argv(args or {}))
    except _ArgsError as exc:
        raise ValueError(f"bad args for nova.deploy.app:build: {exc}") from None
    if ns.replicas is None:
        ns.replicas = 1
    return build_from_args(ns)
