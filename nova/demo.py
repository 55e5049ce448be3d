"""``nova demo``: the main job on the built-in demo model.

Loads the demo VLM (real SmolLM2-135M-Instruct text model + untrained SigLIP tower), starts the
engine (three concurrent stage workers under the chosen policy), sends a burst of agent-like
requests — GUI-agent steps with a screenshot + instruction, and plain text questions — all at
once, and prints each answer, the per-request stage timeline and the aggregate latency table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from nova.config import EngineConfig
from nova.engine.llm_engine import LLMEngine
from nova.metrics import format_summary_table, format_timeline, request_metrics, summarize
from nova.models.inputs import InputProcessor, PromptInput, chat_messages
from nova.sampling_params import SamplingParams
from nova.screenshots import make_screenshot
from nova.types import Request

AGENT_SYSTEM = (
    "You are a GUI agent operating a phone. Answer with one action such as "
    'tap("label"), type("text") or scroll(down), then a short reason.'
)


@dataclass(slots=True)
class DemoRequest:
    name: str
    instruction: str
    with_image: bool
    system: str | None = AGENT_SYSTEM


AGENT_INSTRUCTIONS = (
    "Turn on Wi-Fi.",
    "Open the battery settings.",
    "Send the message.",
    "Scroll to Privacy.",
    "Switch off Bluetooth.",
    "Open the storage page.",
)
TEXT_QUESTIONS = (
    "What is the capital of France? Answer in one sentence.",
    "Name three primary colors.",
)


def demo_requests(num_agent_steps: int = 6) -> list[DemoRequest]:
    steps = [
        DemoRequest(f"agent-{i}", AGENT_INSTRUCTIONS[i % len(AGENT_INSTRUCTIONS)], True)
        for i in range(num_agent_steps)
    ]
    texts = [DemoRequest(f"text-{i}", q, False, system=None) for i, q in enumerate(TEXT_QUESTIONS)]
    # interleave so that vision, prefill and decode work arrive mixed
    return [texts[0], *steps[: len(steps) // 2], texts[1], *steps[len(steps) // 2 :]]


def burst_prompts(proc: InputProcessor, demo: list[DemoRequest]) -> list[PromptInput]:
    """Each demo request as a prompt; agent steps get a generated screenshot each."""
    return [
        proc.from_chat(
            chat_messages(d.instruction, int(d.with_image), d.system),
            [make_screenshot(seed=i)] if d.with_image else [],
        )
        for i, d in enumerate(demo)
    ]


def run_demo(
    model: str = "demo",
    max_tokens: int = 48,
    device: str = "cpu",
    policy: str = "auto",
    num_agent_steps: int = 6,
    partition: str = "auto",
    vision_offload_layers: int = 0,
) -> list[Request]:
    t0 = time.perf_counter()
    engine = LLMEngine(
        EngineConfig(
            model=model,
            device=device,
            policy=policy,
            num_kv_blocks=512,
            partition=partition,
            vision_offload_layers=vision_offload_layers,
        )
    )
    loaded, proc = engine.loaded, engine.processor
    policy = engine.config.resolved_policy
    print(f"Nova demo: {loaded.architecture} from {loaded.model_dir}")
    print(
        f"  {loaded.num_params() / 1e6:.1f}M parameters, {loaded.dtype}, {device}, "
        f"{torch.get_num_threads()} threads; ready in {time.perf_counter() - t0:.1f}s; "
        f"policy {policy}"
    )
    note = getattr(loaded.hf_config, "nova_demo_note", None)
    if note:
        print(f"  Note: {note}")
    about = engine.describe()
    print("  " + "\n  ".join(about.memory_lines))
    print(f"  partitions: {about.partition_backend}")
    demo = demo_requests(num_agent_steps)
    prompts = burst_prompts(proc, demo)
    t_start = time.perf_counter()
    reqs = engine.run_all(prompts, SamplingParams(max_tokens=max_tokens), [d.name for d in demo])
    wall_s = time.perf_counter() - t_start
    print(f"\n{len(reqs)} requests sent at once, all done in {wall_s:.2f}s:\n")
    for d, r in zip(demo, reqs):
        m = request_metrics(r)
        what = "screenshot + " if d.with_image else ""
        print(
            f'[{d.name}] {what}"{d.instruction}"  '
            f"({m.num_prompt_tokens} prompt / {m.num_output_tokens} output tokens, "
            f"{r.finish_reason})"
        )
        print(f"  answer: {proc.decode(r.output_token_ids).strip()}")
    metrics = [request_metrics(r) for r in reqs]
    print("\nPer-request timeline (ms from the first arrival):")
    print(format_timeline(metrics))
    print()
    print(format_summary_table(summarize(metrics, duration_s=wall_s), title=f"Latency ({policy})"))
    return reqs


COMPARE_POLICIES = ("sequential", "pf_limit", "chunked_prefill", "multi_stream", "nova")


def compare_policies(
    model: str = "demo",
    max_tokens: int = 32,
    device: str = "cpu",
    num_agent_steps: int = 6,
    policies: tuple[str, ...] = COMPARE_POLICIES,
) -> dict:
    """The same burst under each policy on the real engine; one summary row per policy.

    On a CPU there are no SM partitions: ``nova`` here shows its stage scheduling (decode
    overlapped with one compute stage, prefill first), not its partitioning.
    """
    loaded = None
    rows = {}
    demo = demo_requests(num_agent_steps)
    for policy in policies:
        engine = LLMEngine(
            EngineConfig(model=model, device=device, policy=policy, num_kv_blocks=512),
            loaded=loaded,
        )
        loaded = engine.loaded
        prompts = burst_prompts(engine.processor, demo)
        t0 = time.perf_counter()
        reqs = engine.run_all(
            prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True), [d.name for d in demo]
        )
        rows[policy] = summarize(
            [request_metrics(r) for r in reqs], duration_s=time.perf_counter() - t0
        )
    print(
        f"\nThe same burst ({len(demo)} requests, {max_tokens} output tokens each) under each "
        "policy:"
    )
    print(
        f"{'policy':18s}{'wall s':>8s}{'E2E mean':>10s}{'E2E p90':>9s}{'E2E max':>9s}"
        f"{'TTFT mean':>11s}{'TPOT mean':>11s}"
    )
    for policy, s in rows.items():
        # TPOT is undefined when no request produced two tokens
        tpot = "-" if s.tpot.mean is None else f"{s.tpot.mean * 1e3:.0f}ms"
        print(
            f"{policy:18s}{s.duration_s:8.2f}{s.e2e.mean:10.2f}{s.e2e.p90:9.2f}{s.e2e.max:9.2f}"
            f"{s.ttft.mean:11.2f}{tpot:>11s}"
        )
    return rows


def demo_via_server(
    model: str = "demo",
    policy: str = "auto",
    device: str = "cpu",
    num_prompts: int = 8,
    request_rate: float = 2.0,
    max_tokens: int = 32,
) -> Any:
    """The demo model behind ``nova serve``'s app on 127.0.0.1 (a free port), loaded by the
    ``nova bench`` client: Poisson GUI-agent steps, each a real PNG screenshot sent as a base64
    data URL through the OpenAI chat API, streamed back; the client's report is printed."""
    import argparse

    from nova.bench.cli import add_bench_args, bench
    from nova.engine.async_engine import AsyncEngine
    from nova.server.app import create_app
    from nova.server.config import ServerConfig
    from nova.server.testing import ServerThread

    engine = AsyncEngine(EngineConfig(model=model, device=device, policy=policy, num_kv_blocks=512))
    try:
        with ServerThread(create_app(engine, ServerConfig())) as srv:
            print(
                f"\nnova serve ({engine.llm_engine.config.resolved_policy}) on {srv.base_url}; "
                f"nova bench sends {num_prompts} "
                f"GUI-agent requests (Poisson, {request_rate} req/s):"
            )
            args = add_bench_args(argparse.ArgumentParser()).parse_args(
                [
                    "--base-url",
                    srv.base_url,
                    "--dataset-name",
                    "poisson",
                    "--num-prompts",
                    str(num_prompts),
                    "--request-rate",
                    str(request_rate),
                    "--image-width",
                    "448",
                    "--image-height",
                    "448",
                    "--workload-arg",
                    f"max_tokens={max_tokens}",
                    "--workload-arg",
                    f"min_tokens={max_tokens // 2}",
                    "--temperature",
                    "0",
                    "--disable-tqdm",
                ]
            )
            outcome = bench(args)
            print(outcome.report)
            return outcome
    finally:
        engine.shutdown()
