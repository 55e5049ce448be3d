"""The real executor: runs stage batches on a ``ModelRunner`` (CPU or one CUDA GPU).

Each stage worker thread calls ``execute`` for its own stage. On CUDA each stage gets its own
stream; image embeddings stay on the device from vision to prefill, and prefill waits on the
event recorded after the vision batch that produced them (no host round trip). On a CPU the
streams are absent and ops run in the calling thread (PyTorch releases the GIL inside ops, so
the three workers do overlap); the ``cpu`` partition backend runs each batch on the worker's
cores for that batch, with that many intra-op threads (``nova.gpu.cpu_cores``).

Caches: the encoder cache's tensors live in ``encoder_store`` (``nova.models.mm_cache``); a
vision batch first drops the entries the scheduler evicted, encodes only the images it names
and keeps those it marks (``BatchItem.cache_images``). A prefill takes each image's embeddings
from the request (encoded by its vision batch, or supplied by the front end) or, for an
encoder-cache hit, from the store. Copy-on-write block copies of a batch (forks) are done
before its forward.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from nova.executor.base import FaultHook, run_isolated
from nova.gpu.backend import PartitionBackend
from nova.gpu.partition import make_backend
from nova.models.mm import VisionInput, encode_image_batch, num_images, select_images
from nova.models.mm_cache import CachedImage, EmbeddingStore
from nova.runtime.forward_batch import SeqInput
from nova.runtime.runner import ModelRunner
from nova.runtime.sampler import TokenHistory, make_generator, make_history, sample_batch
from nova.sampling_params import SamplingParams
from nova.structured.matcher import GrammarMatcher, fill_bitmasks
from nova.types import (
    Batch,
    BatchItem,
    ImageInput,
    Partition,
    Stage,
    StageResult,
    TokenLogprobs,
)


@dataclass(slots=True)
class _Payload:
    sampling: SamplingParams
    generator: torch.Generator | None
    # pixels of the images that came without embeddings, in order (``pixel_index``)
    pixel_values: torch.Tensor | VisionInput | None
    prompt_token_ids: tuple[int, ...] = ()
    images: tuple[ImageInput, ...] = ()
    pixel_index: dict[int, int] = field(default_factory=dict)  # image -> position in pixels
    # per image: embeddings [num_tokens, hidden] on the device once known, and the CUDA event
    # recorded after the vision batch that produced them (None on a CPU)
    embeds: list[torch.Tensor | None] = field(default_factory=list)
    ready: list[Any] = field(default_factory=list)
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
        self.encoder_store = EmbeddingStore()

    def register(
        self,
        request_id: str,
        sampling: SamplingParams,
        pixel_values: Any | None,
        prompt_token_ids: tuple[int, ...] = (),
        images: tuple[ImageInput, ...] = (),
        supplied: dict[int, CachedImage] | None = None,
    ) -> None:
        """``images``: the request's images (the scheduler's view; empty: one per image of
        ``pixel_values``); ``supplied``: embeddings the front end took from the encoder cache
        (those images have no pixels)."""
        supplied = supplied or {}
        n = len(images) if images else (num_images(pixel_values) if pixel_values is not None else 0)
        pixel_index: dict[int, int] = {}
        for i in range(n):
            if i not in supplied:
                pixel_index[i] = len(pixel_index)
        grids = [img.grid for img in images]
        plan_input: Any = pixel_values
        if images and all(g is not None for g in grids):
            plan_input = grids
        plan = (
            self.runner.model.position_plan(prompt_token_ids, plan_input)
            if n and plan_input is not None
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
                tuple(images),
                pixel_index,
                [supplied[i].embeds if i in supplied else None for i in range(n)],
                [supplied[i].ready if i in supplied else None for i in range(n)],
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

    def wait_turn(self, stage: Stage) -> None:
        # (the stage's partition so far; its first batch: the shared one)
        self.partition_backend.wait_turn(stage, self.partitions.get(stage, Partition.shared()))

    def decline_turn(self, stage: Stage) -> None:
        self.partition_backend.decline_turn(stage)

    @property
    def ranks_turns(self) -> bool:
        return self.partition_backend.may_take_turns

    def rank_turn(self, stage: Stage, rank: tuple[float, ...] | None) -> None:
        self.partition_backend.rank_turn(stage, rank)

    def _payload(self, request_id: str) -> _Payload:
        with self._lock:
            return self._payloads[request_id]

    def execute(self, batch: Batch) -> StageResult:
        run = {Stage.VISION: self._vision, Stage.PREFILL: self._prefill, Stage.DECODE: self._decode}
        fn = run[batch.stage]
        partition = self.partitions.get(batch.stage, batch.partition)
        if batch.evict_mm_hashes:  # unpinned entries: no running batch reads them
            self.encoder_store.drop(batch.evict_mm_hashes)

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
        # Fixed-size tensors (LLaVA) or VisionInputs (Qwen-VL): one tower call over the images
        # each item names (encoder-cache misses), split per request, then per image.
        pixels, wanted = [], []
        for it, p in zip(items, payloads):
            # unnamed (callers that build batches by hand): every image that came with pixels
            idx = list(it.encode_images) or sorted(p.pixel_index)
            if p.pixel_values is None or any(i not in p.pixel_index for i in idx):
                raise RuntimeError(f"request {it.request_id} reached vision without its pixels")
            pixels.append(select_images(p.pixel_values, [p.pixel_index[i] for i in idx]))
            wanted.append(idx)
        per_request = encode_image_batch(self.runner.encode_images, pixels)
        event = None
        if self._on_cuda:
            event = torch.cuda.Event()
            event.record()
        for it, p, idx, embeds in zip(items, payloads, wanted, per_request):
            sizes = [self._image_tokens(p, i, embeds.shape[0] // len(idx)) for i in idx]
            for i, e in zip(idx, torch.split(embeds, sizes)):
                p.embeds[i], p.ready[i] = e, event
            for i in it.cache_images:
                img = p.images[i]
                if img.mm_hash is not None and p.embeds[i] is not None:
                    entry = CachedImage(img.mm_hash, img.num_tokens, img.grid, p.embeds[i], event)
                    self.encoder_store.put(entry)
        return {}

    @staticmethod
    def _image_tokens(p: _Payload, i: int, default: int) -> int:
        return p.images[i].num_tokens if p.images else default

    def _sample(
        self, items: list[BatchItem], seqs: list[SeqInput], partition_key: Any = None
    ) -> dict[str, int]:
        """Forward all items; sample only those that want a token (not mid-prompt chunks),
        and for each fork of an item one more token from the same logits."""
        copies = [pair for it in items for pair in it.block_copies]
        if copies:  # copy-on-write of shared blocks, before this batch writes into them
            self.runner.copy_blocks(copies)
        logits = self.runner.forward(seqs, partition_key=partition_key)
        rows: list[int] = []
        ids: list[str] = []
        for i, it in enumerate(items):
            if it.sample:
                rows.append(i)
                ids.append(it.request_id)
                for fid in it.fork_ids:
                    rows.append(i)
                    ids.append(fid)
        if not rows:
            return {}
        payloads = [self._payload(rid) for rid in ids]
        bitmask = self._grammar_bitmask(ids, [items[i] for i in rows], payloads)
        if rows != list(range(len(items))):  # (a [rows, vocab] logits copy: only when needed)
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
        return dict(zip(ids, out.token_ids))

    def _resolve_embeds(self, p: _Payload) -> None:
        """Embeddings of images the encoder cache had (pinned for this request until its
        prefill completes): into the payload, where a recompute finds them later."""
        for i, e in enumerate(p.embeds):
            if e is None and p.images:
                entry = self.encoder_store.get(p.images[i].mm_hash)
                if entry is not None:
                    p.embeds[i], p.ready[i] = entry.embeds, entry.ready

    def _grammar_bitmask(
        self, ids: list[str], items: list[BatchItem], payloads: list[_Payload]
    ) -> Any:
        """The allowed-token bitmask of the rows to sample (numpy int32 ``[rows, words]``,
        all ones for unconstrained rows), or None when no row has a grammar. Raises for a
        request whose grammar is in error or out of step with its output (that request
        fails; ``run_isolated`` reruns the others)."""
        if all(p.grammar is None for p in payloads):
            return None
        for rid, it, p in zip(ids, items, payloads):
            g = p.grammar
            if g is None:
                continue
            if g.is_error:
                raise RuntimeError(f"request {rid}: structured output failed: {g.error}")
            generated = it.num_cached_tokens + len(it.token_ids) - len(p.prompt_token_ids)
            if g.num_consumed != generated:
                raise RuntimeError(
                    f"request {rid}: grammar state is at output token "
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
        # placeholders are prompt tokens; an output token equal to the image token (a recompute
        # after preemption) is text
        in_prompt = max(0, len(p.prompt_token_ids) - it.num_cached_tokens)
        num_here = it.token_ids[:in_prompt].count(image_token)
        if num_here == 0:
            return None
        if any(e is None for e in p.embeds):
            self._resolve_embeds(p)
        # Image tokens live in the prompt only; those before this chunk were consumed earlier
        # (or are in the prefix cache).
        start = p.prompt_token_ids[: it.num_cached_tokens].count(image_token)
        end = start + num_here
        parts: list[torch.Tensor] = []
        first = 0  # image-token index of image i's first token
        for i, e in enumerate(p.embeds):
            n = self._image_tokens(p, i, 0 if e is None else int(e.shape[0]))
            lo, hi = max(start, first), min(end, first + n)
            if lo < hi:
                if e is None:
                    raise RuntimeError(
                        f"request {it.request_id} reached prefill without the embeddings of "
                        f"image {i}"
                    )
                if p.ready[i] is not None:
                    torch.cuda.current_stream().wait_event(p.ready[i])
                parts.append(e[lo - first : hi - first])
            first += n
        if sum(int(x.shape[0]) for x in parts) != num_here:
            raise RuntimeError(
                f"request {it.request_id}: {num_here} image placeholders in the chunk, "
                f"embeddings for {sum(int(x.shape[0]) for x in parts)}"
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)

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
            if it.sample and any(e is None for e in p.embeds):
                self._resolve_embeds(p)  # before the pins go: a recompute needs them
            for fid in it.fork_ids:  # forks decode (and may recompute) with the same prompt
                child = self._payload(fid)
                child.images, child.pixel_index = p.images, p.pixel_index
                child.pixel_values, child.mrope = p.pixel_values, p.mrope
                child.embeds, child.ready = p.embeds, p.ready
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
