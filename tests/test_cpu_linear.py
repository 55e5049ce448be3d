"""Prepacked oneDNN linear layers on a CPU (bf16, fp32): same outputs as F.linear (bf16 bit for
bit, fp32 to float32 rounding), repacked when the weight changes, plain F.linear wherever
packing does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nova.runtime.cpu_linear import PackedLinear, prepack_available

needs_prepack = pytest.mark.skipif(not prepack_available(), reason="no oneDNN bf16 here")
needs_fp32_prepack = pytest.mark.skipif(
    not prepack_available(torch.float32), reason="no oneDNN here"
)


@needs_prepack
@pytest.mark.parametrize("shape", [(64, 576, 960), (7, 576, 49153), (300, 1536, 576), (1, 64, 8)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_equals_f_linear_in_bf16(shape, with_bias):
    tokens, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if with_bias else None
    lin = PackedLinear()
    with torch.inference_mode():
        out = lin(x, w, b)
        assert lin._packed is not None  # it did pack
        torch.testing.assert_close(out, F.linear(x, w, b), atol=0, rtol=0)
        strided = torch.randn(tokens, 2, k, generator=gen).bfloat16()[:, 1]
        torch.testing.assert_close(lin(strided, w, b), F.linear(strided, w, b), atol=0, rtol=0)


@needs_prepack
def test_repacks_when_the_weight_is_written():
    w = torch.randn(32, 16).bfloat16()
    x = torch.randn(4, 16).bfloat16()
    lin = PackedLinear()
    with torch.inference_mode():
        first = lin(x, w)
        packed = lin._packed
    with torch.no_grad():
        w.copy_(torch.randn(32, 16).bfloat16())  # what a loader does
    with torch.inference_mode():
        second = lin(x, w)
        assert lin._packed is not packed
        torch.testing.assert_close(second, F.linear(x, w), atol=0, rtol=0)
        assert not torch.equal(first, second)


@needs_fp32_prepack
@pytest.mark.parametrize(
    "shape", [(1, 576, 960), (16, 576, 3072), (7, 576, 49153), (300, 1536, 576)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_matches_f_linear_in_fp32(shape, with_bias):
    """fp32: another summation order, so float32 rounding apart, and no further from the
    float64 product than F.linear is (within 4x its error)."""
    tokens, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if with_bias else None
    lin = PackedLinear()
    with torch.inference_mode():
        out = lin(x, w, b)
        assert lin._packed is not None  # it did pack
        plain = F.linear(x, w, b)
        exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-4)
    err_packed = (out.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    assert err_packed <= 4 * err_plain + 1e-6


def test_plain_linear_where_packing_does_not_apply():
    lin = PackedLinear()
    x64, w64 = torch.randn(4, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(lin(x64, w64), F.linear(x64, w64))
    assert lin._packed is None  # fp64: F.linear
    w = torch.randn(8, 16).bfloat16().requires_grad_()
    out = lin(torch.randn(4, 16).bfloat16(), w)  # autograd on: F.linear, gradients flow
    assert out.requires_grad and lin._packed is None


def test_pack_linear_modules_swaps_plain_linears_in_place():
    """A vision tower's linears: same parameters and names, outputs to float32 rounding, and
    only plain nn.Linear (not subclasses, not other modules) swapped."""
    from torch import nn

    from nova.runtime.cpu_linear import PackedLinearModule, pack_linear_modules

    class Custom(nn.Linear):
        pass

    torch.manual_seed(0)
    tower = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8), Custom(8, 8))
    keys = list(tower.state_dict())
    x = torch.randn(5, 16)
    with torch.inference_mode():
        before = tower(x)
    assert pack_linear_modules(tower) == 2
    assert list(tower.state_dict()) == keys
    assert type(tower[0]) is PackedLinearModule and type(tower[3]) is Custom
    with torch.inference_mode():
        torch.testing.assert_close(tower(x), before, rtol=1e-5, atol=1e-5)
    if prepack_available(torch.float32):
        assert tower[0]._packed_call._packed is not None  # it did pack
