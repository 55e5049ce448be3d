"""``nova``: adaptive SM partitioning on the latency-throughput Pareto frontier.

Each stage (vision, prefill, decode) runs on its own SM share. The policy re-plans the shares as
load changes:

1. **Load estimate.** From the requests it has seen (their arrival times, images, prompt and
   output lengths) it keeps the arrival rate ``lam_rps`` over a sliding window and the mean
   request shape.
2. **Candidates.** For every set of *active* stages (those with waiting or running work) it
   enumerates partitions on the GPU's SM granularity: the decode share ``d`` on a grid, and the
   rest split between vision and prefill (in a few ratios when both are active). Shares of
   idle stages go to the active ones.
3. **Prediction** for each candidate, from the cost model (``time_s(work, share, co_running,
   isolated=True)``, which includes bandwidth interference between co-running stages):
   - vision and prefill are M/G/1 queues (Pollaczek-Khinchine): ``W = lam E[S^2] / (2 (1 - rho))``
     with ``E[S^2] = S^2 (1 + cv2)``; ``rho >= 1`` means the partition cannot carry the load;
   - decode is a batch server: its batch size ``B`` solves Little's law ``B = lam * n_out *
     T(B)`` (fixed point), and a request spends ``n_out * T(B)``;
   - tail latency: each queue's waiting time is taken as exponential with the P-K mean
     (heavy-traffic approximation), so its 99th percentile is ``W / rho * ln(100 rho)``, summed
     over the queues (conservative) plus service and decode times;
   - capacity (requests/s): the smallest of the stages' service rates.
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

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from nova.core.policy import BatchPlan, Policy, StageLimits, _plan, register_policy
from nova.core.scheduler import SchedulerState
from nova.types import Partition, Stage


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
    arrivals_s: deque = field(default_factory=deque)
    text_tokens: float = 200.0
    output_tokens: float = 50.0
    image_fraction: float = 1.0
    images_per_request: float = 1.0
    num_seen: int = 0


def _stage_shares(active: frozenset[Stage], decode: float, vision_frac: float) -> Partition:
    """A partition over the active stages; idle stages get a token share (never used)."""
    rest = 1.0 - decode if Stage.DECODE in active else 1.0
    has_v, has_p = Stage.VISION in active, Stage.PREFILL in active
    v = rest * vision_frac if has_v and has_p else (rest if has_v else 0.0)
    p = rest - v if has_p else 0.0
    d = decode if Stage.DECODE in active else 0.0
    eps = 1e-3  # Partition needs (0, 1]; an idle stage's share is irrelevant
    return Partition(vision=max(v, eps), prefill=max(p, eps), decode=max(d, eps), name="nova")


@register_policy("nova")
class NovaPolicy(Policy):
    def __init__(
        self,
        limits: StageLimits | None = None,
        cost_model: Any | None = None,
        image_tokens: int = 576,
        sm_granularity_share: float = 1 / 14,
        min_decode_share: float = 1 / 7,
        alpha: int = 4,
        capacity_margin: float = 0.1,
        hysteresis: float = 0.05,
        replan_rate_change: float = 0.15,
        rate_window_s: float = 60.0,
        cv2: float = 0.3,
        vision_fracs: tuple[float, ...] = (0.3, 0.5, 0.7),
    ) -> None:
        if cost_model is None:
            raise ValueError("the nova policy needs a cost model (nova.cost) to predict stage times")
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
        self.vision_fracs = vision_fracs
        self._obs = _Observed()
        self._seen: set[str] = set()
        self._plan_lam: float | None = None
        self._plan_draining: bool | None = None
        self._current: dict[tuple[frozenset[Stage], bool], Prediction] = {}
        self._cache: dict[tuple[frozenset[Stage], bool, int], Prediction] = {}
        self.num_replans = 0

    # -- the Policy interface ------------------------------------------------------------------
    def next_batch(self, stage: Stage, state: SchedulerState, now_s: float) -> BatchPlan | None:
        return _plan(stage, state, self.limits)

    def partition(self, state: SchedulerState, now_s: float) -> Partition:
        self._observe(state, now_s)
        active = frozenset(s for s in Stage if state.num_in_stage(s) > 0 or state.running[s] is not None)
        if not active:
            return state.partition
        draining = (len(state.queue(Stage.VISION)) + len(state.queue(Stage.PREFILL))) >= self.alpha
        load = self.load_estimate(now_s)
        if (self._plan_lam is None or draining != self._plan_draining
                or abs(load.lam_rps - self._plan_lam) > self.replan_rate_change * max(self._plan_lam, 1e-3)):
            self._plan_lam, self._plan_draining = load.lam_rps, draining
            self._current = {k: v for k, v in self._current.items() if k[1] == draining}
            self.num_replans += 1
        key = (active, draining)
        best = self._best(active, draining, load)
        current = self._current.get(key)
        if current is None or self._better(best, current, load):
            self._current[key] = best
        return self._current[key].partition

    # -- load ----------------------------------------------------------------------------------
    def _observe(self, state: SchedulerState, now_s: float) -> None:
        obs = self._obs
        for req in state.requests.values():
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
        n = len(obs.arrivals_s)
        if n < 2:
            lam = 0.0
        else:
            span = max(now_s - obs.arrivals_s[0], obs.arrivals_s[-1] - obs.arrivals_s[0], 1e-6)
            lam = (n - 1) / span if span < self.rate_window_s else n / self.rate_window_s
        return LoadEstimate(lam, obs.image_fraction, obs.images_per_request, obs.text_tokens, obs.output_tokens)

    # -- prediction ------------------------------------------------------------------------------
    def _works(self, load: LoadEstimate, decode_batch: float) -> dict[Stage, Any]:
        from nova.cost.base import StageWork

        n_img = max(1, round(load.images_per_request))
        prompt = int(load.text_tokens + load.image_fraction * n_img * self.image_tokens)
        ctx = prompt + int(load.output_tokens / 2)
        b = max(1, round(decode_batch))
        return {
            Stage.VISION: StageWork(Stage.VISION, num_images=n_img),
            Stage.PREFILL: StageWork(Stage.PREFILL, new_tokens=(max(1, prompt),), context_lens=(max(1, prompt),)),
            Stage.DECODE: StageWork(Stage.DECODE, new_tokens=(1,) * b, context_lens=(ctx,) * b),
        }

    def _time(self, stage: Stage, part: Partition, works: dict[Stage, Any], active: frozenset[Stage]) -> float:
        others = [(works[s], part.share(s)) for s in active if s is not stage]
        return self.cost.time_s(works[stage], part.share(stage), others, True)

    def predict(self, part: Partition, active: frozenset[Stage], load: LoadEstimate) -> Prediction:
        lam = load.lam_rps
        n_out = max(1.0, load.output_tokens)
        batch = 1.0
        works = self._works(load, batch)
        t_step = self._time(Stage.DECODE, part, works, active) if Stage.DECODE in active else 0.0
        for _ in range(6):  # Little's law fixed point for the decode batch
            if Stage.DECODE not in active:
                break
            batch = min(max(1.0, lam * n_out * t_step), float(self.limits.max_num_seqs))
            works = self._works(load, batch)
            t_step = self._time(Stage.DECODE, part, works, active)
        mean = tail = n_out * t_step
        capacity = batch / t_step / n_out if t_step > 0 else math.inf
        if Stage.DECODE in active and batch >= self.limits.max_num_seqs and lam * n_out * t_step > batch:
            capacity = min(capacity, self.limits.max_num_seqs / t_step / n_out)
        for stage, lam_s in ((Stage.VISION, lam * load.image_fraction), (Stage.PREFILL, lam)):
            if stage not in active:
                continue
            service = self._time(stage, part, works, active)
            capacity = min(capacity, (1.0 / service) * (lam / lam_s if lam_s > 0 else math.inf))
            rho = lam_s * service
            if rho >= 1.0:
                return Prediction(part, math.inf, math.inf, capacity, batch)
            wait = lam_s * service * service * (1.0 + self.cv2) / (2.0 * (1.0 - rho))
            weight = load.image_fraction if stage is Stage.VISION else 1.0
            mean += weight * (wait + service)
            tail += service + (wait / rho * math.log(100 * rho) if rho > 0.01 else 0.0)
        return Prediction(part, mean, tail, capacity, batch)

    def candidates(self, active: frozenset[Stage], draining: bool) -> list[Partition]:
        if Stage.DECODE in active and len(active) > 1:
            steps = int(round(1.0 / self.grid))
            decode_shares = [k * self.grid for k in range(1, steps)
                             if k * self.grid >= self.min_decode_share - 1e-9]
            if draining:
                decode_shares = decode_shares[:1]
        else:
            decode_shares = [1.0 if active == {Stage.DECODE} else 0.0]
        fracs = self.vision_fracs if {Stage.VISION, Stage.PREFILL} <= active else (0.5,)
        return [_stage_shares(active, d, f) for d in decode_shares for f in fracs]

    def pareto_frontier(self, active: frozenset[Stage], draining: bool, load: LoadEstimate) -> list[Prediction]:
        preds = [self.predict(p, active, load) for p in self.candidates(active, draining)]
        frontier = [p for p in preds if not any(
            q.tail_latency_s <= p.tail_latency_s and q.capacity_rps >= p.capacity_rps
            and (q.tail_latency_s < p.tail_latency_s or q.capacity_rps > p.capacity_rps) for q in preds)]
        return sorted(frontier, key=lambda p: p.tail_latency_s)

    def _best(self, active: frozenset[Stage], draining: bool, load: LoadEstimate) -> Prediction:
        bucket = int(math.log(max(load.lam_rps, 1e-3)) / math.log(1.0 + self.replan_rate_change / 2))
        key = (active, draining, bucket)
        if key not in self._cache:
            frontier = self.pareto_frontier(active, draining, load)
            need = load.lam_rps * (1.0 + self.capacity_margin)
            ok = [p for p in frontier if p.capacity_rps >= need and math.isfinite(p.tail_latency_s)]
            self._cache[key] = ok[0] if ok else max(frontier, key=lambda p: p.capacity_rps)
        return self._cache[key]

    def _better(self, new: Prediction, cur: Prediction, load: LoadEstimate) -> bool:
        if new.partition == cur.partition:
            return False
        if cur.capacity_rps < load.lam_rps * (1.0 + self.capacity_margin) <= new.capacity_rps:
            return True
        return new.tail_latency_s < (1.0 - self.hysteresis) * cur.tail_latency_s
