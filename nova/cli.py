"""The ``nova`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="demo",
        help="a Hugging Face model directory, a shipped config name, or 'demo'",
    )
    p.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "dummy"))
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu")


def _add_gpu_args(p: argparse.ArgumentParser, partition: bool) -> None:
    """GPU mechanisms (nova.gpu; docs/gpu.md): SM-partition backend and vision weight streaming."""
    if partition:
        p.add_argument(
            "--partition",
            default="auto",
            choices=("auto", "green_context", "none", "cpu"),
            help="SM partition backend (auto: green contexts where available)",
        )
    p.add_argument(
        "--vision-offload-layers",
        type=int,
        default=0,
        metavar="K",
        help="keep vision-encoder weights in host memory, K layers on the device",
    )


def _cmd_demo(args: argparse.Namespace) -> int:
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
    from nova.config import torch_dtype
    from nova.models.inputs import InputProcessor, chat_messages
    from nova.models.loader import load_model
    from nova.runtime.generate import GenerationRequest, generate
    from nova.runtime.runner import CacheConfig, ModelRunner
    from nova.sampling_params import SamplingParams

    loaded = load_model(args.model, args.load_format, torch_dtype(args.dtype), args.device)
    proc = InputProcessor(loaded)
    prompt = proc.from_chat(chat_messages(args.prompt, len(args.image)), list(args.image))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    runner = ModelRunner(
        loaded,
        CacheConfig(block_size=args.block_size),
        vision_offload_layers=args.vision_offload_layers,
    )
    [res] = generate(runner, [GenerationRequest("cli", prompt, params)])
    print(proc.decode(res.output_token_ids))
    print(
        f"[vision {res.vision_s * 1e3:.1f} ms, prefill {res.prefill_s * 1e3:.1f} ms, "
        f"decode {res.decode_s * 1e3:.1f} ms, {len(res.output_token_ids)} tokens, "
        f"{res.finish_reason}]",
        file=sys.stderr,
    )
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from nova.models.loader import shipped_configs
    from nova.models.registry import ARCHITECTURES

    print("architectures:", ", ".join(sorted(ARCHITECTURES)))
    print("shipped configs (use with --load-format dummy):", ", ".join(shipped_configs()))
    from nova.core.policy import available_policies

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
    out = Path(args.out or f"eval-results/{args.name}")
    report = run_experiment(args.name, out, num_requests=args.num_requests)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}; plots: {out}/*.png")
    return 0 if report else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nova", description="Nova VLM serving engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="a burst of agent-like requests through the engine")
    p.add_argument("--model", default="demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--policy", default="multi_stream", help="scheduling policy (see 'nova models')")
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
    _add_gpu_args(p, partition=True)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("generate", help="answer one prompt (optionally with images)")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="image file; repeatable")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    _add_gpu_args(p, partition=False)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("models", help="list supported architectures and shipped configs")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("eval", help="run a named experiment in the simulator (results + plots)")
    p.add_argument("name", nargs="?", help="experiment name (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments")
    p.add_argument("--out", help="output directory (default eval-results/NAME)")
    p.add_argument("--num-requests", type=int, default=None, help="requests per load point")
    p.set_defaults(func=_cmd_eval)

    from nova.bench.cli import add_bench_parser
    from nova.cost.profile import add_profile_parser
    from nova.server.cli import add_serve_parser

    add_serve_parser(sub)
    add_bench_parser(sub)
    add_profile_parser(sub)

    p = sub.add_parser("build-demo", help="(re)build the cached demo model directory")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_build_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from nova.models.errors import InvalidInputError, ModelLoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ModelLoadError, InvalidInputError, ValueError) as exc:
        print(f"nova: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
