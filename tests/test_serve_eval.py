"""The issue-8 end-to-end evaluation script, in its CPU smoke mode: real ``nova serve`` processes
per policy, the bench client, the results files in the ``nova eval`` schema, and the simulator's
error against the measured points."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "serve_eval", ROOT / "benchmarks" / "serve_eval.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["serve_eval"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_serve_eval_smoke_writes_results_and_sim_error(tmp_path):
    mod = _load_script()
    assert mod.main(["--smoke", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "results.json").read_text())
    assert set(rep["policies"]) == {"multi_stream", "nova"}
    for policy, pts in rep["policies"].items():
        assert [p["point"] for p in pts] == ["poisson@1", "sessions@1"]
        for p in pts:
            for key in (
                "rate_rps",
                "throughput_rps",
                "max_latency_s",
                "p99_latency_s",
                "mean_latency_s",
                "mean_ttft_s",
                "num_requests",
            ):
                assert p[key] is not None and p[key] > 0, (policy, key)
            assert p["num_failed"] == 0
            assert p["max_latency_s"] >= p["p99_latency_s"] >= p["mean_latency_s"] * 0.5
            assert set(p["sim_error"]) == {"mean_latency_s", "p99_latency_s", "max_latency_s"}
            assert p["sim"]["mean_latency_s"] > 0
            # The front end was calibrated on warm-up requests and fed to the simulator.
            assert 0 < p["frontend_prepare_s"] < p["mean_ttft_s"]
            assert p["sim"]["frontend_prepare_s"] == p["frontend_prepare_s"]
    # Sessions: 1 session x 2 steps; Poisson: 3 requests.
    assert [p["num_requests"] for p in rep["policies"]["nova"]] == [3, 2]
    md = (tmp_path / "results.md").read_text()
    assert "Simulator vs measured" in md and "| nova | sessions@1 |" in md
    assert (tmp_path / "latency_vs_load.png").stat().st_size > 0
    # A second call measures nothing again (resumable) and rebuilds the same report.
    runs_before = sorted(p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.json"))
    assert mod.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert sorted(p.stat().st_mtime for p in (tmp_path / "runs").rglob("*.json")) == runs_before


def test_serve_eval_rejects_unknown_policy():
    mod = _load_script()
    with pytest.raises(SystemExit):
        mod.parse_args(["--policies", "nova", "fastest"])
