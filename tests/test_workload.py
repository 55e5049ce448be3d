"""Workloads, torch-free: reproducibility, arrival statistics, closed-loop sessions, trace "
"replay."""

from __future__ import annotations

import itertools
import json
import re
import statistics
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nova.workload import (
    GUI_INSTRUCTIONS,
    SAMPLE_TRACES,
    WORKLOADS,
    GuiContentConfig,
    ImageSpec,
    Workload,
    WorkloadRequest,
    bursty,
    make_workload,
    parse_timestamp_s,
    poisson,
    text_tokens_estimate,
    workload_parameters,
)

GENERATED = ("poisson", "bursty", "gui_sessions")
TRACES = ("azure_lmm", "mooncake", "burstgpt")


def _gaps_s(wl: Workload) -> list[float]:
    times = [0.0] + [r.arrival_s for r in wl.requests]
    return [b - a for a, b in itertools.pairwise(times)]


def _cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.fmean(values)


def _skipped_malformed(wl: Workload) -> int:
    for note in wl.notes:
        m = re.match(r"skipped (\d+) malformed rows", note)
        if m:
            return int(m.group(1))
    return 0


def _arrivals(wl: Workload) -> list[float]:
    return [r.arrival_s for r in wl.requests]


def test_import_is_torch_and_numpy_free():
    code = (
        "import sys, nova.workload; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_lists_all_workloads():
    assert set(GENERATED + TRACES) <= set(WORKLOADS)
    params = workload_parameters("poisson")
    assert {"rate_rps", "num_requests", "seed", "image_width", "min_tokens"} <= set(params)
    assert "content" not in params


# --- reproducibility --------------------------------------------------------------------------


@pytest.mark.parametrize("name", GENERATED)
def test_same_seed_same_workload_different_seed_different(name):
    a = make_workload(name, seed=7)
    b = make_workload(name, seed=7)
    c = make_workload(name, seed=8)
    assert a == b
    assert a.requests != c.requests
    assert len({r.request_id for r in a.requests}) == len(a.requests)


@pytest.mark.parametrize("name", TRACES)
def test_trace_replay_is_reproducible(name):
    path = SAMPLE_TRACES[name]
    assert make_workload(name, path=path, seed=3) == make_workload(name, path=str(path), seed=3)
    a = make_workload(name, path=path, seed=3)
    b = make_workload(name, path=path, seed=4)
    assert _arrivals(a) == _arrivals(b)  # timing comes from the trace, content from the seed
    assert [r.instruction for r in a.requests] != [r.instruction for r in b.requests]


def test_rate_changes_timing_not_content():
    slow = poisson(rate_rps=0.5, num_requests=50, seed=1)
    fast = poisson(rate_rps=2.0, num_requests=50, seed=1)
    assert [r.instruction for r in slow.requests] == [r.instruction for r in fast.requests]
    assert _arrivals(fast) == pytest.approx([t / 4 for t in _arrivals(slow)])


# --- arrival statistics -------------------------------------------------------------------------


def test_poisson_mean_rate_and_cv():
    wl = make_workload("poisson", rate_rps=4.0, num_requests=20_000, seed=11)
    assert len(wl) == 20_000
    arrivals = _arrivals(wl)
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert len(wl) / wl.duration_s == pytest.approx(4.0, rel=0.05)
    assert _cv(_gaps_s(wl)) == pytest.approx(1.0, abs=0.05)


def test_bursty_has_higher_cv_and_same_rate():
    wl = make_workload("bursty", rate_rps=4.0, num_requests=20_000, burstiness=0.25, seed=11)
    assert len(wl) / wl.duration_s == pytest.approx(4.0, rel=0.05)
    assert _cv(_gaps_s(wl)) == pytest.approx(2.0, rel=0.1)
    regular = make_workload("bursty", rate_rps=4.0, num_requests=20_000, burstiness=4.0, seed=11)
    assert _cv(_gaps_s(regular)) == pytest.approx(0.5, rel=0.1)


def test_bursty_with_k1_is_poisson():
    assert bursty(burstiness=1.0, seed=5).requests == poisson(seed=5).requests


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**40),
    rate=st.floats(0.01, 100),
    k=st.floats(0.05, 10),
    n=st.integers(1, 60),
)
def test_open_loop_arrivals_sorted_and_positive(seed, rate, k, n):
    wl = bursty(rate_rps=rate, num_requests=n, burstiness=k, seed=seed)
    arrivals = _arrivals(wl)
    assert len(arrivals) == n and arrivals == sorted(arrivals) and arrivals[0] >= 0
    assert wl.duration_s == arrivals[-1] and not wl.closed_loop


# --- GUI-agent content ----------------------------------------------------------------------------


def test_gui_content_defaults():
    assert len(set(GUI_INSTRUCTIONS)) >= 60
    wl = make_workload("poisson", num_requests=2000, seed=2)
    tokens = [r.max_tokens for r in wl.requests]
    assert min(tokens) == 30 and max(tokens) == 80
    histories = set()
    for r in wl.requests:
        assert r.images == (ImageSpec(1120, 1120),)
        assert r.num_text_tokens == text_tokens_estimate(r.instruction)
        assert r.instruction.split("\n")[0] in GUI_INSTRUCTIONS
        histories.add(len(re.findall(r"^\d+\. ", r.instruction, flags=re.M)))
        assert r.session_id is None and r.think_time_s == 0.0
    assert histories == {0, 1, 2, 3, 4}
    assert len({r.seed for r in wl.requests}) > 1990  # distinct screenshots
    assert wl.sessions() == {}


def test_gui_content_options_flat_or_config():
    flat = make_workload(
        "poisson",
        num_requests=200,
        seed=3,
        image_width=640,
        image_height=480,
        min_tokens=5,
        max_tokens=9,
        max_history_actions=0,
        images_per_request=2,
        deadline_s=2.5,
        priority=1,
    )
    cfg = GuiContentConfig(
        image_width=640,
        image_height=480,
        min_tokens=5,
        max_tokens=9,
        max_history_actions=0,
        images_per_request=2,
        deadline_s=2.5,
        priority=1,
    )
    assert flat == poisson(num_requests=200, seed=3, content=cfg)
    for r in flat.requests:
        assert r.images == (ImageSpec(640, 480),) * 2
        assert 5 <= r.max_tokens <= 9 and "Previous actions" not in r.instruction
        assert r.deadline_s == 2.5 and r.priority == 1


def test_text_tokens_estimate():
    assert text_tokens_estimate("") == 40
    assert text_tokens_estimate("Open Settings and turn on Wi-Fi") == 40 + 8  # ceil(6 * 1.3)
    assert text_tokens_estimate("a " * 100) == 170


# --- closed-loop sessions -------------------------------------------------------------------------


def test_gui_sessions_structure():
    wl = make_workload(
        "gui_sessions",
        num_sessions=20,
        min_steps=2,
        max_steps=6,
        think_time_s=1.5,
        session_start_spread_s=30.0,
        seed=4,
    )
    assert wl.closed_loop and wl.duration_s is None
    sessions = wl.sessions()
    assert len(sessions) == 20
    starts = []
    for sid, steps in sessions.items():
        assert 2 <= len(steps) <= 6
        assert [r.step for r in steps] == list(range(len(steps)))
        assert all(r.session_id == sid for r in steps)
        first, rest = steps[0], steps[1:]
        assert first.arrival_s is not None and 0.0 <= first.arrival_s <= 30.0
        assert first.think_time_s == 0.0
        assert all(r.arrival_s is None and r.think_time_s > 0 for r in rest)
        task = first.instruction
        for k, r in enumerate(steps):  # same task; the history grows by one action per step
            assert r.instruction.split("\n")[0] == task
            assert len(re.findall(r"^\d+\. ", r.instruction, flags=re.M)) == k
            if k:
                assert r.instruction.startswith(steps[k - 1].instruction)
        starts.append(first.arrival_s)
    assert starts == sorted(starts)
    think = [r.think_time_s for r in wl.requests if r.step > 0]
    assert statistics.fmean(think) == pytest.approx(1.5, rel=0.3)


def test_gui_sessions_fixed_steps_and_errors():
    wl = make_workload("gui_sessions", num_sessions=3, steps_per_session=4, seed=0)
    assert [len(s) for s in wl.sessions().values()] == [4, 4, 4]
    assert len(wl) == 12
    with pytest.raises(ValueError, match="steps_per_session"):
        make_workload("gui_sessions", steps_per_session=4, min_steps=2)
    with pytest.raises(ValueError, match="max_steps"):
        make_workload("gui_sessions", min_steps=5, max_steps=2)
    with pytest.raises(ValueError, match="num_sessions"):
        make_workload("gui_sessions", num_sessions=0)


# --- trace replay ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,count", [("azure_lmm", 12), ("mooncake", 12), ("burstgpt", 10)])
def test_trace_samples_replay(name, count):
    wl = make_workload(name, path=SAMPLE_TRACES[name])
    arrivals = _arrivals(wl)
    assert len(wl) == count and not wl.closed_loop
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert _skipped_malformed(wl) == 0
    for r in wl.requests:
        assert r.max_tokens >= 1 and r.num_text_tokens >= 1
        if r.num_text_tokens >= 100:  # shorter prompts get just an instruction
            assert text_tokens_estimate(r.instruction) == pytest.approx(r.num_text_tokens, abs=3)


def test_azure_lmm_sample_fields():
    wl = make_workload(
        "azure_lmm", path=SAMPLE_TRACES["azure_lmm"], image_width=896, image_height=896
    )
    first = wl.requests[0]
    assert (first.num_text_tokens, first.max_tokens) == (2843, 112)
    assert first.images == (ImageSpec(896, 896),)
    assert [r.num_images for r in wl.requests][:5] == [1, 1, 2, 1, 0]
    assert wl.requests[1].arrival_s == pytest.approx(0.429, abs=1e-6)
    assert wl.duration_s == pytest.approx(9.7182, abs=1e-6)
    assert any("includes image tokens" in n for n in wl.notes)
    absolute = make_workload("azure_lmm", path=SAMPLE_TRACES["azure_lmm"], start_at_zero=False)
    assert absolute.requests[0].arrival_s == pytest.approx(
        parse_timestamp_s("2025-05-20 00:00:00.012")
    )


def test_mooncake_sample_fields_and_shared_prefix():
    wl = make_workload("mooncake", path=SAMPLE_TRACES["mooncake"])
    assert wl.requests[1].arrival_s == pytest.approx(0.339)  # milliseconds -> seconds
    assert wl.duration_s == pytest.approx(7.408)
    assert all(r.images == () for r in wl.requests)
    a, c = wl.requests[0].instruction.split(), wl.requests[2].instruction.split()
    assert c[: len(a)] == a  # request 2's hash ids extend request 0's: same text prefix
    with_images = make_workload("mooncake", path=SAMPLE_TRACES["mooncake"], images_per_request=1)
    assert all(r.num_images == 1 for r in with_images.requests)


def test_burstgpt_sample_skips_failures_and_filters_model():
    wl = make_workload("burstgpt", path=SAMPLE_TRACES["burstgpt"])
    assert any("skipped 2 rows: zero response tokens" in n for n in wl.notes)
    assert wl.requests[1].arrival_s == 40.0 and wl.duration_s == 578.0
    gpt4 = make_workload("burstgpt", path=SAMPLE_TRACES["burstgpt"], model="GPT-4")
    assert len(gpt4) == 2


@pytest.mark.parametrize("name", TRACES)
def test_trace_rescaling(name):
    path = SAMPLE_TRACES[name]
    base = make_workload(name, path=path)
    fast = make_workload(name, path=path, rate_rps=5.0)
    assert (len(fast) - 1) / fast.duration_s == pytest.approx(5.0)
    factor = fast.duration_s / base.duration_s  # a uniform stretch: gap ratios kept
    assert _arrivals(fast) == pytest.approx([t * factor for t in _arrivals(base)])
    slow = make_workload(name, path=path, time_scale=2.0)
    assert _arrivals(slow) == pytest.approx([2 * t for t in _arrivals(base)])
    first3 = make_workload(name, path=path, max_requests=3)
    assert len(first3) == 3 and _arrivals(first3) == _arrivals(base)[:3]
    with pytest.raises(ValueError, match="rate_rps"):
        make_workload(name, path=path, rate_rps=1.0, time_scale=2.0)
    with pytest.raises(ValueError, match="rate_rps"):
        make_workload(name, path=path, max_requests=1, rate_rps=1.0)  # one arrival: no rate


def test_azure_lmm_bad_rows_skipped_and_counted(tmp_path):
    p = tmp_path / "azure.csv"
    p.write_text(
        "TIMESTAMP,NumImages,ContextTokens,GeneratedTokens\n"
        "2025-05-20 00:00:01.5000000,1,1200,50\n"
        "not a time,1,1200,50\n"
        "2025-05-20 00:00:02.0000000,1,abc,50\n"
        "2025-05-20 00:00:02.5000000,1\n"
        "\n"
        "2025-05-20 00:00:03.0000000,-1,1200,50\n"
        "2025-05-20 00:00:04.0000000,2,3000,0\n"
        "2025-05-20 00:00:04.2500000,0,800,20\n"
    )
    wl = make_workload("azure_lmm", path=p)
    assert len(wl) == 2 and _skipped_malformed(wl) == 5
    assert _arrivals(wl) == pytest.approx([0.0, 2.75])
    assert any("line 3" in n for n in wl.notes)  # the first bad row is named


def test_azure_lmm_seconds_timestamps_and_no_images_column(tmp_path):
    p = tmp_path / "azure_seconds.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10.5,100,10\n12.0,200,20\n11.0,300,30\n")
    wl = make_workload("azure_lmm", path=p)
    assert _arrivals(wl) == [0.0, 0.5, 1.5]  # sorted by timestamp
    assert [r.num_text_tokens for r in wl.requests] == [100, 300, 200]
    assert all(r.images == () for r in wl.requests)
    assert any("out of order" in n for n in wl.notes)


def test_mooncake_bad_rows_skipped_and_counted(tmp_path):
    p = tmp_path / "mooncake.jsonl"
    good = {"timestamp": 1000, "input_length": 600, "output_length": 20, "hash_ids": [1, 2]}
    rows = [
        json.dumps(good),
        "{broken json",
        json.dumps([1, 2, 3]),
        json.dumps({"timestamp": 1500, "input_length": 100}),
        json.dumps({"timestamp": "x", "input_length": 100, "output_length": 5}),
        json.dumps({"timestamp": 1600, "input_length": 100, "output_length": 5, "hash_ids": "12"}),
        json.dumps(dict(good, timestamp=2250)),
    ]
    p.write_text("\n".join(rows) + "\n")
    wl = make_workload("mooncake", path=p)
    assert len(wl) == 2 and _skipped_malformed(wl) == 5
    assert _arrivals(wl) == [0.0, 1.25]


def test_burstgpt_bad_rows_skipped_and_counted(tmp_path):
    p = tmp_path / "burst.csv"
    p.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "3,ChatGPT,100,20,120,Conversation log\n"
        "4,ChatGPT,,20,20,Conversation log\n"
        "five,ChatGPT,100,20,120,Conversation log\n"
        "6,ChatGPT,100,0,100,Conversation log\n"
        "7,GPT-4,50,5,55,API log\n"
    )
    wl = make_workload("burstgpt", path=p)
    assert len(wl) == 2 and _skipped_malformed(wl) == 2
    assert any("skipped 1 rows: zero response tokens" in n for n in wl.notes)


@pytest.mark.parametrize("name", TRACES)
def test_trace_file_errors(name, tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(ValueError, match="not found.*nope.csv"):
        make_workload(name, path=missing)
    bad = tmp_path / "all_bad.txt"
    header = {
        "azure_lmm": "TIMESTAMP,NumImages,ContextTokens,GeneratedTokens\n",
        "burstgpt": "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n",
        "mooncake": "",
    }[name]
    bad.write_text(header + "garbage,row\n{also: garbage}\n")
    with pytest.raises(ValueError, match="no valid rows.*all_bad.txt"):
        make_workload(name, path=bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="no valid rows.*empty.txt"):
        make_workload(name, path=empty)
    with pytest.raises(ValueError, match="path"):
        make_workload(name)


def test_csv_missing_column_is_clear(tmp_path):
    p = tmp_path / "wrong.csv"
    p.write_text("time,tokens\n1,2\n")
    with pytest.raises(ValueError, match=r"wrong.csv.*missing column"):
        make_workload("burstgpt", path=p)


def test_parse_timestamp_s():
    assert parse_timestamp_s("12.5") == 12.5
    assert parse_timestamp_s(3) == 3.0
    t0 = parse_timestamp_s("2025-05-20 00:00:00")
    assert t0 == 1747699200.0
    assert parse_timestamp_s("2025-05-20 00:00:00.0120000") - t0 == pytest.approx(0.012, abs=1e-6)
    assert parse_timestamp_s("2025-05-20T00:00:01Z") - t0 == 1.0
    assert parse_timestamp_s("2025-05-20 02:00:00+02:00") == t0
    for bad in ("yesterday", "nan", "", True):
        with pytest.raises(ValueError):
            parse_timestamp_s(bad)


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_workload_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown workload 'nope'.*bursty.*poisson"):
        make_workload("nope")


@pytest.mark.parametrize(
    "name,kwargs,param",
    [
        ("poisson", {"rate_rps": -1.0}, "rate_rps"),
        ("poisson", {"rate_rps": float("nan")}, "rate_rps"),
        ("poisson", {"num_requests": 0}, "num_requests"),
        ("poisson", {"num_requests": 2.5}, "num_requests"),
        ("poisson", {"seed": "x"}, "seed"),
        ("poisson", {"rate": 1.0}, "rate"),
        ("poisson", {"min_tokens": 50, "max_tokens": 10}, "max_tokens"),
        ("poisson", {"image_width": 0}, "image_width"),
        ("bursty", {"burstiness": 0}, "burstiness"),
        ("gui_sessions", {"think_time_s": -1}, "think_time_s"),
        ("mooncake", {"path": SAMPLE_TRACES["mooncake"], "max_requests": 0}, "max_requests"),
        ("burstgpt", {"path": SAMPLE_TRACES["burstgpt"], "time_scale": 0}, "time_scale"),
        ("azure_lmm", {"path": SAMPLE_TRACES["azure_lmm"], "num_requests": 5}, "num_requests"),
    ],
)
def test_bad_parameters_are_named(name, kwargs, param):
    with pytest.raises(ValueError, match=param):
        make_workload(name, **kwargs)


def test_workload_request_validation():
    with pytest.raises(ValueError, match="max_tokens"):
        WorkloadRequest("r", 0.0, "hi", 41, (), max_tokens=0)
    with pytest.raises(ValueError):
        ImageSpec(0, 10)
