"""The served waves' bookkeeping (``benchmarks/serve_waves.py``): submissions grouped into
waves by their gaps, and each wave's prompt-carrying steps."""

from __future__ import annotations

from conftest import load_benchmark


def test_submissions_group_into_waves_with_their_steps():
    waves = load_benchmark("serve_waves").waves
    rows = [
        {"submit": 10.000},
        {"submit": 10.004},
        {"submit": 10.030},  # a 26 ms gap: still the same wave
        {"t0": 10.005, "t1": 10.800, "prompts": 2, "decodes": 0, "prompt_tokens": 120},
        {"t0": 10.801, "t1": 11.100, "prompts": 1, "decodes": 2, "prompt_tokens": 60},
        {"t0": 11.2, "t1": 11.25, "prompts": 0, "decodes": 3, "prompt_tokens": 0},  # decode only
        {"submit": 20.000},  # the next wave, seconds later
        {"submit": 20.002},
        {"t0": 20.01, "t1": 20.9, "prompts": 2, "decodes": 0, "prompt_tokens": 124},
        {"submit": 99.0},  # outside the round
    ]
    out = waves(rows, 9.0, 30.0)
    assert [w["requests"] for w in out] == [3, 2]
    first = out[0]
    assert first["submitted_over_ms"] == 30.0 and first["largest_gap_ms"] == 26.0
    assert [(s["prompts"], s["decodes"], s["prompt_tokens"]) for s in first["steps"]] == [
        (2, 0, 120),
        (1, 2, 60),
    ]
    assert first["steps"][0]["ms"] == 795.0 and first["steps"][1]["start_after_first_ms"] == 801.0
    assert [s["prompt_tokens"] for s in out[1]["steps"]] == [124]


def test_report_sets_each_round_beside_the_peer_round_and_counts_the_lower_p99():
    render = load_benchmark("serve_waves").render_waves
    wave = {
        "requests": 32,
        "submitted_over_ms": 60.0,
        "largest_gap_ms": 9.0,
        "steps": [
            {"prompts": 32, "decodes": 0, "prompt_tokens": 1984, "ms": 1400.0,
             "start_after_first_ms": 70.0}
        ],
    }  # fmt: skip
    rounds = [
        {
            "round": i,
            "output_tok_s": 400.0,
            "ttft_p50_ms": 1500.0,
            "ttft_p99_ms": p99,
            "tpot_p50_ms": 60.0,
            "waves": [wave, wave],
            "peer": {
                "system": "vllm",
                "output_tok_s": 350.0,
                "ttft_p50_ms": 1600.0,
                "ttft_p99_ms": 2000.0,
                "tpot_p50_ms": 80.0,
            },
        }
        for i, p99 in enumerate((1700.0, 2500.0))
    ]
    report = {
        "machine": {"cpu": "cpu", "cores": 2},
        "date": "d",
        "loadavg_start": [0, 0, 0],
        "loadavg_end": [0, 0, 0],
        "concurrency": 32,
        "server_flags": "",
        "note": "",
        "rounds": rounds,
    }
    text = render(report)
    assert "| 0 | 400.0 | 1500 | 1700 | 350.0, 1600 / 2000 | 0 | 32 |" in text
    assert "| | | | | | 1 | 32 |" in text  # the second wave: empty round and peer cells
    assert "Nova's TTFT p99 at most vLLM's in 1 of 2 rounds." in text
    assert "Waves prefilled in one step: 4 of 4" in text
    del report["rounds"][0]["peer"], report["rounds"][1]["peer"]
    assert "vLLM" not in render(report)
