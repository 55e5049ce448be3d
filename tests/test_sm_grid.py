"""Exact SM accounting (nova.cost.sm_grid): co-running stages never get more SMs than the GPU
has, decode sits on the green-context grid, the compute side gets the exact remainder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nova.cost import GPUS, get_gpu
from nova.cost.sm_grid import GrantedSMs, SmGrid, guideline_min_and_step, split_sms

ALL_GPUS = sorted(GPUS)
SPLITTABLE = [g for g in ALL_GPUS if GPUS[g].grid.decode_choices()]


def test_grids_follow_the_green_context_guideline():
    for name in ALL_GPUS:
        gpu = get_gpu(name)
        if not gpu.compute_capability:
            continue
        major = int(gpu.compute_capability.split(".")[0])
        assert (gpu.grid.min_sms, gpu.grid.step) == guideline_min_and_step(major), name
    assert guideline_min_and_step(9) == (8, 8) and guideline_min_and_step(8) == (4, 2)
    assert get_gpu("h100-sxm").grid.decode_choices()[:3] == (8, 16, 24)
    assert get_gpu("h100-sxm").grid.decode_choices()[-1] == 120  # leaves 12 >= 8
    assert get_gpu("a6000").grid.decode_choices()[0] == 4


def test_the_papers_operating_points_are_expressible_on_the_a6000():
    a6000 = get_gpu("a6000")
    beside_vision = split_sms(a6000, 24)
    beside_prefill = split_sms(a6000, 30)
    draining = split_sms(a6000, 12)
    assert (beside_vision.decode, beside_vision.compute) == (24, (60,))
    assert (beside_prefill.decode, beside_prefill.compute) == (30, (54,))
    assert (draining.decode, draining.compute) == (12, (72,))
    for g in (beside_vision, beside_prefill, draining):
        assert a6000.granted_sms(g.decode_share) == g.decode
        assert a6000.granted_sms(g.compute_share()) == g.compute[0]


def test_no_phantom_sms_on_the_h100():
    h100 = get_gpu("h100-sxm")
    # each share rounded up on its own: 0.5/0.357/0.143 -> 72 + 48 + 24 = 144 > 132
    g = split_sms(h100, 24, (0.58, 0.42))
    assert g.decode == 24 and g.total == 132 and g.compute == (64, 44)
    assert h100.granted_sms(g.compute_share(1)) == 44  # the exact remainder (132 - 24 - 64)
    # a decode slice beside one compute stage: the compute side is the exact remainder
    g = split_sms(h100, 16)
    assert g.compute == (116,) and h100.granted_sms(116 / 132) == 116
    assert h100.granted_sms(0.5) == 64  # 66 is neither aligned nor a remainder: nearest step


def test_decode_is_aligned_to_the_nearest_step_that_leaves_room():
    h100 = get_gpu("h100-sxm")
    assert split_sms(h100, 21).decode == 24 and split_sms(h100, 19).decode == 16
    assert split_sms(h100, 1).decode == 8
    assert split_sms(h100, 132).decode == 120  # the compute stage keeps the minimum
    assert split_sms(h100, 0).decode == 0 and split_sms(h100, 0).compute == (132,)
    assert split_sms(h100, 40, (0.0,)) == GrantedSMs(40, (0,), 132)


def test_impossible_splits_raise():
    with pytest.raises(ValueError, match="cannot hold"):
        split_sms(get_gpu("cpu"), 1)
    with pytest.raises(ValueError, match="sum past 1"):
        split_sms(get_gpu("a6000"), 24, (0.7, 0.7))
    with pytest.raises(ValueError, match="each be in"):
        split_sms(get_gpu("a6000"), 24, (-0.1,))
    with pytest.raises(ValueError, match="SM share"):
        get_gpu("a6000").grid.granted(0.0)
    with pytest.raises(ValueError, match=">= 1"):
        SmGrid(0)


@settings(max_examples=400, deadline=None)
@given(
    gpu_name=st.sampled_from(SPLITTABLE),
    decode_fraction=st.floats(0.0, 1.0),
    shares=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3),
    whole=st.booleans(),
)
def test_split_property_over_every_gpu_and_share(gpu_name, decode_fraction, shares, whole):
    gpu = get_gpu(gpu_name)
    grid = gpu.grid
    total = sum(shares)
    if total > 1.0 or whole:  # fractions of the remainder: normalise (whole: sum exactly 1)
        shares = [s / total for s in shares] if total > 0 else [1.0, *shares[1:]]
    active = sum(1 for s in shares if s > 1e-6)
    decode_sms = round(decode_fraction * gpu.num_sms)
    need = grid.min_sms * (active + (1 if decode_sms > 0 else 0))
    try:
        g = split_sms(gpu, decode_sms, shares)
    except ValueError:
        assert need > gpu.num_sms or (active > 1 and gpu.num_sms - grid.min_sms < need)
        return
    assert g.total <= gpu.num_sms
    assert g.decode == 0 or grid.is_aligned(g.decode)
    assert (g.decode == 0) == (decode_sms == 0)
    for n in (g.decode, *g.compute):
        assert n == 0 or n >= grid.min_sms
        if n:  # the cost models see exactly the planned counts
            assert gpu.granted_sms(n / gpu.num_sms) == n
    for n, s in zip(g.compute, shares):
        assert (n == 0) == (s <= 1e-6)
    if abs(sum(shares) - 1.0) < 1e-9 and active:
        assert g.total == gpu.num_sms  # the last compute stage takes the exact remainder


@settings(max_examples=300, deadline=None)
@given(gpu_name=st.sampled_from(ALL_GPUS), share=st.floats(1e-4, 1.0))
def test_granted_is_on_the_grid_or_a_remainder(gpu_name, share):
    gpu = get_gpu(gpu_name)
    n = gpu.granted_sms(share)
    grid = gpu.grid
    assert 1 <= n <= gpu.num_sms
    assert n == gpu.num_sms or grid.is_aligned(n) or grid.is_remainder(n)
    assert abs(n - share * gpu.num_sms) <= max(grid.step, grid.min_sms)


@settings(max_examples=300, deadline=None)
@given(
    gpu_name=st.sampled_from(ALL_GPUS),
    shares=st.lists(st.floats(1e-3, 1.0), min_size=1, max_size=3),
)
def test_granted_together_never_overbooks(gpu_name, shares):
    gpu = get_gpu(gpu_name)
    grid = gpu.grid
    counts = grid.granted_together(shares)
    if grid.min_sms * len(shares) <= gpu.num_sms:
        assert sum(counts) <= gpu.num_sms
    assert all(n >= grid.min_sms for n in counts)
    for n, s in zip(counts, shares):
        assert n <= max(grid.granted(s), grid.min_sms)


def test_granted_together_keeps_split_sms_counts_and_fixes_independent_rounding():
    h100 = get_gpu("h100-sxm")
    g = split_sms(h100, 24, (0.58, 0.42))
    assert h100.grid.granted_together((g.decode_share, *g.compute_shares)) == (24, 64, 44)
    # 70 and 62 of 132 SMs each round up on their own (72 + 64 = 136): together they fit
    assert h100.granted_sms(70 / 132) + h100.granted_sms(62 / 132) == 136
    assert sum(h100.grid.granted_together((70 / 132, 62 / 132))) <= 132
    a6000 = get_gpu("a6000")
    assert sum(a6000.grid.granted_together((7 / 84, 77 / 84))) <= 84  # 8 + 78 on their own


@settings(max_examples=300, deadline=None)
@given(
    gpu_name=st.sampled_from(ALL_GPUS),
    shares=st.lists(st.floats(1e-3, 1.0), min_size=2, max_size=3),
)
def test_granted_together_does_not_depend_on_the_order(gpu_name, shares):
    grid = get_gpu(gpu_name).grid
    forward = grid.granted_together(shares)
    backward = grid.granted_together(shares[::-1])
    assert forward == backward[::-1]


def test_cpu_cores_play_the_role_of_sms():
    from nova.cost import StageWork, make_cost_model
    from nova.cost.gpus import cpu_spec

    cpu16 = cpu_spec(16)
    assert cpu16.name == "cpu" and cpu16.grid == SmGrid(16, 1, 1)
    g = split_sms(cpu16, 4)
    assert (g.decode, g.compute) == (4, (12,))
    model = make_cost_model("roofline", cpu16, "demo")
    prefill = StageWork.prefill(256)
    quarter, whole = model.breakdown(prefill, 4 / 16), model.breakdown(prefill, 1.0)
    assert quarter.compute_s == pytest.approx(4 * whole.compute_s, rel=1e-3)
    assert quarter.time_s > whole.time_s
    with pytest.raises(ValueError, match="core"):
        cpu_spec(0)
