"""Nova's CPU greedy-argmax kernel (``csrc/cpu_sampling.cpp``) against ``torch.argmax``: the
first largest value, a NaN above every number (the first NaN), a row of -inf gives 0, for
fp32/bf16/fp16, strided rows and vocabularies that are not a multiple of its chunk; the
sampler's greedy rows go through it and pick the same tokens with it off."""

from __future__ import annotations

import pytest
import torch

from nova.runtime import cpu_kernels
from nova.runtime.sampler import greedy_tokens, sample_batch
from nova.sampling_params import SamplingParams

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def special_rows(vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows with ties, NaNs before and after the max, infinities and a row of -inf."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=g)
    last = vocab - 1
    x[1, :] = float("-inf")
    x[2, 0] = x[2, last] = 50.0  # a tie: the first wins
    x[3, last] = float("nan")  # a NaN after the max
    x[4, min(3, last)] = float("nan")
    x[4, last] = float("nan")  # two NaNs: the first
    x[5, last // 2] = float("inf")
    x[6, :] = 1.0  # all equal
    x[7, last] = 60.0
    x[8, :] = float("-inf")
    x[8, last] = float("nan")
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 2, 255, 256, 257, 1000, 49152])
def test_equals_torch_argmax(kernels, dtype, vocab):
    x = special_rows(vocab, dtype)
    assert torch.equal(kernels.greedy_argmax(x), x.argmax(dim=-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows_and_no_rows(kernels, dtype):
    wide = special_rows(600, dtype)
    x = wide[:, 40:540]  # rows of a wider tensor: stride(0) 600
    assert x.stride(0) == 600
    assert torch.equal(kernels.greedy_argmax(x), x.argmax(dim=-1))
    empty = torch.empty(0, 50, dtype=dtype)
    assert kernels.greedy_argmax(empty).shape == (0,)


def test_bad_shapes_are_errors_naming_the_problem(kernels):
    with pytest.raises(RuntimeError, match="expected \\[rows, vocab\\]"):
        kernels.greedy_argmax(torch.zeros(4))
    with pytest.raises(RuntimeError, match="must be contiguous"):
        kernels.greedy_argmax(torch.zeros(8, 4).t())
    with pytest.raises(RuntimeError, match="empty vocabulary"):
        kernels.greedy_argmax(torch.zeros(3, 0))
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        kernels.greedy_argmax(torch.zeros(3, 5, dtype=torch.int32))


def test_greedy_rows_go_through_the_kernel(kernels, monkeypatch):
    calls = []
    real = kernels.greedy_argmax

    class Spy:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def greedy_argmax(self, x):
            calls.append(tuple(x.shape))
            return real(x)

    monkeypatch.setattr(cpu_kernels, "load", lambda: Spy())
    logits = special_rows(300, torch.float32)
    params = [SamplingParams(max_tokens=4, temperature=0.0)] * logits.shape[0]
    out = sample_batch(logits, params, [None] * len(params))
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert calls == [tuple(logits.shape)]
    # a non-contiguous vocabulary dimension and a 1-d tensor take torch's argmax
    assert torch.equal(greedy_tokens(logits.t().contiguous().t()), logits.argmax(dim=-1))
    assert torch.equal(greedy_tokens(logits[0]), logits[0].argmax(dim=-1))
    assert len(calls) == 1


def test_sampling_with_the_kernels_off_picks_the_same_tokens(monkeypatch):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 5000, generator=g).bfloat16().float()  # bf16 ties included
    params = [
        SamplingParams(max_tokens=4, temperature=0.0, logprobs=2 if i % 3 == 0 else None)
        for i in range(16)
    ]
    on = sample_batch(logits, params, [None] * 16)
    monkeypatch.setenv("NOVA_CPU_KERNELS", "0")
    off = sample_batch(logits, params, [None] * 16)
    assert on.token_ids == off.token_ids == logits.argmax(dim=-1).tolist()
