"""``nova eval``: seeds and spreads, the steady window, tuned baselines, the oracle, the checks,
experiments from flags, and the small CI version of the must-hold run."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from conftest import load_benchmark

from nova.cost.base import make_cost_model
from nova.cost.model_spec import get_model_spec
from nova.sampling_params import SamplingParams
from nova.sim.eval import (
    EXPERIMENTS,
    aggregate,
    analyse,
    build_policy,
    experiment_spec,
    headline_cdf_runs,
    num_kv_blocks,
    reused_runs,
    run_experiment,
    steady_window,
)
from nova.sim.experiments import BASELINE_VARIANTS, expand_policies, static_modes
from nova.types import Request

REQUIRED = (
    "rate_rps",
    "throughput_rps",
    "max_latency_s",
    "p99_latency_s",
    "mean_latency_s",
    "mean_ttft_s",
    "num_requests",
)


def _req(i: int, arrival: float, finish: float | None) -> Request:
    r = Request(f"r{i}", [1], SamplingParams(max_tokens=1), arrival_s=arrival)
    r.times.finish_s = finish
    return r


def test_steady_window_tells_a_queue_that_keeps_up_from_one_that_grows():
    keeps_up = [_req(i, i * 1.0, i * 1.0 + 3.0 + (i % 3)) for i in range(200)]
    w = steady_window(keeps_up)
    assert w["offered_rps"] == pytest.approx(1.0, rel=0.01)
    assert w["steady_ratio"] == pytest.approx(1.0, abs=0.02)
    # served at 0.8/s while 1/s arrive: the backlog grows at 0.2/s
    grows = [_req(i, i * 1.0, 5.0 + i / 0.8) for i in range(200)]
    assert steady_window(grows)["steady_ratio"] == pytest.approx(0.8, abs=0.02)
    # never finished at all
    assert steady_window([_req(i, i * 1.0, None) for i in range(50)])["steady_ratio"] < 0.1


def test_aggregate_keeps_mean_spread_and_seeds():
    per_seed = {
        s: {"max_latency_s": 10.0 + s, "mean_latency_s": 3.0, "steady_ratio": 0.97 + 0.01 * s}
        for s in range(3)
    }
    p = aggregate(per_seed, closed_loop=False)
    assert p["max_latency_s"] == pytest.approx(11.0)
    assert p["spread"]["max_latency_s"] == {
        "min": 10.0,
        "max": 12.0,
        "std": pytest.approx(0.8165, rel=1e-3),
    }
    assert [s["seed"] for s in p["seeds"]] == [0, 1, 2]
    assert p["sustained"] is True  # mean ratio 0.98
    per_seed[0]["steady_ratio"] = 0.9
    assert aggregate(per_seed, closed_loop=False)["sustained"] is False
    assert aggregate(per_seed, closed_loop=True)["sustained"] is True


def _pt(mx, mean, thr=1.0, sustained=True, p99=None):
    return {
        "max_latency_s": mx,
        "p99_latency_s": p99 if p99 is not None else mx * 0.9,
        "mean_latency_s": mean,
        "throughput_rps": thr,
        "sustained": sustained,
    }


def test_analyse_picks_best_baseline_and_oracle_and_checks():
    points = {
        "nova": _pt(8.8, 4.0),
        "a": _pt(10.0, 5.0),
        "b": _pt(8.0, 6.0, sustained=False),  # not sustained: not eligible
        "nova[mode=x]": _pt(8.5, 4.1),
    }
    a = analyse(points, ["a", "b"], ["nova[mode=x]"])
    assert a["best_baseline"] == "a" and a["oracle"] == "nova[mode=x]"
    assert a["oracle_gain"] == pytest.approx(0.15)
    assert a["checks"]["beats_best_where_oracle_does"] is True
    assert a["checks"]["max_vs_oracle"] is True  # 8.8 / 8.5 = 1.035
    points["nova"] = _pt(10.5, 4.0)  # 5% worse than the best baseline's max
    a = analyse(points, ["a", "b"], ["nova[mode=x]"])
    assert not a["pass"] and "max_vs_best" in a["failed"]
    # ties in max latency go to the lower mean
    points = {"nova": _pt(10, 5), "a": _pt(10, 6), "c": _pt(10, 5.5)}
    assert analyse(points, ["a", "c"], [])["best_baseline"] == "c"
    # no sustained baseline: nothing must hold there
    points = {"nova": _pt(10, 5), "a": _pt(9, 4, sustained=False)}
    a = analyse(points, ["a"], [])
    assert a["must_hold"] is False and a["pass"] is True


def test_analyse_max_vs_oracle_threshold():
    points = {"nova": _pt(9.0, 4.0), "a": _pt(10.0, 5.0), "s": _pt(8.5, 4.1)}
    a = analyse(points, ["a"], ["s"])
    assert a["nova_vs_oracle"]["max"] == pytest.approx(9.0 / 8.5)
    assert a["checks"]["max_vs_oracle"] is False  # 5.9% above the oracle


def test_tuned_variants_and_expansion():
    assert "chunked_prefill[budget=2048]" in BASELINE_VARIANTS
    assert "pf_limit[limit=8]" in BASELINE_VARIANTS
    assert "sequential" in BASELINE_VARIANTS and "multi_stream" in BASELINE_VARIANTS
    assert expand_policies(["nova", "chunked_prefill"]) == [
        "nova",
        *[v for v in BASELINE_VARIANTS if v.startswith("chunked_prefill")],
    ]
    assert expand_policies(["pf_limit[limit=2]"]) == ["pf_limit[limit=2]"]


def test_static_modes_are_on_the_grid_and_include_the_papers_point():
    exp = EXPERIMENTS["paper-a6000"]
    gpu = make_cost_model("roofline", "a6000", "cogagent-9b").gpu()
    modes = static_modes(exp, gpu)
    assert "spatial:24:30:1" in modes and "spatial:12:12:1" in modes
    h100 = EXPERIMENTS["paper-h100"]
    for label in static_modes(h100, make_cost_model("roofline", "h100-sxm", "cogagent-9b").gpu()):
        _, dv, dp, _ = label.split(":")
        assert int(dv) % 8 == 0 and int(dp) % 8 == 0 and int(dv) >= 16


def test_offloaded_vision_weights_leave_room_for_the_kv_cache():
    """CogAgent on a 24 GB RTX 4090 with the encoder offloaded: the KV cache holds requests
    (subtracting the offloaded encoder's weights left only the 64-block floor: every request
    was rejected)."""
    exp = EXPERIMENTS["rtx4090-cogagent-offload"]
    spec = experiment_spec(exp)
    cost = make_cost_model("roofline", exp.gpu, spec, offload_vision_weights=True)
    resident = num_kv_blocks(cost, spec, 16, offload_vision=False)
    offloaded = num_kv_blocks(cost, spec, 16, offload_vision=True)
    assert resident == 64  # the floor: weights alone do not fit
    assert offloaded * 16 > 40 * 1800  # dozens of ~1800-token requests
    report = run_experiment(
        replace(exp, series=(), rates_rps=(0.2,), seeds=(0,), baselines=("pf_limit[limit=4]",)),
        None,
        num_requests=20,
        progress=lambda _: None,
    )
    nova = report["policies"]["nova"][0]
    assert nova["num_requests"] == 20 and nova["throughput_rps"] > 0


def test_image_size_sets_the_image_tokens():
    exp = EXPERIMENTS["h100-qwen2.5-vl-7b-1080p"]
    assert experiment_spec(exp).image_tokens == 2691
    assert get_model_spec("qwen2.5-vl-7b").image_tokens == 1600


def _bench(name: str):
    return load_benchmark(name)


def _eval_all():
    return _bench("eval_all")


def test_quick_experiment_writes_results_and_the_must_hold_summary(tmp_path):
    """The CI version of the must-hold run (benchmarks/eval_all.py on the small experiment):
    3 seeds, the tuned variants it lists, the oracle; the summary's verdicts follow from the
    per-point figures; nova is never worse than the best tuned baseline there."""
    summary = _eval_all().main(["--only", "quick-a6000", "--out", str(tmp_path), "--workers", "1"])
    out = tmp_path / "quick-a6000"
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [0, 1, 2]
    assert {"nova", "oracle", "chunked_prefill[budget=128]", "nova[mode=spatial:24:30:1]"} <= set(
        data["policies"]
    )
    for name, pts in data["policies"].items():
        assert [p["load"] for p in pts] == [0.2, 0.5], name
        for p in pts:
            for key in REQUIRED:
                assert p[key] is not None and p[key] >= 0, (name, key)
            assert isinstance(p["sustained"], bool)
            assert (
                len(p["seeds"]) == 3 and p["spread"]["max_latency_s"]["min"] <= p["max_latency_s"]
            )
            assert p["max_latency_s"] >= p["p99_latency_s"] >= 0
    for png in ("latency_vs_load.png", "pareto.png", "latency_cdf.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "Headline" in md and "oracle" in md
    # the summary: one row per point, verdicts recomputed from the per-point means
    rows = summary["rows"]
    assert [r["load"] for r in rows] == [0.2, 0.5] and summary["must_hold_points"] == 2
    pols = data["policies"]
    for row in rows:
        at = {name: next(p for p in pts if p["load"] == row["load"]) for name, pts in pols.items()}
        best, oracle, nova = at[row["best_baseline"]], at[row["oracle"]], at["nova"]
        assert best["sustained"] and row["best_max_s"] == best["max_latency_s"]
        for key, metric in (("max", "max_latency_s"), ("p99", "p99_latency_s")):
            ratio = nova[metric] / best[metric]
            assert row["nova_vs_best"][key] == pytest.approx(ratio)
            assert row["checks"][f"{key}_vs_best"] is (ratio <= 1.03)
        ratio = nova["max_latency_s"] / oracle["max_latency_s"]
        assert row["checks"]["max_vs_oracle"] is (ratio <= 1.05)
        assert row["pass"] is all(row["checks"].values())
        assert sorted(row["failed"]) == sorted(k for k, v in row["checks"].items() if not v)
        # never worse than the best tuned baseline (a regression guard: deterministic seeds)
        never_worse = ("max_vs_best", "p99_vs_best", "mean_vs_best", "throughput_vs_best")
        assert all(row["checks"][k] for k in never_worse), row
    # one roll-up row for the experiment, one row per point
    assert (tmp_path / "summary.md").read_text().count("| quick-a6000 |") == 1 + 2
    assert summary["experiments"][0]["must_hold_points"] == 2


def test_custom_experiment_from_flags(tmp_path):
    from nova.cli import main

    code = main(
        [
            "eval",
            "--model",
            "qwen2.5-vl-7b",
            "--gpu",
            "rtx4090",
            "--workload",
            "bursty",
            "--burstiness",
            "2",
            "--image-size",
            "1280x720",
            "--rates",
            "0.5",
            "--policies",
            "nova,chunked_prefill[budget=256],pf_limit",
            "--seeds",
            "3",
            "--num-requests",
            "20",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["baselines"]) == {
        "chunked_prefill[budget=256]",
        "pf_limit[limit=2]",
        "pf_limit[limit=4]",
        "pf_limit[limit=8]",
    }
    assert data["workload"] == "bursty" and data["seeds"] == [0, 1, 2]
    assert (tmp_path / "latency_vs_load.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "qwen2.5-vl-7b", "--rates", "1"], "needs --gpu"),
        (["--model", "qwen2.5-vl-7b", "--gpu", "a6000"], "needs --rates"),
        (
            ["--model", "qwen2.5-vl-7b", "--gpu", "a6000", "--workload", "gui_sessions"],
            "needs --num-sessions",
        ),
        (
            ["--model", "qwen2.5-vl-7b", "--gpu", "a6000", "--rates", "1", "--image-size", "big"],
            "WxH",
        ),
    ],
)
def test_custom_experiment_bad_flags(argv, message, capsys):
    from nova.cli import main

    assert main(["eval", *argv]) == 2
    assert message in capsys.readouterr().err


def test_named_experiments_are_listed():
    for name in (
        "paper-a6000",
        "paper-h100",
        "rtx4090-cogagent-offload",
        "rtx4090-qwen2.5-vl-7b",
        "h100-qwen2.5-vl-7b-1080p",
        "bursty-a6000",
        "sessions-a6000",
        "quick-a6000",
    ):
        exp = EXPERIMENTS[name]
        assert len(exp.seeds) >= 3
    bursty = EXPERIMENTS["bursty-a6000"]
    cvs = [1 / math.sqrt(s.workload_kwargs["burstiness"]) for s in bursty.all_series()]
    assert cvs == pytest.approx([2, 3, 4])
    assert EXPERIMENTS["sessions-a6000"].all_series()[0].loads == (16, 32)


def test_eval_quantile_reruns_nova_alone_with_the_quantile_it_is_given(tmp_path):
    """benchmarks/eval_quantile.py: nova's queueing model takes the quantile only inside the
    run (restored after); at nova's default quantile the re-run reproduces the full
    evaluation's verdicts and ratios (deterministic seeds, the other configurations reused);
    its results keep nova and the configurations the analysis names; --summary-only rebuilds
    the same comparison."""
    mod = _bench("eval_quantile")
    exp = EXPERIMENTS["quick-a6000"]
    spec = experiment_spec(exp)
    cost = make_cost_model("roofline", exp.gpu, spec)
    default = build_policy("nova", exp, cost, spec).model.unlucky_quantile
    with mod.unlucky_quantile(0.5):
        assert build_policy("nova", exp, cost, spec).model.unlucky_quantile == 0.5
    assert build_policy("nova", exp, cost, spec).model.unlucky_quantile == default

    base = tmp_path / "base"
    _eval_all().main(["--only", "quick-a6000", "--out", str(base), "--workers", "1"])
    out = tmp_path / "q"
    args = ["--quantiles", str(default), "0.5", "--base", str(base), "--out", str(out), "--quiet"]
    runs = mod.main(args)
    assert len(runs["base"]["rows"]) == len(runs[str(default)]["rows"]) == 2
    for b, q in zip(runs["base"]["rows"], runs[str(default)]["rows"], strict=True):
        assert (b["load"], b["pass"], b["failed"]) == (q["load"], q["pass"], q["failed"])
        assert b["nova_vs_best"] == pytest.approx(q["nova_vs_best"], rel=1e-12)
        assert b["nova_vs_oracle"] == pytest.approx(q["nova_vs_oracle"], rel=1e-12)
    kept = json.loads((out / "q0.5" / "quick-a6000" / "results.json").read_text())
    named = {a[k] for a in kept["analysis"] for k in ("best_baseline", "oracle")}
    assert set(kept["policies"]) == {"nova", "oracle"} | named
    full = json.loads((base / "quick-a6000" / "results.json").read_text())
    assert set(full["policies"]) - set(kept["policies"])  # the others are left to the base
    text = (out / "summary.md").read_text()
    assert "| quick-a6000 | 2 |" in text and f"q={default}" in text and "q=0.5" in text
    mod.main([*args, "--summary-only"])
    assert (out / "summary.md").read_text() == text


def test_summary_names_the_experiments_its_wall_time_is_for():
    """A summary rebuilt over results from two runs (--only, then --summary-only) says which
    experiments the recorded wall time is for; a summary of one run says nothing more."""
    ev = _eval_all()
    exp = {
        "requests_per_point": 60,
        "seeds": [0],
        "points": 1,
        "must_hold_points": 1,
        "passing_points": 1,
        "nova_vs_best_max": None,
        "oracle_gain_max": None,
    }
    summary = {
        "experiments": [{**exp, "experiment": "a"}, {**exp, "experiment": "b"}],
        "rows": [],
        "points": 2,
        "must_hold_points": 2,
        "passing_points": 2,
    }
    meta = {"machine": {}, "wall_s": 12}
    part = ev.render(summary, {**meta, "experiments_run": ["b"]})
    assert "wall time 12 s for b (this run;" in part and "carried over" in part
    for whole in (
        ev.render(summary, {**meta, "experiments_run": ["a", "b"]}),
        ev.render(summary, meta),
    ):
        assert "wall time 12 s. " in whole and "carried over" not in whole


def test_heldout_seeds_rerun_the_committed_choices(tmp_path):
    """benchmarks/eval_heldout.py on the small experiment: every must-hold point re-run on a
    seed the evaluation did not use, against the best baseline and oracle it chose; the
    verdicts follow from the held-out ratios; the paired interval brackets its mean."""
    base = tmp_path / "base"
    _eval_all().main(["--only", "quick-a6000", "--out", str(base), "--workers", "1"])
    heldout = _bench("eval_heldout")
    summary = heldout.main(
        ["--base", str(base), "--seeds", "3", "4", "--workers", "1", "--out", str(tmp_path / "h")]
    )
    committed = json.loads((base / "quick-a6000" / "results.json").read_text())["analysis"]
    rows = summary["points"]
    assert [(r["series"], r["load"]) for r in rows] == [
        (a["series"], a["load"]) for a in committed if a["must_hold"]
    ]
    for r, a in zip(rows, committed):
        assert r["best_baseline"] == a["best_baseline"] and r["committed_pass"] == a["pass"]
        nb = r["nova_vs_best"]
        assert r["checks"]["max_vs_best"] == (nb["max"] <= 1.03)
        assert r["checks"]["throughput_vs_best"] == (nb["throughput"] >= 0.98)
        assert r["pass"] == all(r["checks"].values())
        pi = r["max_ratio_paired"]
        assert pi["low95"] <= pi["geomean"] <= pi["high95"]
    assert (tmp_path / "h" / "summary.md").read_text().count("| quick-a6000 |") == len(rows)
    # nova alone, the other configurations' runs reused: the same figures (deterministic per
    # seed), and a reuse on other seeds is refused
    reuse = ["--reuse", str(tmp_path / "h"), "--out", str(tmp_path / "r")]
    again = heldout.main(["--base", str(base), "--seeds", "3", "4", "--workers", "1", *reuse])
    assert [r["nova_vs_best"] for r in again["points"]] == [r["nova_vs_best"] for r in rows]
    with pytest.raises(SystemExit):
        heldout.main(["--base", str(base), "--seeds", "3", "--reuse", str(tmp_path / "h")])
    # benchmarks/heldout_sets.py pools sets: here the same two seeds twice, so each point's
    # pooled ratio is the set's and its passes twice the set's; sets of other nova specs refused
    sets = _bench("heldout_sets")
    pooled = sets.pool([tmp_path / "h", tmp_path / "r"])
    assert len(pooled["points"]) == len(rows)
    by_key = {(p["series"], p["load"]): p for p in pooled["points"]}
    for r in rows:
        p = by_key[(r["series"], float(r["load"]))]
        assert p["pooled_seeds"] == 4 and p["passes"] == 2 * r["pass"]
        shares = [x["baseline_mode_share"] for x in p["per_seed"]]
        assert len(shares) == 4 and all(x is None or 0.0 <= x <= 1.0 for x in shares)
        assert p["pooled_max"]["geomean"] == pytest.approx(r["max_ratio_paired"]["geomean"])
        assert p["pooled_max"]["high95"] - p["pooled_max"]["low95"] <= (
            r["max_ratio_paired"]["high95"] - r["max_ratio_paired"]["low95"] + 1e-12
        )
    assert "| quick-a6000 |" in sets.render(pooled)
    assert sets.baseline_mode("chunked_prefill[budget=256]") == "chunked:256"
    assert sets.baseline_mode("pf_limit[limit=4]") is None
    runs = [
        {"max_ratio": 1.1, "baseline_mode_share": 0.2},
        {"max_ratio": 1.0, "baseline_mode_share": 1.0},
    ]
    bins = {b["share"]: b for b in sets.by_share(runs)}
    assert bins["0.9-1"]["runs"] == 1 and bins["0-0.5"]["over_1_03"] == 1
    assert bins["0.5-0.9"]["runs"] == 0
    other = json.loads((tmp_path / "r" / "summary.json").read_text())
    (tmp_path / "r" / "summary.json").write_text(json.dumps({**other, "nova": "nova[x=1]"}))
    with pytest.raises(SystemExit, match="different nova specs"):
        sets.pool([tmp_path / "h", tmp_path / "r"])


def test_paired_interval_of_log_ratios():
    interval = _bench("eval_heldout").paired_interval
    assert interval([2.0, 2.0, 2.0], [1.0, 1.0, 1.0]) == pytest.approx((2.0, 2.0, 2.0))
    gm, low, high = interval([1.1, 0.9, 1.2, 1.0], [1.0, 1.0, 1.0, 1.0])
    assert low < gm < high and gm == pytest.approx((1.1 * 0.9 * 1.2) ** 0.25)
    assert high / low > 1.2  # four noisy seeds: a wide interval


def _timeless(x):
    """``x`` without its wall-clock fields (``sim_wall_s``: how long a simulation took)."""
    if isinstance(x, dict):
        return {k: _timeless(v) for k, v in x.items() if k != "sim_wall_s"}
    if isinstance(x, list):
        return [_timeless(v) for v in x]
    return x


def test_reuse_reruns_nova_alone_and_matches_a_full_run():
    """``run_experiment(reuse=...)`` takes every policy's runs but nova's from an earlier report
    and re-runs nova: the report equals a full run's (the statics are fixed nova modes, which
    never consult the model), and a report of other seeds or another experiment is refused."""
    exp = replace(
        EXPERIMENTS["quick-a6000"],
        rates_rps=(0.3,),
        seeds=(0, 1),
        baselines=("chunked_prefill[budget=256]", "pf_limit[limit=4]"),
    )
    quiet = {"progress": lambda _: None, "num_requests": 30, "plots": False}
    full = run_experiment(exp, None, **quiet)
    again = run_experiment(exp, None, reuse=json.loads(json.dumps(full)), **quiet)
    assert _timeless(again["policies"]) == _timeless(full["policies"])
    assert again["analysis"] == full["analysis"]
    with pytest.raises(ValueError, match="seeds"):
        run_experiment(replace(exp, seeds=(0,)), None, reuse=full, **quiet)
    with pytest.raises(ValueError, match="not 'paper-a6000'"):
        run_experiment("paper-a6000", None, reuse=full, **quiet)
    doctored = json.loads(json.dumps(full))  # the reused runs are taken, not re-run
    doctored["policies"]["pf_limit[limit=4]"][0]["seeds"][0]["max_latency_s"] = 1234.0
    taken = run_experiment(exp, None, reuse=doctored, **quiet)
    assert taken["policies"]["pf_limit[limit=4]"][0]["spread"]["max_latency_s"]["max"] == 1234.0
    dropped = json.loads(json.dumps(full))
    del dropped["policies"]["pf_limit[limit=4]"]
    with pytest.raises(ValueError, match="no runs of 'pf_limit"):
        run_experiment(exp, None, reuse=dropped, **quiet)


def test_a_reuse_run_draws_its_plots_with_the_cdf_runs_rerun(tmp_path):
    """A ``reuse`` run writes the three plots (they were left stale before): the latency CDF's
    fixed policies, whose reused runs keep no per-request latencies, are re-run at the
    headline point's first seed, each request's latency kept; the reused runs are not touched."""
    exp = replace(
        EXPERIMENTS["quick-a6000"],
        rates_rps=(0.3,),
        seeds=(0, 1),
        baselines=("chunked_prefill[budget=128]", "pf_limit[limit=4]"),
        num_requests=30,
    )
    quiet = {"progress": lambda _: None}
    full = run_experiment(exp, None, plots=False, **quiet)
    run_experiment(exp, tmp_path, reuse=json.loads(json.dumps(full)), **quiet)
    for name in ("latency_vs_load.png", "pareto.png", "latency_cdf.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    h = full["headline"]
    assert h is not None
    fixed = [h["best_baseline"], "chunked_prefill[budget=128]", "pf_limit[limit=4]"]
    raw = reused_runs(full, exp, list(dict.fromkeys(fixed)))
    drawn = headline_cdf_runs(exp, full, raw)
    cell = (full["series"].index(h["series"]), h["load"])
    for policy in fixed:
        e2e = drawn[cell][policy][0]["e2e_s"]
        assert len(e2e) == 30 and e2e == sorted(e2e)
        assert max(e2e) == pytest.approx(drawn[cell][policy][0]["max_latency_s"])
        assert "e2e_s" not in raw[cell][policy][0]  # the reused runs are left as they were
        assert drawn[cell][policy][1] is raw[cell][policy][1]  # other seeds: not re-run


def test_fine_budget_baselines_picks_nova_budgets_off_the_grid_and_the_best_baseline():
    """benchmarks/fine_budget_baselines.py: the budgets outside 128/256/512/2048 where nova spent
    at least the minimum share of its runs (mean over seeds), and the comparison with the
    lowest mean max among the point's baselines."""
    fine = _bench("fine_budget_baselines")
    point = ("x", "", 0.5)

    def row(policy: str, seed: int, max_s: float, modes: dict | None = None) -> dict:
        metrics = {"max_latency_s": max_s, "p99_latency_s": max_s, "mean_latency_s": max_s / 2}
        if modes is not None:
            metrics["modes"] = modes
        return {"experiment": "x", "series": "", "load": 0.5, "policy": policy, "seed": seed,
                "metrics": metrics}  # fmt: skip

    rows = [
        row("nova", 0, 9.0, {"chunked:160": 0.95, "chunked:256": 0.05}),
        row("nova", 1, 11.0, {"chunked:160": 0.85, "chunked:320": 0.15}),
        row("chunked_prefill[budget=256]", 0, 10.0),
        row("chunked_prefill[budget=256]", 1, 12.0),
        row("chunked_prefill[budget=160]", 0, 9.0),
        row("chunked_prefill[budget=160]", 1, 10.0),
    ]
    assert fine.nova_budgets(rows, 0.10) == {point: [160]}  # 320: 7.5% of the runs
    assert fine.nova_budgets(rows, 0.05) == {point: [160, 320]}
    runs = fine.runs_by_point(rows)[point]
    out = fine.compare(
        {"candidates": ["chunked_prefill[budget=256]", "chunked_prefill[budget=160]"]}, runs
    )
    assert out["fine_baseline"] == "chunked_prefill[budget=160]"
    assert out["nova_vs_fine"]["max"] == pytest.approx(20.0 / 19.0)
    only_grid = fine.compare({"candidates": ["chunked_prefill[budget=256]"]}, runs)
    assert only_grid["nova_vs_fine"]["max"] == pytest.approx(20.0 / 22.0)
