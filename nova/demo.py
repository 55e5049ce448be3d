"""``nova demo``: the main job on the built-in demo model.

Loads the demo VLM (real SmolLM2-135M-Instruct text model + untrained SigLIP tower), sends a
few agent-like requests — screenshot + instruction, and a plain text question — through the
runtime together, and prints each answer with its vision, prefill and decode times.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from nova.models.inputs import InputProcessor
from nova.models.loader import load_model
from nova.runtime.generate import GenerationRequest, GenerationResult, generate
from nova.runtime.runner import CacheConfig, ModelRunner
from nova.sampling_params import SamplingParams
from nova.screenshots import make_screenshot

AGENT_SYSTEM = (
    "You are a GUI agent operating a phone. Answer with one action such as "
    "tap(\"label\"), type(\"text\") or scroll(down), then a short reason."
)


@dataclass(slots=True)
class DemoRequest:
    name: str
    instruction: str
    with_image: bool
    system: str | None = AGENT_SYSTEM


DEMO_REQUESTS = (
    DemoRequest("agent-step-1", "Turn on Wi-Fi.", with_image=True),
    DemoRequest("agent-step-2", "Open the battery settings.", with_image=True),
    DemoRequest("text-question", "What is the capital of France? Answer in one sentence.",
                with_image=False, system=None),
)


def _messages(req: DemoRequest) -> list[dict]:
    content: list[dict] = [{"type": "image"}] if req.with_image else []
    content.append({"type": "text", "text": req.instruction})
    messages = [{"role": "system", "content": req.system}] if req.system else []
    return messages + [{"role": "user", "content": content}]


def run_demo(model: str = "demo", max_tokens: int = 48, device: str = "cpu") -> list[GenerationResult]:
    from nova.models.demo import DEMO_MODEL_NOTE

    t0 = time.perf_counter()
    loaded = load_model(model, device=device)
    load_s = time.perf_counter() - t0
    proc = InputProcessor(loaded)
    runner = ModelRunner(loaded, CacheConfig(block_size=16, num_blocks=256))
    print(f"Nova demo: {loaded.architecture} from {loaded.model_dir}")
    print(f"  {loaded.num_params() / 1e6:.1f}M parameters, {loaded.dtype}, {device}, "
          f"{torch.get_num_threads()} threads; loaded in {load_s:.1f}s")
    if model == "demo":
        print(f"  Note: {DEMO_MODEL_NOTE}")
    requests = []
    for i, req in enumerate(DEMO_REQUESTS):
        images = [make_screenshot(seed=i)] if req.with_image else []
        prompt = proc.from_chat(_messages(req), images)
        requests.append(GenerationRequest(req.name, prompt, SamplingParams(max_tokens=max_tokens)))
    t0 = time.perf_counter()
    results = generate(runner, requests)
    total_s = time.perf_counter() - t0
    print(f"\n{len(results)} requests batched together in {total_s:.2f}s:\n")
    for req, res in zip(DEMO_REQUESTS, results):
        n_out = len(res.output_token_ids)
        print(f"[{req.name}] {'screenshot + ' if req.with_image else ''}\"{req.instruction}\"")
        print(f"  prompt {len(res.prompt_token_ids)} tokens, output {n_out} tokens ({res.finish_reason})")
        print(f"  vision {res.vision_s * 1e3:7.1f} ms | prefill {res.prefill_s * 1e3:7.1f} ms | "
              f"decode {res.decode_s * 1e3:7.1f} ms"
              + (f" ({res.decode_s * 1e3 / max(1, n_out - 1):.1f} ms/token)" if n_out > 1 else ""))
        print(f"  answer: {proc.decode(res.output_token_ids).strip()}\n")
    return results
