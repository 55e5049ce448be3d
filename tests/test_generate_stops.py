"""Stop conditions and KV accounting of offline generation through the engine (``LLM``, one
stage at a time: policy ``sequential``)."""

from __future__ import annotations

import pytest

from nova.llm import LLM
from nova.models.inputs import PromptInput
from nova.sampling_params import SamplingParams
from nova.types import RequestRejected


@pytest.fixture()
def llm(tiny_dirs):
    return LLM(str(tiny_dirs["llama"]), policy="sequential", block_size=4, num_kv_blocks=40)


def _block_manager(llm: LLM):
    return llm.llm_engine.runner.block_manager


def test_max_tokens_and_stop_token(llm):
    prompt = PromptInput([1, 5, 6, 7])
    [free] = llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(free.output_token_ids) == 8 and free.finish_reason == "length"
    stop_at = free.output_token_ids[3]
    first = free.output_token_ids.index(stop_at)
    [stopped] = llm.generate(
        [prompt], SamplingParams(max_tokens=8, stop_token_ids=(stop_at,), ignore_eos=True)
    )
    assert stopped.output_token_ids == free.output_token_ids[: first + 1]
    assert stopped.finish_reason == "stop"


def test_seeded_sampling_reproducible_and_batch_independent(llm):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=3, ignore_eos=True)
    other = SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True)
    alone = llm.generate([PromptInput([1, 9, 8])], p)[0]
    mixed = llm.generate([PromptInput([1, 2, 3, 4, 5]), PromptInput([1, 9, 8])], [other, p])[1]
    assert alone.output_token_ids == mixed.output_token_ids


def test_more_requests_than_cache_run_in_waves(llm):
    # 40 blocks of 4 tokens; each request needs ceil((4+20)/4) = 6 blocks -> 6 at a time.
    prompts = [PromptInput([1, 2, 3, i + 4]) for i in range(15)]
    results = llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    assert [r.prompt_token_ids for r in results] == [[1, 2, 3, i + 4] for i in range(15)]
    assert all(len(r.output_token_ids) == 20 for r in results)
    bm = _block_manager(llm)
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_integrity()


def test_request_too_large_for_cache_is_an_error(llm):
    # 100 + 100 tokens = 50 blocks of 4 at most; the cache has 40 (160 tokens).
    with pytest.raises(
        RequestRejected, match="needs up to 200 tokens of KV cache; the whole cache holds 160"
    ):
        llm.generate([PromptInput([1] * 100)], SamplingParams(max_tokens=100))
    bm = _block_manager(llm)
    assert bm.num_free_blocks == bm.num_blocks
