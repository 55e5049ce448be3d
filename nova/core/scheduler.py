"""The scheduler: request lifecycle and KV admission, driven by a ``Policy``. Torch-free, and
it never reads a clock: every call gets ``now_s``.

Lifecycle: ``add_request`` -> waiting for vision (if it has images) -> waiting for prefill ->
decoding -> finished. A batch is built by ``schedule(stage, now_s)`` (the policy proposes, the
scheduler admits) and applied by ``complete(result, now_s)``.

Memory rules:
- a prefill is admitted only when the blocks of all tokens it computes fit;
- before a decode step every sequence in it grows by one token; when blocks run out, the
  lowest-ranked decoding sequence is preempted: its blocks are freed and it goes back to the
  prefill queue to recompute prompt + outputs later (never an engine failure);
- finished, failed and aborted requests free their blocks at once — except that a request
  aborted while its batch is running keeps them until that batch completes, because the
  executor may still be writing into them.

Caches (see ``nova.core.block_manager`` and ``nova.core.encoder_cache``):
- prefix cache: a prefill admitted from scratch first looks up its prompt's leading full
  blocks; a hit (a multiple of the block size, never the whole prompt: at least one token is
  computed, so there are logits) is shared, and only the rest is planned, computed and costed.
  Blocks are offered to the cache as their K/V are computed (prefill chunks, decode steps).
- encoder cache: at ``add_request`` each image is looked up; a request whose images all hit
  (or came with embeddings) skips the vision queue, and a vision batch encodes only misses.
  Its hits stay pinned until its prefill has taken the embeddings.
- ``n`` > 1: ``add_request(req, now, forks)``: the forks wait while ``req`` prefills; the
  prefill samples a first token for each, and they then share ``req``'s blocks (``fork``;
  the partially filled last block is copied on write) and decode on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from nova.core.block_manager import BlockManager, num_blocks_for
from nova.core.encoder_cache import EncoderCacheAccounting
from nova.core.policy import WAITING_STATUS, BatchPlan, Policy, SchedulerState
from nova.core.prefix_keys import extend_block_hashes
from nova.types import (
    NO_EXTRAS,
    Batch,
    BatchItem,
    ItemExtras,
    Partition,
    Request,
    RequestEvent,
    RequestRejected,
    RequestStatus,
    Stage,
    StageResult,
)

# Enum members as module constants: ``Stage.DECODE`` is looked up through the enum's metaclass
# (about ten times a global's cost in CPython 3.11), and the hot paths below test them for
# every batch and item.
_VISION, _PREFILL, _DECODE = Stage.VISION, Stage.PREFILL, Stage.DECODE
_DECODING = RequestStatus.DECODING


# -- the objects built for every sequence of every step -------------------------------------------
# ``BatchItem``, ``RequestEvent`` and ``Batch`` are frozen dataclasses, whose generated
# ``__init__`` sets each field with ``object.__setattr__`` (around the frozen guard): about twice
# what the fields' own slot setters cost. A step builds an item and an event per sequence and a
# batch (the simulator: millions per run), so those are built with the setters;
# ``tests/test_scheduler.py`` checks they equal the constructors' results.
def _slot_setters(cls: type) -> tuple[Callable[[Any, Any], None], ...]:
    """The ``__set__`` of each field's slot of ``cls``, in field order."""
    return tuple(getattr(cls, f.name).__set__ for f in fields(cls))


# (unpacked: a field added to one of the classes fails here, instead of staying unset below)
_ITEM_ID, _ITEM_TOKENS, _ITEM_CACHED, _ITEM_TABLE, _ITEM_IMAGES, _ITEM_SAMPLE, _ITEM_EXTRAS = (
    _slot_setters(BatchItem)
)
_EVENT_ID, _EVENT_TOKENS, _EVENT_FINISHED, _EVENT_REASON, _EVENT_ERROR, _EVENT_LOGPROBS = (
    _slot_setters(RequestEvent)
)
_BATCH_ID, _BATCH_STAGE, _BATCH_ITEMS, _BATCH_PARTITION, _BATCH_START, _BATCH_EVICT = _slot_setters(
    Batch
)
_new = object.__new__


def _batch_item(
    request_id: str,
    token_ids: tuple[int, ...] = (),
    num_cached_tokens: int = 0,
    block_table: tuple[int, ...] = (),
    num_images: int = 0,
    sample: bool = True,
    extras: ItemExtras = NO_EXTRAS,
) -> BatchItem:
    """``BatchItem(request_id, token_ids, ...)``, the same arguments and defaults."""
    item = _new(BatchItem)
    _ITEM_ID(item, request_id)
    _ITEM_TOKENS(item, token_ids)
    _ITEM_CACHED(item, num_cached_tokens)
    _ITEM_TABLE(item, block_table)
    _ITEM_IMAGES(item, num_images)
    _ITEM_SAMPLE(item, sample)
    _ITEM_EXTRAS(item, extras)
    return item


def _token_event(request_id: str, token: int, finish_reason: str | None) -> RequestEvent:
    """``RequestEvent(request_id, (token,), finish_reason is not None, finish_reason)``."""
    event = _new(RequestEvent)
    _EVENT_ID(event, request_id)
    _EVENT_TOKENS(event, (token,))
    _EVENT_FINISHED(event, finish_reason is not None)
    _EVENT_REASON(event, finish_reason)
    _EVENT_ERROR(event, None)
    _EVENT_LOGPROBS(event, ())
    return event


def _batch(
    batch_id: int,
    stage: Stage,
    items: tuple[BatchItem, ...],
    partition: Partition,
    start_s: float,
    evict_mm_hashes: tuple[str, ...],
) -> Batch:
    """``Batch(batch_id, stage, items, partition, start_s, evict_mm_hashes)``."""
    batch = _new(Batch)
    _BATCH_ID(batch, batch_id)
    _BATCH_STAGE(batch, stage)
    _BATCH_ITEMS(batch, items)
    _BATCH_PARTITION(batch, partition)
    _BATCH_START(batch, start_s)
    _BATCH_EVICT(batch, evict_mm_hashes)
    return batch


class Scheduler:
    def __init__(
        self,
        policy: Policy,
        block_manager: BlockManager,
        eos_token_ids: tuple[int, ...] = (),
        max_model_len: int | None = None,
        encoder_cache: EncoderCacheAccounting | None = None,
    ) -> None:
        self.policy = policy
        self.state = SchedulerState(block_manager)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.encoder_cache = encoder_cache or EncoderCacheAccounting(0)
        self._next_batch_id = 0
        self._abort_in_flight: set[str] = set()
        self._forks: dict[str, list[Request]] = {}  # parent id -> forks waiting for its prefill
        self._fork_parent: dict[str, str] = {}  # waiting fork id -> parent id
        self._reserved: dict[str, list[str]] = {}  # vision item -> encoder entries it adds
        self._evict: list[str] = []  # encoder entries evicted for the batch being built
        self._events: list[RequestEvent] = []  # see take_events

    @property
    def block_manager(self) -> BlockManager:
        return self.state.block_manager

    def has_unfinished(self) -> bool:
        return bool(self.state.requests) or self.state.any_running()

    # -- requests --------------------------------------------------------------------------
    def add_request(self, req: Request, now_s: float, forks: Sequence[Request] = ()) -> None:
        """Admit ``req``; ``forks``: further choices of the same prompt (``n`` > 1) that share
        its prefill (their prompts and images are ``req``'s; each has its own sampling)."""
        ids = [req.request_id] + [f.request_id for f in forks]
        for rid in ids:
            if rid in self.state.requests or rid in self._fork_parent:
                raise RequestRejected(f"request id {rid!r} is already in use")
        if len(set(ids)) != len(ids):
            raise RequestRejected(f"request ids {ids} repeat")
        self.check_admissible(len(req.prompt_token_ids), req.sampling.max_tokens)
        req.arrival_s = now_s
        req.times.arrival_s = now_s
        self._lookup_images(req)
        self.state.requests[req.request_id] = req
        self.state.num_added += 1
        if req.needs_vision:
            self.state.set_status(req, RequestStatus.WAITING_VISION)
        else:
            self.state.set_status(req, RequestStatus.WAITING_PREFILL)
        # what its prefill will reuse, as far as the cache knows now (policies plan the
        # uncached suffix from it; taken anew when it enters the prefill queue and at admission)
        self._probe_prefix(req)
        for i, child in enumerate(forks, start=1):
            child.parent_id = req.request_id
            child.choice_index = i
            child.arrival_s = now_s
            child.times.arrival_s = now_s
            self._fork_parent[child.request_id] = req.request_id
        if forks:
            self._forks[req.request_id] = list(forks)

    def _lookup_images(self, req: Request) -> None:
        """Encoder-cache lookup of each image: hits are pinned for ``req``; the misses are
        what its vision batch encodes."""
        cache, rid = self.encoder_cache, req.request_id
        hits: list[bool] = []
        supplied = 0
        for img in req.images:
            if img.has_embeds:  # the front end holds them: pin if cached, count as a hit
                cache.lookup(img.mm_hash, rid, count=False)
                supplied += 1
                hits.append(True)
            else:
                hits.append(cache.lookup(img.mm_hash, rid))
        cache.count(supplied, supplied)
        req.encoder_cache_hits = hits
        req.images_to_encode = req.encoder_cache_misses

    def _probe_prefix(self, req: Request) -> list[int]:
        """The cached blocks a prefill of ``req`` from scratch would reuse now (also stored as
        ``req.prefix_hit_tokens``). At most ``len - 1`` tokens: one is always computed."""
        bm = self.block_manager
        if not bm.enable_prefix_caching:
            return []
        n = len(req.prompt_token_ids) + len(req.output_token_ids) - 1
        hashes = extend_block_hashes(req, bm.block_size, n)
        blocks = bm.match_prefix(hashes, n // bm.block_size)
        req.prefix_hit_tokens = len(blocks) * bm.block_size
        return blocks

    def take_events(self) -> list[RequestEvent]:
        """Events produced outside ``complete``'s and ``abort``'s return values: forks that
        ended with their parent before its prefill (aborted or failed). Drained by the caller
        after every ``abort``, ``fail`` and ``complete``."""
        out, self._events = self._events, []
        return out

    def check_admissible(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ``RequestRejected`` if such a request could never be served: a prompt that
        does not fit the context, or a worst-case KV footprint larger than the whole cache.
        (The server calls it too, to answer 400 before a stream starts.)"""
        if self.max_model_len is not None and num_prompt_tokens >= self.max_model_len:
            raise RequestRejected(
                f"prompt of {num_prompt_tokens} tokens does not fit the model's context "
                f"length {self.max_model_len}"
            )
        max_len = num_prompt_tokens + max_tokens
        if self.max_model_len is not None:  # generation also stops at the context length
            max_len = min(max_len, self.max_model_len)
        bm = self.block_manager
        if num_blocks_for(max_len, bm.block_size) > bm.num_blocks:
            raise RequestRejected(
                f"request needs up to {max_len} tokens of KV cache; the whole cache holds "
                f"{bm.num_blocks * bm.block_size}"
            )

    def abort(self, request_id: str, now_s: float) -> RequestEvent | None:
        """Abort a live request; None if unknown or already done."""
        req = self.state.requests.get(request_id)
        if req is None:
            parent = self._fork_parent.pop(request_id, None)
            if parent is None:
                return None
            forks = self._forks[parent]
            child = next(f for f in forks if f.request_id == request_id)
            forks.remove(child)
            self._end_fork(child, RequestStatus.ABORTED, "abort", now_s, None, emit=False)
            return RequestEvent(request_id, (), True, "abort")
        if request_id in self.state.in_flight:
            self._abort_in_flight.add(request_id)  # blocks freed when its batch completes
            self.state.set_status(req, RequestStatus.ABORTED)
            req.finish_reason = "abort"
            req.times.finish_s = now_s
            del self.state.requests[request_id]
            self._end_forks_of(req, RequestStatus.ABORTED, "abort", now_s, None)
        else:
            self._finish(req, RequestStatus.ABORTED, "abort", now_s)
        return RequestEvent(request_id, (), True, "abort")

    def fail(self, request_id: str, reason: str, now_s: float) -> RequestEvent | None:
        """Fail a live request that is not in a running batch (e.g. its input broke)."""
        req = self.state.requests.get(request_id)
        if req is None or request_id in self.state.in_flight:
            return None
        self._finish(req, RequestStatus.FAILED, "error", now_s, error=reason)
        return RequestEvent(request_id, (), True, "error", reason)

    # -- batches ---------------------------------------------------------------------------
    def schedule(self, stage: Stage, now_s: float) -> Batch | None:
        """The next batch for ``stage`` (None if it is busy or the policy/memory says wait)."""
        state = self.state
        if state.running[stage] is not None:
            return None
        plan = self.policy.next_batch(stage, state, now_s)
        if plan is None:
            return None
        if plan.stage is not stage:
            raise ValueError(f"policy {self.policy.name} planned {plan.stage} for stage {stage}")
        if stage is _DECODE:
            items = self._admit_decode(plan, plan.request_ids)
        elif stage is _VISION:
            items = self._admit_vision(plan)
        else:
            items = self._admit_decode(plan, plan.decode_ids) if plan.decode_ids else []
            items += self._admit_prefill(plan, num_tokens=len(items))
        if not items:
            return None
        state.partition = partition = self.policy.partition(state, now_s)
        evict: tuple[str, ...] = ()
        if self._evict:
            evict, self._evict = tuple(self._evict), []
        batch = _batch(self._next_batch_id, stage, tuple(items), partition, now_s, evict)
        self._next_batch_id += 1
        in_flight = state.in_flight
        if stage is _DECODE:
            for it in items:
                in_flight[it.request_id] = stage
        else:
            requests = state.requests
            for it in items:
                in_flight[it.request_id] = stage
                times = requests[it.request_id].times
                if stage is _VISION and times.vision_start_s is None:
                    times.vision_start_s = now_s
                elif stage is _PREFILL and times.prefill_start_s is None:
                    times.prefill_start_s = now_s
        state.running[stage] = batch
        return batch

    def _candidates(
        self, plan: BatchPlan, ids: tuple[str, ...] | None = None, stage: Stage | None = None
    ) -> list[Request]:
        status = WAITING_STATUS[stage or plan.stage]
        get = self.state.requests.get
        in_flight = self.state.in_flight
        out = []
        for rid in plan.request_ids if ids is None else ids:
            req = get(rid)
            if req is not None and req.status is status and rid not in in_flight:
                out.append(req)
        return out

    def _admit_vision(self, plan: BatchPlan) -> list[BatchItem]:
        """Requests in order while their images fit ``max_images``; each item encodes the
        request's encoder-cache misses and reserves cache room for them (LRU evictions ride
        on the batch)."""
        items: list[BatchItem] = []
        num_images = 0
        cache = self.encoder_cache
        for req in self._candidates(plan):
            to_encode = req.images_to_encode
            n = len(to_encode)
            if items and plan.max_images is not None and num_images + n > plan.max_images:
                break
            if plan.max_requests is not None and len(items) >= plan.max_requests:
                break
            keep: list[int] = []
            if cache.enabled:
                for i in to_encode:
                    img = req.images[i]
                    if img.mm_hash is None:
                        continue
                    evicted = cache.reserve(img.mm_hash, img.num_tokens, req.request_id)
                    if evicted is not None:
                        keep.append(i)
                        self._evict += evicted
                        self._reserved.setdefault(req.request_id, []).append(img.mm_hash)
            extras = ItemExtras(encode_images=tuple(to_encode), cache_images=tuple(keep))
            items.append(BatchItem(req.request_id, num_images=n, extras=extras))
            num_images += n
        return items

    def _images_in(self, req: Request, start: int, end: int) -> int:
        """Images whose placeholders fall in tokens [start, end) (position unknown: counted
        with the chunk that starts at 0)."""
        n = 0
        for img in req.images:
            if img.offset is None:
                n += start == 0
            elif img.offset < end and img.offset + img.num_tokens > start:
                n += 1
        return n

    def _admit_prefill(self, plan: BatchPlan, num_tokens: int = 0) -> list[BatchItem]:
        """Whole prompts (or, for a chunked plan, chunks filling the token budget) in order.

        ``num_tokens``: budget already used (decode tokens of a mixed chunked batch).
        """
        bm = self.block_manager
        items: list[BatchItem] = []
        num_decode_items = num_tokens
        for req in self._candidates(plan):
            rid = req.request_id
            prompt, outputs = req.prompt_token_ids, req.output_token_ids
            num_prefill = len(prompt) + len(outputs)  # = len(req.prefill_token_ids)
            done = req.num_computed_tokens  # > 0: earlier chunks are in the cache
            fresh = done == 0 and not bm.has_seq(rid)
            prefix: list[int] = self._probe_prefix(req) if fresh else []
            done += len(prefix) * bm.block_size
            take = num_prefill - done
            budget_left = None if plan.max_tokens is None else plan.max_tokens - num_tokens
            if budget_left is not None and take > budget_left:
                if plan.chunked and budget_left > 0:
                    take = budget_left
                elif items or num_decode_items:
                    break
            if plan.max_requests is not None and len(items) >= plan.max_requests:
                break
            fits = bm.can_allocate(rid, done + take, prefix)
            if not fits and not items and not num_decode_items:
                self._free_partial_prefills_for(req, done + take, prefix)
                fits = bm.can_allocate(rid, done + take, prefix)
            if not fits:
                break  # FCFS: do not let later, smaller prompts overtake the head
            if bm.has_seq(rid):
                bm.grow(rid, done + take)
            else:
                bm.allocate(rid, done + take, prefix)
            if fresh and bm.enable_prefix_caching:
                bm.record_lookup(num_prefill, done)
                if req.times.prefill_start_s is None:  # the first prefill: what usage reports
                    req.num_cached_prompt_tokens = min(done, len(prompt))
            # = tuple(req.prefill_token_ids[done: done + take]), without joining prompt + outputs
            chunk = (
                prompt[done : done + take]
                if done + take <= len(prompt)
                else (prompt + outputs)[done : done + take]
            )
            sample = done + take == num_prefill
            forks = self._forks.get(rid) if sample else None
            extras = NO_EXTRAS
            if forks or bm.has_copies(rid):
                extras = ItemExtras(
                    block_copies=tuple(bm.take_copies(rid)),
                    fork_ids=tuple([f.request_id for f in forks]) if forks else (),
                )
            items.append(
                _batch_item(
                    rid,
                    tuple(chunk),
                    done,
                    bm.block_table_tuple(rid),
                    self._images_in(req, done, done + take) if req.images else 0,
                    sample,
                    extras,
                )
            )
            num_tokens += take
        return items

    def _admit_decode(self, plan: BatchPlan, ids: tuple[str, ...]) -> list[BatchItem]:
        bm = self.block_manager
        cands = self._candidates(plan, ids, _DECODE)
        if plan.max_requests is not None and len(cands) > plan.max_requests:
            cands = cands[: plan.max_requests]
        # Victims: decoding requests outside this step first, then the lowest-ranked candidates
        # (popped off the tail of cands, which this loop then never reaches). Built when first
        # needed: until a preemption nothing changes the decode queue.
        others: list[Request] | None = None
        items: list[BatchItem] = []
        for i, req in enumerate(cands, 1):  # cands[i:]: the candidates after req
            rid = req.request_id
            num_tokens = len(req.prompt_token_ids) + len(req.output_token_ids)
            table = bm.try_grow(rid, num_tokens)
            if table is None:
                if others is None:  # (no victim taken yet: cands is every candidate)
                    ids_chosen = {r.request_id for r in cands}
                    others = [
                        r for r in self.state.queue(_DECODE) if r.request_id not in ids_chosen
                    ]
                while not bm.can_allocate(rid, num_tokens):
                    if others:
                        self._preempt(others.pop())
                    elif i < len(cands):
                        self._preempt(cands.pop())
                    else:
                        break
                table = bm.try_grow(rid, num_tokens)
                if table is None:
                    self._preempt(req)
                    continue
            if bm.has_copies(rid):  # copy-on-write of a block shared with a fork
                extras = ItemExtras(block_copies=tuple(bm.take_copies(rid)))
                items.append(
                    _batch_item(
                        rid, (req.output_token_ids[-1],), num_tokens - 1, table, 0, True, extras
                    )
                )
            else:
                items.append(_batch_item(rid, (req.output_token_ids[-1],), num_tokens - 1, table))
        return items

    def _free_partial_prefills_for(
        self, head: Request, num_tokens: int, prefix: Sequence[int] = ()
    ) -> None:
        """Chunked prefill: lower-ranked, partially prefilled requests may hold the blocks the
        head needs; preempt them (last first) until the head fits or none is left."""
        bm = self.block_manager
        holders = [
            r
            for r in self.state.requests.values()
            if r is not head
            and r.status is RequestStatus.WAITING_PREFILL
            and r.num_computed_tokens > 0
            and r.request_id not in self.state.in_flight
        ]
        while holders and not bm.can_allocate(head.request_id, num_tokens, prefix):
            self._preempt(holders.pop())

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req.request_id)
        self.encoder_cache.release(req.request_id)
        self.state.set_status(req, RequestStatus.WAITING_PREFILL)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.state.num_preemptions += 1

    def complete(self, result: StageResult, now_s: float) -> list[RequestEvent]:
        """Apply a finished batch; returns one event per request that produced output or ended."""
        batch = result.batch
        stage = batch.stage
        state = self.state
        if state.running[stage] is not batch:
            raise ValueError(f"batch {batch.batch_id} is not the running {stage.value} batch")
        state.running[stage] = None
        if (
            stage is _DECODE
            and not self._abort_in_flight
            and not result.failed
            and not self.block_manager.enable_prefix_caching
        ):
            events = self._complete_decode(batch.items, result.new_token_ids, result.end_s)
        else:
            events = self._complete_items(result)
        self.policy.on_batch_done(result, state, now_s)
        return events

    def _complete_decode(
        self, items: tuple[BatchItem, ...], new_tokens: dict[str, int], end_s: float
    ) -> list[RequestEvent]:
        """``_complete_items`` for a decode step in which nothing was aborted or failed and no
        prefix cache takes blocks (the common step): every item takes its token."""
        in_flight, requests = self.state.in_flight, self.state.requests
        append_token = self._append_token
        events: list[RequestEvent] = []
        for item in items:
            rid = item.request_id
            in_flight.pop(rid, None)
            token = new_tokens.get(rid)
            if token is None:
                events.append(self._no_token(requests[rid], _DECODE, end_s))
            else:
                events.append(append_token(requests[rid], item, token, end_s))
        return events

    def _complete_items(self, result: StageResult) -> list[RequestEvent]:
        """Apply each item of a finished batch (any stage, any outcome)."""
        batch = result.batch
        stage, end_s, new_tokens = batch.stage, result.end_s, result.new_token_ids
        state = self.state
        events: list[RequestEvent] = []
        in_flight, requests, aborted, failed = (
            state.in_flight,
            state.requests,
            self._abort_in_flight,
            result.failed,
        )
        bm = self.block_manager
        caching = bm.enable_prefix_caching
        vision, prefill = stage is _VISION, stage is _PREFILL
        settle = vision and bool(self._reserved)
        for item in batch.items:
            rid = item.request_id
            in_flight.pop(rid, None)
            if settle:
                self._settle_reserved(rid, bool(failed) and rid in failed)
            if aborted and rid in aborted:
                aborted.discard(rid)
                bm.free(rid)
                self.encoder_cache.release(rid)
                continue
            req = requests[rid]
            if failed and rid in failed:
                self._finish(req, RequestStatus.FAILED, "error", end_s, error=failed[rid])
                events.append(RequestEvent(rid, (), True, "error", req.error))
                continue
            if vision:
                req.times.vision_end_s = end_s
                req.images_to_encode = []
                self.state.set_status(req, RequestStatus.WAITING_PREFILL)
                self._probe_prefix(req)
                continue
            if caching:
                num_computed = item.num_cached_tokens + len(item.token_ids)
                if num_computed // bm.block_size > bm.num_committed_blocks(rid):
                    hashes = extend_block_hashes(req, bm.block_size, num_computed)
                    bm.commit(rid, hashes, num_computed)
            if not item.sample:  # a prefill chunk short of the prompt's end: progress only
                req.num_computed_tokens = item.num_cached_tokens + len(item.token_ids)
                continue
            token = new_tokens.get(rid)
            if token is None:
                events.append(self._no_token(req, stage, end_s))
                continue
            if prefill:
                self.encoder_cache.release(rid)  # the executor holds its embeddings now
                if item.extras is not NO_EXTRAS and item.fork_ids:
                    events += self._fork(req, item, result)
                if req.times.prefill_end_s is None:
                    req.times.prefill_end_s = end_s
            events.append(self._append_token(req, item, token, end_s))
        return events

    def _no_token(self, req: Request, stage: Stage, end_s: float) -> RequestEvent:
        """The executor returned no token for ``req``'s sampled item: it fails."""
        reason = f"executor returned no token for {stage.value}"
        self._finish(req, RequestStatus.FAILED, "error", end_s, error=reason)
        return RequestEvent(req.request_id, (), True, "error", reason)

    def _settle_reserved(self, rid: str, failed: bool) -> None:
        """The encoder entries a vision item reserved: ready if it ran (the executor kept the
        embeddings), dropped if it failed."""
        cache = self.encoder_cache
        for key in self._reserved.pop(rid, ()):
            if failed:
                cache.discard(key)
            else:
                cache.mark_ready(key)

    def _fork(self, parent: Request, item: BatchItem, result: StageResult) -> list[RequestEvent]:
        """Parent's prefill done: each waiting fork shares its blocks and takes the first token
        sampled for it (a fork without one fails)."""
        events: list[RequestEvent] = []
        forks = self._forks.pop(parent.request_id, [])
        for child in forks:
            cid = child.request_id
            self._fork_parent.pop(cid, None)
            token = result.new_token_ids.get(cid)
            if token is None or cid not in item.fork_ids:
                reason = f"executor returned no token for fork {cid}"
                self._end_fork(child, RequestStatus.FAILED, "error", result.end_s, reason, False)
                events.append(RequestEvent(cid, (), True, "error", reason))
                continue
            self.block_manager.fork(parent.request_id, cid)
            child.block_hashes = list(parent.block_hashes)
            child.num_cached_prompt_tokens = parent.num_cached_prompt_tokens
            child.prefix_hit_tokens = parent.prefix_hit_tokens
            child.encoder_cache_hits = list(parent.encoder_cache_hits)
            times, ptimes = child.times, parent.times
            times.vision_start_s, times.vision_end_s = ptimes.vision_start_s, ptimes.vision_end_s
            times.prefill_start_s = ptimes.prefill_start_s
            self.state.requests[cid] = child
            self.state.num_added += 1
            times.prefill_end_s = result.end_s
            events.append(self._append_token(child, item, token, result.end_s))
        return events

    def _end_fork(
        self,
        child: Request,
        status: RequestStatus,
        reason: str,
        now_s: float,
        error: str | None,
        emit: bool = True,
    ) -> None:
        child.status = status
        child.finish_reason = reason
        child.error = error
        child.times.finish_s = now_s
        if emit:
            self._events.append(RequestEvent(child.request_id, (), True, reason, error))

    def _end_forks_of(
        self, req: Request, status: RequestStatus, reason: str, now_s: float, error: str | None
    ) -> None:
        """``req`` ended before its prefill: its waiting forks end with it."""
        for child in self._forks.pop(req.request_id, ()):
            self._fork_parent.pop(child.request_id, None)
            self._end_fork(child, status, reason, now_s, error)

    def _append_token(
        self, req: Request, item: BatchItem, token: int, end_s: float
    ) -> RequestEvent:
        """``req`` takes ``token``, the one its ``item`` sampled (a prefill's caller has set
        ``prefill_end_s``): it finishes, or decodes on."""
        req.num_computed_tokens = item.num_cached_tokens + len(item.token_ids)
        outputs = req.output_token_ids
        outputs.append(token)
        req.times.token_s.append(end_s)
        # why it stops: its sampling (stop token, max_tokens), else the context length
        reason = req.sampling.stop_reason(token, len(outputs), self.eos_token_ids)
        if (
            reason is None
            and self.max_model_len is not None
            and len(req.prompt_token_ids) + len(outputs) >= self.max_model_len
        ):
            reason = "length"
        if reason is not None:
            self._finish(req, RequestStatus.FINISHED, reason, end_s)
        elif req.status is _DECODING:  # = set_status(req, DECODING): to the end
            index = self.state.by_status[_DECODING]
            index.pop(req.request_id, None)
            index[req.request_id] = req
        else:
            self.state.set_status(req, _DECODING)
        return _token_event(req.request_id, token, reason)

    def _finish(
        self,
        req: Request,
        status: RequestStatus,
        reason: str,
        now_s: float,
        error: str | None = None,
    ) -> None:
        self.block_manager.free(req.request_id)
        self.encoder_cache.release(req.request_id)
        self.state.set_status(req, status)
        req.finish_reason = reason
        req.error = error
        req.times.finish_s = now_s
        self.state.requests.pop(req.request_id, None)
        if self._forks:
            self._end_forks_of(req, status, reason, now_s, error)
