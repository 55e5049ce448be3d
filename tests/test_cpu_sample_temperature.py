"""Nova's CPU temperature-sampling kernel (``sample_temperature`` in ``csrc/cpu_sampling.cpp``):
the inverse CDF of softmax(logits / T) at the given uniform, checked against a float64
reference away from the CDF's steps; NaN and -inf logits are never drawn, +inf always; bad
arguments are errors; the sampler sends rows that need only a temperature through it."""

from __future__ import annotations

import pytest
import torch

from nova.runtime import cpu_kernels
from nova.runtime.sampler import make_generator, sample_batch
from nova.sampling_params import SamplingParams


def reference(x: torch.Tensor, temperature: float, u: float) -> tuple[int, float]:
    """(token, distance of u from the nearest CDF step) in float64."""
    p = torch.softmax(x.double() / temperature, dim=0)
    cdf = p.cumsum(0)
    cdf = cdf / cdf[-1]
    token = int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True))
    return min(token, x.numel() - 1), float((cdf - u).abs().min())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 3, 255, 257, 5000])
def test_inverse_cdf_matches_a_float64_reference(kernels, dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    rows = 6
    x = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    temps = torch.tensor([1.0, 0.7, 1.5, 0.05, 2.0, 1.0])
    checked = 0
    for u_value in torch.rand(40, generator=g).tolist():
        u = torch.full((rows,), u_value)
        got = kernels.sample_temperature(x, temps, u).tolist()
        for r in range(rows):
            want, gap = reference(x[r].float(), float(temps[r]), u_value)
            if gap > 1e-5:  # (at a step, float32 rounding may pick the neighbour)
                assert got[r] == want, (r, u_value)
                checked += 1
    assert checked > 150


def test_nan_and_infinities(kernels):
    x = torch.tensor(
        [
            [0.0, float("nan"), 1.0, float("-inf")],
            [0.0, float("inf"), 5.0, 1.0],
            [float("-inf"), float("-inf"), 2.0, float("-inf")],
        ]
    )
    seen = set()
    for u_value in torch.linspace(0, 0.999, 50).tolist():
        out = kernels.sample_temperature(x, torch.ones(3), torch.full((3,), u_value)).tolist()
        assert out[0] in (0, 2) and out[1] == 1 and out[2] == 2
        seen.add(out[0])
    assert seen == {0, 2}


def test_bad_arguments_are_errors(kernels):
    x = torch.randn(2, 10)
    ok = torch.tensor([0.5, 0.5])
    with pytest.raises(RuntimeError, match="is not positive"):
        kernels.sample_temperature(x, torch.tensor([1.0, 0.0]), ok)
    with pytest.raises(RuntimeError, match="outside \\[0, 1\\)"):
        kernels.sample_temperature(x, ok, torch.tensor([0.5, 1.0]))
    with pytest.raises(RuntimeError, match="float32 \\[rows\\]"):
        kernels.sample_temperature(x, torch.ones(3), ok)
    with pytest.raises(RuntimeError, match="contiguous vocabulary"):
        kernels.sample_temperature(x.t(), ok, ok)


def test_the_sampler_sends_plain_temperature_rows_through_it(kernels, monkeypatch):
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def sample_temperature(self, x, temps, u):
            calls.append(temps.tolist())
            return kernels.sample_temperature(x, temps, u)

    monkeypatch.setattr(cpu_kernels, "load", lambda: Spy())
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 2
    params = [
        SamplingParams(max_tokens=4, temperature=0.5, seed=1),
        SamplingParams(max_tokens=4, temperature=0.9, top_p=0.5, seed=2),  # tensor path
        SamplingParams(max_tokens=4, temperature=0.0),  # greedy
        SamplingParams(max_tokens=4, temperature=1.5, top_k=1000, seed=3),  # k >= vocab
    ]
    out = sample_batch(logits, params, [make_generator(p) for p in params])
    assert calls == [[0.5, 1.5]]
    assert out.token_ids[2] == int(logits[2].argmax())
    # seeded rows replay exactly, in another batch too
    again = sample_batch(
        logits[[3, 0]],
        [params[3], params[0]],
        [make_generator(params[3]), make_generator(params[0])],
    )
    assert again.token_ids == [out.token_ids[3], out.token_ids[0]]
