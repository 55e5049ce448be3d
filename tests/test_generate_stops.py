"""Stop conditions and KV accounting of the offline generate loop."""

from __future__ import annotations

import pytest

from nova.models.inputs import PromptInput
from nova.models.loader import load_model
from nova.runtime.generate import GenerationRequest, generate
from nova.runtime.runner import CacheConfig, ModelRunner
from nova.sampling_params import SamplingParams


@pytest.fixture()
def runner(tiny_dirs):
    return ModelRunner(load_model(tiny_dirs["llama"]), CacheConfig(block_size=4, num_blocks=40))


def test_max_tokens_and_stop_token(runner):
    prompt = PromptInput([1, 5, 6, 7])
    [free] = generate(
        runner, [GenerationRequest("a", prompt, SamplingParams(max_tokens=8, ignore_eos=True))]
    )
    assert len(free.output_token_ids) == 8 and free.finish_reason == "length"
    stop_at = free.output_token_ids[3]
    first = free.output_token_ids.index(stop_at)
    [stopped] = generate(
        runner,
        [
            GenerationRequest(
                "b",
                prompt,
                SamplingParams(max_tokens=8, stop_token_ids=(stop_at,), ignore_eos=True),
            )
        ],
    )
    assert stopped.output_token_ids == free.output_token_ids[: first + 1]
    assert stopped.finish_reason == "stop"


def test_seeded_sampling_reproducible_and_batch_independent(runner):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=3, ignore_eos=True)
    other = SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True)
    alone = generate(runner, [GenerationRequest("a", PromptInput([1, 9, 8]), p)])[0]
    mixed = generate(
        runner,
        [
            GenerationRequest("x", PromptInput([1, 2, 3, 4, 5]), other),
            GenerationRequest("a", PromptInput([1, 9, 8]), p),
        ],
    )[1]
    assert alone.output_token_ids == mixed.output_token_ids


def test_more_requests_than_cache_run_in_waves(runner):
    # 40 blocks of 4 tokens; each request needs ceil((4+20)/4) = 6 blocks -> 6 per wave.
    reqs = [
        GenerationRequest(
            str(i), PromptInput([1, 2, 3, i + 4]), SamplingParams(max_tokens=20, ignore_eos=True)
        )
        for i in range(15)
    ]
    results = generate(runner, reqs)
    assert [r.request_id for r in results] == [str(i) for i in range(15)]
    assert all(len(r.output_token_ids) == 20 for r in results)
    assert runner.block_manager.num_free_blocks == runner.block_manager.num_blocks
    runner.block_manager.check_integrity()


def test_request_too_large_for_cache_is_an_error(runner):
    with pytest.raises(ValueError, match="needs 50 KV blocks at most, the cache has 40"):
        generate(
            runner,
            [GenerationRequest("big", PromptInput([1] * 100), SamplingParams(max_tokens=100))],
        )
    assert runner.block_manager.num_free_blocks == runner.block_manager.num_blocks
