"""The start-up warm-up (``nova.runtime.warmup``): it runs every stage once before serving, packs
a CPU's linear weights then (not in the first request), reports the packed copy's memory, and
leaves no trace in what the engine serves: no request, no policy arrival, no KV block taken,
the same greedy tokens."""

from __future__ import annotations

import pytest
from conftest import QWEN_VL_IMAGE_TOKEN_ID as IMG
from conftest import QWEN_VL_VISION_END_ID as VEND
from conftest import QWEN_VL_VISION_START_ID as VSTART
from PIL import Image

from nova.config import EngineConfig
from nova.engine.llm_engine import LLMEngine
from nova.models.loader import load_model
from nova.runtime.cpu_linear import packed_weight_bytes, prepack_available
from nova.runtime.runner import CacheConfig, ModelRunner
from nova.runtime.warmup import WARMUP_DECODE_BATCH, blank_image_pixels, warm_up
from nova.sampling_params import SamplingParams

needs_packing = pytest.mark.skipif(
    not prepack_available(), reason="oneDNN packing is not available on this CPU"
)


def _engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), block_size=4, num_kv_blocks=64, **kw))


@needs_packing
def test_warm_up_packs_the_weights_and_reports_them(tiny_qwen_vl_dirs):
    eng = _engine(tiny_qwen_vl_dirs["qwen2.5-vl"])
    report = eng.warm_up_report
    assert report is not None and report.vision_s is not None
    assert report.prefill_s > 0 and report.decode_s > 0
    packed = packed_weight_bytes(eng.loaded.model)
    assert packed > 0  # the decoder's and the vision tower's linears, packed at start-up
    assert eng.runner.memory.weights_packed_bytes == packed
    assert "weights packed" in "\n".join(eng.describe().memory_lines)
    assert eng.snapshot().memory_bytes["weights_packed_bytes"] == packed

    off = _engine(tiny_qwen_vl_dirs["qwen2.5-vl"], warmup=False)
    assert off.warm_up_report is None
    assert packed_weight_bytes(off.loaded.model) == 0  # nothing ran yet: nothing packed
    assert off.runner.memory.weights_packed_bytes == 0


def test_warm_up_leaves_no_trace_in_serving(tiny_qwen_vl_dirs):
    """Greedy tokens are the same with and without the warm-up (its scratch KV entries are
    never read), and the warm-up is not a request: no policy arrival, no block taken."""
    outputs = []
    for warmup in (True, False):
        eng = _engine(tiny_qwen_vl_dirs["qwen2.5-vl"], warmup=warmup, policy="sequential")
        bm = eng.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks and bm.num_cached_blocks == 0
        assert sum(eng.snapshot().requests_in_stage.values()) == 0
        proc = eng.processor
        image = Image.new("RGB", (100, 60), (10, 200, 30))
        prompts = [
            proc.from_token_ids([1, 5, VSTART, IMG, VEND, 40, 41, 42], [image]),
            proc.from_token_ids([1, 5, 6, 7, 8, 9]),
        ]
        reqs = eng.run_all(prompts, SamplingParams(max_tokens=6, temperature=0.0))
        outputs.append([r.output_token_ids for r in reqs])
    assert outputs[0] == outputs[1]
    assert all(len(o) == 6 for o in outputs[0])


def test_nova_policy_sees_no_warm_up_arrival(tiny_dirs):
    eng = _engine(tiny_dirs["llava-clip"], policy="nova")
    assert eng.warm_up_report is not None
    policy = eng.scheduler.policy
    assert policy._obs.num_seen == 0 and not policy._obs.arrivals_s


def test_warm_up_fits_a_one_block_cache(tiny_dirs):
    loaded = load_model(tiny_dirs["llama"])
    runner = ModelRunner(loaded, CacheConfig(block_size=4, num_blocks=1))
    report = warm_up(runner)  # a 3-token prompt and its decode step in the one block
    assert report.vision_s is None and report.decode_s > 0
    assert WARMUP_DECODE_BATCH > 1


def test_model_without_an_image_processor_warms_up_text_only(tiny_dirs):
    """A text model, and a multimodal one saved without its image processor (it serves no
    images, so its vision encoder never runs): no warm-up image."""
    for name in ("llama", "llava-clip"):
        eng = _engine(tiny_dirs[name])
        assert blank_image_pixels(eng.processor) is None
        assert eng.warm_up_report is not None and eng.warm_up_report.vision_s is None
    eng = _engine(tiny_dirs["llama"])
    assert blank_image_pixels(eng.processor) is None
    assert eng.warm_up_report is not None and eng.warm_up_report.vision_s is None


def test_no_warmup_flag():
    from nova.cli import build_parser
    from nova.server.cli import engine_config_from_args

    args = build_parser(["serve"]).parse_args(["serve", "--model", "demo", "--no-warmup"])
    assert engine_config_from_args(args).warmup is False
    args = build_parser(["serve"]).parse_args(["serve", "--model", "demo"])
    assert engine_config_from_args(args).warmup is True
