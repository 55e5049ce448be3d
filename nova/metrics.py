"""Request latency metrics and their aggregates, shared by the engine, the benchmark client and
the simulator.

Torch- and numpy-free, and it never reads a clock: every time comes from ``Request.times``
(seconds on whichever clock the engine or simulator runs). Durations are seconds (``_s``) in the
data; the text formatters print milliseconds. ``None`` means "not defined for this request"
(e.g. no vision stage, not finished yet, failed before a stage), never an error.

Typical use::

    metrics = [request_metrics(r) for r in requests]
    summary = summarize(metrics)                 # or summarize(metrics, duration_s=wall_s)
    print(format_summary_table(summary, title="run 1"))
    json.dump(summary_to_dict(summary), f)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from nova.types import Request, RequestStatus, RequestTimes

__all__ = [
    "Distribution",
    "RequestMetrics",
    "Summary",
    "distribution",
    "format_summary_table",
    "format_timeline",
    "goodput_rps",
    "percentile",
    "request_metrics",
    "summarize",
    "summary_to_dict",
]


def _diff(end_s: float | None, start_s: float | None) -> float | None:
    if end_s is None or start_s is None:
        return None
    return end_s - start_s


# --------------------------------------------------------------------------------------------
# Per request
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestMetrics:
    """Latencies of one request, derived from its ``RequestTimes``; ``None`` where undefined.

    - ``ttft_s``: first output token - arrival.
    - ``tpot_s``: (last token - first token) / (n - 1), n = number of token times; ``None`` if n <
    2.
    - ``e2e_s``: finish - arrival (also set for aborted/failed requests that have a finish time).
    - ``itl_s``: gaps between consecutive output tokens (empty if fewer than two tokens).
    - ``vision_queue_s``: vision start - arrival; ``None`` if the vision stage never started.
    - ``vision_s``: vision end - vision start.
    - ``prefill_queue_s``: prefill start - (vision end if the vision stage ran, else arrival).
      A request whose images skipped the encoder (e.g. a cache hit) is queued from arrival.
    - ``prefill_s``: prefill end - prefill start (the first prefill; recomputes do not move it).
    - ``decode_s``: last token - first token, i.e. the whole time spent in the decode stage,
      including waits between decode steps (a separate decode *queue* time cannot be told apart
      from token times). ``None`` with fewer than two tokens (no decode step ran).
    - ``deadline_met``: ``e2e_s <= deadline_s`` for a finished request with a deadline, else
    ``None``.
    """

    request_id: str
    status: str
    num_prompt_tokens: int
    num_output_tokens: int
    num_images: int
    num_preemptions: int
    arrival_s: float
    finish_s: float | None
    deadline_s: float | None
    deadline_met: bool | None
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    itl_s: list[float] = field(default_factory=list)
    vision_queue_s: float | None = None
    vision_s: float | None = None
    prefill_queue_s: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED.value


def request_metrics(req: Request) -> RequestMetrics:
    """Metrics of one request, from ``req.times``; safe on unfinished or failed requests."""
    times = req.times if req.times is not None else RequestTimes(arrival_s=req.arrival_s)
    arrival_s = times.arrival_s
    token_s = list(times.token_s)
    first_s = token_s[0] if token_s else None
    last_s = token_s[-1] if token_s else None
    n_tok = len(token_s)

    e2e_s = _diff(times.finish_s, arrival_s)
    status = req.status.value if isinstance(req.status, RequestStatus) else str(req.status)
    deadline_met: bool | None = None
    if req.deadline_s is not None and status == RequestStatus.FINISHED.value and e2e_s is not None:
        deadline_met = e2e_s <= req.deadline_s

    prefill_base_s = times.vision_end_s if times.vision_end_s is not None else arrival_s
    decode_s = _diff(last_s, first_s) if n_tok >= 2 else None

    return RequestMetrics(
        request_id=req.request_id,
        status=status,
        num_prompt_tokens=len(req.prompt_token_ids),
        num_output_tokens=len(req.output_token_ids),
        num_images=len(req.images),
        num_preemptions=req.num_preemptions,
        arrival_s=arrival_s,
        finish_s=times.finish_s,
        deadline_s=req.deadline_s,
        deadline_met=deadline_met,
        ttft_s=_diff(first_s, arrival_s),
        tpot_s=decode_s / (n_tok - 1) if decode_s is not None else None,
        e2e_s=e2e_s,
        itl_s=[b - a for a, b in itertools.pairwise(token_s)],
        vision_queue_s=_diff(times.vision_start_s, arrival_s),
        vision_s=_diff(times.vision_end_s, times.vision_start_s),
        prefill_queue_s=_diff(times.prefill_start_s, prefill_base_s),
        prefill_s=_diff(times.prefill_end_s, times.prefill_start_s),
        decode_s=decode_s,
    )


# --------------------------------------------------------------------------------------------
# Distributions
# --------------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted, non-empty values, interpolating
    linearly between the closest ranks (numpy's default ``method="linear"``)."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q!r}")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    lo_v, hi_v = sorted_values[lo], sorted_values[hi]
    return lo_v + (hi_v - lo_v) * (pos - lo)


@dataclass(slots=True)
class Distribution:
    """Summary statistics of a list of values (seconds for latencies); all ``None`` when empty."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None
    min: float | None = None


def distribution(values: Iterable[float | None]) -> Distribution:
    """Statistics of ``values``; ``None`` entries are skipped."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return Distribution()
    return Distribution(
        count=len(xs),
        mean=math.fsum(xs) / len(xs),
        p50=percentile(xs, 50.0),
        p90=percentile(xs, 90.0),
        p99=percentile(xs, 99.0),
        max=xs[-1],
        min=xs[0],
    )


# --------------------------------------------------------------------------------------------
# Run summary
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Summary:
    """Aggregate over a run. Latency distributions cover every request whose value is defined
    (whatever its status); throughputs count finished requests only and are ``None`` when the
    duration is unknown or not positive."""

    num_requests: int
    num_finished: int
    num_aborted: int
    num_failed: int
    num_unfinished: int  # still waiting or decoding
    ttft: Distribution
    tpot: Distribution
    e2e: Distribution
    vision_queue: Distribution
    vision: Distribution
    prefill_queue: Distribution
    prefill: Distribution
    decode: Distribution
    duration_s: float | None
    num_prompt_tokens: int  # of finished requests
    num_output_tokens: int  # of finished requests
    request_throughput_rps: float | None
    output_throughput_tps: float | None
    total_throughput_tps: float | None
    deadline_violation_rate: float | None
    num_preemptions: int


def _derived_duration_s(metrics: Sequence[RequestMetrics]) -> float | None:
    """Earliest arrival to latest finish; ``None`` when nothing finished (or no requests)."""
    finishes = [m.finish_s for m in metrics if m.finish_s is not None]
    if not metrics or not finishes:
        return None
    return max(finishes) - min(m.arrival_s for m in metrics)


def _resolve_duration_s(
    metrics: Sequence[RequestMetrics], duration_s: float | None
) -> float | None:
    if duration_s is None:
        return _derived_duration_s(metrics)
    if not duration_s > 0.0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    return duration_s


def _per_s(amount: float, duration_s: float | None) -> float | None:
    if duration_s is None or duration_s <= 0.0:
        return None
    return amount / duration_s


def summarize(metrics: Sequence[RequestMetrics], duration_s: float | None = None) -> Summary:
    """Aggregate ``metrics``. ``duration_s`` defaults to earliest arrival -> latest finish."""
    metrics = list(metrics)
    duration = _resolve_duration_s(metrics, duration_s)
    finished = [m for m in metrics if m.finished]
    n_prompt = sum(m.num_prompt_tokens for m in finished)
    n_output = sum(m.num_output_tokens for m in finished)
    with_deadline = [m.deadline_met for m in finished if m.deadline_met is not None]
    violation = (
        sum(1 for met in with_deadline if not met) / len(with_deadline) if with_deadline else None
    )
    n_aborted = sum(1 for m in metrics if m.status == RequestStatus.ABORTED.value)
    n_failed = sum(1 for m in metrics if m.status == RequestStatus.FAILED.value)
    return Summary(
        num_requests=len(metrics),
        num_finished=len(finished),
        num_aborted=n_aborted,
        num_failed=n_failed,
        num_unfinished=len(metrics) - len(finished) - n_aborted - n_failed,
        ttft=distribution(m.ttft_s for m in metrics),
        tpot=distribution(m.tpot_s for m in metrics),
        e2e=distribution(m.e2e_s for m in metrics),
        vision_queue=distribution(m.vision_queue_s for m in metrics),
        vision=distribution(m.vision_s for m in metrics),
        prefill_queue=distribution(m.prefill_queue_s for m in metrics),
        prefill=distribution(m.prefill_s for m in metrics),
        decode=distribution(m.decode_s for m in metrics),
        duration_s=duration,
        num_prompt_tokens=n_prompt,
        num_output_tokens=n_output,
        request_throughput_rps=_per_s(len(finished), duration),
        output_throughput_tps=_per_s(n_output, duration),
        total_throughput_tps=_per_s(n_prompt + n_output, duration),
        deadline_violation_rate=violation,
        num_preemptions=sum(m.num_preemptions for m in metrics),
    )


def _meets(value: float | None, bound_s: float | None, *, none_ok: bool) -> bool:
    if bound_s is None:
        return True
    if value is None:
        return none_ok
    return value <= bound_s


def goodput_rps(
    metrics: Sequence[RequestMetrics],
    duration_s: float | None,
    max_ttft_s: float | None = None,
    max_tpot_s: float | None = None,
    max_e2e_s: float | None = None,
) -> float | None:
    """Finished requests per second that meet every given SLO (``value <= bound``), as vLLM's
    bench goodput. A single-token request has no TPOT and so meets any TPOT bound.
    ``duration_s=None`` derives it like ``summarize``; ``None`` is returned if it is unknown."""
    metrics = list(metrics)
    duration = _resolve_duration_s(metrics, duration_s)
    good = sum(
        1
        for m in metrics
        if m.finished
        and _meets(m.ttft_s, max_ttft_s, none_ok=False)
        and _meets(m.tpot_s, max_tpot_s, none_ok=True)
        and _meets(m.e2e_s, max_e2e_s, none_ok=False)
    )
    return _per_s(good, duration)


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def _ms(value_s: float | None, width: int, decimals: int = 2) -> str:
    if value_s is None:
        return f"{'-':>{width}}"
    return f"{value_s * 1000.0:>{width}.{decimals}f}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


_LATENCY_ROWS: tuple[tuple[str, str], ...] = (
    ("TTFT", "ttft"),
    ("TPOT", "tpot"),
    ("E2E", "e2e"),
    ("vision queue", "vision_queue"),
    ("vision", "vision"),
    ("prefill queue", "prefill_queue"),
    ("prefill", "prefill"),
    ("decode", "decode"),
)


def format_summary_table(summary: Summary, title: str = "") -> str:
    """Fixed-width text table: one row per latency metric (milliseconds), then counts and
    throughputs."""
    w = 10
    header = f"{'metric (ms)':<14}{'n':>6}" + "".join(
        f"{c:>{w}}" for c in ("mean", "p50", "p90", "p99", "max")
    )
    rule = "-" * len(header)
    lines: list[str] = []
    if title:
        lines += [title, "=" * max(len(title), len(rule))]
    lines += [header, rule]
    for label, attr in _LATENCY_ROWS:
        d: Distribution = getattr(summary, attr)
        lines.append(
            f"{label:<14}{d.count:>6}"
            + "".join(_ms(getattr(d, c), w) for c in ("mean", "p50", "p90", "p99", "max"))
        )
    lines.append(rule)
    s = summary
    lines += [
        f"requests: {s.num_requests} (finished {s.num_finished}, aborted {s.num_aborted}, "
        f"failed {s.num_failed}, unfinished {s.num_unfinished}), preemptions: {s.num_preemptions}",
        f"tokens (finished): prompt {s.num_prompt_tokens}, output {s.num_output_tokens}",
        f"duration: {_num(s.duration_s, '.3f')} s",
        f"throughput: {_num(s.request_throughput_rps, '.3f')} req/s, "
        f"output {_num(s.output_throughput_tps, '.2f')} tok/s, "
        f"total {_num(s.total_throughput_tps, '.2f')} tok/s",
        "deadline violation rate: "
        + ("-" if s.deadline_violation_rate is None else f"{s.deadline_violation_rate:.1%}"),
    ]
    return "\n".join(lines)


def format_timeline(metrics: Sequence[RequestMetrics]) -> str:
    """One line per request (sorted by arrival): arrival relative to the earliest arrival,
    then stage queue/run times, TTFT, decode and E2E, all milliseconds; tokens as prompt/output."""
    cols = (
        ("arrive_ms", "arrival"),
        ("vis_q_ms", "vision_queue_s"),
        ("vis_ms", "vision_s"),
        ("pre_q_ms", "prefill_queue_s"),
        ("pre_ms", "prefill_s"),
        ("ttft_ms", "ttft_s"),
        ("decode_ms", "decode_s"),
        ("e2e_ms", "e2e_s"),
    )
    ms_w = 10
    metrics = sorted(metrics, key=lambda m: m.arrival_s)
    id_w = max([len("id")] + [len(m.request_id) for m in metrics])
    header = (
        f"{'id':<{id_w}}  "
        + "".join(f"{name:>{ms_w}}" for name, _ in cols)
        + f"{'tokens':>12}  status"
    )
    lines = [header, "-" * len(header)]
    t0_s = min((m.arrival_s for m in metrics), default=0.0)
    for m in metrics:
        cells = "".join(
            _ms(m.arrival_s - t0_s if attr == "arrival" else getattr(m, attr), ms_w, 1)
            for _, attr in cols
        )
        tokens = f"{m.num_prompt_tokens}/{m.num_output_tokens}"
        lines.append(f"{m.request_id:<{id_w}}  {cells}{tokens:>12}  {m.status}")
    return "\n".join(lines)


def summary_to_dict(summary: Summary) -> dict[str, Any]:
    """JSON-serialisable dict (seconds, as in the dataclasses; distributions nested)."""
    return asdict(summary)
