"""The concurrent engine: three worker threads, real and fake executors."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from conftest import IMAGE_TOKEN_ID

from nova.config import EngineConfig
from nova.core.block_manager import BlockManager
from nova.core.policy import StageLimits, make_policy
from nova.core.scheduler import RequestRejected, Scheduler
from nova.engine.llm_engine import LLMEngine
from nova.engine.loop import EngineLoop
from nova.executor.fake import FakeExecutor, next_token
from nova.llm import LLM
from nova.models.inputs import PromptInput
from nova.models.loader import load_model
from nova.sampling_params import SamplingParams
from nova.types import ImageInput, Request, RequestStatus, Stage

VOCAB = 1000


def expected_fake_output(prompt: list[int], max_tokens: int) -> list[int]:
    seq, out = list(prompt), []
    while len(out) < max_tokens:
        tok = next_token(seq, VOCAB)
        out.append(tok)
        seq.append(tok)
    return out


def fake_engine(policy="multi_stream", num_blocks=32, block_size=4, delay_s=None, fault_hook=None):
    sched = Scheduler(
        make_policy(policy, limits=StageLimits(max_num_seqs=16)),
        BlockManager(num_blocks, block_size),
    )
    ex = FakeExecutor(VOCAB, delay_s or {}, fault_hook)
    return EngineLoop(sched, ex), ex


@pytest.mark.parametrize("policy", ["multi_stream", "sequential", "chunked_prefill"])
def test_burst_larger_than_kv_cache_completes_everything_once(policy):
    engine, ex = fake_engine(
        policy,
        num_blocks=24,
        block_size=4,
        delay_s={Stage.VISION: 0.002, Stage.PREFILL: 0.001, Stage.DECODE: 0.0005},
    )
    events: dict[str, list] = {}
    lock = threading.Lock()

    def listener(ev, req):
        with lock:
            events.setdefault(ev.request_id, []).append(ev)

    reqs = []
    with engine:
        for i in range(40):  # each up to 6 blocks; 40 of them need far more than 24 blocks
            r = Request(
                f"r{i}",
                [i + 1] * (5 + i % 9),
                SamplingParams(max_tokens=8 + i % 7, ignore_eos=True),
                [ImageInput(2, f"h{i}")] if i % 3 == 0 else [],
            )
            engine.add_request(r, None, listener)
            reqs.append(r)
        assert engine.wait_idle(timeout_s=60)
    assert engine.scheduler.state.num_preemptions > 0 or policy == "sequential"
    for r in reqs:
        assert r.status is RequestStatus.FINISHED
        assert r.output_token_ids == expected_fake_output(r.prompt_token_ids, r.sampling.max_tokens)
        evs = events[r.request_id]
        assert sum(e.finished for e in evs) == 1 and evs[-1].finished
        assert [
            t for e in evs for t in e.new_token_ids
        ] == r.output_token_ids  # none lost or doubled
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert sorted(ex.released) == sorted(r.request_id for r in reqs)


def _run_and_record_spans(policy: str) -> list[tuple[float, float, Stage]]:
    engine, ex = fake_engine(policy, delay_s=dict.fromkeys(Stage, 0.01))
    spans = []
    orig = ex.execute

    def timed(batch):
        t0 = time.monotonic()
        out = orig(batch)
        spans.append((t0, time.monotonic(), batch.stage))
        return out

    ex.execute = timed
    with engine:
        for i in range(8):
            engine.add_request(
                Request(
                    f"r{i}",
                    [1, 2, 3],
                    SamplingParams(max_tokens=6, ignore_eos=True),
                    [ImageInput(2, "h")] if i % 2 else [],
                )
            )
        assert engine.wait_idle(timeout_s=30)
    return sorted(spans)


def _overlapping_pairs(spans) -> int:
    return sum(1 for i, a in enumerate(spans) for b in spans[i + 1 :] if b[0] < a[1] - 1e-4)


def test_sequential_never_overlaps_stages():
    assert _overlapping_pairs(_run_and_record_spans("sequential")) == 0


def test_multi_stream_overlaps_stages():
    spans = _run_and_record_spans("multi_stream")
    assert _overlapping_pairs(spans) > 0
    # and overlapping batches are of different stages (one batch per stage at a time)
    for i, a in enumerate(spans):
        for b in spans[i + 1 :]:
            if b[0] < a[1] - 1e-4:
                assert a[2] is not b[2]


def test_abort_mid_decode_frees_blocks():
    engine, _ex = fake_engine(num_blocks=64, delay_s={Stage.DECODE: 0.005})
    with engine:
        reqs = [
            Request(f"r{i}", [1, 2, 3, 4, 5], SamplingParams(max_tokens=200, ignore_eos=True))
            for i in range(4)
        ]
        for r in reqs:
            engine.add_request(r)
        for _ in range(500):
            if all(len(r.output_token_ids) >= 3 for r in reqs):
                break
            time.sleep(0.005)
        assert all(r.status is RequestStatus.DECODING for r in reqs)
        for r in reqs[:3]:
            assert engine.abort(r.request_id)
        assert not engine.abort(reqs[0].request_id)  # already aborted
        for _ in range(200):  # the in-flight decode step completes, then blocks are back
            if not engine.scheduler.block_manager.has_seq(reqs[0].request_id):
                break
            time.sleep(0.005)
        bm = engine.scheduler.block_manager
        assert all(not bm.has_seq(r.request_id) for r in reqs[:3])
        assert bm.has_seq(reqs[3].request_id)
        engine.abort(reqs[3].request_id)
        assert engine.wait_idle(timeout_s=10)
    assert [r.status for r in reqs] == [RequestStatus.ABORTED] * 4
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_integrity()


def test_injected_failure_fails_only_that_request():
    def hook(stage, rid):
        if rid == "bad" and stage is Stage.DECODE:
            raise RuntimeError("injected fault")

    engine, _ = fake_engine(fault_hook=hook)
    with engine:
        reqs = [
            Request(rid, [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
            for rid in ("good-1", "bad", "good-2")
        ]
        for r in reqs:
            engine.add_request(r)
        assert engine.wait_idle(timeout_s=10)
    assert reqs[1].status is RequestStatus.FAILED and "injected fault" in reqs[1].error
    for r in (reqs[0], reqs[2]):
        assert r.status is RequestStatus.FINISHED and len(r.output_token_ids) == 5


def test_rejected_request_is_an_error_and_leaves_nothing_behind():
    engine, ex = fake_engine(num_blocks=4, block_size=4)
    with engine:
        with pytest.raises(RequestRejected):
            engine.add_request(Request("big", [1] * 10, SamplingParams(max_tokens=10)))
        assert not engine.has_unfinished()
        assert ex.released == ["big"] and "big" not in ex._seqs  # payload taken back


# -- the real executor on tiny random checkpoints -------------------------------------------


def _alone(
    model_dir, prompts: list[PromptInput], max_tokens: int, ignore_eos: bool = False
) -> list[list[int]]:
    """Each prompt's output when it runs by itself, one stage at a time (policy sequential)."""
    llm = LLM(str(model_dir), policy="sequential", block_size=8, num_kv_blocks=64)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
    return [llm.generate([p], params)[0].output_token_ids for p in prompts]


@pytest.mark.parametrize("policy", ["multi_stream", "sequential"])
def test_engine_outputs_equal_running_each_request_alone(tiny_dirs, policy):
    loaded = load_model(tiny_dirs["llava-siglip-qwen2"])
    cfg = EngineConfig(
        model=str(tiny_dirs["llava-siglip-qwen2"]),
        policy=policy,
        block_size=4,
        num_kv_blocks=40,
        max_num_seqs=4,
    )
    llm_engine = LLMEngine(cfg, loaded=loaded)
    n_img = llm_engine.processor.num_image_tokens
    torch.manual_seed(0)
    prompts = []
    for i in range(8):
        if i % 2 == 0:
            ids = [1, 5 + i] + [IMAGE_TOKEN_ID] * n_img + [7, 8, 9][: 1 + i % 3]
            prompts.append(PromptInput(ids, torch.randn(1, 3, 32, 32), 1))
        else:
            prompts.append(PromptInput([1] + [20 + i] * (3 + i)))
    expected = _alone(tiny_dirs["llava-siglip-qwen2"], prompts, 12)
    llm_engine.start()
    try:
        reqs = []
        for i, p in enumerate(prompts):  # arrivals spread over time, into a busy engine
            reqs.append(llm_engine.submit(p, SamplingParams(max_tokens=12)))
            time.sleep(0.003 * (i % 3))
        assert llm_engine.loop.wait_idle(timeout_s=120)
    finally:
        llm_engine.stop()
    for r, exp in zip(reqs, expected):
        assert r.status is RequestStatus.FINISHED, r.error
        assert r.output_token_ids == exp
    assert (
        llm_engine.scheduler.block_manager.num_free_blocks
        == llm_engine.scheduler.block_manager.num_blocks
    )


def test_llm_offline_api(tiny_dirs):
    from nova.llm import LLM

    llm = LLM(str(tiny_dirs["qwen2"]), block_size=4, num_kv_blocks=64)
    outs = llm.generate(
        [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [1, 9, 9, 9, 4]}],
        SamplingParams(max_tokens=6, ignore_eos=True),
    )
    assert [len(o.output_token_ids) for o in outs] == [6, 6]
    assert (
        outs[0].text is None and outs[0].metrics.ttft_s is not None and outs[0].metrics.ttft_s >= 0
    )
    assert [outs[1].output_token_ids] == _alone(
        tiny_dirs["qwen2"], [PromptInput([1, 9, 9, 9, 4])], 6, ignore_eos=True
    )
    with pytest.raises(Exception, match="out of range"):
        llm.generate([{"prompt_token_ids": [1, 10**9]}])


def test_async_engine_streams_and_aborts_on_cancel(tiny_dirs):
    from nova.engine.async_engine import AsyncEngine

    eng = AsyncEngine(EngineConfig(model=str(tiny_dirs["llama"]), block_size=4, num_kv_blocks=64))

    async def main():
        deltas = [
            d
            async for d in eng.generate(
                PromptInput([1, 2, 3]), SamplingParams(max_tokens=5, ignore_eos=True)
            )
        ]
        assert [len(d.new_token_ids) for d in deltas] == [1] * 5
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert deltas[-1].metrics is not None and deltas[-1].metrics.num_output_tokens == 5

        gen = eng.generate(
            PromptInput([1, 2, 3]),
            SamplingParams(max_tokens=200, ignore_eos=True),
            request_id="long",
        )
        first = await gen.__anext__()
        assert first.request_id == "long"
        await gen.aclose()  # the consumer goes away: the request is aborted
        for _ in range(200):
            if not eng.llm_engine.loop.has_unfinished():
                break
            await asyncio.sleep(0.01)
        assert not eng.llm_engine.loop.has_unfinished()

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
    bm = eng.llm_engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_package_exposes_api_lazily():
    import subprocess
    import sys

    code = (
        "import sys, nova; assert 'torch' not in sys.modules; "
        "from nova import LLM, AsyncEngine, SamplingParams, EngineConfig; assert 'torch' in "
        "sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_injected_failure_in_real_executor_fails_only_that_request(tiny_dirs):
    loaded = load_model(tiny_dirs["llama"])

    def hook(stage, rid):
        if rid == "bad" and stage is Stage.PREFILL:
            raise RuntimeError("injected prefill fault")

    llm_engine = LLMEngine(
        EngineConfig(model=str(tiny_dirs["llama"]), block_size=4, num_kv_blocks=64),
        loaded=loaded,
        fault_hook=hook,
    )
    llm_engine.start()
    try:
        reqs = [
            llm_engine.submit(
                PromptInput([1, 2, 3 + i]),
                SamplingParams(max_tokens=5, ignore_eos=True),
                request_id=rid,
            )
            for i, rid in enumerate(("ok-1", "bad", "ok-2"))
        ]
        assert llm_engine.loop.wait_idle(timeout_s=60)
    finally:
        llm_engine.stop()
    assert reqs[1].status is RequestStatus.FAILED and "injected prefill fault" in reqs[1].error
    assert [len(r.output_token_ids) for r in (reqs[0], reqs[2])] == [5, 5]
    assert [reqs[0].output_token_ids] == _alone(
        tiny_dirs["llama"], [PromptInput([1, 2, 3])], 5, ignore_eos=True
    )
    assert (
        llm_engine.scheduler.block_manager.num_free_blocks
        == llm_engine.scheduler.block_manager.num_blocks
    )
