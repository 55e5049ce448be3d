"""The caches through the real engine on tiny random models: greedy outputs equal with the
prefix and encoder caches on and off (text, one image, several images; LLaVA, Qwen2-VL and
Qwen2.5-VL with M-RoPE), hits where prompts share a prefix, none across different images or
an image at another position, and ``n`` > 1 forking the prompt's blocks."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from conftest import IMAGE_TOKEN_ID, QWEN_VL_IMAGE_TOKEN_ID, QWEN_VL_VISION_END_ID
from conftest import QWEN_VL_VISION_START_ID as VSTART

from nova.config import EngineConfig
from nova.engine.llm_engine import LLMEngine
from nova.sampling_params import SamplingParams
from nova.types import Stage

MAX_NEW = 6
SYS = list(range(3, 40))  # a 37-token "system prompt" every prompt starts with


def png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def save_llava_processor(model_dir) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(model_dir)


@pytest.fixture(scope="module")
def model_dirs(tiny_dirs, tiny_qwen_vl_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-models")
    out = {"llama": tiny_dirs["llama"]}
    for kind in ("llava-clip", "llava-siglip-qwen2"):
        shutil.copytree(tiny_dirs[kind], root / kind)
        save_llava_processor(root / kind)
        out[kind] = root / kind
    out.update(tiny_qwen_vl_dirs)
    return out


def placeholder(kind: str) -> list[int]:
    if kind.startswith("qwen"):
        return [VSTART, QWEN_VL_IMAGE_TOKEN_ID, QWEN_VL_VISION_END_ID]
    return [IMAGE_TOKEN_ID]


def session_prompts(kind: str) -> list[tuple[list[int], list[bytes]]]:
    """A growing conversation, a twin with another second image, an image at another
    position, text only, and a repeat."""
    ph = placeholder(kind) if kind != "llama" else []
    a, b, c = png(100, 60, 1), png(60, 100, 2), png(100, 60, 3)  # c: a's size, other pixels
    if not ph:
        p1 = [*SYS, 50, 51]
        p2 = [*p1, 60, 61, 62, 63]
        return [(p1, []), (p2, []), ([*SYS, 80, 81], []), (p2, [])]
    p1 = [*SYS, *ph, 50, 51]
    p2 = [*p1, 60, 61, *ph, 62]
    return [
        (p1, [a]),  # one image
        (p2, [a, b]),  # several images; shares p1's blocks, image a included
        (p2, [a, c]),  # same tokens, another second image: nothing from c on is shared
        ([*SYS, 70, *ph, 50, 51], [b]),  # image b at another position
        ([*SYS, 80, 81, 82], []),  # text only
        (p2, [a, b]),  # a repeat: all but the last block
    ]


def run_session(model_dir, kind: str, caches: bool, policy: str = "multi_stream"):
    eng = LLMEngine(
        EngineConfig(
            model=str(model_dir),
            block_size=4,
            num_kv_blocks=512,
            policy=policy,
            max_prefill_tokens=24 if policy == "chunked_prefill" else 4096,
            prefix_caching=caches,
            encoder_cache_bytes=(1 << 24) if caches else 0,
        )
    )
    outs, reqs = [], []
    sp = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    for ids, images in session_prompts(kind):
        prompt = eng.processor.from_token_ids(ids, images)
        [r] = eng.run_all([prompt], [sp])
        assert r.error is None, r.error
        outs.append(list(r.output_token_ids))
        reqs.append(r)
    return outs, reqs, eng


@pytest.mark.parametrize(
    "kind", ["llama", "llava-clip", "llava-siglip-qwen2", "qwen2-vl", "qwen2.5-vl"]
)
def test_greedy_outputs_equal_with_caches_on_and_off(model_dirs, kind):
    on, reqs, eng = run_session(model_dirs[kind], kind, caches=True)
    off, reqs_off, eng_off = run_session(model_dirs[kind], kind, caches=False)
    assert on == off
    bm = eng.scheduler.block_manager
    assert bm.num_hit_tokens > 0 and eng_off.scheduler.block_manager.num_hit_tokens == 0
    assert all(r.num_cached_prompt_tokens == 0 for r in reqs_off)
    if kind == "llama":
        assert reqs[1].num_cached_prompt_tokens == 36  # p1 has 39 tokens: 9 full blocks
        return
    ph_start = len(SYS)
    # p2 reuses all of p1's full blocks, those covering the first image included
    assert reqs[1].num_cached_prompt_tokens == len(reqs[0].prompt_token_ids) // 4 * 4
    assert reqs[1].num_cached_prompt_tokens > ph_start + 4
    # p3: same tokens as p2, another second image: no block covering it is reused
    second = reqs[2].images[1]
    assert reqs[2].num_cached_prompt_tokens <= second.offset
    assert reqs[2].images[1].mm_hash != reqs[1].images[1].mm_hash
    # image b at another position: reused up to the first token that differs only
    assert reqs[3].num_cached_prompt_tokens <= len(SYS)
    # the repeat: everything but the last (partial or full) block
    n = len(reqs[5].prompt_token_ids)
    assert n - reqs[5].num_cached_prompt_tokens <= 4
    # encoder cache: a, a, b (hit), b, a + b hits
    assert reqs[1].encoder_cache_hits == [True, False]
    assert reqs[3].encoder_cache_hits == [True]
    assert reqs[5].encoder_cache_hits == [True, True]
    assert reqs[5].times.vision_start_s is None  # skipped the vision stage
    assert eng.scheduler.encoder_cache.num_hit_images >= 4


def test_chunked_prefill_with_prefix_hits_equals_off(model_dirs):
    kind = "qwen2.5-vl"
    on, _, _ = run_session(model_dirs[kind], kind, caches=True, policy="chunked_prefill")
    off, _, _ = run_session(model_dirs[kind], kind, caches=False)
    assert on == off


def test_an_encoder_cache_hit_skips_decoding_and_preprocessing(model_dirs):
    eng = LLMEngine(EngineConfig(model=str(model_dirs["qwen2-vl"]), num_kv_blocks=128))
    proc = eng.processor
    img = png(100, 60, 7)
    ids = [*SYS, *placeholder("qwen2-vl"), 50]
    first = proc.from_token_ids(ids, [img])
    assert first.cached_images == {} and first.pixel_values is not None
    [r] = eng.run_all([first], [SamplingParams(max_tokens=2)])
    # the processor finds the embeddings by the raw bytes' key: no pixels at all
    second = proc.from_token_ids(ids, [img])
    assert list(second.cached_images) == [0] and second.pixel_values is None
    assert second.token_ids == first.token_ids and second.image_grids == first.image_grids
    [r2] = eng.run_all([second], [SamplingParams(max_tokens=2)])
    assert r2.output_token_ids == r.output_token_ids
    assert r2.images[0].has_embeds and r2.times.vision_start_s is None
    # other resize limits give another key
    assert proc.image_key(img, max_pixels=28 * 28 * 8) != proc.image_key(img)


def test_n_forks_share_the_prompt_blocks_and_equal_n_1(model_dirs):
    refs: dict[str, list[int]] = {}
    eng: LLMEngine | None = None

    def hook(stage: Stage, rid: str) -> None:  # the first decode batch: all choices alive
        if stage is Stage.DECODE and not refs and eng is not None:
            bm = eng.scheduler.block_manager
            refs.update({r: [bm.ref_count(b) for b in bm.block_table(r)[:3]] for r in ids})

    eng = LLMEngine(
        EngineConfig(model=str(model_dirs["qwen2.5-vl"]), block_size=4, num_kv_blocks=256),
        fault_hook=hook,
    )
    prompt_ids = [*SYS[:10], *placeholder("qwen2.5-vl"), 50, 51]
    img = png(60, 100, 5)
    sp = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
    eng.start()
    try:
        group = eng.submit_group(eng.processor.from_token_ids(prompt_ids, [img]), sp, "g", n=3)
        ids = [r.request_id for r in group]
        assert ids == ["g", "g-1", "g-2"]
        assert eng.wait_idle(120)
    finally:
        eng.stop()
    [alone] = eng.run_all([eng.processor.from_token_ids(prompt_ids, [img])], [sp])
    assert all(r.output_token_ids == alone.output_token_ids for r in group)
    assert refs and all(v == [3, 3, 3] for v in refs.values())  # the prompt's first blocks
    bm = eng.scheduler.block_manager
    assert bm.num_used_blocks == 0


def test_seeded_choices_use_seed_plus_index(model_dirs):
    eng = LLMEngine(EngineConfig(model=str(model_dirs["llama"]), num_kv_blocks=128))
    prompt = eng.processor.from_token_ids([*SYS, 50])
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    eng.start()
    try:
        group = eng.submit_group(prompt, sp, "s", n=2)
        assert eng.wait_idle(60)
    finally:
        eng.stop()
    [one] = eng.run_all(
        [prompt], [SamplingParams(max_tokens=8, temperature=1.0, seed=12, ignore_eos=True)]
    )
    assert group[1].output_token_ids == one.output_token_ids
    assert group[0].output_token_ids != group[1].output_token_ids


def test_cache_flags_come_from_the_config():
    import argparse

    from nova.flags import add_flags, from_flags

    p = argparse.ArgumentParser()
    add_flags(p, EngineConfig)
    default = from_flags(EngineConfig, p.parse_args([]))
    assert default.prefix_caching and default.encoder_cache_bytes == 1 << 30
    off = from_flags(
        EngineConfig, p.parse_args(["--no-prefix-caching", "--encoder-cache-bytes", "0"])
    )
    assert not off.prefix_caching and off.encoder_cache_bytes == 0
    with pytest.raises(SystemExit):
        p.parse_args(["--encoder-cache-bytes", "-1"])


def test_recompute_with_a_generated_image_token_treats_it_as_text(model_dirs):
    """A preempted request recomputes prompt + outputs; an output token equal to the image
    token is text, not a placeholder (the prompt's placeholders take the embeddings)."""
    from nova.executor.torch_executor import TorchExecutor
    from nova.models.inputs import InputProcessor
    from nova.models.loader import load_model
    from nova.runtime.runner import CacheConfig, ModelRunner
    from nova.types import Batch, BatchItem, Partition

    loaded = load_model(model_dirs["llava-clip"])
    runner = ModelRunner(loaded, CacheConfig(block_size=4, num_blocks=64))
    ex = TorchExecutor(runner)
    proc = InputProcessor(loaded)
    prompt = proc.from_token_ids([1, 7, IMAGE_TOKEN_ID, 8], [png(40, 40, 3)])
    outputs = [IMAGE_TOKEN_ID, 9]
    sp = SamplingParams(max_tokens=8)
    bm = runner.block_manager
    batch_ids = iter(range(100))

    def run(stage, items):
        return ex.execute(Batch(next(batch_ids), stage, tuple(items), Partition.shared(), 0.0))

    images = tuple(prompt.image_inputs(proc.image_token_id, proc.num_image_tokens))
    tokens = list(prompt.token_ids)
    for rid in ("step", "once"):
        ex.register(rid, sp, prompt.pixel_values, tuple(tokens), images)
        run(Stage.VISION, [BatchItem(rid, num_images=1)])
    # step by step: the prompt, then each output as a decode step
    table = tuple(bm.allocate("step", len(tokens) + 2))
    run(Stage.PREFILL, [BatchItem("step", tuple(tokens), 0, table, 1)])
    run(Stage.DECODE, [BatchItem("step", (outputs[0],), len(tokens), table)])
    want = run(Stage.DECODE, [BatchItem("step", (outputs[1],), len(tokens) + 1, table)])
    # at once (a recompute): the output image token must not take an image embedding
    table = tuple(bm.allocate("once", len(tokens) + 2))
    got = run(Stage.PREFILL, [BatchItem("once", (*tokens, *outputs), 0, table, 1)])
    assert not got.failed, got.failed
    assert got.new_token_ids["once"] == want.new_token_ids["step"]
