"""Cost models (nova.cost): GPU specs, model shapes, roofline calibration, profiled tables."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nova.cost import (
    GPUS,
    PAPER_STAGE_TIMES_S,
    Calibration,
    CostModel,
    ModelSpec,
    ProfiledCostModel,
    RooflineCostModel,
    StageWork,
    calibrate_to_paper,
    get_gpu,
    make_cost_model,
    paper_works,
)
from nova.cost.profiled import PROFILES_DIR, ProfileError, interpolate, merge_profiles
from nova.cost.roofline import water_fill
from nova.types import Batch, BatchItem, Partition, Stage

REPO = Path(__file__).resolve().parent.parent
REAL_GPUS = ("a6000", "rtx4090", "a100-80g", "h100-sxm", "h200")


@pytest.fixture(scope="module")
def cog() -> ModelSpec:
    return ModelSpec.named("cogagent-9b")


@pytest.fixture(scope="module")
def a6000(cog) -> RooflineCostModel:
    return RooflineCostModel(get_gpu("a6000"), cog, Calibration.for_gpu("a6000"))


def _works(cog: ModelSpec) -> dict[Stage, StageWork]:
    return paper_works(cog)


# -- torch-free ---------------------------------------------------------------------------------
def test_import_is_torch_free():
    code = (
        "import nova.cost, sys\n"
        "from nova.cost import make_cost_model, StageWork\n"
        "m = make_cost_model('roofline', 'a6000', 'cogagent-9b')\n"
        "m.time_s(StageWork.decode(100), 0.5)\n"
        "make_cost_model('profiled', 'cpu', 'demo')\n"
        "assert 'torch' not in sys.modules, 'nova.cost imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# -- GPUs -----------------------------------------------------------------------------------------
def test_gpu_registry_and_granularity():
    assert set(REAL_GPUS) | {"cpu"} <= set(GPUS)
    a6000, h100 = get_gpu("A6000"), get_gpu("h100-sxm")
    assert a6000.num_sms == 84 and h100.num_sms == 132
    assert a6000.granted_sms(1.0) == 84 and h100.granted_sms(1.0) == 132
    assert a6000.granted_sms(0.5) == 42  # exact, no spurious rounding up
    assert a6000.granted_sms(0.3) == 26  # 25.2 -> rounded up to a multiple of 2
    assert a6000.granted_sms(1 / 84) == 4  # minimum partition on 8.x
    assert h100.granted_sms(0.3) == 40  # 39.6 -> multiple of 8
    assert h100.granted_sms(0.01) == 8
    assert get_gpu("cpu").granted_share(0.3) == 1.0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="SM share"):
            a6000.granted_sms(bad)


def test_unknown_gpu_error_lists_known():
    with pytest.raises(ValueError, match=r"unknown GPU 'b200'.*a6000.*h100-sxm"):
        get_gpu("b200")


# -- model shapes ----------------------------------------------------------------------------------
def test_cogagent_shape(cog):
    assert 9.2e9 < cog.text_params() < 9.6e9  # GLM-4-9B
    assert 4.2e9 < cog.vision_params() < 4.7e9  # EVA2-CLIP-E + projector
    assert cog.vision_tokens == 6400 and cog.image_tokens == 1600
    assert cog.kv_bytes_per_token == 2 * 40 * 2 * 128 * 2


def test_llava_and_causal_lm_shapes():
    llava = ModelSpec.named("llava-1.5-7b")
    assert llava.vision_tokens == 577 and llava.image_tokens == 576  # CLIP CLS, "default" drops it
    assert 6.9e9 < llava.num_params() < 7.2e9
    ov = ModelSpec.named("llava-onevision-qwen2-7b")
    assert ov.vision_tokens == ov.image_tokens == 729  # SigLIP: no CLS, "full"
    llama = ModelSpec.named("llama-3.1-8b")
    assert not llama.has_vision and 7.9e9 < llama.num_params() < 8.1e9
    with pytest.raises(ValueError, match="no vision tower"):
        llama.vision_flops(1)
    smol = ModelSpec.from_config_dict(
        json.loads((REPO / "nova/models/configs/smollm2-135m/config.json").read_text()), name="smol"
    )
    assert smol.tie_word_embeddings and 0.13e9 < smol.num_params() < 0.14e9


def test_demo_spec_matches_demo_model_config():
    from nova.models.demo import demo_model_dir, is_complete

    demo = ModelSpec.named("demo")
    assert demo.image_tokens == 196 and demo.bytes_per_param == 4.0
    if not is_complete(demo_model_dir()):
        pytest.skip("demo model not built")
    built = ModelSpec.from_dir(demo_model_dir(), name="demo")
    assert built.to_dict() | {"description": ""} == demo.to_dict() | {"description": ""}


def test_model_spec_roundtrip_and_errors(tmp_path, cog):
    assert ModelSpec.from_dict(cog.to_dict()) == cog
    (tmp_path / "config.json").write_text(json.dumps(cog.to_dict()))
    assert ModelSpec.from_dir(tmp_path, name="cogagent-9b") == cog
    with pytest.raises(ValueError, match="unknown model 'gpt-5'.*cogagent-9b"):
        ModelSpec.named("gpt-5")
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        ModelSpec.from_config_dict({"num_hidden_layers": 2})


def test_flops_and_bytes_scale(cog):
    assert cog.vision_flops(2) == pytest.approx(2 * cog.vision_flops(1))
    assert cog.vision_bytes(2) < 2 * cog.vision_bytes(1)  # weights read once per batch
    # Prefill ~ 2 * params * tokens; attention grows with cached context.
    assert cog.prefill_flops(1000) == pytest.approx(
        2 * cog.text_layers * cog.text_layer_params * 1000 + 2 * cog.lm_head_params, rel=0.05
    )
    assert cog.prefill_flops(100, cached_tokens=2000) > cog.prefill_flops(100)
    # Decode bytes: weights + KV reads that grow with context and batch.
    d1 = cog.decode_bytes([1000])
    assert cog.decode_bytes([2000]) - d1 == pytest.approx(1000 * cog.kv_bytes_per_token)
    assert cog.decode_bytes([1000, 1000]) > d1


# -- roofline: calibration
# ---------------------------------------------------------------------------
def test_default_calibration_reproduces_paper_times(a6000, cog):
    for stage, work in _works(cog).items():
        t = a6000.time_s(work, 1.0)
        assert t == pytest.approx(PAPER_STAGE_TIMES_S[stage], rel=0.10), stage
    assert a6000.time_s(_works(cog)[Stage.VISION], 1.0) == pytest.approx(0.8068, rel=0.01)


def test_calibrate_to_paper_fits_exactly_and_matches_the_shipped_a6000_evidence(cog):
    fit = calibrate_to_paper()
    model = RooflineCostModel("a6000", cog, fit)
    for stage, work in _works(cog).items():
        assert model.time_s(work, 1.0) == pytest.approx(PAPER_STAGE_TIMES_S[stage], rel=1e-3)
    shipped = Calibration.for_gpu("a6000")  # nova/cost/data/gpus/a6000.json
    for name in ("vision_mfu", "prefill_mfu", "bw_eff"):
        assert getattr(fit, name) == pytest.approx(getattr(shipped, name), rel=1e-3), name
    assert 0.4 < fit.vision_mfu < 0.8 and 0.4 < fit.prefill_mfu < 0.8 and 0.6 < fit.bw_eff <= 1.0
    bounds = {s: model.breakdown(w, 1.0).bound for s, w in _works(cog).items()}
    assert bounds == {Stage.VISION: "compute", Stage.PREFILL: "compute", Stage.DECODE: "memory"}


# -- roofline: shape of the curves ----------------------------------------------------------------
@pytest.mark.parametrize("gpu", REAL_GPUS)
def test_monotone_in_share_batch_and_context(gpu, cog):
    m = RooflineCostModel(gpu, cog)
    shares = [i / 20 for i in range(1, 21)]
    for work in _works(cog).values():
        times = [m.time_s(work, s) for s in shares]
        assert all(b <= a + 1e-12 for a, b in itertools.pairwise(times)), (gpu, work.stage)
    for share in (0.2, 0.5, 1.0):
        vision = [m.time_s(StageWork.vision(n), share) for n in (1, 2, 4, 8)]
        prefill = [m.time_s(StageWork.prefill(n), share) for n in (16, 128, 1024, 4096)]
        decode_b = [m.time_s(StageWork.decode([1000] * b), share) for b in (1, 4, 16, 64, 256)]
        decode_c = [m.time_s(StageWork.decode([c] * 8), share) for c in (100, 1000, 10000)]
        cached = [m.time_s(StageWork.prefill(200, cached_tokens=c), share) for c in (0, 1000, 8000)]
        for seq in (vision, prefill, decode_b, decode_c, cached):
            assert all(b >= a for a, b in itertools.pairwise(seq)), (gpu, share, seq)


def test_decode_keeps_speed_on_a_third_of_sms_but_prefill_does_not(a6000, cog):
    w = _works(cog)
    full_d, third_d = a6000.time_s(w[Stage.DECODE], 1.0), a6000.time_s(w[Stage.DECODE], 0.3)
    assert third_d <= 1.15 * full_d
    full_p, third_p = a6000.time_s(w[Stage.PREFILL], 1.0), a6000.time_s(w[Stage.PREFILL], 0.3)
    assert third_p >= 2.5 * full_p
    # The paper's minimum decode partition (12 of 84 SMs) is clearly slower.
    assert a6000.time_s(w[Stage.DECODE], 12 / 84) > 1.5 * full_d


def test_h100_faster_than_a6000_for_every_stage(cog):
    a, h, h200 = (RooflineCostModel(g, cog) for g in ("a6000", "h100-sxm", "h200"))
    for work in _works(cog).values():
        for share in (0.3, 1.0):
            assert h.time_s(work, share) < a.time_s(work, share), work.stage
    decode = _works(cog)[Stage.DECODE]
    assert h200.time_s(decode, 1.0) < h.time_s(decode, 1.0)  # more HBM bandwidth


# -- roofline: co-running ------------------------------------------------------------------------
def test_corunning_raises_latency(a6000, cog):
    w = _works(cog)
    parts = {Stage.VISION: 0.5, Stage.PREFILL: 0.35, Stage.DECODE: 0.3}
    for stage, work in w.items():
        alone = a6000.time_s(work, parts[stage])
        others = [(w[s], parts[s]) for s in w if s is not stage]
        for isolated in (True, False):
            assert a6000.time_s(work, parts[stage], others, isolated) > alone, (stage, isolated)
        # More co-runners, more slowdown.
        assert a6000.time_s(work, parts[stage], others) >= a6000.time_s(
            work, parts[stage], others[:1]
        )


def test_partitions_beat_multistream_for_compute_stages(a6000, cog):
    w = _works(cog)
    for stage, other in (
        (Stage.VISION, Stage.PREFILL),
        (Stage.PREFILL, Stage.VISION),
        (Stage.PREFILL, Stage.DECODE),
    ):
        co = [(w[other], 0.5)]
        iso = a6000.time_s(w[stage], 0.5, co, isolated=True)
        shared = a6000.time_s(w[stage], 0.5, co, isolated=False)
        assert iso < shared, stage
    # Multi-stream with full shares: both compute stages contend for all SMs.
    both = a6000.time_s(w[Stage.PREFILL], 1.0, [(w[Stage.VISION], 1.0)], isolated=False)
    assert both > 1.8 * a6000.time_s(w[Stage.PREFILL], 1.0)


def test_bandwidth_sharing_is_max_min_fair():
    assert water_fill(10.0, [2.0, 3.0]) == [2.0, 3.0]
    assert water_fill(10.0, [1.0, 20.0, 20.0]) == [1.0, 4.5, 4.5]
    alloc = water_fill(7.0, [5.0, 5.0])
    assert alloc == [3.5, 3.5] and sum(alloc) <= 7.0


def test_vision_weight_offload_costs_little(cog):
    plain = RooflineCostModel("a6000", cog)
    offload = RooflineCostModel("a6000", cog, offload_vision_weights=True)
    vision = _works(cog)[Stage.VISION]
    t0, t1 = plain.time_s(vision, 1.0), offload.time_s(vision, 1.0)
    assert t0 <= t1 < 1.05 * t0  # PCIe 4.0 streaming hides behind compute (paper: negligible)
    assert offload.time_s(_works(cog)[Stage.DECODE], 1.0) == plain.time_s(
        _works(cog)[Stage.DECODE], 1.0
    )


# -- registry
# ------------------------------------------------------------------------------------------
def test_make_cost_model_registry_and_errors(cog):
    m = make_cost_model("roofline", "h100-sxm", "cogagent-9b")
    assert isinstance(m, CostModel) and m.name == "roofline" and m.gpu().name == "h100-sxm"
    assert (
        make_cost_model("roofline", get_gpu("a6000"), cog, calib=Calibration.for_gpu("a6000")).model
        == cog
    )
    with pytest.raises(ValueError, match=r"unknown cost model kind 'magic'.*profiled.*roofline"):
        make_cost_model("magic", "a6000", cog)
    with pytest.raises(ValueError, match="unknown GPU"):
        make_cost_model("roofline", "tpu", cog)
    with pytest.raises(ValueError, match="unknown model"):
        make_cost_model("roofline", "a6000", "nope-7b")
    with pytest.raises(
        ValueError, match="no shipped profile for model 'cogagent-9b' on GPU 'a6000'"
    ):
        make_cost_model("profiled", "a6000", cog)


# -- StageWork
# ------------------------------------------------------------------------------------------
def test_stage_work_from_batch():
    part = Partition(0.5, 0.3, 0.2, name="p")
    vision = Batch(
        1, Stage.VISION, (BatchItem("a", num_images=1), BatchItem("b", num_images=2)), part, 0.0
    )
    assert StageWork.from_batch(vision) == StageWork.vision(3)
    prefill = Batch(
        2,
        Stage.PREFILL,
        (
            BatchItem("a", token_ids=(1,) * 10),
            BatchItem("b", token_ids=(1,) * 4, num_cached_tokens=6),
        ),
        part,
        0.0,
    )
    w = StageWork.from_batch(prefill)
    assert w.new_tokens == (10, 4) and w.context_lens == (10, 10) and w.cached_tokens == (0, 6)
    assert w == StageWork.prefill([10, 4], cached_tokens=[0, 6])
    decode = Batch(
        3,
        Stage.DECODE,
        (
            BatchItem("a", token_ids=(5,), num_cached_tokens=99),
            BatchItem("b", token_ids=(6,), num_cached_tokens=9),
        ),
        part,
        0.0,
    )
    w = StageWork.from_batch(decode)
    assert w == StageWork.decode([100, 10]) and w.num_seqs == 2 and w.mean_context_len == 55


def test_stage_work_validation():
    with pytest.raises(ValueError, match="needs >= 1 image"):
        StageWork(Stage.VISION)
    with pytest.raises(ValueError, match="needs >= 1 sequence"):
        StageWork(Stage.DECODE)
    with pytest.raises(ValueError, match="context lengths"):
        StageWork(Stage.PREFILL, new_tokens=(3, 4), context_lens=(3,))
    with pytest.raises(ValueError, match="new_tokens <= context_len"):
        StageWork(Stage.PREFILL, new_tokens=(5,), context_lens=(4,))
    assert StageWork("decode", new_tokens=[1], context_lens=[3]).stage is Stage.DECODE


# -- profiled
# ------------------------------------------------------------------------------------------
def _synthetic_profile() -> dict:
    # decode latency = 0.01 + 0.001 * batch + 1e-5 * context (bilinear: exact under interpolation)
    batch, ctx = [1, 4, 16], [100, 1000]
    decode = [[0.01 + 0.001 * b + 1e-5 * c for c in ctx] for b in batch]
    return {
        "format": "nova-cost-profile",
        "version": 1,
        "metadata": {"model": "synthetic", "gpu": "a6000"},
        "stages": {
            "vision": {
                "axes": ["num_images"],
                "grid": [[1, 2, 4]],
                "shares": [0.5, 1.0],
                "latency_s": [[0.2, 0.38, 0.74], [0.1, 0.19, 0.37]],
            },
            "prefill": {
                "axes": ["total_new_tokens", "num_seqs"],
                "grid": [[100, 1000], [1, 4]],
                "shares": [1.0],
                "latency_s": [[[0.02, 0.025], [0.12, 0.13]]],
            },
            "decode": {
                "axes": ["batch_size", "mean_context_len"],
                "grid": [batch, ctx],
                "shares": [1.0],
                "latency_s": [decode],
            },
        },
        "corun_mode": "shared",
        "corun_factor": {"decode": {"vision": 1.2, "prefill": 1.5}, "vision": {"decode": 1.1}},
        "corun_factor_isolated": {"decode": {"vision": 1.05, "prefill": 1.1}},
    }


def test_profiled_round_trip_and_exact_at_grid_points(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_synthetic_profile()))
    m = ProfiledCostModel.from_file(path)
    assert isinstance(m, CostModel) and m.gpu().name == "a6000"
    again = tmp_path / "again.json"
    m.save(again)
    assert json.loads(again.read_text()) == _synthetic_profile()
    assert make_cost_model("profiled", "a6000", "synthetic", path=again).to_dict() == m.to_dict()
    # exact at grid points
    assert m.time_s(StageWork.vision(2), 1.0) == pytest.approx(0.19)
    assert m.time_s(StageWork.vision(4), 0.5) == pytest.approx(0.74)
    assert m.time_s(StageWork.prefill([500, 500]), 1.0) == pytest.approx(0.12 + 0.01 / 3)
    assert m.time_s(StageWork.prefill(1000), 1.0) == pytest.approx(0.12)
    for b in (1, 4, 16):
        for c in (100, 1000):
            assert m.time_s(StageWork.decode([c] * b), 1.0) == pytest.approx(
                0.01 + 0.001 * b + 1e-5 * c
            )


def test_profiled_interpolation_between_and_beyond_grid():
    m = ProfiledCostModel.from_dict(_synthetic_profile())
    f = lambda b, c: 0.01 + 0.001 * b + 1e-5 * c  # noqa: E731
    assert m.time_s(StageWork.decode([550] * 10), 1.0) == pytest.approx(f(10, 550))
    assert m.time_s(StageWork.decode([100, 300]), 1.0) == pytest.approx(f(2, 200))  # mean context
    assert m.time_s(StageWork.vision(3), 1.0) == pytest.approx((0.19 + 0.37) / 2)
    # between shares: linear; below the smallest: scaled by smallest / share; above: clamped
    granted = 64 / 84  # a6000 grants 64 SMs for 0.75
    assert m.time_s(StageWork.vision(1), 0.75) == pytest.approx(0.2 - 0.1 * (granted - 0.5) / 0.5)
    assert m.time_s(StageWork.vision(1), 0.25) == pytest.approx(0.2 * 0.5 / (22 / 84))
    # above the grid: linear extrapolation of the last segment; below: clamped
    assert m.time_s(StageWork.vision(8), 1.0) == pytest.approx(0.37 + 4 * 0.09)
    assert m.time_s(StageWork.decode([1000] * 32), 1.0) == pytest.approx(f(32, 1000))
    assert m.time_s(StageWork.decode([10]), 1.0) == pytest.approx(f(1, 100))
    assert m.time_s(StageWork.prefill(10), 1.0) == pytest.approx(0.02)


def test_profiled_corun_factors_multiply():
    m = ProfiledCostModel.from_dict(_synthetic_profile())
    d, v, p = StageWork.decode([100]), StageWork.vision(1), StageWork.prefill(100)
    alone = m.time_s(d, 1.0)
    assert m.time_s(d, 1.0, [(v, 0.5)], isolated=False) == pytest.approx(alone * 1.2)
    assert m.time_s(d, 1.0, [(v, 0.5), (p, 0.3)], isolated=False) == pytest.approx(
        alone * 1.2 * 1.5
    )
    assert m.time_s(d, 1.0, [(v, 0.5), (p, 0.3)], isolated=True) == pytest.approx(
        alone * 1.05 * 1.1
    )
    # no isolated table for vision -> the measured (shared) one; no factor at all -> 1.0
    assert m.time_s(v, 1.0, [(d, 0.3)], isolated=True) == pytest.approx(0.1 * 1.1)
    assert m.time_s(p, 1.0, [(d, 0.3)]) == pytest.approx(0.02)


def test_profiled_monotone_fix_and_errors():
    prof = _synthetic_profile()
    prof["stages"]["vision"]["latency_s"][1] = [0.1, 0.09, 0.37]  # noise: 2 images "faster"
    raw = ProfiledCostModel.from_dict(prof, monotone=False)
    fixed = ProfiledCostModel.from_dict(prof)
    assert raw.time_s(StageWork.vision(2), 1.0) == pytest.approx(0.09)
    assert fixed.time_s(StageWork.vision(2), 1.0) == pytest.approx(0.1)
    assert fixed.to_dict()["stages"]["vision"]["latency_s"][1] == [0.1, 0.09, 0.37]  # raw kept
    text_only = _synthetic_profile()
    del text_only["stages"]["vision"]
    with pytest.raises(ProfileError, match="no vision table"):
        ProfiledCostModel.from_dict(text_only).time_s(StageWork.vision(1), 1.0)
    bad = _synthetic_profile()
    bad["stages"]["decode"]["latency_s"][0][0] = [0.1]
    with pytest.raises(ProfileError, match="not shaped like the grid"):
        ProfiledCostModel.from_dict(bad)
    with pytest.raises(ProfileError, match="not a Nova cost profile"):
        ProfiledCostModel.from_dict({"stages": {}})
    with pytest.raises(ProfileError, match="no cost profile at"):
        ProfiledCostModel.from_file("/nonexistent/profile.json")


def test_merge_profiles_takes_min_tables_and_median_factors():
    a, b, c = _synthetic_profile(), _synthetic_profile(), _synthetic_profile()
    b["stages"]["vision"]["latency_s"][1] = [0.5, 0.1, 0.3]  # a disturbed sweep, and a faster one
    b["corun_factor"]["decode"]["vision"] = 2.0
    c["corun_factor"]["decode"]["vision"] = 1.4
    c["metadata"]["date"] = "later"
    merged = merge_profiles([a, b, c])
    assert merged["stages"]["vision"]["latency_s"][1] == [0.1, 0.1, 0.3]
    assert merged["corun_factor"]["decode"]["vision"] == 1.4  # median of 1.2, 2.0, 1.4
    assert [m["date"] for m in merged["metadata"]["merged_from"]] == [None, None, "later"]
    ProfiledCostModel.from_dict(merged)  # valid
    other = _synthetic_profile()
    other["stages"]["decode"]["grid"][1] = [100, 2000]
    with pytest.raises(ProfileError, match="same decode grid"):
        merge_profiles([a, other])


def test_interpolate_1d_and_2d():
    assert interpolate([1.0, 3.0], [[0, 10]], [5]) == 2.0
    assert interpolate([1.0, 3.0], [[0, 10]], [-5]) == 1.0
    assert interpolate([3.0, 1.0], [[0, 10]], [20]) == 1.0  # never extrapolates downwards
    assert interpolate([[1.0, 2.0], [3.0, 4.0]], [[0, 1], [0, 1]], [0.5, 0.5]) == 2.5


def test_shipped_demo_cpu_profile():
    path = PROFILES_DIR / "demo-cpu.json"
    if not path.is_file():
        pytest.skip("demo-cpu profile not measured yet")
    m = make_cost_model("profiled", "cpu", "demo")
    assert m.gpu().name == "cpu" and m.metadata["device"] == "cpu"
    assert set(m.stages) == set(Stage)
    for work in (StageWork.vision(1), StageWork.prefill(256), StageWork.decode([256] * 4)):
        t = m.time_s(work, 1.0)
        assert 1e-3 < t < 10.0
        others = [
            (w, 1.0)
            for w in (StageWork.vision(1), StageWork.decode([64]))
            if w.stage is not work.stage
        ]
        assert m.time_s(work, 1.0, others, isolated=False) >= t
    assert m.time_s(StageWork.decode([256] * 16), 1.0) >= m.time_s(StageWork.decode([256]), 1.0)


def test_profile_model_quick_on_a_tiny_model(tiny_dirs, tmp_path):
    from nova.profiling import ProfileGrid, profile_model, summarize

    grid = ProfileGrid(
        num_images=(1, 2),
        prefill_tokens=(8, 32),
        prefill_seqs=(1, 2),
        decode_batch=(1, 4),
        decode_context=(16, 64),
        corun_prefill_tokens=16,
        corun_decode_batch=2,
        corun_decode_context=16,
    )
    prof = profile_model(str(tiny_dirs["llava-siglip-qwen2"]), grid=grid, warmup=1, repeats=1)
    meta = prof["metadata"]
    assert meta["device"] == "cpu" and meta["torch_version"] and meta["date"]
    assert prof["stages"]["prefill"]["grid"] == [[8, 32], [1, 2]]
    assert set(prof["corun_factor"]) == {"vision", "prefill", "decode"}
    assert all(f >= 1.0 for row in prof["corun_factor"].values() for f in row.values())
    path = ProfiledCostModel.from_dict(prof).save(tmp_path / "tiny-cpu.json")
    m = ProfiledCostModel.from_file(path, monotone=False)
    assert m.time_s(StageWork.prefill(32), 1.0) == prof["stages"]["prefill"]["latency_s"][0][1][0]
    assert "vision" in summarize(prof)


def test_profile_subcommand_parser():
    import argparse

    from nova.profiling.cli import add_profile_parser

    parser = argparse.ArgumentParser()
    add_profile_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["profile", "--model", "demo", "--quick", "--out", "x.json"])
    assert args.quick and args.model == "demo" and args.device == "cpu" and callable(args.func)


def test_totals_key_is_an_exact_memo_key_for_both_cost_models(a6000):
    """Batches with equal ``totals_key`` (same totals, sequences reordered or regrouped) take
    exactly the same time in the roofline and the profiled model: the simulator's cost memo
    relies on it. Different totals give different keys."""
    profiled = ProfiledCostModel.from_file(PROFILES_DIR / "demo-cpu.json")
    same = [
        (StageWork.decode([100, 300, 200]), StageWork.decode([300, 200, 100])),
        (StageWork.decode([150, 250]), StageWork.decode([200, 200])),  # decode: pairs = context
        (StageWork.prefill([64, 32], [10, 0]), StageWork.prefill([32, 64], [0, 10])),
        (StageWork.vision(2), StageWork.vision(2)),
    ]
    co = [(StageWork.vision(1), 0.5)]
    for a, b in same:
        assert (a.totals_key() == b.totals_key() and a != b) or a.stage is Stage.VISION
        for model in (a6000, profiled):
            assert model.shape_key(a) == model.shape_key(b)
            for share, others, isolated in ((1.0, (), True), (0.5, co, True), (1.0, co, False)):
                if a.stage is Stage.VISION and others:
                    others = [(StageWork.decode([64]), 0.5)]
                assert model.time_s(a, share, others, isolated) == model.time_s(
                    b, share, others, isolated
                )
    assert StageWork.decode([100, 300]).totals_key() != StageWork.decode([100, 301]).totals_key()
    # same new tokens and context, different split between sequences: different causal pairs
    assert (
        StageWork.prefill([64, 32], [10, 0]).totals_key()
        != StageWork.prefill([64, 32], [0, 10]).totals_key()
    )


def test_trusted_stage_work_equals_the_checked_one():
    w = StageWork.trusted(Stage.DECODE, 0, (1, 1), (10, 20))
    assert w == StageWork.decode([10, 20]) and hash(w) == hash(StageWork.decode([10, 20]))


def test_profile_split_keeps_the_total_and_mixes_lengths():
    import random

    from nova.profiling.grid import split_total

    rng = random.Random(0)
    for total, parts in ((1024, 4), (32, 2), (7, 7), (256, 1)):
        out = split_total(total, parts, rng)
        assert sum(out) == total and len(out) == parts and min(out) >= 1
    assert len(set(split_total(1024, 4, rng))) > 1
    with pytest.raises(ValueError):
        split_total(3, 4, rng)


def test_roofline_one_co_runner_fast_path_equals_the_general_code(a6000):
    import random

    rng = random.Random(1)
    works = [
        StageWork.vision(1),
        StageWork.vision(3),
        StageWork.prefill([1750]),
        StageWork.prefill([900, 40], [0, 300]),
        StageWork.decode([1800]),
        StageWork.decode([1700, 1900, 60]),
        StageWork.decode([100] * 40),
    ]
    for _ in range(300):
        w, o = rng.choice(works), rng.choice(works)
        share, other_share = (
            rng.choice((1.0, 0.2, 0.5, 0.71, 1 / 7)),
            rng.choice((1.0, 0.3, 0.8, 1 / 14)),
        )
        for isolated in (True, False):
            fast = a6000._terms(w, share, [(o, other_share)], isolated)
            general = a6000._terms(w, share, [(o, other_share)], isolated, pair_path=False)
            assert fast == general


def test_device_names_map_to_registered_gpu_specs():
    from nova.cost.gpus import GPUS, gpu_spec_name_for_device

    cases = {
        "NVIDIA H200": "h200",
        "NVIDIA H100 80GB HBM3": "h100-sxm",
        "NVIDIA A100-SXM4-80GB": "a100-80g",
        "NVIDIA RTX A6000": "a6000",
        "NVIDIA GeForce RTX 4090": "rtx4090",
    }
    for device_name, spec in cases.items():
        assert gpu_spec_name_for_device(device_name) == spec
        assert spec in GPUS
    assert gpu_spec_name_for_device("NVIDIA GeForce GTX 1080") is None


def test_shipped_profile_for_picks_the_models_dtype(tmp_path, monkeypatch):
    """The nova policy plans with a profile measured in the engine's dtype: the dtype-named
    file first, else the plain one if its metadata names that dtype, else none (the roofline)."""
    from nova.cost import profiled

    def write(name: str, dtype: str) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({"metadata": {"dtype": dtype}}))
        return path

    monkeypatch.setattr(profiled, "PROFILES_DIR", tmp_path)
    plain = write("demo-cpu.json", "float32")
    assert profiled.shipped_profile_for("demo", "cpu", "float32") == plain
    assert profiled.shipped_profile_for("demo", "cpu", "bfloat16") is None
    named = write("demo-cpu-bfloat16.json", "bfloat16")
    assert profiled.shipped_profile_for("demo", "cpu", "bfloat16") == named
    assert profiled.shipped_profile_for("demo", "cpu", "float16") is None
    assert profiled.shipped_profile_for("other", "cpu", "float32") is None
    write("demo-cpu-float16.json", "bfloat16")  # a misnamed file is not taken
    assert profiled.shipped_profile_for("demo", "cpu", "float16") is None


def test_profile_default_out_is_the_name_the_engine_looks_for():
    from nova.profiling.cli import default_out

    meta = {"model": "/x/demo", "gpu": "cpu", "dtype": "bfloat16", "device_name": "AMD EPYC"}
    assert default_out(meta).name == "demo-cpu-bfloat16-amd-epyc.json"


def test_shipped_profile_for_prefers_one_measured_on_this_device(tmp_path, monkeypatch):
    """ "cpu" is every CPU: a profile measured on this CPU model comes first; another CPU's
    profile is the fallback (the engine warns), and a file whose metadata names another device
    or dtype than its name is not taken as this device's."""
    from nova.cost import profiled

    def write(name: str, dtype: str, device: str) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({"metadata": {"dtype": dtype, "device_name": device}}))
        return path

    monkeypatch.setattr(profiled, "PROFILES_DIR", tmp_path)
    xeon = write("demo-cpu-float32.json", "float32", "Intel(R) Xeon(R) Processor")
    assert profiled.device_slug("AMD EPYC") == "amd-epyc"
    assert profiled.shipped_profile_for("demo", "cpu", "float32", "AMD EPYC") == xeon
    assert profiled.profile_device_name(xeon) == "Intel(R) Xeon(R) Processor"
    epyc = write("demo-cpu-float32-amd-epyc.json", "float32", "AMD EPYC")
    assert profiled.shipped_profile_for("demo", "cpu", "float32", "AMD EPYC") == epyc
    assert profiled.shipped_profile_for("demo", "cpu", "float32", "AMD EPYC 9654") == xeon
    assert profiled.shipped_profile_for("demo", "cpu", "float32") == xeon
    write("demo-cpu-bfloat16-amd-epyc.json", "float32", "AMD EPYC")  # wrong dtype inside
    assert profiled.shipped_profile_for("demo", "cpu", "bfloat16", "AMD EPYC") is None
    write("demo-cpu-float32-amd-epyc.json", "float32", "AMD EPYC 7B13")  # another device inside
    assert profiled.shipped_profile_for("demo", "cpu", "float32", "AMD EPYC") == xeon


def test_default_cost_model_warns_when_the_profile_is_another_devices(
    tmp_path, monkeypatch, caplog
):
    from types import SimpleNamespace

    import torch

    from nova.cost import profiled
    from nova.engine import llm_engine
    from nova.profiling import device as device_mod

    shipped = Path(profiled.PROFILES_DIR) / "demo-cpu.json"
    data = json.loads(shipped.read_text())
    monkeypatch.setattr(profiled, "PROFILES_DIR", tmp_path)
    (tmp_path / "demo-cpu.json").write_text(json.dumps(data))
    loaded = SimpleNamespace(model_dir=Path("demo-smollm2"), dtype=torch.float32)
    measured_on = data["metadata"]["device_name"]
    monkeypatch.setattr(device_mod, "device_name", lambda device: "Some Other CPU")
    with caplog.at_level("WARNING", logger=llm_engine.__name__):
        cm = llm_engine.default_cost_model(loaded, "cpu")  # type: ignore[arg-type]
    assert cm.gpu().name == "cpu"
    assert measured_on in caplog.text and "Some Other CPU" in caplog.text
    caplog.clear()
    monkeypatch.setattr(device_mod, "device_name", lambda device: measured_on)
    with caplog.at_level("WARNING", logger=llm_engine.__name__):
        llm_engine.default_cost_model(loaded, "cpu")  # type: ignore[arg-type]
    assert "plans with" not in caplog.text


def test_engine_plans_with_the_profile_of_its_dtype():
    """The nova policy's cost model for the demo on a CPU: the shipped fp32 profile in fp32,
    the bf16 one in bf16 (each measured in that dtype)."""
    from types import SimpleNamespace

    import torch

    from nova.engine.llm_engine import default_cost_model

    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        loaded = SimpleNamespace(model_dir=Path("demo-smollm2-135m-siglip-v1"), dtype=dtype)
        model = default_cost_model(loaded, "cpu")  # type: ignore[arg-type]
        assert model.metadata["dtype"] == name and model.metadata["model"] == "demo"
