"""benchmarks/gpu_sm_curves.py: the CPU smoke path end to end, and the GPU path's evidence
derivation on synthetic measurements (the shipped model's own predictions must come back as the
shipped model)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from nova.cost.base import StageWork
from nova.cost.evidence import DATA_DIR, load_evidence, parse_evidence
from nova.cost.gpus import get_gpu
from nova.cost.model_spec import ModelSpec
from nova.cost.roofline import RooflineCostModel
from nova.cost.sm_grid import split_sms

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "gpu_sm_curves", ROOT / "benchmarks" / "gpu_sm_curves.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_sm_curves"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_writes_loadable_evidence(tmp_path):
    mod = _load_script()
    evidence = tmp_path / "cpu-smoke.json"
    assert mod.main(["--smoke", "--out-dir", str(tmp_path), "--out-evidence", str(evidence)]) == 0
    doc = json.loads(evidence.read_text())
    parse_evidence(doc, "smoke")
    assert doc["gpu"] == "cpu" and "our measurement" in doc["values"]["vision_efficiency"]["source"]
    summary = json.loads((tmp_path / "gpu_sm_curves.json").read_text())
    assert set(summary["stages"]) == {"vision", "prefill"} and summary["decode"]
    assert "Stage time vs granted SMs" in (tmp_path / "gpu_sm_curves.md").read_text()
    # dropped into a data tree's measured/, it replaces the cpu defaults
    data = tmp_path / "data"
    shutil.copytree(DATA_DIR, data)
    (data / "measured").mkdir(exist_ok=True)
    shutil.copy(evidence, data / "measured" / "cpu-smoke.json")
    ev = load_evidence("cpu", data)
    assert ev.values["vision_efficiency"].file == "measured/cpu-smoke.json"


def _synthetic_results(gpu_name: str) -> tuple[dict, RooflineCostModel, ModelSpec]:
    """What the script would record on ``gpu_name`` if the shipped model were exactly right."""
    gpu = get_gpu(gpu_name)
    spec = ModelSpec.named("qwen2.5-vl-7b").for_image(1120, 1120)
    model = RooflineCostModel(gpu, spec)
    n, ctx, prefill_tokens = gpu.num_sms, 2048, 2048
    points = sorted({*gpu.grid.aligned_counts()[::2], n})
    works = {"vision": StageWork.vision(1), "prefill": StageWork.prefill(prefill_tokens)}
    res = {
        "device_name": "synthetic",
        "date": "2026-01-01",
        "backend": "synthetic",
        "num_sms": n,
        "shapes": {"image": "1120x1120", "prefill_tokens": prefill_tokens, "decode_context": ctx},
        "decode": {
            str(b): {str(k): model.time_s(StageWork.decode([ctx] * b), k / n) for k in points}
            for b in (1, 8)
        },
        "stages": {
            name: {str(k): model.time_s(w, k / n) for k in points} for name, w in works.items()
        },
        "corun": [],
    }
    decode = StageWork.decode([ctx] * 8)
    for d in (24, 48):
        g = split_sms(gpu, d)
        ds, cs = g.decode_share, g.compute_share()
        for name, w in works.items():
            res["corun"].append(
                {
                    "decode_sms": g.decode,
                    "compute_sms": g.compute[0],
                    "beside": name,
                    "decode_batch": 8,
                    "decode_alone_s": model.time_s(decode, ds),
                    "decode_corun_s": model.time_s(decode, ds, [(w, cs)]),
                    "compute_alone_s": model.time_s(w, cs),
                    "compute_corun_s": model.time_s(w, cs, [(decode, ds)]),
                }
            )
    return res, model, spec


@pytest.mark.parametrize("gpu_name", ["h200", "a6000"])
def test_evidence_from_the_models_own_predictions_is_the_model(gpu_name):
    mod = _load_script()
    res, model, spec = _synthetic_results(gpu_name)
    doc, derived = mod.build_evidence(res, model.gpu(), spec, "synthetic measurement")
    parse_evidence(doc, "synthetic")
    values = {k: v["value"] for k, v in doc["values"].items()}
    calib, inter = model.calib, model.interference
    assert values["vision_efficiency"] == pytest.approx(calib.vision_mfu, abs=1e-4)
    assert values["prefill_efficiency"] == pytest.approx(calib.prefill_mfu, abs=1e-4)
    assert values["decode_bandwidth_fraction"] == pytest.approx(calib.bw_eff, abs=1e-4)
    assert values["interference_memory_beside_compute"] == pytest.approx(
        inter.memory_beside_compute, abs=2e-3
    )
    assert values["interference_compute_per_load"] == pytest.approx(
        inter.compute_per_load, abs=2e-3
    )
    n = model.gpu().num_sms
    ctx = res["shapes"]["decode_context"]
    b = derived["curve_batch"]
    for p in doc["hbm_vs_sms"]["points"]:
        if model.breakdown(StageWork.decode([ctx] * b), p["sms"] / n).bound == "memory":
            assert p["fraction"] == pytest.approx(model.bandwidth_fraction(p["sms"]), abs=2e-3)
    assert doc["curves"]["corun"] and all("source" in p for p in doc["curves"]["corun"])


def test_a_decode_step_within_the_fitted_overhead_leaves_the_default_curve():
    """A loaded CPU's smoke run once timed the largest decode batch on every core below the
    fitted per-step overhead: no memory time to take fractions of, so no curve is written
    (the file would not load: fractions of 0), and the summary says why."""
    mod = _load_script()
    res, model, spec = _synthetic_results("h200")
    _, derived = mod.build_evidence(res, model.gpu(), spec, "synthetic measurement")
    b, n = derived["curve_batch"], res["num_sms"]
    res["decode"][str(b)][str(n)] = 1e-7
    doc, derived = mod.build_evidence(res, model.gpu(), spec, "synthetic measurement")
    assert "hbm_vs_sms" not in doc and "curve_batch" not in derived
    assert f"decode batch {b}" in derived["curve_skipped"]
    parse_evidence(doc, "synthetic")
