"""The cost model's evidence files (nova/cost/data): every number names its source, the loader
rejects what does not, measured files replace defaults, and the model follows the evidence."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

from nova.cost import GPUS, ModelSpec, StageWork, make_cost_model
from nova.cost.evidence import (
    DATA_DIR,
    VALUE_RANGES,
    EvidenceError,
    load_evidence,
    parse_evidence,
    read_evidence_file,
    shipped_evidence_files,
)
from nova.cost.roofline import (
    Calibration,
    RooflineCostModel,
    calibrate_to_profile,
    profile_works,
    wave_efficiency,
)
from nova.types import Stage


def _doc(**values: object) -> dict:
    return {"format": "nova-cost-evidence", "version": 1, "gpu": "h200", "values": values}


def _num(value: float, source: str = "a paper, Table 1", on: str = "h200") -> dict:
    return {"value": value, "source": source, "measured_on": on}


# -- the shipped files ---------------------------------------------------------------------------
def test_every_shipped_evidence_file_loads_and_every_gpu_has_all_values():
    files = shipped_evidence_files()
    assert {p.name for p in files} >= {"common.json", "a6000.json", "h200.json", "cpu.json"}
    for path in files:
        read_evidence_file(path)  # raises on a number without a source
    for gpu in GPUS:
        ev = load_evidence(gpu)
        assert set(VALUE_RANGES) - {"matmul_ceiling"} <= set(ev.values), gpu
        for name, s in ev.values.items():
            assert s.source.strip() and s.measured_on.strip(), (gpu, name)
        for point in ev.hbm_vs_sms.points:
            assert point.source.strip() and point.measured_on.strip()


def test_borrowed_numbers_say_where_they_come_from():
    h200 = load_evidence("h200")
    assert h200.borrowed()["decode_bandwidth_fraction"] == "h100-sxm"
    assert h200.borrowed()["hbm_vs_sms.points"] == "a100-40g"
    a6000 = load_evidence("a6000")
    assert "vision_efficiency" not in a6000.borrowed()  # fitted on the A6000 itself
    assert a6000.borrowed()["hbm_vs_sms.points"] == "a40"
    assert a6000.borrowed()["interference_memory_beside_compute"] == "a100"
    assert "decode_overhead_s" in a6000.assumptions()


def test_other_gpus_efficiencies_follow_their_stated_derivation():
    """vision/prefill efficiency = this GPU's matmul ceiling x the A6000 fit / the A6000's
    ceiling, as the files' sources say."""
    a6000 = load_evidence("a6000")
    for gpu in ("rtx4090", "a100-80g", "h100-sxm", "h200"):
        ev = load_evidence(gpu)
        for stage in ("vision", "prefill"):
            want = ev["matmul_ceiling"] * a6000[f"{stage}_efficiency"] / a6000["matmul_ceiling"]
            assert ev[f"{stage}_efficiency"] == pytest.approx(want, abs=2e-4), (gpu, stage)
            assert "a6000" in ev.values[f"{stage}_efficiency"].measured_on


def test_cpu_evidence_is_the_fit_to_our_committed_profile():
    profile = make_cost_model("profiled", "cpu", "demo")
    spec = ModelSpec.named("demo")
    works = profile_works(profile.metadata, spec)
    times = {s: profile.time_s(w, 1.0) for s, w in works.items()}
    fit = calibrate_to_profile(times, works, "cpu", spec, Calibration.for_gpu("cpu"))
    shipped = Calibration.for_gpu("cpu")
    for name in ("vision_mfu", "prefill_mfu", "bw_eff"):
        assert getattr(shipped, name) == pytest.approx(getattr(fit, name), rel=2e-3), (
            f"{name}: nova/cost/data/gpus/cpu.json is stale; rerun "
            "benchmarks/calibration.py --refit after refreshing the CPU profile"
        )
    roofline = RooflineCostModel("cpu", spec)
    for stage, work in works.items():
        assert roofline.time_s(work, 1.0) == pytest.approx(times[stage], rel=1e-3)


# -- the loader rejects what has no source ---------------------------------------------------------
@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_doc(decode_bandwidth_fraction=0.7), "must be an object"),
        (_doc(decode_bandwidth_fraction={"value": 0.7, "measured_on": "h200"}), "'source'"),
        (_doc(decode_bandwidth_fraction=_num(0.7, source=" ")), "'source'"),
        (_doc(decode_bandwidth_fraction=_num(0.7, on="")), "'measured_on'"),
        (_doc(decode_bandwidth_fraction=_num(1.7)), "outside"),
        (_doc(hbm_saturation_share=_num(0.3)), "unknown value"),
        (_doc(decode_bandwidth_fraction={**_num(0.7), "why": "x"}), "unknown fields"),
        ({"format": "other", "version": 1}, "not a cost evidence file"),
        ({**_doc(), "hbm_vs_sms": {"points": [{"sms": 8, "fraction": 0.5}]}}, "'source'"),
        ({**_doc(), "hbm_vs_sms": {"points": [0.5]}}, "must be an object"),
        (
            {
                **_doc(),
                "hbm_vs_sms": {
                    "points": [
                        {"sms": 16, "fraction": 0.5, "source": "s", "measured_on": "h200"},
                        {"sms": 8, "fraction": 0.6, "source": "s", "measured_on": "h200"},
                    ]
                },
            },
            "ascending",
        ),
        ({**_doc(), "curves": {"decode": [{"sms": 8, "value_s": 0.01}]}}, "'source'"),
    ],
)
def test_a_number_without_a_source_is_a_load_error(doc, message):
    with pytest.raises(EvidenceError, match=message):
        parse_evidence(doc, "test.json")


def test_missing_values_are_a_load_error(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATA_DIR, data)
    d = json.loads((data / "gpus" / "h200.json").read_text())
    del d["values"]["decode_bandwidth_fraction"]
    (data / "gpus" / "h200.json").write_text(json.dumps(d))
    with pytest.raises(EvidenceError, match="no evidence for .*decode_bandwidth_fraction"):
        load_evidence("h200", data)
    with pytest.raises(EvidenceError, match="no evidence file for GPU 'b200'"):
        load_evidence("b200", data)


# -- measured files replace the defaults ---------------------------------------------------------
def _measured(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(DATA_DIR, data)
    (data / "measured").mkdir(exist_ok=True)
    src = "our measurement, NVIDIA H200, 2026-01-01 (benchmarks/gpu_sm_curves.py)"
    measured = {
        "format": "nova-cost-evidence",
        "version": 1,
        "gpu": "h200",
        "values": {"decode_bandwidth_fraction": _num(0.5, src)},
        "hbm_vs_sms": {
            "points": [
                {"sms": 8, "fraction": 1.0, "source": src, "measured_on": "h200"},
            ]
        },
        "curves": {
            "decode_step_s": [{"sms": 8, "value_s": 0.01, "source": src, "measured_on": "h200"}]
        },
    }
    (data / "measured" / "h200-2026-01-01.json").write_text(json.dumps(measured))
    return data


def test_measured_evidence_replaces_the_defaults(tmp_path):
    data = _measured(tmp_path)
    ev = load_evidence("h200", data)
    assert ev["decode_bandwidth_fraction"] == 0.5
    assert ev.values["decode_bandwidth_fraction"].file == "measured/h200-2026-01-01.json"
    assert "decode_bandwidth_fraction" not in ev.borrowed()  # now measured on the H200 itself
    assert ev.files[-1] == "measured/h200-2026-01-01.json" and "decode_step_s" in ev.curves
    shipped = RooflineCostModel("h200", "cogagent-9b")
    measured = RooflineCostModel("h200", "cogagent-9b", evidence=ev)
    decode = StageWork.decode([1800] * 4)
    # the measured curve: 8 SMs already reach the full bandwidth; the shipped one does not
    assert measured.time_s(decode, 8 / 132) == pytest.approx(measured.time_s(decode, 1.0))
    assert shipped.time_s(decode, 8 / 132) > 3 * shipped.time_s(decode, 1.0)
    assert measured.time_s(decode, 1.0) > shipped.time_s(decode, 1.0)  # 0.5 < 0.69 of peak


# -- the model follows the evidence --------------------------------------------------------------
def test_wave_formula_reproduces_bullet_table_2():
    """Bullet (arXiv 2504.19516) Table 2: theoretical SM idle % of Llama-3.1-8B prefill GEMMs on
    an A100 (108 SMs) from wave quantization: QKV (N = 6144) and O-proj (N = 4096) rows, with
    the 256 x 128 tile of the Ampere evidence and one block per SM."""
    a100 = load_evidence("a100-80g")
    tile_m, tile_n = int(a100["gemm_tile_m"]), int(a100["gemm_tile_n"])
    table = {6144: (11.1, 11.1, 11.1, 1.9), 4096: (40.7, 21.0, 5.2, 0.2)}
    for n, idle in table.items():
        for seq, want in zip((1024, 2048, 4096, 16384), idle):
            got = 100 * (1 - wave_efficiency(seq, n, 108, tile_m, tile_n))
            assert got == pytest.approx(want, abs=0.06), (n, seq)


def test_compute_is_not_proportional_to_sms():
    """Wave quantization: the same prefill on fewer SMs can use them better or worse than a
    straight proportion; never faster with fewer SMs."""
    m = make_cost_model("roofline", "a6000", "cogagent-9b")
    prefill = StageWork.prefill(1750)
    full = m.breakdown(prefill, 1.0).compute_s
    ratios = {k: m.breakdown(prefill, k / 84).compute_s / (full * 84 / k) for k in range(4, 85, 2)}
    assert min(ratios.values()) < 0.97 and max(ratios.values()) > 1.03  # both ways
    times = [m.time_s(prefill, k / 84) for k in range(4, 85, 2)]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(times))


def test_hbm_saturation_differs_by_gpu():
    """The SMs that reach 90% of the bandwidth differ per GPU (not 30% of the SMs everywhere):
    GDDR parts need few, HBM parts most."""
    share_for_90 = {}
    for gpu in ("a6000", "rtx4090", "a100-80g", "h100-sxm", "h200"):
        ev = load_evidence(gpu)
        n = GPUS[gpu].num_sms
        share_for_90[gpu] = ev.hbm_vs_sms.sms_for(0.9, n) / n
    assert share_for_90["rtx4090"] < share_for_90["a6000"] < 0.35
    assert share_for_90["h100-sxm"] < share_for_90["h200"]
    assert share_for_90["a100-80g"] > 0.6 and share_for_90["h200"] > 0.6


def test_the_papers_a6000_operating_points_keep_decode_near_full_speed():
    """A consistency check the fit does not use: the paper runs decode on 24-30 of 84 SMs, where
    the evidence's curve keeps decode within ~12% of its full-GPU speed, and drops it to 12
    under backlog, where decode is about half as fast."""
    m = make_cost_model("roofline", "a6000", "cogagent-9b")
    decode = StageWork.decode([1800] * 4)
    full = m.time_s(decode, 1.0)
    assert m.time_s(decode, 24 / 84) < 1.12 * full and m.time_s(decode, 30 / 84) < 1.03 * full
    assert 1.6 * full < m.time_s(decode, 12 / 84) < 2.2 * full


def test_decode_is_the_sensitive_side_of_a_co_run():
    m = make_cost_model("roofline", "a6000", "cogagent-9b")
    decode, prefill = StageWork.decode([1800] * 4), StageWork.prefill(1750)
    d_alone, p_alone = m.time_s(decode, 30 / 84), m.time_s(prefill, 54 / 84)
    d_co = m.time_s(decode, 30 / 84, [(prefill, 54 / 84)])
    p_co = m.time_s(prefill, 54 / 84, [(decode, 30 / 84)])
    assert d_co / d_alone > p_co / p_alone > 1.0
    # x 1.15 (interference_memory_beside_compute) and the bandwidth prefill itself takes
    assert 1.15 < d_co / d_alone < 1.3
    assert m.breakdown(prefill, 54 / 84).bound == "compute"
    assert m.breakdown(decode, 30 / 84).bound == "memory"


def test_granted_sms_not_raw_shares_drive_the_model():
    m = make_cost_model("roofline", "h100-sxm", "cogagent-9b")
    prefill = StageWork.prefill(1750)
    # 0.5 of 132 SMs = 66, granted 64: the same time as asking for 64 exactly
    assert m.time_s(prefill, 0.5) == m.time_s(prefill, 64 / 132)
    assert m.breakdown(prefill, 0.5).effective_share == 64 / 132
    # the exact remainder beside a 24-SM decode slice is 108 SMs, not rounded to 104 or 112
    assert m.breakdown(prefill, 108 / 132).effective_share == 108 / 132


def test_stage_work_stages_cover_the_evidence():
    assert {s.value for s in Stage} == {"vision", "prefill", "decode"}
    for stage in ("vision", "prefill", "decode"):
        assert f"{stage}_efficiency" in VALUE_RANGES and f"{stage}_overhead_s" in VALUE_RANGES


def test_a_profile_with_sm_shares_becomes_the_bandwidth_curve(tmp_path):
    from nova.cost.profile_evidence import evidence_from_profile, profile_evidence_path
    from nova.cost.profiled import ProfiledCostModel

    overhead = 0.0015
    shares = [12 / 84, 24 / 84, 0.5, 1.0]
    memory_ms = {12 / 84: 40.0, 24 / 84: 25.0, 0.5: 21.0, 1.0: 20.0}
    decode = [
        [[overhead + memory_ms[s] / 1e3 * b / 8 for _ in (1, 2)] for b in (1, 8)] for s in shares
    ]
    profile = ProfiledCostModel.from_dict(
        {
            "format": "nova-cost-profile",
            "version": 1,
            "metadata": {"model": "m", "gpu": "a6000", "date": "2026-01-01"},
            "stages": {
                "decode": {
                    "axes": ["batch_size", "mean_context_len"],
                    "grid": [[1, 8], [100, 1000]],
                    "shares": shares,
                    "latency_s": decode,
                }
            },
        }
    )
    doc = evidence_from_profile(profile, overhead, name="m-a6000.json")
    points = {p["sms"]: p["fraction"] for p in doc["hbm_vs_sms"]["points"]}
    assert points == {12: 0.5, 24: 0.8, 42: pytest.approx(20 / 21, abs=1e-4), 84: 1.0}
    data = tmp_path / "data"
    shutil.copytree(DATA_DIR, data)
    path = profile_evidence_path(data, "a6000", Path("m-a6000.json"))
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(doc))
    ev = load_evidence("a6000", data)
    model = RooflineCostModel("a6000", "cogagent-9b", evidence=ev)
    assert model.bandwidth_fraction(12) == 0.5 and model.bandwidth_fraction(24) == 0.8
    one = ProfiledCostModel.from_dict(
        {
            **profile.to_dict(),
            "stages": {
                "decode": {
                    **profile.to_dict()["stages"]["decode"],
                    "shares": [1.0],
                    "latency_s": [decode[-1]],
                }
            },
        }
    )
    with pytest.raises(EvidenceError, match="at least two SM shares"):
        evidence_from_profile(one, overhead)


def test_co_running_partitions_never_get_more_sms_than_the_gpu():
    """Shares a policy did not build with split_sms: each rounded on its own would overbook
    (72 + 64 of 132); side by side the cost model grants them within the device."""
    m = make_cost_model("roofline", "h100-sxm", "cogagent-9b")
    decode, prefill = StageWork.decode([1800] * 4), StageWork.prefill(1750)
    d = m.breakdown(decode, 70 / 132, [(prefill, 62 / 132)]).effective_share
    p = m.breakdown(prefill, 62 / 132, [(decode, 70 / 132)]).effective_share
    assert d * 132 + p * 132 <= 132
    general = m._terms(decode, 70 / 132, [(prefill, 62 / 132)], True, pair_path=False)
    assert general == m._terms(decode, 70 / 132, [(prefill, 62 / 132)], True)
