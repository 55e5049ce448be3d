"""The successor-hold benchmark's bookkeeping (``benchmarks/successor_hold.py``): per workload,
``hold`` over ``no_hold`` in the same round, only where both ran."""

from __future__ import annotations

from conftest import load_benchmark


def _row(workload: str, rnd: int, mode: str, scale: float) -> dict:
    return {
        "workload": workload,
        "round": rnd,
        "mode": mode,
        "output_throughput": 100.0 / scale,
        "median_ttft_ms": 400.0 * scale,
        "p99_ttft_ms": 800.0 * scale,
        "mean_e2el_ms": 3000.0 * scale,
        "p99_e2el_ms": 4000.0 * scale,
        "median_tpot_ms": 50.0,
    }


def test_ratios_pair_the_modes_of_one_round_and_skip_unpaired_rounds():
    bench = load_benchmark("successor_hold")
    rows = [
        _row("w", 0, "hold", 1.2),
        _row("w", 0, "no_hold", 1.0),
        _row("w", 1, "no_hold", 2.0),  # its pair runs in round 1 below, in the other order
        _row("w", 1, "hold", 1.0),
        _row("w", 2, "hold", 9.0),  # no `no_hold` run: not a pair
        _row("v", 0, "hold", 1.0),
        _row("v", 0, "no_hold", 1.0),
    ]
    ratios = bench.ratios_by_workload(rows)
    assert sorted(ratios) == ["v", "w"]
    assert [round(x, 6) for x in ratios["w"]["p99_ttft_ms"]] == [1.2, 0.5]
    assert [round(x, 6) for x in ratios["w"]["output_throughput"]] == [round(1 / 1.2, 6), 2.0]
    report = {
        "machine": {"cpu": "cpu", "cores": 2},
        "date": "d",
        "loadavg_start": [0, 0, 0],
        "loadavg_end": [0, 0, 0],
        "model": "demo",
        "sessions": 8,
        "steps": 4,
        "note": "",
        "rows": rows,
    }
    text = bench.render(report)
    # median of 1.2 and 0.5 for w's TTFT p99; v's ratios are all 1
    assert "| w | 2 | 0.850 | 0.850 | 0.850 | 0.850 |" in text
    assert "| v | 1 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in text
