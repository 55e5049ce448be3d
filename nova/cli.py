"""The ``nova`` command line.

Each subcommand imports what it needs only when it runs: ``nova eval`` (the simulator) and
``nova bench`` (the load client) need neither torch nor FastAPI. ``serve``, ``bench`` and
``profile`` define their parsers in their own packages, imported only when that subcommand is
on the command line (``nova --help`` lists them from ``EXTERNAL``). Engine flags come from
``EngineConfig``'s field metadata (``nova.flags``), never written out here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nova.config import EngineConfig
from nova.flags import add_flags, from_flags


@dataclass(frozen=True, slots=True)
class External:
    """A subcommand whose parser lives in another module (``adder(subparsers)`` registers it)."""

    module: str
    adder: str
    help: str
    extra: str | None = None  # optional dependency group it needs (nova.extras)


EXTERNAL: dict[str, External] = {
    "serve": External(
        "nova.server.cli", "add_serve_parser", "serve the OpenAI-compatible API", "server"
    ),
    "bench": External(
        "nova.bench.cli", "add_bench_parser", "load-test an OpenAI-compatible server", "bench"
    ),
    "profile": External(
        "nova.profiling.cli",
        "add_profile_parser",
        "measure stage latency tables for the profiled cost model",
    ),
}

# ``nova demo`` passes these engine settings on; ``nova generate`` takes every engine flag
# except --seed (its --seed seeds sampling; dummy weights keep seed 0) and runs one request
# at a time by default.
DEMO_ENGINE_FLAGS = ("model", "device", "policy", "partition", "vision_offload_layers")
GENERATE_ENGINE_EXCLUDED = ("seed",)
GENERATE_ENGINE_DEFAULTS = {"policy": "sequential"}


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.via_server:
        from nova.extras import require_extra

        require_extra("server", "nova demo --via-server")
        require_extra("bench", "nova demo --via-server")
    from nova.demo import compare_policies, demo_via_server, run_demo

    run_demo(
        args.model,
        max_tokens=args.max_tokens,
        device=args.device,
        policy=args.policy,
        num_agent_steps=args.agent_steps,
        partition=args.partition,
        vision_offload_layers=args.vision_offload_layers,
    )
    if args.via_server:
        demo_via_server(args.model, policy=args.policy, device=args.device)
    if args.compare_policies:
        compare_policies(
            args.model,
            max_tokens=min(args.max_tokens, 32),
            device=args.device,
            num_agent_steps=args.agent_steps,
        )
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    """One request through the engine; the answer on stdout, its stage times on stderr."""
    from nova.llm import LLM
    from nova.models.inputs import chat_messages
    from nova.sampling_params import SamplingParams

    config = from_flags(EngineConfig, args)
    llm = LLM(**asdict(config))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
    )
    prompt = {"messages": chat_messages(args.prompt, len(args.image)), "images": list(args.image)}
    [out] = llm.generate([prompt], params)
    if out.error is not None:
        print(f"nova: error: the request failed: {out.error}", file=sys.stderr)
        return 1
    print(out.text if out.text is not None else out.output_token_ids)
    m = out.metrics
    print(
        f"[vision {(m.vision_s or 0.0) * 1e3:.1f} ms, prefill {(m.prefill_s or 0.0) * 1e3:.1f} ms, "
        f"decode {(m.decode_s or 0.0) * 1e3:.1f} ms, {len(out.output_token_ids)} tokens, "
        f"{out.finish_reason}]",
        file=sys.stderr,
    )
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from nova.core.policy import available_policies
    from nova.models.loader import shipped_configs
    from nova.models.registry import ARCHITECTURES

    print("architectures:", ", ".join(sorted(ARCHITECTURES)))
    print("shipped configs (use with --load-format dummy):", ", ".join(shipped_configs()))
    print("policies:", ", ".join(available_policies()))
    return 0


def _cmd_build_demo(args: argparse.Namespace) -> int:
    from nova.models.demo import build_demo_model

    print(build_demo_model(force=args.force))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nova.sim.eval import EXPERIMENTS, run_experiment

    if args.list or not args.name:
        for name, exp in sorted(EXPERIMENTS.items()):
            print(f"{name:14s} {exp.description}")
        return 0
    from nova.extras import require_extra

    require_extra("plot", "nova eval")  # before minutes of simulation, not after
    out = Path(args.out or f"eval-results/{args.name}")
    report = run_experiment(args.name, out, num_requests=args.num_requests)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}; plots: {out}/*.png")
    return 0 if report else 1


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="a burst of agent-like requests through the engine")
    add_flags(p, EngineConfig, include=DEMO_ENGINE_FLAGS)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--agent-steps", type=int, default=6, help="screenshot requests in the burst")
    p.add_argument(
        "--via-server",
        action="store_true",
        help="then serve the model over HTTP and load it with the nova bench client",
    )
    p.add_argument(
        "--compare-policies",
        action="store_true",
        help="then run the same burst under each policy and print them side by side",
    )
    p.set_defaults(func=_cmd_demo)


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="answer one prompt (optionally with images)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="image file; repeatable")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    # dest differs from EngineConfig.seed (dummy weights), which nova generate leaves at 0
    g.add_argument("--seed", dest="sampling_seed", type=int, default=None, help="sampling seed")
    add_flags(
        p,
        EngineConfig,
        exclude=GENERATE_ENGINE_EXCLUDED,
        defaults=GENERATE_ENGINE_DEFAULTS,
        group="model and engine",
    )
    p.set_defaults(func=_cmd_generate)


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``nova`` parser. ``commands``: the external subcommands (``EXTERNAL``) whose modules
    are imported to define their flags (default: all); the others are listed by name only."""
    parser = argparse.ArgumentParser(prog="nova", description="Nova VLM serving engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_demo(sub)
    _add_generate(sub)

    p = sub.add_parser("models", help="list supported architectures and shipped configs")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("eval", help="run a named experiment in the simulator (results + plots)")
    p.add_argument("name", nargs="?", help="experiment name (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments")
    p.add_argument("--out", help="output directory (default eval-results/NAME)")
    p.add_argument("--num-requests", type=int, default=None, help="requests per load point")
    p.set_defaults(func=_cmd_eval)

    for name, ext in EXTERNAL.items():
        if commands is None or name in commands:
            if ext.extra is not None:
                from nova.extras import require_extra

                require_extra(ext.extra, f"nova {name}")
            getattr(importlib.import_module(ext.module), ext.adder)(sub)
        else:
            sub.add_parser(name, help=ext.help)

    p = sub.add_parser("build-demo", help="(re)build the cached demo model directory")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_build_demo)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (top-level options are all flags)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    from nova.extras import MissingExtraError
    from nova.models.errors import InvalidInputError, ModelLoadError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(commands=[c for c in [_command(argv)] if c is not None])
    except MissingExtraError as exc:
        print(f"nova: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
    except (ModelLoadError, InvalidInputError, ValueError, MissingExtraError) as exc:
        print(f"nova: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
