"""Discrete-event simulator: the real ``Scheduler`` and ``Policy`` objects on a virtual clock.

Only the executor differs from the engine: a batch's duration comes from a cost model. Batches
of different stages may run at the same time; their speeds depend on each other (shared HBM
bandwidth, and SMs too when the partition is not ``isolated``), so the simulator advances a fluid
model: each running batch has remaining work in [0, 1] and a rate ``1 / cost.time_s(work,
share, co_running, isolated)`` that is recomputed whenever a batch starts or ends. A batch keeps
the SM share it started with (partitions change at batch boundaries, as in the engine).

Torch-free. Output tokens are placeholders (EOS is never produced; requests run to max_tokens),
which is what latency simulation needs.

Caches: the scheduler's own prefix cache (block manager) and encoder-cache accounting run here
as in the engine. For them to see what requests share, an arrival may carry its prompt as
``segments`` (text pieces whose equal keys stand for equal tokens, and images keyed by their
content, e.g. a session's screenshot resent in later steps); ``arrivals_from_workload`` derives
them from a multi-turn workload request's conversation. Arrivals without segments get prompts
no other request shares (a unique first token), so the caches change nothing for them. A hit
skips the vision batch (all images cached) or shrinks it (misses only), and prefill is costed
for the uncached suffix only (``work_of`` counts the tokens a batch computes).
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
import zlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from nova.core.block_manager import BlockManager
from nova.core.encoder_cache import EncoderCacheAccounting
from nova.core.policy import WAITING_STATUS, Policy, earliest_key
from nova.core.scheduler import Scheduler
from nova.cost.base import CostModel, StageWork
from nova.cost.gpus import GpuSpec, get_gpu
from nova.sampling_params import SamplingParams
from nova.types import STAGES, Batch, ImageInput, Request, Stage, StageResult
from nova.workload.agent_sessions import turn_text_tokens
from nova.workload.gui_agent import CHAT_TEMPLATE_TOKENS
from nova.workload.types import Workload, WorkloadRequest

SIM_TOKEN = 1  # placeholder token id of simulated outputs
SIM_IMAGE_TOKEN = 0  # placeholder token id of simulated image tokens
_UNIQUE_TOKEN0 = 1 << 40  # first tokens of prompts that share nothing (above any text token)
# An arrival within TIME_EPS_S after an event joins it; a batch with at most DONE_EPS of its
# work left is done (float drift of the fluid model).
TIME_EPS_S = 1e-9
DONE_EPS = 1e-9
_COST_CACHE_MAX = 200_000  # memoized cost-model answers (rates) kept (cleared when full)

WorkFn = Callable[[Batch], StageWork]

# Enum members as module constants: ``Stage.DECODE`` is looked up through the enum's metaclass
# (about ten times a global's cost in CPython 3.11), and the hot paths below test them for
# every batch and item.
_VISION, _DECODE = Stage.VISION, Stage.DECODE


def work_of(batch: Batch) -> StageWork:
    """The cost model's view of a batch the scheduler built: ``StageWork.from_batch(batch)``,
    without re-checking what is valid by construction (``StageWork.trusted``)."""
    stage = batch.stage
    items = batch.items
    if stage is _DECODE:
        return _trusted_decode(tuple([it.num_cached_tokens + 1 for it in items]))
    if stage is _VISION:
        return _trusted_work(stage, sum([it.num_images for it in items]))
    new = tuple([len(it.token_ids) for it in items])
    return _trusted_work(
        stage, 0, new, tuple([it.num_cached_tokens + n for it, n in zip(items, new)])
    )


_trusted_work = StageWork.trusted
_trusted_decode = StageWork.trusted_decode


@dataclass(slots=True)
class _Running:
    batch: Batch
    work: StageWork
    share: float  # its own SM share (the partition it started with)
    isolated: bool  # its partition's mode (``Partition.isolated``)
    key: Hashable  # the work's cost-memo key (``shape_key``), or ``_UNCACHED``
    remaining: float = 1.0  # fraction of the batch's work still to do
    rate: float = 0.0  # fraction per second at the current co-running set


@dataclass(slots=True)
class BatchRecord:
    stage: Stage
    start_s: float
    end_s: float
    request_ids: tuple[str, ...]
    share: float


@dataclass(slots=True)
class SimResult:
    requests: list[Request]
    batches: list[BatchRecord]
    end_s: float
    num_preemptions: int
    # the caches' counters over the run (see ``nova.engine.client.EngineSnapshot``)
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    encoder_cache_queried_images: int = 0
    encoder_cache_hit_images: int = 0

    def decisions(self, stage: Stage) -> list[tuple[str, ...]]:
        """The sequence of batches (request ids) the policy ran for ``stage``."""
        return [b.request_ids for b in self.batches if b.stage is stage]


@dataclass(slots=True, frozen=True)
class PromptSegment:
    """A piece of a simulated prompt: ``num_tokens`` text tokens that equal those of any
    segment with the same ``key``, or (``image``) one image whose content is ``key`` (its
    tokens: ``num_tokens``, or the simulator's ``image_tokens`` when 0)."""

    key: str
    num_tokens: int = 0
    image: bool = False


@dataclass(slots=True, frozen=True)
class SimArrival:
    """One request to simulate. ``arrival_s`` None: a closed-loop step sent ``think_time_s``
    after the previous step of ``session_id`` finished. ``segments``: the prompt's content
    (see ``PromptSegment``; empty: ``num_text_tokens`` then ``num_images`` images that no
    other request shares)."""

    request_id: str
    arrival_s: float | None
    num_text_tokens: int
    num_images: int
    max_tokens: int
    session_id: str | None = None
    think_time_s: float = 0.0
    priority: int = 0
    deadline_s: float | None = None
    segments: tuple[PromptSegment, ...] = ()


def request_segments(r: WorkloadRequest) -> tuple[PromptSegment, ...]:
    """The content of a workload request as prompt segments: a multi-turn request's turns (each
    turn's template and text, then its image), else the chat template, the images and the
    instruction of one user turn. Images are keyed by their content when the workload names
    it (``ImageSpec.content_key``), else by request and position (never shared)."""
    out: list[PromptSegment] = []

    def image(k: int, key: str | None) -> PromptSegment:
        return PromptSegment(key or f"{r.request_id}/image{k}", image=True)

    if r.turns:
        k = 0
        for turn in r.turns:
            out.append(PromptSegment(f"{turn.role}|{turn.text}", turn_text_tokens(turn)))
            if turn.image is not None:
                out.append(image(k, turn.image.content_key))
                k += 1
        return tuple(out)
    out.append(PromptSegment("template", min(CHAT_TEMPLATE_TOKENS, r.num_text_tokens)))
    out += [image(k, img.content_key) for k, img in enumerate(r.images)]
    rest = r.num_text_tokens - CHAT_TEMPLATE_TOKENS
    if rest > 0:
        out.append(PromptSegment(f"user|{r.instruction}", rest))
    return tuple(out)


def arrivals_from_workload(workload: Workload, segments: bool | None = None) -> list[SimArrival]:
    """``nova.workload.Workload`` -> arrivals (keeps the workload's session structure).
    ``segments``: give every arrival its content (``request_segments``), so the caches can see
    what requests share; None: only multi-turn requests (whose sharing is the point)."""
    return [
        SimArrival(
            r.request_id,
            r.arrival_s,
            r.num_text_tokens,
            len(r.images),
            r.max_tokens,
            r.session_id,
            r.think_time_s,
            r.priority,
            r.deadline_s,
            request_segments(r) if (segments or (segments is None and r.turns)) else (),
        )
        for r in workload.requests
    ]


class _Uncached:
    """The memo key of a work the simulator cannot key (no ``shape_key``, unhashable)."""


_UNCACHED = _Uncached()


def _head_rank(sched: Scheduler, stage: Stage) -> tuple[float, ...]:
    """``stage``'s earliest waiting request in service order (none: after every other)."""
    return earliest_key(sched.state, stage) or (math.inf,)


def _no_key(work: StageWork) -> Hashable:
    return _UNCACHED


class Simulator:
    """Runs arrivals through a ``Scheduler`` on a virtual clock; see the module docstring.

    The event loop asks a stage for a batch only when it can get one, from the policy's
    declarations (``Policy.idle_without_queue``, ``Policy.one_batch_at_a_time``), and memoizes
    the cost model's answers per batch shape (its ``shape_key``, else the work itself if
    hashable; ``memoize_costs=False``: never). ``tests/test_simulator.py`` holds the
    straightforward loop (every idle stage asked after every event, every rate recomputed) and
    checks that both decide alike.
    """

    def __init__(
        self,
        policy: Policy,
        cost_model: CostModel,
        num_kv_blocks: int,
        block_size: int = 16,
        image_tokens: int = 576,
        max_model_len: int | None = None,
        work_fn: WorkFn = work_of,
        check_invariants: bool = False,
        memoize_costs: bool = True,
        prefix_caching: bool | None = None,
        encoder_cache_bytes: int = 0,
        embed_bytes_per_token: int = 1,
        stages_take_turns: bool = False,
    ) -> None:
        """``prefix_caching``: model the prefix cache (None: when some arrival has
        ``segments``); ``encoder_cache_bytes``: the encoder cache's capacity (0: off), an image
        token's embedding taking ``embed_bytes_per_token`` (hidden size x bytes per value).
        ``stages_take_turns``: the device runs one batch at a time, decode first, then the
        front stage holding the earliest request in service order, ties to the one that ran
        least recently (the ``cpu`` partition backend on a CPU whose
        cores cannot be split into slices of ``--cpu-min-split-cores``: ``nova.gpu.cpu_cores``);
        a batch is planned when its turn comes."""
        self.stages_take_turns = stages_take_turns
        self.scheduler = Scheduler(
            policy,
            BlockManager(num_kv_blocks, block_size, bool(prefix_caching)),
            (),
            max_model_len,
            EncoderCacheAccounting(encoder_cache_bytes, embed_bytes_per_token),
        )
        self.prefix_caching = prefix_caching
        self._segment_tokens: dict[tuple[str, int], list[int]] = {}
        self.cost = cost_model
        self.image_tokens = image_tokens
        self.work_fn = work_fn
        self.check_invariants = check_invariants  # KV integrity after every event (tests)
        # False: ask the cost model for every rate (for a cost model that is not a pure function
        # of the batch shapes, shares and mode, e.g. one that samples noise)
        self.memoize_costs = memoize_costs
        self._rate_cache: dict[Hashable, float] = {}  # memo key -> 1 / cost.time_s
        self._seq = itertools.count()

    def _text_tokens(self, key: str, n: int) -> list[int]:
        """Tokens standing for text ``key``: equal keys give equal tokens (crc32-seeded)."""
        tokens = self._segment_tokens.get((key, n))
        if tokens is None:
            base = zlib.crc32(key.encode("utf-8"))
            tokens = [2 + (base + 7919 * i) % 1_000_003 for i in range(n)]
            self._segment_tokens[(key, n)] = tokens
        return tokens

    def make_request(self, a: SimArrival) -> Request:
        """The scheduler's request for arrival ``a``: its segments' tokens and images, or
        placeholder tokens that no other request shares (each image fills ``image_tokens``)."""
        sampling = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)
        if a.segments:
            tokens: list[int] = []
            images: list[ImageInput] = []
            for seg in a.segments:
                if seg.image:
                    n = seg.num_tokens or self.image_tokens
                    images.append(ImageInput(n, seg.key, offset=len(tokens)))
                    tokens += [SIM_IMAGE_TOKEN] * n
                else:
                    tokens += self._text_tokens(seg.key, seg.num_tokens)
            if not tokens:
                tokens = [SIM_TOKEN]
            return Request(a.request_id, tokens, sampling, images, a.priority, a.deadline_s)
        n_prompt = max(1, a.num_text_tokens) + a.num_images * self.image_tokens
        images = [ImageInput(self.image_tokens, f"{a.request_id}/{i}") for i in range(a.num_images)]
        first = _UNIQUE_TOKEN0 + next(self._seq)  # shares no block with any other request
        return Request(
            a.request_id,
            [first] + [SIM_TOKEN] * (n_prompt - 1),
            sampling,
            images,
            a.priority,
            a.deadline_s,
        )

    def run(self, arrivals: Sequence[SimArrival], max_time_s: float = math.inf) -> SimResult:
        """Simulate ``arrivals`` until every request is done (or ``max_time_s``).

        Python's cyclic garbage collector is paused during the run (and restored after): the
        run allocates millions of small acyclic objects (freed by reference counting), and the
        collector's repeated passes over the growing heap took ~20% of the time."""
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(arrivals, max_time_s)
        finally:
            if gc_enabled:
                gc.enable()

    def _sessions(
        self, arrivals: Sequence[SimArrival]
    ) -> tuple[list[tuple[float, int, SimArrival]], dict[str, list[SimArrival]]]:
        """The heap of open-loop arrivals, and each session's closed-loop steps in order."""
        heap: list[tuple[float, int, SimArrival]] = []
        by_session: dict[str, list[SimArrival]] = {}
        for a in arrivals:
            if a.arrival_s is not None:
                heapq.heappush(heap, (a.arrival_s, next(self._seq), a))
            elif a.session_id is None:
                raise ValueError(f"{a.request_id}: a request without arrival time needs a session")
            else:
                by_session.setdefault(a.session_id, []).append(a)
        return heap, by_session

    def _rate(self, r: _Running, running: list[_Running], key: Hashable) -> float:
        """``r``'s rate beside the other ``running`` batches: 1 / ``cost.time_s``, memoized on
        ``key`` (shapes, shares and mode: cost models are pure functions of them);
        ``_UNCACHED``: not memoized."""
        cache = self._rate_cache
        rate = cache.get(key)
        if rate is None:
            others = [(o.work, o.share) for o in running if o is not r]
            rate = 1.0 / max(self.cost.time_s(r.work, r.share, others, r.isolated), 1e-9)
            if key is not _UNCACHED:
                if len(cache) >= _COST_CACHE_MAX:
                    cache.clear()
                cache[key] = rate
        return rate

    def _update_rates(self, running: dict[Stage, _Running]) -> None:
        """Each running batch's rate beside the others (same floats as asking the cost model
        directly, so the same schedule)."""
        batches = list(running.values())
        if len(batches) == 1:  # the common case: one batch alone (no others to key on)
            r = batches[0]
            key: Hashable = r.key
            if key is not _UNCACHED:
                key = (key, r.share, r.isolated)
            r.rate = self._rate(r, batches, key)
            return
        for r in batches:
            if r.key is _UNCACHED:  # one uncached shape: no key for any of them
                for o in batches:
                    o.rate = self._rate(o, batches, _UNCACHED)
                return
        # key: its shape and share, the others' (in running order), the mode
        pairs = [(r.key, r.share) for r in batches]
        for i, r in enumerate(batches):
            key = (r.key, r.share, (*pairs[:i], *pairs[i + 1 :]), r.isolated)
            r.rate = self._rate(r, batches, key)

    def _shape_key_fn(self) -> Callable[[StageWork], Hashable]:
        """work -> memo key: the cost model's ``shape_key`` if it has one, else the work itself
        if hashable; works that are neither (or every work, without ``memoize_costs``) are not
        cached."""
        if not self.memoize_costs:
            return _no_key
        shape_key: Callable[[StageWork], Hashable] | None = getattr(self.cost, "shape_key", None)
        if shape_key is not None:
            return shape_key

        def key(work: StageWork) -> Hashable:
            try:
                hash(work)
            except TypeError:
                return _UNCACHED
            return work

        return key

    def _run(self, arrivals: Sequence[SimArrival], max_time_s: float) -> SimResult:
        sched = self.scheduler
        if self.prefix_caching is None:
            sched.block_manager.enable_prefix_caching = any(a.segments for a in arrivals)
        schedule, complete = sched.schedule, sched.complete
        heap, by_session = self._sessions(arrivals)
        session_of = {a.request_id: a.session_id for a in arrivals if a.session_id}
        requests: list[Request] = []
        records: list[BatchRecord] = []
        running: dict[Stage, _Running] = {}
        work_fn = self.work_fn
        shape_key = self._shape_key_fn()
        check = self.check_invariants
        vision, prefill, decode = Stage.VISION, Stage.PREFILL, Stage.DECODE
        inf = math.inf
        t = 0.0
        changed = False  # the running set changed since the rates were computed
        # Stages that cannot get a batch are not asked (the policy's declarations): none while
        # a time-sliced policy runs a batch; none for a stage no live request waits for.
        turns = self.stages_take_turns
        sliced = sched.policy.one_batch_at_a_time or turns
        waiting: list[tuple[Stage, dict[str, Request] | bool]] = [
            (stage, sched.state.by_status[WAITING_STATUS[stage]])
            if sched.policy.idle_without_queue
            else (stage, True)  # always asked
            for stage in STAGES
        ]
        if turns:  # decode first; the front stages by their earliest request (above)
            waiting.sort(key=lambda w: w[0] is not decode)
        while True:
            started = changed
            if turns and not running:  # decode, then the front stage holding the earliest
                # request (ties: the one that ran least recently), as the engine's turns go
                waiting.sort(key=lambda w: (w[0] is not decode, _head_rank(sched, w[0])))
            for stage, queue in waiting:
                if stage in running:
                    continue
                if sliced and running:
                    break
                if queue:
                    batch = schedule(stage, t)
                    if batch is not None:
                        part = batch.partition
                        work = work_fn(batch)
                        share = (
                            part.decode
                            if stage is decode
                            else part.prefill
                            if stage is prefill
                            else part.vision
                        )  # = part.share(stage)
                        running[stage] = _Running(
                            batch, work, share, part.isolated, shape_key(work)
                        )
                        started = True
            if started:
                self._update_rates(running)
            changed = False
            next_done = inf
            for r in running.values():
                done_s = t + r.remaining / r.rate
                if done_s < next_done:
                    next_done = done_s
            next_arrival = heap[0][0] if heap else inf
            t_next = next_done if next_done < next_arrival else next_arrival
            if t_next == inf:
                if sched.has_unfinished():
                    raise RuntimeError(
                        f"simulation stalled at t={t:.3f}s: {len(sched.state.requests)} requests "
                        f"left but the policy schedules nothing"
                    )
                break
            if t_next > max_time_s:
                break
            dt = t_next - t
            finished: list[Stage] | None = None
            for stage, r in running.items():
                r.remaining -= r.rate * dt
                if r.remaining <= DONE_EPS:
                    if finished is None:
                        finished = [stage]
                    else:
                        finished.append(stage)
            t = t_next
            if finished is not None:
                changed = True
                for stage in finished:
                    r = running.pop(stage)
                    if turns and stage is not decode:  # the other front stage goes next
                        waiting.sort(key=lambda w: (w[0] is not decode, w[0] is stage))
                    batch = r.batch
                    items = batch.items
                    ids = tuple([it.request_id for it in items])
                    tokens: dict[str, int]
                    if stage is decode:  # every decode item samples
                        tokens = dict.fromkeys(ids, SIM_TOKEN)
                    elif stage is vision:
                        tokens = {}
                    else:
                        tokens = {it.request_id: SIM_TOKEN for it in items if it.sample}
                    events = complete(StageResult(batch, t, tokens), t)
                    records.append(BatchRecord(stage, batch.start_s, t, ids, r.share))
                    if by_session:
                        for ev in events:
                            sid = session_of.get(ev.request_id)
                            if ev.finished and sid in by_session and by_session[sid]:
                                nxt = by_session[sid].pop(0)
                                heapq.heappush(heap, (t + nxt.think_time_s, next(self._seq), nxt))
            if check:
                sched.block_manager.check_integrity()
                sched.encoder_cache.check_integrity()
            while heap and heap[0][0] <= t + TIME_EPS_S:
                _, _, a = heapq.heappop(heap)
                req = self.make_request(a)
                sched.add_request(req, max(t, a.arrival_s if a.arrival_s is not None else t))
                requests.append(req)
        bm, enc = sched.block_manager, sched.encoder_cache
        return SimResult(
            requests,
            records,
            t,
            sched.state.num_preemptions,
            bm.num_queried_tokens,
            bm.num_hit_tokens,
            enc.num_queried_images,
            enc.num_hit_images,
        )


@dataclass(slots=True)
class FixedCostModel:
    """Constant duration per stage, no interference: for parity tests and quick experiments.
    ``gpu_spec``: the GPU the durations stand for (only reported; default the ``cpu`` spec)."""

    durations_s: dict[Stage, float] = field(default_factory=lambda: dict.fromkeys(Stage, 0.01))
    name: str = "fixed"
    gpu_spec: GpuSpec = field(default_factory=lambda: get_gpu("cpu"))

    def time_s(
        self,
        work: StageWork,
        sm_share: float,
        co_running: Sequence[tuple[StageWork, float]] = (),
        isolated: bool = True,
    ) -> float:
        return self.durations_s[work.stage]

    def gpu(self) -> GpuSpec:
        return self.gpu_spec

    @staticmethod
    def shape_key(work: StageWork) -> Hashable:
        """The duration depends on the stage only."""
        return work.stage
