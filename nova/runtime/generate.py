"""Offline batched generation on one ModelRunner: vision, then one batched prefill, then batched
decode until every request stops. Requests are admitted in waves that fit the KV cache.

This is the runtime's own loop (used by the demo, tests and the runtime benchmark); the
concurrent three-stage engine drives the same ``ModelRunner`` calls from its stage workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from nova.core.block_manager import num_blocks_for
from nova.models.inputs import PromptInput
from nova.models.mm import encode_image_batch
from nova.models.mrope import MRopePlan
from nova.runtime.forward_batch import SeqInput
from nova.runtime.runner import ModelRunner
from nova.runtime.sampler import make_generator, sample
from nova.sampling_params import SamplingParams


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    prompt: PromptInput
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(slots=True)
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: str  # "stop" (stop/EOS token) or "length" (max_tokens)
    vision_s: float = 0.0  # wall time of the vision batch this request was in
    prefill_s: float = 0.0  # wall time of the prefill batch this request was in
    decode_s: float = 0.0  # wall time from first token to this request's last token


@dataclass(slots=True)
class _Running:
    req: GenerationRequest
    eos_ids: frozenset[int]
    gen: torch.Generator | None
    mm_embeds: torch.Tensor | None = None
    plan: MRopePlan | None = None  # M-RoPE positions of a prompt with images (Qwen-VL)
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def _append(run: _Running, token: int) -> None:
    run.output.append(token)
    run.finish_reason = run.req.sampling.stop_reason(token, len(run.output), run.eos_ids)


def _waves(runner: ModelRunner, requests: list[GenerationRequest]) -> list[list[GenerationRequest]]:
    """Split requests into groups whose worst-case KV footprint fits the cache together."""
    capacity = runner.block_manager.num_free_blocks
    waves: list[list[GenerationRequest]] = []
    current: list[GenerationRequest] = []
    used = 0
    for req in requests:
        need = num_blocks_for(
            len(req.prompt.token_ids) + req.sampling.max_tokens, runner.block_size
        )
        if need > capacity:
            raise ValueError(
                f"request {req.request_id} needs {need} KV blocks at most, the cache has {capacity}"
            )
        if used + need > capacity:
            waves.append(current)
            current, used = [], 0
        current.append(req)
        used += need
    if current:
        waves.append(current)
    return waves


def _encode_images(runner: ModelRunner, runs: list[_Running]) -> float:
    with_images = [r for r in runs if r.req.prompt.pixel_values is not None]
    if not with_images:
        return 0.0
    start = time.perf_counter()
    embeds = encode_image_batch(
        runner.encode_images, [r.req.prompt.pixel_values for r in with_images]
    )
    for r, e in zip(with_images, embeds):
        r.mm_embeds = e
    return time.perf_counter() - start


def _run_wave(runner: ModelRunner, wave: list[GenerationRequest]) -> list[GenerationResult]:
    eos = runner.loaded.eos_token_ids
    runs = [
        _Running(
            r,
            frozenset(eos),
            make_generator(r.sampling),
            plan=runner.model.position_plan(r.prompt.token_ids, r.prompt.pixel_values),
        )
        for r in wave
    ]
    bm = runner.block_manager
    try:
        vision_s = _encode_images(runner, runs)
        start = time.perf_counter()
        seqs = []
        for r in runs:
            ids = r.req.prompt.token_ids
            table = bm.allocate(r.req.request_id, len(ids))
            mrope = r.plan.slice(0, len(ids)) if r.plan is not None else None
            seqs.append(SeqInput(ids, 0, table, r.mm_embeds, mrope_positions=mrope))
        logits = runner.forward(seqs)
        for r, tok in zip(
            runs, sample(logits, [r.req.sampling for r in runs], [r.gen for r in runs])
        ):
            _append(r, tok)
        prefill_end = time.perf_counter()
        decode_end: dict[str, float] = {}
        while active := [r for r in runs if r.finish_reason is None]:
            seqs = []
            for r in active:
                rid = r.req.request_id
                context = len(r.req.prompt.token_ids) + len(r.output)
                bm.grow(rid, context)
                offset = r.plan.delta if r.plan is not None else 0
                seqs.append(
                    SeqInput(
                        [r.output[-1]], context - 1, bm.block_table(rid), position_offset=offset
                    )
                )
            logits = runner.forward(seqs)
            toks = sample(logits, [r.req.sampling for r in active], [r.gen for r in active])
            now = time.perf_counter()
            for r, tok in zip(active, toks):
                _append(r, tok)
                if r.finish_reason is not None:
                    decode_end[r.req.request_id] = now
    finally:
        for r in runs:
            bm.free(r.req.request_id)
    return [
        GenerationResult(
            request_id=r.req.request_id,
            prompt_token_ids=r.req.prompt.token_ids,
            output_token_ids=r.output,
            finish_reason=r.finish_reason or "length",
            vision_s=vision_s if r.mm_embeds is not None else 0.0,
            prefill_s=prefill_end - start,
            decode_s=decode_end.get(r.req.request_id, prefill_end) - prefill_end,
        )
        for r in runs
    ]


def generate(runner: ModelRunner, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Generate for all requests (batched); results in request order."""
    ids = [r.request_id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids must be unique")
    results: list[GenerationResult] = []
    for wave in _waves(runner, requests):
        results.extend(_run_wave(runner, wave))
    return results
