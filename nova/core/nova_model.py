"""The ``nova`` policy's decision space (``Mode``) and the one queueing model that scores it.

Torch-free and clock-free: plain arithmetic on a load estimate and a cost model's answers
(``nova.cost.base.CostModel``). ``docs/scheduler.md`` states the model and its assumptions.

A mode is one way to run the GPU:

- ``spatial``: decode on a slice of ``decode_vision_sms`` SMs beside vision, or
  ``decode_prefill_sms`` beside prefill, the compute stage on the exact remainder (vision and
  prefill never co-run); a stage alone gets the whole GPU; vision batches of at most
  ``vision_batch`` images. (The Nova paper's A6000 operating points: 24 beside vision, 30 beside
  prefill.)
- ``chunked``: time-sliced fused steps, every decoding sequence's next token plus prompt chunks
  up to ``token_budget`` tokens (what ``chunked_prefill`` does).
- ``prefill_first``: time-sliced, the whole GPU to one stage at a time, vision and prefill first,
  one decode step after at most ``limit`` front batches in a row (what ``pf_limit`` does).
- ``decode_first``: time-sliced, the whole device to one stage at a time, decode whenever a
  sequence decodes (run to completion: front work waits for the decode set to drain), vision
  batches of at most ``vision_batch`` images. Only offered on a device too coarse to split
  usefully (``NovaPolicy``), where it keeps decode steps free of front work.

Every mode is scored by the same model: the front stages (vision + prefill) are an M/G/1 queue
whose service time per request is what the mode makes it, decode is a batch server whose step
time depends on what it runs beside, and the two are coupled through the decode batch size
(Little's law) and the fraction of time the front is busy. See ``QueueModel.predict``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from nova.cost.base import CostModel, StageWork
from nova.types import Stage

SPATIAL, CHUNKED, PREFILL_FIRST = "spatial", "chunked", "prefill_first"
DECODE_FIRST = "decode_first"
MODE_KINDS = (SPATIAL, CHUNKED, PREFILL_FIRST, DECODE_FIRST)


@dataclass(slots=True, frozen=True)
class Mode:
    """One operating mode (see the module doc). Fields that do not apply to ``kind`` are 0."""

    kind: str
    decode_vision_sms: int = 0
    decode_prefill_sms: int = 0
    vision_batch: int = 0
    token_budget: int = 0
    limit: int = 0

    def __post_init__(self) -> None:
        if self.kind not in MODE_KINDS:
            raise ValueError(f"unknown mode kind {self.kind!r}; choose one of {MODE_KINDS}")
        if self.kind == SPATIAL and min(self.decode_vision_sms, self.decode_prefill_sms) < 1:
            raise ValueError(f"a spatial mode needs decode SMs >= 1 beside each stage: {self}")
        if self.kind in (SPATIAL, PREFILL_FIRST, DECODE_FIRST) and self.vision_batch < 1:
            raise ValueError(f"{self.kind} mode needs vision_batch >= 1: {self}")
        if self.kind == CHUNKED and self.token_budget < 1:
            raise ValueError(f"a chunked mode needs token_budget >= 1: {self}")
        if self.kind == PREFILL_FIRST and self.limit < 1:
            raise ValueError(f"a prefill_first mode needs limit >= 1: {self}")

    @classmethod
    def spatial(cls, decode_vision_sms: int, decode_prefill_sms: int, vision_batch: int) -> Mode:
        return cls(SPATIAL, decode_vision_sms, decode_prefill_sms, vision_batch=vision_batch)

    @classmethod
    def chunked(cls, token_budget: int) -> Mode:
        return cls(CHUNKED, token_budget=token_budget)

    @classmethod
    def prefill_first(cls, limit: int, vision_batch: int) -> Mode:
        return cls(PREFILL_FIRST, vision_batch=vision_batch, limit=limit)

    @classmethod
    def decode_first(cls, vision_batch: int) -> Mode:
        return cls(DECODE_FIRST, vision_batch=vision_batch)

    @property
    def time_sliced(self) -> bool:
        return self.kind != SPATIAL

    @property
    def label(self) -> str:
        """``spatial:24:30:1`` / ``chunked:128`` / ``prefill_first:4:8`` / ``decode_first:8``
        (``Mode.parse``)."""
        if self.kind == DECODE_FIRST:
            return f"{DECODE_FIRST}:{self.vision_batch}"
        if self.kind == SPATIAL:
            return (
                f"{SPATIAL}:{self.decode_vision_sms}:{self.decode_prefill_sms}:{self.vision_batch}"
            )
        if self.kind == CHUNKED:
            return f"{CHUNKED}:{self.token_budget}"
        return f"{PREFILL_FIRST}:{self.limit}:{self.vision_batch}"

    @classmethod
    def parse(cls, label: str) -> Mode:
        """The inverse of ``label``; ``ValueError`` naming the forms for anything else."""
        kind, *raw = label.strip().split(":")
        forms = "spatial:DV:DP:VB, chunked:BUDGET, prefill_first:LIMIT:VB or decode_first:VB"
        try:
            nums = [int(x) for x in raw]
            if kind == SPATIAL and len(nums) == 3:
                return cls.spatial(*nums)
            if kind == CHUNKED and len(nums) == 1:
                return cls.chunked(nums[0])
            if kind == PREFILL_FIRST and len(nums) == 2:
                return cls.prefill_first(*nums)
            if kind == DECODE_FIRST and len(nums) == 1:
                return cls.decode_first(nums[0])
        except ValueError as exc:
            raise ValueError(f"bad mode {label!r} ({exc}); expected {forms}") from exc
        raise ValueError(f"bad mode {label!r}; expected {forms}")


@dataclass(slots=True, frozen=True)
class LoadEstimate:
    """What the policy has observed, as means per request. ``backlog`` counts requests waiting
    for (or in) the front stages now: a burst shows up there before any rate estimate moves."""

    lam_rps: float
    image_fraction: float
    images_per_request: float  # among requests with images
    text_tokens: float
    output_tokens: float
    output_tokens_tail: float = 0.0  # a high quantile of output tokens (0: the mean)
    backlog: int = 0
    prompt_cv2: float = 0.0  # squared coefficient of variation of prompt tokens
    arrival_cv2: float = 1.0  # squared coefficient of variation of inter-arrival gaps (Poisson 1)
    # the arrivals are significantly burstier than Poisson (the policy's test): they come in
    # clusters whose drain makes the tail (``cluster_quantile``)
    clustered: bool = False


@dataclass(slots=True, frozen=True)
class Prediction:
    """The model's answer for one mode at one load (seconds; requests per second)."""

    mode: Mode
    mean_latency_s: float
    tail_latency_s: float  # p99 of end-to-end latency, or the backlog's drain, if larger
    capacity_rps: float
    front_service_s: float  # mean front (vision + prefill) server time per request
    time_per_token_s: float
    decode_batch: float
    # seconds per decode token while the front is busy (the front's time per request over the
    # tokens decode gets meanwhile): how fast a request decodes inside a cluster of arrivals
    busy_time_per_token_s: float = math.inf

    @property
    def feasible(self) -> bool:
        return math.isfinite(self.tail_latency_s)

    @property
    def score_s(self) -> float:
        """What nova minimizes: predicted tail plus mean latency (both matter; the tail alone
        cannot tell apart modes whose tails are within the model's error)."""
        return self.tail_latency_s + self.mean_latency_s


@dataclass(slots=True, frozen=True)
class _Front:
    """The front server (vision + prefill) as a mode makes it: service per image request and
    per text-only request (seconds of front time, decode's interruptions included), decode
    tokens produced per request's front time, extra wait before service starts, capacity."""

    image_s: float
    text_s: float
    image_fraction: float
    tokens: float
    extra_wait_s: float
    capacity_rps: float
    busy_s: float  # mean front time per request while decode runs beside it
    tail_s: float  # an image request's front time when decode runs beside it (the slow case)

    @property
    def mean_s(self) -> float:
        f = self.image_fraction
        return f * self.image_s + (1 - f) * self.text_s


@dataclass(slots=True, frozen=True)
class ModelLimits:
    """The engine's batch caps the model needs (``StageLimits``' values)."""

    max_num_seqs: int = 64
    max_prefill_tokens: int = 4096
    max_vision_images: int = 8


class QueueModel:
    """Scores modes with one queueing model on a cost model's stage times.

    ``num_sms``: the device's SMs (a mode's SM counts are shares of it). ``image_tokens``: prompt
    tokens per image. ``cv2``: squared coefficient of variation of a request's front service
    time beyond what the mix of image and text-only requests and the observed spread of prompt
    lengths (``LoadEstimate.prompt_cv2``) explain. ``tail_quantile``: the
    latency quantile scored as "tail". ``unlucky_quantile``: the quantile of the arrivals during
    one request's decode that the tail prices (``_unlucky_span_s``). ``tail_window_requests``:
    the run of requests whose tail is scored (None: the stationary tail). Near saturation the
    queue relaxes to its steady state more slowly than such a run lasts, and the run's tail is
    its longest excursion (``window_max_wait``), below the stationary quantile.
    """

    def __init__(
        self,
        cost: CostModel,
        num_sms: int,
        image_tokens: int,
        limits: ModelLimits | None = None,
        cv2: float = 0.05,
        tail_quantile: float = 0.995,
        # 0.995, not 0.99: over the full evaluation 51 of 61 points pass against 50, none lost
        # (benchmarks/results/eval_quantile/summary.md, q0.995/; benchmarks/results/eval/
        # summary.md); 0.998 passes 50 (two points gained, two lost: eval_quantile/q0.998/).
        unlucky_quantile: float = 0.995,
        rho_cap: float = 0.95,
        overload_horizon_s: float = 60.0,
        tail_window_requests: float | None = 1000.0,
        window_mean: bool = False,
    ) -> None:
        self.cost = cost
        self.num_sms = num_sms
        self.image_tokens = image_tokens
        self.limits = limits or ModelLimits()
        self.cv2 = cv2
        self.tail_quantile = tail_quantile
        self.unlucky_quantile = unlucky_quantile
        self.rho_cap = rho_cap
        self.overload_horizon_s = overload_horizon_s
        self.tail_window_requests = tail_window_requests
        # the mean wait of a window of ``tail_window_requests`` from an empty queue, not the
        # steady state's (``window_mean_ratio``); off: Pollaczek-Khinchine's
        self.window_mean = window_mean
        self._memo: dict[tuple[object, ...], float] = {}

    # -- stage times ---------------------------------------------------------------------------
    def _time(
        self, work: StageWork, share: float, co: Sequence[tuple[StageWork, float]] = ()
    ) -> float:
        key = (work.totals_key(), share, tuple((w.totals_key(), s) for w, s in co))
        t = self._memo.get(key)
        if t is None:
            if len(self._memo) > 50_000:
                self._memo.clear()
            t = self._memo[key] = self.cost.time_s(work, share, co, True)
        return t

    @staticmethod
    def _decode_work(batch: float, context: float) -> StageWork:
        b = max(1, round(batch))
        return StageWork(
            Stage.DECODE, new_tokens=(1,) * b, context_lens=(max(1, round(context)),) * b
        )

    @staticmethod
    def _prefill_work(tokens: float) -> StageWork:
        n = max(1, round(tokens))
        return StageWork(Stage.PREFILL, new_tokens=(n,), context_lens=(n,))

    @staticmethod
    def _mixed_work(batch: float, chunk: float, chunk_context: float, context: float) -> StageWork:
        """A fused step: ``batch`` decode tokens plus one prompt chunk of ``chunk`` tokens whose
        KV after the step holds ``chunk_context`` tokens."""
        b = max(0, round(batch))
        c = max(1, round(chunk))
        ctx = max(1, round(context))
        return StageWork(
            Stage.PREFILL,
            new_tokens=(1,) * b + (c,),
            context_lens=(ctx,) * b + (max(c, round(chunk_context)),),
        )

    # -- the model -------------------------------------------------------------------------------
    def predict(self, mode: Mode, load: LoadEstimate) -> Prediction:
        """Mean and tail latency and capacity of ``mode`` at ``load``. The decode batch and the
        decode span depend on each other (Little's law: batch = rate x span): a few fixed-point
        rounds from a batch of one."""
        if mode.kind == DECODE_FIRST:
            return self._decode_first(mode, load)
        front_of = {SPATIAL: self._spatial, CHUNKED: self._chunked}.get(
            mode.kind, self._prefill_first
        )
        lam = load.lam_rps
        max_seqs = float(self.limits.max_num_seqs)
        decoding = busy = 0.0
        pred: Prediction | None = None
        for _ in range(5):
            front, step_s = front_of(mode, load, decoding, busy)
            busy = min(1.0, lam * front.mean_s)
            pred = self._finish(mode, load, front, step_s, max(1.0, decoding))
            if not pred.feasible:
                return pred
            span = pred.time_per_token_s * max(1.0, load.output_tokens)
            new_decoding = min(lam * span, max_seqs)
            if lam * span > max_seqs:  # decode cannot hold everyone decoding: its capacity binds
                cap = max_seqs / span
                if cap < lam:
                    return replace(
                        pred,
                        mean_latency_s=math.inf,
                        tail_latency_s=math.inf,
                        capacity_rps=min(pred.capacity_rps, cap),
                    )
            if abs(new_decoding - decoding) < 0.25:
                break
            decoding = new_decoding
        assert pred is not None
        return pred

    def _shape(self, load: LoadEstimate) -> tuple[float, float, float, float, float, float]:
        """(f, m, prompt tokens of an image request, of a text request, mean decode context,
        output tokens)."""
        f = min(1.0, max(0.0, load.image_fraction))
        m = max(1.0, load.images_per_request)
        text = max(1.0, load.text_tokens)
        n = max(1.0, load.output_tokens)
        prompt_img = text + m * self.image_tokens
        prompt_mean = f * prompt_img + (1 - f) * text
        return f, m, prompt_img, text, prompt_mean + n / 2, n

    def _decode_span_s(
        self, lam: float, n: float, sojourn_s: float, front: _Front, step_s: float
    ) -> float:
        """Seconds a request needs for its ``n`` output tokens after its prefill.

        Decode shares the GPU with the front work that arrives meanwhile: the requests queued
        behind it when its prefill ends (``lam * sojourn_s`` of them on average, Little's law)
        and those arriving during its decode. Each request's front work takes ``front.busy_s``,
        during which decode gets ``front.tokens`` tokens (a chunked step's decode tokens, a
        forced decode step, or decode on its slice beside the compute stage); with the front
        idle a token takes ``step_s``. The rest of the front time blocks decode, like
        high-priority work in a preemptive-priority queue: the span is a delay busy period,
        ``X = (b B + n t1) / (1 - lam b)`` for ``B`` requests queued and ``b`` blocking seconds
        each; if the front alone supplies every token, ``X = n S / k`` (front busy throughout).
        The queue is empty at the prefill's end with probability ``1 - rho`` (M/G/1: departures
        see the time-average queue), so ``X`` is the mixture of the empty and non-empty cases.
        """
        rho = min(1.0, lam * front.mean_s)
        backlog = lam * sojourn_s
        if rho <= 0.0:
            return self._span_behind(lam, n, backlog, front, step_s)
        return (1.0 - rho) * self._span_behind(lam, n, 0.0, front, step_s) + rho * (
            self._span_behind(lam, n, backlog / rho, front, step_s)
        )

    @staticmethod
    def _span_behind(lam: float, n: float, backlog: float, front: _Front, step_s: float) -> float:
        """``_decode_span_s`` with ``backlog`` requests queued at the prefill's end."""
        s_busy, k = front.busy_s, front.tokens
        blocking = s_busy - k * step_s  # front time per request beyond what decode gets
        denom = 1.0 - lam * blocking
        if denom <= 0:
            return math.inf
        full = n * s_busy / k if k > 0 else math.inf
        floor = n * min(step_s, s_busy / k if k > 0 else step_s)
        return max(floor, min(full, (backlog * blocking + n * step_s) / denom))

    def _burst_tail(
        self,
        lam: float,
        n_tail: float,
        behind: float,
        service_s: float,
        s_tail: float,
        front: _Front,
        step_s: float,
    ) -> float:
        """The worse end of a burst with ``behind`` requests after its first, each served in
        ``service_s``: its first request decodes while the rest of it is served; its last waits
        for all of it first."""
        drain = behind * service_s
        first = s_tail + self._span_behind(lam, n_tail, behind, front, step_s)
        last = drain + s_tail + self._span_behind(lam, n_tail, lam * drain, front, step_s)
        return max(first, last)

    def _unlucky_span_s(
        self,
        lam: float,
        n: float,
        mean_span_s: float,
        front: _Front,
        step_s: float,
        arrival_cv2: float = 1.0,
    ) -> float:
        """The decode span of a request that meets many arrivals while it decodes: as many as
        the ``unlucky_quantile`` (0.995: about the worst of 200) of a Poisson count with mean
        ``lam * span`` (a fixed point from ``mean_span_s``; bursty arrivals widen the count's
        excess over its mean by ``sqrt(arrival_cv2)``, a renewal count's dispersion), each
        blocking decode for its front time beyond the tokens it yields. At low load this, not
        the queue, makes the tail: a mode whose front stalls decode (a vision step, a long
        fused step) hurts the requests that happen to overlap with others."""
        k = front.tokens
        blocking = max(0.0, front.busy_s - k * step_s)
        cap = n * front.busy_s / k if k > 0 else math.inf
        span = mean_span_s
        for _ in range(3):  # the longer the span, the more requests arrive during it
            mean = lam * span
            arrivals: float = poisson_quantile(mean, self.unlucky_quantile)
            if arrival_cv2 > 1.0:
                arrivals = mean + (arrivals - mean) * math.sqrt(arrival_cv2)
            span = min(cap, n * step_s + arrivals * blocking)
        return span

    def _finish(
        self, mode: Mode, load: LoadEstimate, front: _Front, step_s: float, batch: float
    ) -> Prediction:
        """Latency = front wait (M/G/1, Pollaczek-Khinchine over the two request classes) +
        own front service + the decode span; the tail uses the waiting time's exponential tail
        with its Cramer-Lundberg decay rate (``_decay_rate``), a high quantile of output tokens
        and an unlucky decode span (``_unlucky_span_s``).
        A backlog bounds the tail from below: its last request waits for all of it."""
        lam = load.lam_rps
        f, _, _, _, _, n = self._shape(load)
        s_mean = front.mean_s
        rho = lam * s_mean
        if not math.isfinite(s_mean) or s_mean <= 0:
            return Prediction(mode, math.inf, math.inf, front.capacity_rps, s_mean, math.inf, batch)
        # Overloaded (rho >= 1): the queue grows at lam - 1/S requests per second; over the
        # ``overload_horizon_s`` a plan holds, the last request waits that much longer (a
        # finite penalty, so that among modes that are all overloaded the one that serves the
        # overload best wins, not the one with the most capacity whatever it does to decode).
        overload_s = max(0.0, lam - 1.0 / s_mean) * self.overload_horizon_s * s_mean
        if rho > self.rho_cap:
            # Near saturation the steady state is out of reach: an M/G/1 queue relaxes to it
            # in ~ E[S] / (1 - sqrt(rho))^2 (thousands of services at rho = 0.95), far longer
            # than a plan holds. Queue terms are taken at ``rho_cap``; the capacity guard, not
            # a 1/(1 - rho) blow-up, keeps modes below their capacity.
            lam, rho = self.rho_cap / s_mean, self.rho_cap
        s_img, s_txt = front.image_s, front.text_s
        second = (f * s_img * s_img + (1 - f) * s_txt * s_txt) * (1.0 + self.cv2 + load.prompt_cv2)
        # Arrivals burstier than Poisson: Kingman's GI/G/1 approximation scales the M/G/1 wait
        # by (ca2 + cs2) / (1 + cs2), and the waiting tail's decay rate by its inverse (the
        # heavy-traffic diffusion limit)
        cs2 = max(0.0, second / (s_mean * s_mean) - 1.0)
        burst = max(1.0, (load.arrival_cv2 + cs2) / (1.0 + cs2))
        q = self.tail_quantile
        var = self.cv2 + load.prompt_cv2
        eta = _decay_rate(lam, ((f, s_img), (1.0 - f, s_txt)), var) / burst
        window = self.tail_window_requests
        queued = lam * second * burst / (2.0 * (1.0 - rho)) if lam > 0 else 0.0
        if self.window_mean and window and lam > 0 and rho < 1.0 and eta > 0:
            # a window of requests from an empty queue: its mean wait, not the steady state's
            queued *= window_mean_ratio(rho, eta, window / lam)
        wait = queued + front.extra_wait_s
        tail_wait = front.extra_wait_s
        if rho > 1.0 - q and eta > 0:
            stationary = math.log(rho / (1.0 - q)) / eta
            if window and lam > 0 and rho < 1.0:
                # near saturation a window of requests sees its longest excursion, not the
                # stationary tail (``window_max_wait``)
                stationary = min(stationary, window_max_wait(rho, eta, window / lam))
            tail_wait += stationary
        n_tail = max(n, load.output_tokens_tail)
        s_tail = front.tail_s
        span = self._decode_span_s(lam, n, wait + s_mean, front, step_s)
        mean = wait + s_mean + span
        # Two ways to be the worst request: a long wait, and then a decode slowed by the queue
        # that built up behind it (correlated: added); or a wait and a decode that are each
        # unlucky on their own (independent: their excesses over the mean add in quadrature).
        correlated = (
            tail_wait + s_tail + self._decode_span_s(lam, n_tail, tail_wait + s_tail, front, step_s)
        )
        typical = self._decode_span_s(lam, n_tail, wait + s_tail, front, step_s)
        unlucky = self._unlucky_span_s(lam, n_tail, span, front, step_s, load.arrival_cv2)
        independent = (
            wait + s_tail + typical + math.hypot(tail_wait - wait, max(0.0, unlucky - typical))
        )
        tail = max(correlated, independent)
        if load.clustered:
            # clustered arrivals: the worst request is the last of a long cluster (arrivals
            # closer together than a front service), whatever the load. Inside a cluster the
            # earlier requests decode, so every front service runs beside decode
            # (``front.busy_s``): the mode whose front keeps its speed beside decode drains it
            # fastest.
            # A request in a cluster has on average as many requests ahead of it in the
            # cluster as behind it (geometric sizes: p / (1 - p) each): it waits for the ones
            # ahead, then decodes while the ones behind are served.
            s_busy = front.busy_s
            p_short = short_gap_probability(load.lam_rps, s_busy, load.arrival_cv2)
            others = p_short / (1.0 - p_short)
            mean = max(
                mean,
                others * s_busy + s_mean + self._span_behind(lam, n, others, front, step_s),
            )
            behind = geometric_quantile(p_short, q) - 1.0
            if behind > 0:
                # (a mode whose front steps starve decode makes the first one the worst)
                tail = max(
                    tail, self._burst_tail(lam, n_tail, behind, s_busy, s_tail, front, step_s)
                )
        if load.backlog > 1:
            tail = max(
                tail, self._burst_tail(lam, n_tail, load.backlog - 1, s_mean, s_tail, front, step_s)
            )
        return Prediction(
            mode,
            mean + overload_s / 2,
            tail + overload_s,
            front.capacity_rps,
            s_mean,
            span / n if n else 0.0,
            batch,
            front.busy_s / front.tokens if front.tokens > 0 else math.inf,
        )

    def _spatial(
        self, mode: Mode, load: LoadEstimate, decoding: float, busy: float
    ) -> tuple[_Front, float]:
        """``decoding``: sequences decoding on average (the decode batch); ``busy``: the
        fraction of time the front is busy."""
        batch = max(1.0, decoding)
        f, m, prompt_img, text, ctx, _ = self._shape(load)
        big_n = self.num_sms
        dv, dp = mode.decode_vision_sms / big_n, mode.decode_prefill_sms / big_n
        vision_batch = max(1, min(mode.vision_batch, self.limits.max_vision_images))
        img_per_batch = min(float(vision_batch), max(1.0, m))
        vision = StageWork(Stage.VISION, num_images=max(1, round(img_per_batch)))
        p_img, p_txt = self._prefill_work(prompt_img), self._prefill_work(text)
        dwork = self._decode_work(batch, ctx)
        # decode co-runs while some sequence decodes. Inside a front busy period (probability
        # ``busy``) the previous request is still decoding (its decode outlasts a front
        # service); otherwise P(>= 1 decoding), Poisson with mean ``decoding``.
        co = 1.0 - (1.0 - busy) * math.exp(-decoding)
        v_co = m * self._time(vision, 1 - dv, [(dwork, dv)]) / img_per_batch
        v_solo = m * self._time(vision, 1.0) / img_per_batch
        pi_co, pt_co = (self._time(w, 1 - dp, [(dwork, dp)]) for w in (p_img, p_txt))
        pi_solo, pt_solo = self._time(p_img, 1.0), self._time(p_txt, 1.0)
        t_v = self._time(dwork, dv, [(vision, 1 - dv)])
        t_p = self._time(dwork, dp, [(p_img, 1 - dp)])
        t_1 = self._time(dwork, 1.0)
        image_s = co * (v_co + pi_co) + (1 - co) * (v_solo + pi_solo)
        text_s = co * pt_co + (1 - co) * pt_solo
        # a decoding request sees every front beside it: front time and tokens it yields
        busy_img, busy_txt = v_co + pi_co, pt_co
        tokens = f * (v_co / t_v + pi_co / t_p) + (1 - f) * pt_co / t_p
        # an image waits for the others of its vision batch; a compute batch waits for the
        # running decode step to leave its SMs (about half a step)
        extra = (img_per_batch - 1) / 2 * v_co / m + co * t_1 / 2
        busy_mean = f * busy_img + (1 - f) * busy_txt
        front = _Front(
            image_s,
            text_s,
            f,
            tokens,
            extra,
            1.0 / busy_mean,
            busy_mean,
            busy_img if f > 0 else busy_txt,
        )
        return front, t_1

    def _chunked(
        self, mode: Mode, load: LoadEstimate, decoding: float, busy: float
    ) -> tuple[_Front, float]:
        batch = max(1.0, decoding)
        f, m, prompt_img, text, ctx, _ = self._shape(load)
        vision = self._time(StageWork(Stage.VISION, num_images=max(1, round(m))), 1.0)
        t_1 = self._time(self._decode_work(batch, ctx), 1.0)
        chunk = mode.token_budget - min(batch, float(self.limits.max_num_seqs))
        if chunk < 1:  # decode fills the budget: prompts cannot progress
            return _Front(math.inf, math.inf, f, 0.0, 0.0, 0.0, math.inf, math.inf), t_1
        prompt_mean = f * prompt_img + (1 - f) * text
        step = self._time(
            self._mixed_work(batch, min(chunk, prompt_mean), prompt_mean / 2, ctx), 1.0
        )
        # chunks of consecutive prompts share steps: steps per prompt counted fractionally
        steps_img, steps_txt = max(1.0, prompt_img / chunk), max(1.0, text / chunk)
        image_s = (vision if f > 0 else 0.0) + steps_img * step
        text_s = steps_txt * step
        tokens = f * steps_img + (1 - f) * steps_txt  # one per fused step; none in vision steps
        mean_s = f * image_s + (1 - f) * text_s
        extra = max(0.0, 1 - lam_s(load, mean_s)) * t_1 / 2  # waits for a running decode step
        tail_s = image_s if f > 0 else text_s
        return _Front(image_s, text_s, f, tokens, extra, 1.0 / mean_s, mean_s, tail_s), t_1

    def _prefill_first(
        self, mode: Mode, load: LoadEstimate, decoding: float, busy: float
    ) -> tuple[_Front, float]:
        batch = max(1.0, decoding)
        f, m, prompt_img, text, ctx, _ = self._shape(load)
        vision_batch = max(1, min(mode.vision_batch, self.limits.max_vision_images))
        img_per_batch = min(float(vision_batch), max(1.0, m))
        per_img = self._time(StageWork(Stage.VISION, num_images=max(1, round(img_per_batch))), 1.0)
        t_1 = self._time(self._decode_work(batch, ctx), 1.0)
        v_img = m * per_img / img_per_batch
        # front batches per request (vision, prefill); while the front stays busy one decode
        # step runs after every ``limit`` of them
        batches_img = math.ceil(m / img_per_batch) + 1.0
        forced_img, forced_txt = batches_img / mode.limit, 1.0 / mode.limit
        image_s = v_img + self._time(self._prefill_work(prompt_img), 1.0) + forced_img * t_1
        text_s = self._time(self._prefill_work(text), 1.0) + forced_txt * t_1
        tokens = f * forced_img + (1 - f) * forced_txt
        mean_s = f * image_s + (1 - f) * text_s
        extra = (img_per_batch - 1) / 2 * per_img / img_per_batch
        extra += max(0.0, 1 - lam_s(load, mean_s)) * t_1 / 2
        tail_s = image_s if f > 0 else text_s
        return _Front(image_s, text_s, f, tokens, extra, 1.0 / mean_s, mean_s, tail_s), t_1

    def _decode_first(self, mode: Mode, load: LoadEstimate) -> Prediction:
        """Gated cycles (a polling server with batch service): a cycle is one vision batch (at
        most ``vision_batch`` images), one prefill batch (the requests whose images it encoded
        and the text-only ones queued with them, at most ``max_prefill_tokens``), then decode
        steps until that decode set drains (``decode_first_stage``). Arrivals during a cycle
        wait for the next one, so the batch size ``b`` and the cycle time ``T(b)`` settle
        where ``b = lam T(b)`` (a fixed point): the decode drain costs about the same steps for
        one sequence or many, so unlike an M/G/1 server whose service is the decode steps
        shared by a fixed batch, the cycles grow their batches with the load until a cycle
        holds ``b_max`` requests (the vision batch's images or the prefill batch's tokens);
        the capacity is ``b_max / T(b_max)``.

        Mean latency: the residual of the cycle running at arrival (half a cycle while the
        device is busy), the queue of requests that did not fit one cycle (a bulk-service
        queue's diffusion approximation: ``sigma^2 / (2 (b_max - mu))`` requests, ``mu`` the
        arrivals per cycle, ``sigma^2`` their variance ``mu * max(1, arrival_cv2)``), then the
        request's own cycle: its front batches and its ``n`` decode steps. Tail: a request
        arriving as a gate closes waits a typical cycle (while the device is busy), then its own
        cycle holding the ``unlucky_quantile`` of a cycle's arrivals, with the tail's output
        tokens; requests beyond ``b_max`` wait further cycles. A backlog drains ``b_max``
        requests a cycle."""
        f, m, prompt_img, text, ctx, n = self._shape(load)
        n_tail = max(n, load.output_tokens_tail)
        vb = max(1, min(mode.vision_batch, self.limits.max_vision_images))
        prompt_mean = f * prompt_img + (1 - f) * text
        b_max = min(
            vb / (f * m) if f > 0 else math.inf,
            self.limits.max_prefill_tokens / prompt_mean,
            float(self.limits.max_num_seqs),
        )
        b_max = max(1.0, b_max)

        def vision_s(b: float) -> float:
            images = b * f * m
            if images <= 0:
                return 0.0
            k = max(1, round(images))
            # (fewer than one image a cycle: its expected share)
            return self._time(StageWork(Stage.VISION, num_images=k), 1.0) * images / k

        def prefill_s(b: float) -> float:
            k = max(1, round(b))
            p = max(1, round(prompt_mean))
            work = StageWork(Stage.PREFILL, new_tokens=(p,) * k, context_lens=(p,) * k)
            return self._time(work, 1.0) * max(b, 1e-9) / k

        def step_s(b: float) -> float:
            # between whole batch sizes, the mix of the two (a cycle's set is a random count)
            lo = max(1, math.floor(b))
            t_lo = self._time(self._decode_work(lo, ctx), 1.0)
            if b <= lo:
                return t_lo
            t_hi = self._time(self._decode_work(lo + 1, ctx), 1.0)
            return t_lo + (b - lo) * (t_hi - t_lo)

        def front_s(b: float) -> float:
            return vision_s(b) + prefill_s(b)

        def cycle_s(b: float) -> float:
            # a set of b sequences decodes until its longest is done: the mean's n steps for
            # one, towards the tail's for many
            b = max(1.0, b)
            drain_steps = n + (n_tail - n) * (1.0 - 1.0 / b)
            return front_s(b) + drain_steps * step_s(b)

        t_full = cycle_s(b_max)
        capacity = b_max / t_full
        lam = load.lam_rps
        lam_eff = min(lam, self.rho_cap * capacity)
        b = 1.0
        for _ in range(30):  # b = lam T(b), from a batch of one
            new_b = min(b_max, max(1.0, lam_eff * cycle_s(b)))
            if abs(new_b - b) < 0.01:
                b = new_b
                break
            b = new_b
        t_cycle = cycle_s(b)
        busy = min(1.0, lam_eff * t_cycle / b)  # the device's busy fraction
        mu = lam_eff * t_cycle  # arrivals per cycle
        dispersion = max(1.0, load.arrival_cv2)
        queued = mu * dispersion / (2.0 * max(b_max - mu, 1e-9))
        queue_wait = queued / lam_eff if lam_eff > 0 else 0.0
        own = front_s(b) + n * step_s(b)
        mean = busy * t_cycle / 2.0 + queue_wait + own
        # the tail: the cycle running at arrival, then its own cycle of the unlucky count
        others: float = poisson_quantile(mu, self.unlucky_quantile)
        others = mu + (others - mu) * math.sqrt(dispersion)
        size = min(b_max, max(1.0, others))
        extra_cycles = max(0.0, math.ceil((others + 1.0) / b_max) - 1.0)
        tail_wait = queue_wait * math.log(1.0 / (1.0 - self.tail_quantile))
        tail = (
            busy * t_cycle
            + extra_cycles * t_full
            + tail_wait
            + front_s(size)
            + n_tail * step_s(size)
        )
        if load.backlog > 1:
            rest = load.backlog % b_max or b_max
            cycles = math.ceil(load.backlog / b_max) - 1
            tail = max(tail, t_cycle + cycles * t_full + front_s(rest) + n_tail * step_s(rest))
        tail = max(tail, mean)
        # over capacity: the queue grows at lam - capacity over the horizon a plan holds
        overload_s = max(0.0, lam - capacity) * self.overload_horizon_s / capacity
        t1 = step_s(b)
        return Prediction(
            mode,
            mean + overload_s / 2,
            tail + overload_s,
            capacity,
            t_cycle / b,
            t1,
            b,
            t1,  # decode never waits for front work
        )


def _decay_rate(lam: float, classes: Sequence[tuple[float, float]], cv2: float) -> float:
    """The exponential decay rate of the M/G/1 waiting time's tail (Cramer-Lundberg):
    ``P(W > t) ~ rho exp(-eta t)`` with ``eta > 0`` solving ``lam (E[exp(eta S)] - 1) = eta``.
    ``classes``: (probability, mean service) per request class; each class's service spread
    has squared coefficient of variation ``cv2`` (a normal approximation of its moment
    generating function). 0 when the queue is unstable. For nearly deterministic service this
    is about twice the exponential approximation's rate (the M/D/1 tail)."""
    if lam <= 0:
        return math.inf

    def excess(eta: float) -> float:
        mgf = 0.0  # (a loop, not sum() over a generator: ~50 calls per plan candidate)
        for p, m in classes:
            mgf += p * math.exp(min(700.0, eta * m + 0.5 * eta * eta * cv2 * m * m))
        return lam * (mgf - 1.0) - eta

    mean = sum(p * m for p, m in classes)
    if lam * mean >= 1.0:
        return 0.0
    hi = 1.0 / max(mean, 1e-9)
    while excess(hi) < 0:
        hi *= 2.0
        if hi > 1e9:
            return hi
    lo = 0.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if excess(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# E[the longest wait over a run from an empty queue] x eta at run durations ``t`` relaxation
# times: M/D/1 at rho = 0.95 by Lindley's recursion, 300 seeds per point
# (``benchmarks/window_max_table.py`` -> ``benchmarks/results/window_max_table.md``; M/D/1 at
# rho = 0.85 and 0.9 and M/M/1 at 0.95 lie within 15% of it from t = 0.35 on, and below it but
# for M/M/1, 0-2% above).
WINDOW_MAX_T = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 35.0, 60.0)
WINDOW_MAX_G = (
    0.558, 0.823, 1.102, 1.286, 1.521, 1.684, 1.975, 2.186, 2.488, 2.929, 3.381, 3.731,
    4.282, 4.807, 5.271,
)  # fmt: skip


def window_max_wait(rho: float, eta: float, duration_s: float) -> float:
    """The expected longest wait a run of ``duration_s`` seconds sees, from an empty queue at
    utilization ``rho`` with waiting-tail decay rate ``eta``: heavy-traffic units, the run's
    length in relaxation times ``t = duration / tau`` with ``tau = 2 / ((1 - rho) eta)`` (a
    reflected Brownian motion's time scale), and the wait in units of ``1 / eta``, read from
    ``WINDOW_MAX_G`` (log-linear between points; ``ln t`` growth beyond the table, the maximum
    of ``t`` roughly independent excursions; ``sqrt(t)`` below it, a free Brownian motion's
    reach)."""
    tau = 2.0 / ((1.0 - rho) * eta)
    t = duration_s / tau
    ts, gs = WINDOW_MAX_T, WINDOW_MAX_G
    if t <= ts[0]:
        g = gs[0] * math.sqrt(max(t, 0.0) / ts[0])
    elif t >= ts[-1]:
        g = gs[-1] + math.log(t / ts[-1])
    else:
        g = _log_interp(t, gs)
    return g / eta


def _log_interp(t: float, values: Sequence[float]) -> float:
    """``values`` (one per ``WINDOW_MAX_T``) at ``t`` inside the grid, linear in ``log t``."""
    ts = WINDOW_MAX_T
    i = bisect.bisect_right(ts, t)
    w = math.log(t / ts[i - 1]) / math.log(ts[i] / ts[i - 1])
    return values[i - 1] + w * (values[i] - values[i - 1])


# E[the mean wait over a run from an empty queue] / the stationary (Pollaczek-Khinchine) mean
# wait, at the same ``t`` as ``WINDOW_MAX_T``: M/D/1 at rho = 0.95 by Lindley's recursion, 300
# seeds per point (``benchmarks/window_max_table.py`` -> ``benchmarks/results/
# window_max_table.md``, "A run's mean wait"; M/D/1 at 0.85 and 0.9 lie below it or within 1%
# up to t = 3, M/M/1 at 0.95 within 4%)
WINDOW_MEAN_R = (
    0.235, 0.336, 0.446, 0.517, 0.592, 0.639, 0.709, 0.769, 0.824, 0.872, 0.910, 0.931,
    0.972, 0.990, 0.986,
)  # fmt: skip


def window_mean_ratio(rho: float, eta: float, duration_s: float) -> float:
    """The mean wait of a run of ``duration_s`` seconds from an empty queue over the stationary
    mean wait, at utilization ``rho`` with waiting-tail decay rate ``eta``: ``WINDOW_MEAN_R`` at
    ``t = duration / tau`` (``window_max_wait``'s units), log-linear between points, ``sqrt(t)``
    below the table (a free Brownian motion's mean reach), 1 beyond it. At most 1."""
    t = duration_s * (1.0 - rho) * eta / 2.0
    ts, rs = WINDOW_MAX_T, WINDOW_MEAN_R
    if t <= ts[0]:
        return rs[0] * math.sqrt(max(t, 0.0) / ts[0])
    if t >= ts[-1]:
        return 1.0
    return min(1.0, _log_interp(t, rs))


_POISSON_QUANTILES: dict[tuple[float, float], int] = {}


def gamma_cdf(x: float, shape: float, rate: float) -> float:
    """P(G <= x) for a gamma variable with ``shape`` and ``rate``: the regularized lower
    incomplete gamma function by its power series (terms fall once n > x; arguments here are
    well under 50)."""
    z = rate * x
    if z <= 0.0:
        return 0.0
    if z > 50.0:
        return 1.0
    term = 1.0 / shape
    total = term
    n = 1
    while n < 500:
        term *= z / (shape + n)
        total += term
        if term < 1e-12 * total:
            break
        n += 1
    return min(1.0, math.exp(shape * math.log(z) - z - math.lgamma(shape)) * total)


def short_gap_probability(lam: float, service_s: float, arrival_cv2: float) -> float:
    """P(gap < ``service_s``) for gamma-distributed gaps with mean ``1 / lam`` and squared CV
    ``arrival_cv2`` (Poisson: the exponential), at most 0.999 (so clusters stay finite)."""
    if lam <= 0.0 or service_s <= 0.0 or not math.isfinite(service_s):
        return 0.0
    shape = 1.0 / max(arrival_cv2, 1e-3)
    return min(0.999, gamma_cdf(service_s, shape, lam * shape))


def cluster_quantile(lam: float, service_s: float, arrival_cv2: float, q: float) -> float:
    """The ``q`` quantile of a cluster's size: consecutive arrivals whose gaps are shorter than
    ``service_s``, so that each finds the previous one still in service. Gaps are taken as
    gamma-distributed with mean ``1 / lam`` and squared CV ``arrival_cv2`` (Poisson: the
    exponential); a gap is short with probability ``p``, and a cluster's size is geometric:
    ``P(size > k) = p ** k``. Bursty gaps at low load are mostly tiny and sometimes huge, so
    ``p`` stays high while the rate is low: clusters, not the utilization, make the tail."""
    return geometric_quantile(short_gap_probability(lam, service_s, arrival_cv2), q)


def geometric_quantile(p: float, q: float) -> float:
    """The ``q`` quantile of a size with ``P(size > k) = p ** k`` (1 when ``p`` is 0)."""
    if p <= 0.0:
        return 1.0
    return 1.0 + math.log(1.0 - q) / math.log(p)


def poisson_quantile(mean: float, q: float) -> int:
    """The smallest k with P(Poisson(mean) <= k) >= q, for ``mean`` rounded to 0.05 (memoized;
    a normal approximation above 50)."""
    mean = round(mean * 20.0) / 20.0
    if mean <= 0.0:
        return 0
    key = (mean, q)
    k = _POISSON_QUANTILES.get(key)
    if k is not None:
        return k
    if mean > 50.0:
        z = 2.878 if q >= 0.998 else 2.326 if q >= 0.99 else 1.645  # normal quantiles
        k = math.ceil(mean + z * math.sqrt(mean))
    else:
        term = cdf = math.exp(-mean)
        k = 0
        while cdf < q:
            k += 1
            term *= mean / k
            cdf += term
    if len(_POISSON_QUANTILES) < 100_000:
        _POISSON_QUANTILES[key] = k
    return k


def lam_s(load: LoadEstimate, service_s: float) -> float:
    """Utilization ``lam * service``."""
    return load.lam_rps * service_s
