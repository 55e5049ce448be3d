"""The screenshot burst's bookkeeping (``benchmarks/engine_latency.py``,
``benchmarks/engine_rounds.py``): the device's idle time between batches, and rounds pooled
with each system's ratio to the reference within its own round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark


def test_busy_time_is_the_union_of_the_batches_intervals(monkeypatch):
    # engine_latency imports a sibling script, as it does when run from benchmarks/
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    busy_s = load_benchmark("engine_latency").busy_s
    rows = [
        ("decode", 0.0, 1.0, 4, 2),
        ("vision", 0.5, 2.0, 8, 1),  # overlaps the decode step: counted once
        ("prefill", 2.5, 3.0, 8, 2),  # 0.5 s idle before it
        ("decode", 2.6, 2.7, 4, 1),  # inside the prefill batch
    ]
    assert busy_s(rows) == pytest.approx(2.5)
    assert busy_s([]) == 0.0


def test_rounds_pool_with_ratios_within_each_round_and_idle_time(tmp_path):
    rounds = load_benchmark("engine_rounds")

    def system(tps: float, tpot_s: float) -> dict:
        return {"output_throughput_tps": tps, "tpot": {"p50": tpot_s}}

    def overlap(name: str, rnd: int, idle_s: float | None) -> dict:
        o = {
            "system": name,
            "round": rnd,
            "alone": {"steps": 10, "mean_ms": 100.0},
            "beside_front": {"steps": 0},
            "vision_batches": 1,
            "vision_mean_ms": 500.0,
            "prefill_batches": 1,
            "prefill_mean_ms": 1000.0,
            "span_s": 2.6,
        }
        if idle_s is not None:
            o["idle_s"] = idle_s
        return o

    path = tmp_path / "run.json"
    path.write_text(
        json.dumps(
            {
                "systems": {
                    "engine:a#0": system(110.0, 0.050),
                    "engine:sequential#0": system(100.0, 0.050),
                    "engine:a#1": system(45.0, 0.100),
                    "engine:sequential#1": system(50.0, 0.080),
                },
                "decode_overlap": [
                    overlap("engine:a", 0, 0.07),
                    overlap("engine:sequential", 0, None),  # older run: 2.6 - 2.5 s
                    overlap("engine:a", 1, 0.05),
                    overlap("engine:sequential", 1, None),
                ],
            }
        )
    )
    text = rounds.report([path], "engine:sequential")
    line = next(x for x in text.splitlines() if x.startswith("| engine:a |"))
    # means 77.5 / 75 = 1.033; within rounds 1.1 and 0.9 (mean 1.0), TPOT 1.0 and 1.25
    assert "| 1.033 |" in line
    assert "1.000 (0.900-1.100), 1.125 (1.000-1.250)" in line
    assert line.endswith("| 70, 50 |")
    ref = next(x for x in text.splitlines() if x.startswith("| engine:sequential |"))
    assert ref.endswith("| 100, 100 |")
