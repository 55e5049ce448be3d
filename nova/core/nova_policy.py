"""``nova``: adaptive SM partitioning on the latency-throughput Pareto frontier.

Decode is memory-bound and reaches most of the HBM bandwidth with a fraction of the SMs; vision
and prefill are compute-bound. So Nova overlaps decode with the compute stages: decode runs on a
share ``d`` of the SMs and the compute partition ``1 - d`` runs vision or prefill. Vision and
prefill never co-run: splitting SMs between two compute-bound stages only time-shares them more
slowly (the paper's operating points are likewise "decode with vision" and "decode with
prefill"); prefill goes first (its request is further along; shortest remaining work first),
unless the oldest waiting image has waited ``vision_starvation_s``. The policy re-plans ``d`` as
load changes:

1. **Load estimate.** From the requests it has seen (their arrival times, images, prompt and
   output lengths) it keeps the arrival rate ``lam_rps`` over a sliding window and the mean
   request shape.
2. **Candidates.** When decode and a compute stage both have work: the decode share ``d`` on
   the GPU's SM granularity grid (at least ``min_decode_share``), the compute stages ``1 - d``.
   A lone stage gets the whole GPU.
3. **Prediction** for each candidate, from the cost model (``nova.cost.base.CostModel``:
   ``time_s(work, share, co_running, isolated)``, which includes bandwidth interference between
   co-running stages; nova's partitions are isolated, ``Partition.isolated``):
   - vision + prefill form one M/G/1 server (Pollaczek-Khinchine) with service
     ``S = f_img S_vision + S_prefill`` at share ``1 - d`` while decode co-runs:
     ``W = lam E[S^2] / (2 (1 - rho))``, ``E[S^2] = S^2 (1 + cv2)``; ``rho >= 1``: the partition
     cannot carry the load;
   - decode is a batch server: its batch ``B`` solves Little's law ``B = lam n_out T(B)`` (fixed
     point); its step time is ``T(B, d, co-running)`` while the compute server is busy (a
     fraction ``rho`` of the time) and ``T(B, 1.0)`` otherwise;
   - tail latency: the waiting time is taken as exponential with the P-K mean (heavy-traffic
     approximation), so its 99th percentile is ``W / rho * ln(100 rho)``; plus service and
     ``n_out`` decode steps;
   - capacity (requests/s): the smaller of the compute server's and decode's.
4. **Choice.** Keep the Pareto frontier of (predicted p99 latency, capacity); pick the point with
   the lowest predicted latency whose capacity is at least ``(1 + capacity_margin) * lam``; if
   none can carry the load, the one with the most capacity.
5. **Backlog.** When ``alpha`` or more requests wait for vision/prefill, decode drops to its
   minimum share (``min_decode_share``) so the front stages drain the backlog (the paper's
   queue threshold).
6. **Hysteresis.** A plan is recomputed only when the arrival rate moved by more than
   ``replan_rate_change`` since the last plan or the backlog state flipped; a new choice replaces
   the current one only if it predicts ``hysteresis`` lower latency or the current one can no
   longer carry the load. Plans are cached per (active set, rate bucket), so a decision is a
   dictionary lookup most of the time.

Assumptions, stated: Poisson-like arrivals (M/G/1), independent stages in series, service-time
variability ``cv2`` (0.3 by default: screenshot sizes are similar), the cost model's interference
model, and shares that take effect at batch boundaries (a batch keeps the share it started with,
so the GPU can be briefly over- or under-subscribed after a switch).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from nova.core.policy import (
    BatchPlan,
    Policy,
    SchedulerState,
    StageLimits,
    plan_in_service_order,
    register_policy,
)
from nova.cost.base import CostModel, StageWork
from nova.types import Partition, Request, RequestStatus, Stage


@dataclass(slots=True, frozen=True)
class LoadEstimate:
    lam_rps: float
    image_fraction: float
    images_per_request: float  # among requests with images
    text_tokens: float
    output_tokens: float


@dataclass(slots=True, frozen=True)
class Prediction:
    partition: Partition
    mean_latency_s: float
    tail_latency_s: float
    capacity_rps: float
    decode_batch: float


@dataclass(slots=True)
class _Observed:
    arrivals_s: deque[float] = field(default_factory=deque)
    text_tokens: float = 200.0
    output_tokens: float = 50.0
    image_fraction: float = 1.0
    images_per_request: float = 1.0
    num_seen: int = 0


def _compute_decode_partition(decode: float) -> Partition:
    """Decode on ``decode``; vision and prefill (which never co-run) on the rest.
    ``decode == 0`` (no decode work) or ``1`` (only decode) give the whole GPU to one side;
    Partition needs shares in (0, 1], so the idle side keeps a token share it never uses."""
    eps = 1e-3
    compute = 1.0 - decode if 0.0 < decode < 1.0 else (1.0 if decode == 0.0 else eps)
    return Partition(compute, compute, max(decode, eps), name="nova", isolated=True)


_VISION, _PREFILL, _DECODE = Stage.VISION, Stage.PREFILL, Stage.DECODE
_WAITING_VISION, _WAITING_PREFILL = RequestStatus.WAITING_VISION, RequestStatus.WAITING_PREFILL
_DECODING = RequestStatus.DECODING

# (vision, prefill, decode have work) -> that set of stages
_ACTIVE: dict[tuple[bool, bool, bool], frozenset[Stage]] = {
    (v, p, d): frozenset(
        s for s, on in zip((Stage.VISION, Stage.PREFILL, Stage.DECODE), (v, p, d)) if on
    )
    for v in (False, True)
    for p in (False, True)
    for d in (False, True)
}


@register_policy("nova")
class NovaPolicy(Policy):
    idle_without_queue = True

    def __init__(
        self,
        limits: StageLimits | None = None,
        cost_model: CostModel | None = None,
        image_tokens: int = 576,
        sm_granularity_share: float = 1 / 14,
        min_decode_share: float = 1 / 7,
        alpha: int = 4,
        capacity_margin: float = 0.1,
        hysteresis: float = 0.05,
        replan_rate_change: float = 0.15,
        rate_window_s: float = 60.0,
        cv2: float = 0.3,
        vision_starvation_s: float = 10.0,
    ) -> None:
        if cost_model is None:
            raise ValueError(
                "the nova policy needs a cost model (nova.cost) to predict stage times"
            )
        self.limits = limits or StageLimits()
        self.cost = cost_model
        self.image_tokens = image_tokens
        self.grid = sm_granularity_share
        self.min_decode_share = min_decode_share
        self.alpha = alpha
        self.capacity_margin = capacity_margin
        self.hysteresis = hysteresis
        self.replan_rate_change = replan_rate_change
        self.rate_window_s = rate_window_s
        self.cv2 = cv2
        self.vision_starvation_s = vision_starvation_s
        self._obs = _Observed()
        self._seen: set[str] = set()
        self._plan_lam: float | None = None
        self._plan_draining: bool | None = None
        self._current: dict[tuple[frozenset[Stage], bool], Prediction] = {}
        self._cache: dict[tuple[frozenset[Stage], bool, int], Prediction] = {}
        self._log_bucket = math.log(1.0 + self.replan_rate_change / 2)  # rate buckets of the cache
        self._num_added_seen = 0  # state.num_added at the last _observe
        self._observed_state: SchedulerState | None = None
        self.num_replans = 0

    # -- the Policy interface ------------------------------------------------------------------
    def next_batch(self, stage: Stage, state: SchedulerState, now_s: float) -> BatchPlan | None:
        if stage is Stage.PREFILL and state.running[Stage.VISION] is not None:
            return None
        if stage is Stage.VISION:
            if state.running[Stage.PREFILL] is not None:
                return None
            vision_q = state.queue(Stage.VISION)
            starving = bool(vision_q) and now_s - vision_q[0].arrival_s >= self.vision_starvation_s
            if state.queue(Stage.PREFILL) and not starving:
                return None  # prefill first
        return plan_in_service_order(stage, state, self.limits)

    def partition(self, state: SchedulerState, now_s: float) -> Partition:
        self._observe(state, now_s)
        by_status, running = state.by_status, state.running
        waiting_vision, waiting_prefill = by_status[_WAITING_VISION], by_status[_WAITING_PREFILL]
        # the stages with work (waiting or running), as a cached frozenset
        active = _ACTIVE[
            (
                bool(waiting_vision) or running[_VISION] is not None,
                bool(waiting_prefill) or running[_PREFILL] is not None,
                bool(by_status[_DECODING]) or running[_DECODE] is not None,
            )
        ]
        if not active:
            return state.partition
        if not waiting_vision and not waiting_prefill:
            draining = self.alpha <= 0  # (= the count below: nothing waits)
        else:
            draining = state.num_waiting(_VISION) + state.num_waiting(_PREFILL) >= self.alpha
        lam = self._arrival_rate(now_s)
        if (
            self._plan_lam is None
            or draining != self._plan_draining
            or abs(lam - self._plan_lam) > self.replan_rate_change * max(self._plan_lam, 1e-3)
        ):
            self._plan_lam, self._plan_draining = lam, draining
            self._current = {k: v for k, v in self._current.items() if k[1] == draining}
            self.num_replans += 1
        key = (active, draining)
        best = self._best_at(active, draining, lam, now_s)
        current = self._current.get(key)
        if current is None or (best is not current and self._better_at(best, current, lam)):
            self._current[key] = best
        return self._current[key].partition

    # -- load ----------------------------------------------------------------------------------
    def _observe(self, state: SchedulerState, now_s: float) -> None:
        obs = self._obs
        # Only requests added since the last call can be unseen: they are the newest entries
        # of ``state.requests`` (insertion order), at most ``num_added`` - the count then.
        if state is not self._observed_state:  # another scheduler's state: look at everything
            self._observed_state, self._num_added_seen = state, 0
        num_new = state.num_added - self._num_added_seen
        if num_new == 0:  # nothing new: only the window moves (same steps as below)
            if len(self._seen) > 100_000:
                self._seen = set(state.requests)
            arrivals, cutoff = obs.arrivals_s, now_s - self.rate_window_s
            while arrivals and arrivals[0] < cutoff:
                arrivals.popleft()
            return
        self._num_added_seen = state.num_added
        new: Iterable[Request]
        if num_new < 0 or num_new >= len(state.requests):
            new = state.requests.values()
        else:
            new = list(itertools.islice(reversed(state.requests.values()), num_new))[::-1]
        for req in new:
            if req.request_id in self._seen:
                continue
            self._seen.add(req.request_id)
            obs.arrivals_s.append(req.arrival_s)
            a = 1.0 / min(obs.num_seen + 1, 50)  # running mean, then EWMA over ~50 requests
            n_text = len(req.prompt_token_ids) - req.num_image_tokens
            obs.text_tokens += a * (n_text - obs.text_tokens)
            obs.output_tokens += a * (req.sampling.max_tokens - obs.output_tokens)
            obs.image_fraction += a * ((1.0 if req.images else 0.0) - obs.image_fraction)
            if req.images:
                obs.images_per_request += a * (len(req.images) - obs.images_per_request)
            obs.num_seen += 1
        if len(self._seen) > 100_000:  # bounded memory: ids of long-gone requests
            self._seen = set(state.requests)
        while obs.arrivals_s and obs.arrivals_s[0] < now_s - self.rate_window_s:
            obs.arrivals_s.popleft()

    def load_estimate(self, now_s: float) -> LoadEstimate:
        obs = self._obs
        return LoadEstimate(
            self._arrival_rate(now_s),
            obs.image_fraction,
            obs.images_per_request,
            obs.text_tokens,
            obs.output_tokens,
        )

    def _arrival_rate(self, now_s: float) -> float:
        arrivals = self._obs.arrivals_s
        n = len(arrivals)
        if n < 2:
            return 0.0
        span = max(now_s - arrivals[0], arrivals[-1] - arrivals[0], 1e-6)
        return (n - 1) / span if span < self.rate_window_s else n / self.rate_window_s

    # -- prediction ------------------------------------------------------------------------------
    def _works(self, load: LoadEstimate, decode_batch: float) -> dict[Stage, StageWork]:
        n_img = max(1, round(load.images_per_request))
        prompt = int(load.text_tokens + load.image_fraction * n_img * self.image_tokens)
        ctx = prompt + int(load.output_tokens / 2)
        b = max(1, round(decode_batch))
        return {
            Stage.VISION: StageWork(Stage.VISION, num_images=n_img),
            Stage.PREFILL: StageWork(
                Stage.PREFILL, new_tokens=(max(1, prompt),), context_lens=(max(1, prompt),)
            ),
            Stage.DECODE: StageWork(Stage.DECODE, new_tokens=(1,) * b, context_lens=(ctx,) * b),
        }

    def predict(self, part: Partition, active: frozenset[Stage], load: LoadEstimate) -> Prediction:
        lam = load.lam_rps
        n_out = max(1.0, load.output_tokens)
        has_compute = bool(active & {Stage.VISION, Stage.PREFILL})
        has_decode = Stage.DECODE in active
        compute_share = part.prefill  # vision and prefill share one partition (never co-run)
        works = self._works(load, 1.0)
        busy, service, second_moment = 0.0, 0.0, 0.0
        if has_compute:
            decode_co = [(works[Stage.DECODE], part.decode)] if has_decode else []
            s_v = self.cost.time_s(works[Stage.VISION], compute_share, decode_co, part.isolated)
            s_p = self.cost.time_s(works[Stage.PREFILL], compute_share, decode_co, part.isolated)
            service = load.image_fraction * s_v + s_p
            second_moment = service * service * (1.0 + self.cv2)
            busy = lam * service
            if busy >= 1.0:
                return Prediction(part, math.inf, math.inf, 1.0 / service, 1.0)
        capacity = 1.0 / service if service > 0 else math.inf
        t_step, batch = 0.0, 1.0
        if has_decode:
            for _ in range(6):  # Little's law fixed point for the decode batch
                works = self._works(load, batch)
                co = [(works[Stage.PREFILL], compute_share)] if has_compute else []
                t_co = (
                    self.cost.time_s(works[Stage.DECODE], part.decode, co, part.isolated)
                    if has_compute
                    else 0.0
                )
                t_alone = self.cost.time_s(works[Stage.DECODE], 1.0, (), part.isolated)
                t_step = busy * t_co + (1.0 - busy) * t_alone
                batch = min(max(1.0, lam * n_out * t_step), float(self.limits.max_num_seqs))
            capacity = min(capacity, self.limits.max_num_seqs / t_step / n_out)
        wait = lam * second_moment / (2.0 * (1.0 - busy)) if has_compute else 0.0
        tail_wait = wait / busy * math.log(100 * busy) if busy > 0.01 else 0.0
        mean = wait + service + n_out * t_step
        tail = tail_wait + service + n_out * t_step
        return Prediction(part, mean, tail, capacity, batch)

    def candidates(self, active: frozenset[Stage], draining: bool) -> list[Partition]:
        if Stage.DECODE in active and active & {Stage.VISION, Stage.PREFILL}:
            steps = round(1.0 / self.grid)
            shares = [
                k * self.grid
                for k in range(1, steps)
                if k * self.grid >= self.min_decode_share - 1e-9
            ]
            if draining:
                shares = shares[:1]
        else:
            shares = [1.0 if Stage.DECODE in active else 0.0]
        return [_compute_decode_partition(d) for d in shares]

    def partition_set(self) -> list[Partition]:
        """Every partition this policy may choose (for backends that create them up front)."""
        compute_and_decode = frozenset({Stage.PREFILL, Stage.DECODE})
        seen: dict[Partition, None] = {}
        for active in (compute_and_decode, frozenset({Stage.DECODE}), frozenset({Stage.PREFILL})):
            for draining in (False, True):
                for part in self.candidates(active, draining):
                    seen.setdefault(part)
        return list(seen)

    def pareto_frontier(
        self, active: frozenset[Stage], draining: bool, load: LoadEstimate
    ) -> list[Prediction]:
        preds = [self.predict(p, active, load) for p in self.candidates(active, draining)]
        frontier = [
            p
            for p in preds
            if not any(
                q.tail_latency_s <= p.tail_latency_s
                and q.capacity_rps >= p.capacity_rps
                and (q.tail_latency_s < p.tail_latency_s or q.capacity_rps > p.capacity_rps)
                for q in preds
            )
        ]
        return sorted(frontier, key=lambda p: p.tail_latency_s)

    def _best(self, active: frozenset[Stage], draining: bool, load: LoadEstimate) -> Prediction:
        bucket = int(math.log(max(load.lam_rps, 1e-3)) / self._log_bucket)
        key = (active, draining, bucket)
        if key not in self._cache:
            frontier = self.pareto_frontier(active, draining, load)
            need = load.lam_rps * (1.0 + self.capacity_margin)
            ok = [p for p in frontier if p.capacity_rps >= need and math.isfinite(p.tail_latency_s)]
            self._cache[key] = ok[0] if ok else max(frontier, key=lambda p: p.capacity_rps)
        return self._cache[key]

    def _best_at(
        self, active: frozenset[Stage], draining: bool, lam: float, now_s: float
    ) -> Prediction:
        """``_best`` for the load at ``now_s`` whose arrival rate is ``lam``; the full load
        estimate is built only when the plan cache misses."""
        best = self._cache.get((active, draining, int(math.log(max(lam, 1e-3)) / self._log_bucket)))
        return best if best is not None else self._best(active, draining, self.load_estimate(now_s))

    def _better_at(self, new: Prediction, cur: Prediction, lam: float) -> bool:
        if new.partition == cur.partition:
            return False
        if cur.capacity_rps < lam * (1.0 + self.capacity_margin) <= new.capacity_rps:
            return True
        return new.tail_latency_s < (1.0 - self.hysteresis) * cur.tail_latency_s
