from __future__ import annotations

import pytest
import torch

from nova.runtime.sampler import filtered_probs, make_generator, sample
from nova.sampling_params import SamplingParams


def test_params_validation():
    for bad in (
        dict(max_tokens=0),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=0),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert sample(logits, [SamplingParams()] * 2, [None, None]) == [1, 0]


def test_top_k_and_top_p_filter():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[2:] == 0).all() and torch.isclose(p[:2].sum(), torch.tensor(1.0))
    # top_p=0.7: 0.5 alone < 0.7, 0.5+0.3 reaches it -> keep exactly two tokens
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert (p > 0).tolist() == [True, True, False, False]
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.01))
    assert (p > 0).tolist() == [True, False, False, False]  # most likely token always kept


def test_seed_reproducible_regardless_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=1.0, seed=1234)
    other = SamplingParams(temperature=0.7)

    def run(rows, ps):
        gens = [make_generator(p) for p in ps]
        return [sample(logits[rows], ps, gens) for _ in range(20)]

    alone = [toks[0] for toks in run([0], [params])]
    batched = [toks[1] for toks in run([2, 0], [other, params])]
    assert alone == batched
    assert len(set(alone)) > 1  # it really samples


def test_temperature_sampling_follows_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    gen = make_generator(SamplingParams(temperature=1.0, seed=7))
    counts = torch.zeros(3)
    for _ in range(2000):
        counts[sample(logits, [SamplingParams(temperature=1.0)], [gen])[0]] += 1
    assert abs(counts[0] / 2000 - 0.7) < 0.05


def test_tiny_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([[2.0, 1.0, 0.5]])
    gen = make_generator(SamplingParams(temperature=1.0, top_p=1e-300, seed=1))
    assert sample(logits, [SamplingParams(temperature=1.0, top_p=1e-300)], [gen]) == [0]
