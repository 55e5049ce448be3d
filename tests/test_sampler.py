from __future__ import annotations

import pytest
import torch

from nova.runtime.sampler import filtered_probs, make_generator, sample, sample_batch
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


# -- batched processing: mask, penalties, bias, min_tokens, logprobs ------------------------


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """bool [B, V] -> int32 [B, ceil(V/32)] in llguidance's/xgrammar's layout."""
    b, v = allowed.shape
    words = (v + 31) // 32
    padded = torch.zeros(b, words * 32, dtype=torch.int64)
    padded[:, :v] = allowed.long()
    weights = 2 ** torch.arange(32, dtype=torch.int64)
    packed = (padded.view(b, words, 32) * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def test_bitmask_layout_round_trips():
    from nova.runtime.sampler import unpack_bitmask

    torch.manual_seed(0)
    allowed = torch.rand(3, 70) > 0.5
    assert torch.equal(unpack_bitmask(_pack(allowed), 70), allowed)
    # all -1 words = every token allowed
    assert unpack_bitmask(torch.full((1, 3), -1, dtype=torch.int32), 70).all()


def test_allowed_token_bitmask_restricts_greedy_and_sampled_rows():
    torch.manual_seed(1)
    logits = torch.randn(4, 100)
    allowed = torch.zeros(4, 100, dtype=torch.bool)
    allowed[0, [3, 50]] = True
    allowed[1, 77] = True
    allowed[2] = True  # unconstrained row
    allowed[3, 10:20] = True
    mask = _pack(allowed)
    params = [SamplingParams(), SamplingParams(), SamplingParams(), SamplingParams(temperature=1.5)]
    for step in range(30):
        gens = [None, None, None, torch.Generator().manual_seed(step)]
        toks = sample(logits, params, gens, allowed_token_bitmask=mask)
        assert toks[0] == (3 if logits[0, 3] > logits[0, 50] else 50)
        assert toks[1] == 77
        assert toks[2] == int(logits[2].argmax())
        assert 10 <= toks[3] < 20
    # logits are not modified in place
    assert torch.isfinite(logits).all()


def test_greedy_unchanged_without_processing():
    torch.manual_seed(2)
    logits = torch.randn(8, 49153, dtype=torch.bfloat16)
    assert sample(logits, [SamplingParams()] * 8, [None] * 8) == logits.argmax(-1).tolist()
    none_mask = torch.full((8, (49153 + 31) // 32), -1, dtype=torch.int32)
    out = sample(logits, [SamplingParams()] * 8, [None] * 8, allowed_token_bitmask=none_mask)
    assert out == logits.argmax(-1).tolist()


def test_repetition_penalty_formula_over_prompt_and_output():
    from nova.runtime.sampler import TokenHistory

    p = SamplingParams(repetition_penalty=2.0)
    hist = TokenHistory(p, prompt_token_ids=[0], vocab_size=4)
    # token 0 (in the prompt): 3.0 / 2 = 1.5 < token 1's 2.0 -> greedy picks 1
    logits = torch.tensor([[3.0, 2.0, -5.0, -6.0]])
    assert sample(logits, [p], [None], histories=[hist]) == [1]
    # now 1 is an output too: 2.0 / 2 = 1.0 < 1.5; negative logits are multiplied
    assert sample(logits, [p], [None], histories=[hist]) == [0]
    assert hist.num_output_tokens == 2


def test_presence_and_frequency_penalties_count_output_tokens_only():
    from nova.runtime.sampler import TokenHistory

    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logprobs=0)
    hist = TokenHistory(p, prompt_token_ids=[2, 2, 2], vocab_size=3, output_token_ids=[0, 0, 1])
    logits = torch.tensor([[2.0, 1.0, 0.5]])
    out = sample_batch(logits, [p], [None], histories=[hist])
    # expected processed logits: 0: 2 - 0.5 - 0.5 = 1.0; 1: 1 - 0.5 - 0.25 = 0.25; 2: 0.5
    expected = torch.log_softmax(torch.tensor([1.0, 0.25, 0.5]), 0)
    assert out.token_ids == [0]
    assert out.logprobs[0].logprob == pytest.approx(float(expected[0]), abs=1e-6)


def test_penalties_without_history_are_an_error():
    with pytest.raises(ValueError, match="TokenHistory"):
        sample(torch.zeros(1, 5), [SamplingParams(frequency_penalty=1.0)], [None])


def test_logit_bias_added_and_out_of_vocab_rejected():
    logits = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    params = [SamplingParams(logit_bias=((2, 5.0),)), SamplingParams()]
    assert sample(logits, params, [None, None]) == [2, 0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(logits[:1], [SamplingParams(logit_bias=((3, 1.0),))], [None])


def test_min_tokens_blocks_eos_and_stop_tokens_then_releases():
    from nova.runtime.sampler import TokenHistory

    p = SamplingParams(min_tokens=2, stop_token_ids=(1,))
    hist = TokenHistory(p, [], vocab_size=4)
    logits = torch.tensor([[0.0, 9.0, 8.0, 1.0]])  # 1 = stop token, 2 = EOS
    assert sample(logits, [p], [None], histories=[hist], eos_token_ids=[2]) == [3]
    assert sample(logits, [p], [None], histories=[hist], eos_token_ids=[2]) == [3]
    assert sample(logits, [p], [None], histories=[hist], eos_token_ids=[2]) == [1]
    # ignore_eos: EOS is an ordinary token, min_tokens does not block it
    q = SamplingParams(min_tokens=2, ignore_eos=True)
    assert sample(
        logits[:, [0, 2]], [q], [None], histories=[TokenHistory(q, [], 2)], eos_token_ids=[1]
    ) == [1]


def test_min_tokens_yields_to_a_mask_that_only_allows_eos():
    from nova.runtime.sampler import TokenHistory

    p = SamplingParams(min_tokens=5)
    allowed = torch.zeros(1, 4, dtype=torch.bool)
    allowed[0, 2] = True
    toks = sample(
        torch.zeros(1, 4),
        [p],
        [None],
        allowed_token_bitmask=_pack(allowed),
        histories=[TokenHistory(p, [], 4)],
        eos_token_ids=[2],
    )
    assert toks == [2]


def test_logprobs_of_greedy_and_sampled_rows():
    torch.manual_seed(3)
    logits = torch.randn(3, 60)
    params = [
        SamplingParams(logprobs=5),
        SamplingParams(temperature=0.8, top_k=10, seed=1, logprobs=0),
        SamplingParams(),
    ]
    gens = [make_generator(p) for p in params]
    out = sample_batch(logits, params, gens)
    lp = torch.log_softmax(logits, -1)
    a, b, c = out.logprobs
    assert c is None
    assert a.token_id == out.token_ids[0] == int(logits[0].argmax()) and a.rank == 1
    assert a.logprob == pytest.approx(float(lp[0].max()), abs=1e-5)
    assert [t for t, _ in a.top] == torch.topk(lp[0], 5).indices.tolist()
    assert b.top == () and b.token_id == out.token_ids[1]
    # logprobs come from the distribution before temperature and top-k
    assert b.logprob == pytest.approx(float(lp[1, b.token_id]), abs=1e-5)
    assert b.rank == int((lp[1] > lp[1, b.token_id]).sum()) + 1 <= 10


def test_logprobs_after_the_mask():
    allowed = torch.zeros(1, 40, dtype=torch.bool)
    allowed[0, [5, 6]] = True
    logits = torch.zeros(1, 40)
    logits[0, 6] = 1.0
    out = sample_batch(
        logits, [SamplingParams(logprobs=3)], [None], allowed_token_bitmask=_pack(allowed)
    )
    lp = out.logprobs[0]
    assert lp.token_id == 6
    assert lp.logprob == pytest.approx(float(torch.log_softmax(torch.tensor([0.0, 1.0]), 0)[1]))
    assert [t for t, _ in lp.top] == [6, 5]  # masked tokens (-inf) are not listed


def test_min_p_filter():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = filtered_probs(logits, SamplingParams(temperature=1.0, min_p=0.4))
    assert (p > 0).tolist() == [True, True, False, False]


def test_top_p_exact_on_every_rung_of_candidates():
    """Rows whose cut lies in the first rung, the second, or beyond both (full sort), in one
    batch: each keeps exactly the tokens a full sort keeps."""
    from nova.runtime import sampler as s

    vocab = s.TOP_P_CANDIDATES[-1] * 4
    gen = torch.Generator().manual_seed(5)
    logits = torch.stack([torch.randn(vocab, generator=gen) * scale for scale in (8.0, 2.0, 0.1)])
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * 3
    probs = s.filtered_probs_batch(logits, params)
    kept = []
    for row in range(3):
        sorted_p = logits[row].softmax(0).sort(descending=True).values
        expected = int(((sorted_p.cumsum(0) - sorted_p) < 0.9).sum())
        assert int((probs[row] > 0).sum()) == expected
        kept.append(expected)
    assert kept[0] <= s.TOP_P_CANDIDATES[0] < kept[1] <= s.TOP_P_CANDIDATES[-1] < kept[2]


def test_mixed_batch_matches_rows_alone():
    """Each row's token is what it would be alone (seeded), whatever the batch holds."""
    from nova.runtime.sampler import make_history

    torch.manual_seed(4)
    logits = torch.randn(5, 300)
    params = [
        SamplingParams(temperature=0.7, top_p=0.9, seed=11),
        SamplingParams(),
        SamplingParams(temperature=1.2, top_k=20, seed=12, presence_penalty=1.0),
        SamplingParams(temperature=1.0, min_p=0.05, seed=13, logit_bias=((7, 3.0),)),
        SamplingParams(repetition_penalty=1.3, logprobs=2),
    ]
    prompt = [1, 2, 3, 7]

    def run(rows):
        ps = [params[i] for i in rows]
        gens = [make_generator(p) for p in ps]
        hists = [make_history(p, prompt, 300) for p in ps]
        return [sample(logits[rows], ps, gens, histories=hists) for _ in range(10)]

    together = run(list(range(5)))
    for i in range(5):
        alone = run([i])
        assert [t[0] for t in alone] == [t[i] for t in together]


def test_extreme_penalties_stay_finite():
    """A repetition penalty of 5e-324 (float32: 0) divides positive logits into +inf; the
    sampler keeps the order and returns finite logprobs instead of NaN."""
    from nova.runtime.sampler import TokenHistory

    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    for p in (
        SamplingParams(repetition_penalty=5e-324, logprobs=2),
        SamplingParams(repetition_penalty=5e-324, temperature=1e-5, seed=0, logprobs=2),
    ):
        hist = TokenHistory(p, prompt_token_ids=[1, 3], vocab_size=4)
        out = sample_batch(logits, [p], [make_generator(p)], histories=[hist])
        lp = out.logprobs[0]
        assert out.token_ids[0] in (1, 3)
        assert all(v == v and v != float("inf") for _, v in lp.top)  # no NaN, no +inf
        assert lp.logprob == lp.logprob


def test_token_history_is_sparse_and_copies_independently():
    from nova.runtime.sampler import TokenHistory

    p = SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5)
    h = TokenHistory(p, prompt_token_ids=[5, 5, 7, 10**6], vocab_size=100)  # 10**6: a placeholder
    assert sorted(h.seen_ids.tolist()) == [5, 7]
    for t in (3, 3, 5):
        h.append(t)
    twin = h.copy()
    twin.append(9)
    assert dict(zip(h.output_ids.tolist(), h.output_counts.tolist())) == {3: 2.0, 5: 1.0}
    assert sorted(h.seen_ids.tolist()) == [3, 5, 7] and h.num_output_tokens == 3
    assert sorted(twin.seen_ids.tolist()) == [3, 5, 7, 9] and twin.num_output_tokens == 4
