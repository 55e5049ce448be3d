"""The real executor: runs stage batches on a ``ModelRunner`` (CPU or one CUDA GPU).

Each stage worker thread calls ``execute`` for its own stage. On CUDA each stage gets its own
stream; image embeddings stay on the device from vision to prefill, and prefill waits on the
event recorded after the vision batch that produced them (no host round trip). On a CPU the
streams are absent and ops run in the calling thread (PyTorch releases the GIL inside ops, so
the three workers do overlap); the ``cpu`` partition backend runs each batch on the worker's
cores for that batch, with that many intra-op threads (``nova.gpu.cpu_cores``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from nova.executor.base import FaultHook, run_isolated
from nova.gpu.backend import PartitionBackend
from nova.gpu.partition import make_backend
from nova.models.mm import VisionInput, encode_image_batch
from nova.runtime.forward_batch import SeqInput
from nova.runtime.runner import ModelRunner
from nova.runtime.sampler import TokenHistory, make_generator, make_history, sample_batch
from nova.sampling_params import SamplingParams
from nova.structured.matcher import GrammarMatcher, fill_bitmasks
from nova.types import Batch, BatchItem, Partition, Stage, StageResult, TokenLogprobs


@dataclass(slots=True)
class _Payload:
    sampling: SamplingParams
    generator: torch.Generator | None
    pixel_values: torch.Tensor | VisionInput | None
    prompt_token_ids: tuple[int, ...] = ()
    image_embeds: torch.Tensor | None = None  # [num_image_tokens, hidden] on the device
    embeds_ready: Any | None = None  # torch.cuda.Event recorded after vision, or None
    mrope: Any | None = None  # MRopePlan: M-RoPE positions of a Qwen-VL prompt with images
    # the tokens penalties and min_tokens look at (None when the request has neither)
    history: TokenHistory | None = None
    # log-probabilities of the token sampled by the batch now running (taken by ``execute``)
    last_logprobs: TokenLogprobs | None = None
    grammar: GrammarMatcher | None = None  # structured output: the request's grammar state


class TorchExecutor:
    def __init__(
        self,
        runner: ModelRunner,
        fault_hook: FaultHook | None = None,
        partition_backend: PartitionBackend | None = None,
    ) -> None:
        self.runner = runner
        self.fault_hook = fault_hook
        self._payloads: dict[str, _Payload] = {}
        self._lock = threading.Lock()
        self._on_cuda = runner.device.type == "cuda"
        # Streams and SM partitions (nova.gpu.partition): default one stream per stage on CUDA
        # (``none``), nothing on a CPU.
        self.partition_backend = partition_backend or make_backend(
            "none" if self._on_cuda else "cpu", runner.device
        )
        self.partitions: dict[Stage, Partition] = {}
        self.granted_sms: dict[Stage, int] = {}  # SMs each stage's last batch ran on

    def register(
        self,
        request_id: str,
        sampling: SamplingParams,
        pixel_values: Any | None,
        prompt_token_ids: tuple[int, ...] = (),
    ) -> None:
        plan = (
            self.runner.model.position_plan(prompt_token_ids, pixel_values)
            if pixel_values is not None
            else None
        )
        history = make_history(
            sampling, prompt_token_ids, self.runner.vocab_size, self.runner.device
        )
        grammar = sampling.structured_output
        with self._lock:
            self._payloads[request_id] = _Payload(
                sampling,
                make_generator(sampling),
                pixel_values,
                tuple(prompt_token_ids),
                mrope=plan,
                history=history,
                grammar=grammar.new_matcher() if grammar is not None else None,
            )

    def release(self, request_id: str) -> None:
        with self._lock:
            self._payloads.pop(request_id, None)

    def set_partition(self, stage: Stage, partition: Partition) -> None:
        # Takes effect with the stage's next batch (``execute`` activates it).
        self.partitions[stage] = partition

    def _payload(self, request_id: str) -> _Payload:
        with self._lock:
            return self._payloads[request_id]

    def execute(self, batch: Batch) -> StageResult:
        run = {Stage.VISION: self._vision, Stage.PREFILL: self._prefill, Stage.DECODE: self._decode}
        fn = run[batch.stage]
        partition = self.partitions.get(batch.stage, batch.partition)

        def run_batch(stream: Any) -> StageResult:
            result = run_isolated(batch, fn, self.fault_hook)
            if stream is not None:
                stream.synchronize()
            return result

        # On the stage's stream (in the green context of its SM share, if the backend has
        # them); on a CPU, on the stage's team thread and cores (nova.gpu.cpu_threads).
        out = self.partition_backend.run(batch.stage, partition, run_batch)
        with self._lock:
            for rid in out.new_token_ids:
                p = self._payloads.get(rid)
                if p is not None and p.last_logprobs is not None:
                    out.logprobs[rid], p.last_logprobs = p.last_logprobs, None
        self.granted_sms[batch.stage] = self.partition_backend.granted_sms(batch.stage, partition)
        return out

    def _vision(self, items: list[BatchItem]) -> dict[str, int]:
        payloads = [self._payload(it.request_id) for it in items]
        # Fixed-size tensors (LLaVA) or VisionInputs (Qwen-VL): one tower call, split per request.
        pixels = []
        for it, p in zip(items, payloads):
            if p.pixel_values is None:
                raise RuntimeError(f"request {it.request_id} reached vision without images")
            pixels.append(p.pixel_values)
        per_request = encode_image_batch(self.runner.encode_images, pixels)
        event = None
        if self._on_cuda:
            event = torch.cuda.Event()
            event.record()
        for p, embeds in zip(payloads, per_request):
            p.image_embeds = embeds
            p.embeds_ready = event
        return {}

    def _sample(
        self, items: list[BatchItem], seqs: list[SeqInput], partition_key: Any = None
    ) -> dict[str, int]:
        """Forward all items; sample only those that want a token (not mid-prompt chunks)."""
        logits = self.runner.forward(seqs, partition_key=partition_key)
        rows = [i for i, it in enumerate(items) if it.sample]
        if not rows:
            return {}
        payloads = [self._payload(items[i].request_id) for i in rows]
        bitmask = self._grammar_bitmask([items[i] for i in rows], payloads)
        if len(rows) != len(items):  # (a copy of the [rows, vocab] logits: only when needed)
            logits = logits[rows]
        out = sample_batch(
            logits,
            [p.sampling for p in payloads],
            [p.generator for p in payloads],
            allowed_token_bitmask=None if bitmask is None else torch.from_numpy(bitmask),
            histories=[p.history for p in payloads],
            eos_token_ids=self.runner.loaded.eos_token_ids,
        )
        for p, lp in zip(payloads, out.logprobs):
            p.last_logprobs = lp
        self._advance_grammars(payloads, out.token_ids)
        return {items[i].request_id: tok for i, tok in zip(rows, out.token_ids)}

    def _grammar_bitmask(self, items: list[BatchItem], payloads: list[_Payload]) -> Any:
        """The allowed-token bitmask of the rows to sample (numpy int32 ``[rows, words]``,
        all ones for unconstrained rows), or None when no row has a grammar. Raises for a
        request whose grammar is in error or out of step with its output (that request
        fails; ``run_isolated`` reruns the others)."""
        if all(p.grammar is None for p in payloads):
            return None
        for it, p in zip(items, payloads):
            g = p.grammar
            if g is None:
                continue
            if g.is_error:
                raise RuntimeError(f"request {it.request_id}: structured output failed: {g.error}")
            generated = it.num_cached_tokens + len(it.token_ids) - len(p.prompt_token_ids)
            if g.num_consumed != generated:
                raise RuntimeError(
                    f"request {it.request_id}: grammar state is at output token "
                    f"{g.num_consumed}, the request at {generated}"
                )
        return fill_bitmasks([p.grammar for p in payloads], self.runner.vocab_size)

    @staticmethod
    def _advance_grammars(payloads: list[_Payload], tokens: list[int]) -> None:
        """Each sampled token advances its request's grammar. Last step of a batch and never
        raising, so a batch rerun (``run_isolated``) cannot advance a grammar twice; a token
        the grammar rejects leaves it in error, which fails the request at its next step."""
        for p, tok in zip(payloads, tokens):
            if p.grammar is not None:
                p.grammar.consume(tok)

    def _chunk_embeds(self, it: BatchItem, p: _Payload) -> torch.Tensor | None:
        """The image embeddings for the placeholders inside this (possibly partial) prefill."""
        image_token = self.runner.model.image_token_id
        if image_token is None:
            return None
        num_here = it.token_ids.count(image_token)
        if num_here == 0:
            return None
        if p.image_embeds is None:
            raise RuntimeError(f"request {it.request_id} reached prefill without image embeddings")
        if p.embeds_ready is not None:
            torch.cuda.current_stream().wait_event(p.embeds_ready)
        # Image tokens live in the prompt only; those before this chunk were consumed earlier.
        before = p.prompt_token_ids[: it.num_cached_tokens].count(image_token)
        return p.image_embeds[before : before + num_here]

    def _prefill(self, items: list[BatchItem]) -> dict[str, int]:
        seqs = []
        for it in items:
            p = self._payload(it.request_id)
            embeds = self._chunk_embeds(it, p)
            mrope = (
                p.mrope.slice(it.num_cached_tokens, it.num_cached_tokens + len(it.token_ids))
                if p.mrope is not None
                else None
            )
            seqs.append(
                SeqInput(
                    list(it.token_ids),
                    it.num_cached_tokens,
                    list(it.block_table),
                    embeds,
                    mrope_positions=mrope,
                )
            )
        return self._sample(items, seqs)

    def _decode(self, items: list[BatchItem]) -> dict[str, int]:
        seqs = [
            SeqInput(
                list(it.token_ids),
                it.num_cached_tokens,
                list(it.block_table),
                position_offset=self._position_offset(it.request_id),
            )
            for it in items
        ]
        return self._sample(items, seqs, partition_key=self.decode_graph_key())

    def _position_offset(self, request_id: str) -> int:
        """M-RoPE: tokens after a prompt with images sit at index + delta (0 otherwise)."""
        plan = self._payload(request_id).mrope
        return plan.delta if plan is not None else 0

    def decode_graph_key(self) -> Any:
        """Which decode CUDA graphs to replay: one set per decode SM share (a graph captured
        in one partition keeps that partition's SMs on replay)."""
        part = self.partitions.get(Stage.DECODE)
        return None if part is None else part.share(Stage.DECODE)
