"""nova.metrics: per-request formulas, percentiles, summaries, goodput and formatting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nova.metrics import (
    Distribution,
    RequestMetrics,
    distribution,
    format_summary_table,
    format_timeline,
    goodput_rps,
    percentile,
    request_metrics,
    summarize,
    summary_to_dict,
)
from nova.types import ImageInput, Request, RequestStatus

approx = pytest.approx
REPO = Path(__file__).resolve().parents[1]


def make_request(
    rid: str = "r",
    *,
    arrival_s: float = 10.0,
    images: int = 1,
    prompt_len: int = 5,
    vision: tuple[float, float] | None = None,
    prefill: tuple[float, float] | None = None,
    token_s: list[float] | None = None,
    finish_s: float | None = None,
    status: RequestStatus = RequestStatus.FINISHED,
    deadline_s: float | None = None,
    num_preemptions: int = 0,
) -> Request:
    req = Request(
        rid,
        prompt_token_ids=list(range(prompt_len)),
        images=[ImageInput(4, f"h{i}") for i in range(images)],
        arrival_s=arrival_s,
        deadline_s=deadline_s,
    )
    t = req.times
    assert t is not None
    if vision is not None:
        t.vision_start_s, t.vision_end_s = vision
    if prefill is not None:
        t.prefill_start_s, t.prefill_end_s = prefill
    t.token_s = list(token_s or [])
    t.finish_s = finish_s
    req.output_token_ids = [7] * len(t.token_s)
    req.status = status
    req.num_preemptions = num_preemptions
    return req


def full_request(**kw) -> Request:
    """arrival 10.0, vision 10.5-10.75, prefill 11.0-11.5, tokens 11.5/11.75/12.25/12.5, finish "
    "12.5."""
    args = dict(
        vision=(10.5, 10.75),
        prefill=(11.0, 11.5),
        token_s=[11.5, 11.75, 12.25, 12.5],
        finish_s=12.5,
    )
    args.update(kw)
    return make_request(**args)


# ------------------------------------------------------------------ per-request formulas


def test_full_request_formulas() -> None:
    m = request_metrics(full_request(deadline_s=3.0, num_preemptions=2))
    assert m.request_id == "r"
    assert m.status == "finished"
    assert (m.num_prompt_tokens, m.num_output_tokens, m.num_images) == (5, 4, 1)
    assert m.num_preemptions == 2
    assert m.arrival_s == 10.0 and m.finish_s == 12.5
    assert m.ttft_s == 1.5
    assert m.tpot_s == approx(1.0 / 3.0)
    assert m.e2e_s == 2.5
    assert m.itl_s == [0.25, 0.5, 0.25]
    assert m.vision_queue_s == 0.5
    assert m.vision_s == 0.25
    assert m.prefill_queue_s == 0.25  # from vision end
    assert m.prefill_s == 0.5
    assert m.decode_s == 1.0
    assert m.deadline_s == 3.0 and m.deadline_met is True


def test_text_only_prefill_queue_from_arrival() -> None:
    m = request_metrics(full_request(images=0, vision=None))
    assert m.num_images == 0
    assert m.vision_queue_s is None and m.vision_s is None
    assert m.prefill_queue_s == 1.0  # 11.0 - arrival 10.0


def test_single_token_has_no_tpot_or_decode() -> None:
    m = request_metrics(full_request(token_s=[11.5], finish_s=11.5))
    assert m.ttft_s == 1.5 and m.e2e_s == 1.5
    assert m.tpot_s is None and m.decode_s is None
    assert m.itl_s == []


def test_deadline_missed_and_exact_boundary() -> None:
    assert request_metrics(full_request(deadline_s=2.0)).deadline_met is False
    assert request_metrics(full_request(deadline_s=2.5)).deadline_met is True  # e2e == deadline
    assert request_metrics(full_request()).deadline_met is None  # no deadline


def test_unfinished_request_partial_fields() -> None:
    req = make_request(
        vision=(10.5, 10.75),
        prefill=(11.0, 11.5),
        token_s=[11.5, 12.0],
        status=RequestStatus.DECODING,
        deadline_s=1.0,
    )
    m = request_metrics(req)
    assert m.status == "decoding"
    assert m.ttft_s == 1.5 and m.tpot_s == 0.5 and m.decode_s == 0.5
    assert m.e2e_s is None and m.finish_s is None
    assert m.deadline_met is None  # not finished


def test_fresh_request_all_none() -> None:
    m = request_metrics(make_request(status=RequestStatus.WAITING_VISION))
    for name in (
        "ttft_s",
        "tpot_s",
        "e2e_s",
        "vision_queue_s",
        "vision_s",
        "prefill_queue_s",
        "prefill_s",
        "decode_s",
        "deadline_met",
        "finish_s",
    ):
        assert getattr(m, name) is None, name
    assert m.itl_s == [] and m.num_output_tokens == 0


def test_failed_in_vision_stage() -> None:
    req = make_request(
        vision=(10.5, 10.75), status=RequestStatus.FAILED, finish_s=10.75, deadline_s=5.0
    )
    req.times.vision_end_s = None  # failed mid-encoder
    m = request_metrics(req)
    assert m.status == "failed"
    assert m.vision_queue_s == 0.5 and m.vision_s is None
    assert m.prefill_queue_s is None and m.prefill_s is None and m.ttft_s is None
    assert m.e2e_s == 0.75
    assert m.deadline_met is None  # only finished requests meet or miss deadlines


def test_vision_skipped_with_images_queues_prefill_from_arrival() -> None:
    # e.g. an encoder-cache hit: images but no vision stage timestamps
    m = request_metrics(full_request(vision=None))
    assert m.num_images == 1 and m.vision_queue_s is None
    assert m.prefill_queue_s == 1.0


def test_prefill_started_not_ended() -> None:
    req = make_request(images=0, prefill=(11.0, 11.0), status=RequestStatus.ABORTED, finish_s=11.2)
    req.times.prefill_end_s = None
    m = request_metrics(req)
    assert m.prefill_queue_s == 1.0 and m.prefill_s is None
    assert m.ttft_s is None and m.e2e_s == approx(1.2)


# ------------------------------------------------------------------ percentiles


def test_percentile_hand_computed() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 50) == approx(2.5)
    assert percentile(xs, 90) == approx(3.7)  # pos 2.7 -> 3 + 0.7
    assert percentile(xs, 99) == approx(3.97)  # pos 2.97
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile([5.0], 99) == 5.0
    # pos = 4 * 0.25 = 1.0 exactly -> second value; pos 4*0.3 = 1.2 -> 20 + 0.2*(40-20)
    assert percentile([10.0, 20.0, 40.0, 80.0, 160.0], 25) == approx(20.0)
    assert percentile([10.0, 20.0, 40.0, 80.0, 160.0], 30) == approx(24.0)


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution_unsorted_and_none_skipped() -> None:
    d = distribution([4.0, None, 1.0, 3.0, 2.0])
    assert d.count == 4
    assert d.mean == approx(2.5)
    assert d.p50 == approx(2.5) and d.p90 == approx(3.7) and d.p99 == approx(3.97)
    assert d.min == 1.0 and d.max == 4.0


def test_distribution_empty() -> None:
    d = distribution([])
    assert d == Distribution(count=0)
    assert (d.mean, d.p50, d.p90, d.p99, d.max, d.min) == (None,) * 6
    assert distribution([None, None]).count == 0


# ------------------------------------------------------------------ summary


def run_metrics() -> list[RequestMetrics]:
    """Four requests: two finished (one misses its deadline), one aborted, one failed."""
    a = full_request(rid="a", deadline_s=3.0, num_preemptions=1)  # e2e 2.5, ttft 1.5, tpot 1/3
    b = make_request(
        "b",
        arrival_s=11.0,
        images=0,
        prompt_len=3,
        prefill=(11.25, 11.5),
        token_s=[11.5, 12.0, 14.5],
        finish_s=15.0,
        deadline_s=2.0,
    )
    # b: ttft 0.5, tpot 1.5, e2e 4.0, prefill_queue 0.25, prefill 0.25, decode 3.0
    c = make_request(
        "c",
        arrival_s=10.5,
        images=0,
        prompt_len=4,
        prefill=(11.0, 11.5),
        token_s=[11.5],
        finish_s=12.0,
        status=RequestStatus.ABORTED,
        num_preemptions=2,
    )
    d = make_request(
        "d", arrival_s=9.0, vision=(9.5, 10.0), status=RequestStatus.FAILED, finish_s=10.0
    )
    d.times.vision_end_s = None
    return [request_metrics(r) for r in (a, b, c, d)]


def test_summarize_counts_and_distributions() -> None:
    s = summarize(run_metrics())
    assert (s.num_requests, s.num_finished, s.num_aborted, s.num_failed, s.num_unfinished) == (
        4,
        2,
        1,
        1,
        0,
    )
    assert s.num_preemptions == 3
    assert s.ttft.count == 3  # a, b, c (aborted after its first token)
    assert s.ttft.mean == approx((1.5 + 0.5 + 1.0) / 3)
    assert s.ttft.p50 == approx(1.0) and s.ttft.max == 1.5 and s.ttft.min == 0.5
    assert s.tpot.count == 2 and s.tpot.mean == approx((1 / 3 + 1.5) / 2)
    assert s.e2e.count == 4  # every request with a finish time
    assert s.e2e.max == 4.0
    assert s.vision_queue.count == 2 and s.vision_queue.mean == 0.5
    assert s.vision.count == 1 and s.vision.mean == 0.25
    assert s.prefill_queue.count == 3  # a 0.25, b 0.25, c 0.5
    assert s.prefill_queue.mean == approx(1.0 / 3.0)
    assert s.prefill.count == 3 and s.prefill.max == 0.5
    assert s.decode.count == 2 and s.decode.mean == approx(2.0)
    assert s.deadline_violation_rate == 0.5  # a met (2.5 <= 3), b missed (4 > 2)


def test_summarize_derived_duration_and_throughput() -> None:
    s = summarize(run_metrics())
    assert s.duration_s == 6.0  # earliest arrival 9.0 (d) -> latest finish 15.0 (b)
    assert s.num_prompt_tokens == 8 and s.num_output_tokens == 7  # finished a, b only
    assert s.request_throughput_rps == approx(2 / 6)
    assert s.output_throughput_tps == approx(7 / 6)
    assert s.total_throughput_tps == approx(15 / 6)


def test_summarize_explicit_duration() -> None:
    s = summarize(run_metrics(), duration_s=10.0)
    assert s.duration_s == 10.0
    assert s.request_throughput_rps == approx(0.2)
    assert s.output_throughput_tps == approx(0.7)
    assert s.total_throughput_tps == approx(1.5)
    with pytest.raises(ValueError):
        summarize(run_metrics(), duration_s=0.0)


def test_summarize_empty_and_unfinished() -> None:
    s = summarize([])
    assert s.num_requests == 0 and s.duration_s is None
    assert s.request_throughput_rps is None and s.deadline_violation_rate is None
    assert s.ttft.count == 0 and s.ttft.mean is None
    assert summarize([], duration_s=2.0).request_throughput_rps == 0.0
    # nothing finished yet: no derived duration, but counted as unfinished
    s = summarize([request_metrics(make_request(status=RequestStatus.DECODING, token_s=[11.0]))])
    assert s.num_unfinished == 1 and s.duration_s is None and s.output_throughput_tps is None
    # zero-length derived duration -> no throughput rather than a division by zero
    s = summarize([request_metrics(make_request(images=0, token_s=[10.0], finish_s=10.0))])
    assert s.duration_s == 0.0 and s.request_throughput_rps is None


def test_deadline_violation_rate_none_without_deadlines() -> None:
    s = summarize([request_metrics(full_request())])
    assert s.deadline_violation_rate is None
    s = summarize([request_metrics(full_request(deadline_s=1.0))])
    assert s.deadline_violation_rate == 1.0


# ------------------------------------------------------------------ goodput


def test_goodput() -> None:
    ms = run_metrics()  # finished: a (ttft 1.5, tpot 1/3, e2e 2.5), b (ttft 0.5, tpot 1.5, e2e 4)
    assert goodput_rps(ms, 10.0) == approx(0.2)  # no SLO: all finished
    assert goodput_rps(ms, 10.0, max_ttft_s=1.0) == approx(0.1)  # b only (c aborted)
    assert goodput_rps(ms, 10.0, max_tpot_s=0.5) == approx(0.1)  # a only
    assert goodput_rps(ms, 10.0, max_ttft_s=1.0, max_tpot_s=0.5) == 0.0
    assert goodput_rps(ms, 10.0, max_e2e_s=4.0) == approx(0.2)  # boundary counts as met
    assert goodput_rps(ms, 10.0, max_e2e_s=3.9) == approx(0.1)
    assert goodput_rps(ms, None) == approx(2 / 6)  # derived duration
    assert goodput_rps([], None) is None


def test_goodput_single_token_meets_tpot() -> None:
    m = request_metrics(full_request(token_s=[11.5], finish_s=11.5))
    assert goodput_rps([m], 1.0, max_tpot_s=0.001) == 1.0


# ------------------------------------------------------------------ formatting


def test_format_summary_table() -> None:
    text = format_summary_table(summarize(run_metrics()), title="run A")
    lines = text.splitlines()
    assert lines[0] == "run A"
    for label in (
        "TTFT",
        "TPOT",
        "E2E",
        "vision queue",
        "vision",
        "prefill queue",
        "prefill",
        "decode",
    ):
        assert any(line.startswith(label) for line in lines), label
    ttft = next(line for line in lines if line.startswith("TTFT"))
    assert ttft.split() == ["TTFT", "3", "1000.00", "1000.00", "1400.00", "1490.00", "1500.00"]
    e2e = next(line for line in lines if line.startswith("E2E"))
    assert e2e.split()[-1] == "4000.00"
    vision = next(line for line in lines if line.split()[:2] == ["vision", "1"])
    assert vision.split()[2:] == ["250.00"] * 5
    assert "finished 2" in text and "aborted 1" in text and "failed 1" in text
    assert "duration: 6.000 s" in text
    assert "0.333 req/s" in text and "1.17 tok/s" in text and "2.50 tok/s" in text
    assert "deadline violation rate: 50.0%" in text
    # fixed width: all latency rows the same length
    rows = [
        line
        for line in lines
        if line.split() and line.split()[0] in ("TTFT", "TPOT", "E2E", "decode", "prefill")
    ]
    assert len({len(r) for r in rows}) == 1


def test_format_summary_table_empty() -> None:
    text = format_summary_table(summarize([]))
    ttft = next(line for line in text.splitlines() if line.startswith("TTFT"))
    assert ttft.split() == ["TTFT", "0", "-", "-", "-", "-", "-"]
    assert "duration: - s" in text


def test_format_timeline() -> None:
    text = format_timeline(run_metrics())
    lines = text.splitlines()
    body = lines[2:]
    assert [line.split()[0] for line in body] == ["d", "a", "c", "b"]  # by arrival
    a = body[1].split()
    # arrival 10.0 - earliest 9.0; vis_q, vis, pre_q, pre, ttft, decode, e2e in ms
    assert a == [
        "a",
        "1000.0",
        "500.0",
        "250.0",
        "250.0",
        "500.0",
        "1500.0",
        "1000.0",
        "2500.0",
        "5/4",
        "finished",
    ]
    d = body[0].split()
    assert d == ["d", "0.0", "500.0", "-", "-", "-", "-", "-", "1000.0", "5/0", "failed"]
    assert body[2].split()[-1] == "aborted"
    assert format_timeline([]).count("\n") == 1  # header and rule only


def test_summary_to_dict_json() -> None:
    s = summarize(run_metrics())
    d = summary_to_dict(s)
    assert d["num_finished"] == 2 and d["duration_s"] == 6.0
    assert d["ttft"]["count"] == 3 and d["ttft"]["max"] == 1.5
    back = json.loads(json.dumps(d))
    assert back == d
    empty = json.loads(json.dumps(summary_to_dict(summarize([]))))
    assert empty["e2e"]["p99"] is None


def test_import_is_torch_and_numpy_free() -> None:
    code = (
        "import nova.metrics, sys; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, "
        "sorted(m for m in sys.modules if m in ('torch', 'numpy'))"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
