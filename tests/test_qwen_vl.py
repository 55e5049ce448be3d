"""Qwen2-VL and Qwen2.5-VL: our paged decoder with M-RoPE and transformers' vision
towers, against transformers' own models on tiny random configs (fp32, atol 1e-4); dynamic
resolution (image token counts as the processor computes them, clear errors outside the resize
limits); the engine, the cost model and the GUI workload on this family."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import (
    QWEN_VL_IMAGE_TOKEN_ID as IMG,
)
from conftest import (
    QWEN_VL_MAX_PIXELS,
)
from conftest import (
    QWEN_VL_VISION_END_ID as VEND,
)
from conftest import (
    QWEN_VL_VISION_START_ID as VSTART,
)

from nova.llm import LLM
from nova.models.errors import InvalidInputError
from nova.models.inputs import InputProcessor, PromptInput
from nova.models.loader import SHIPPED_CONFIGS_DIR, load_model
from nova.models.mm import VisionInput, encode_image_batch
from nova.models.mrope import mrope_plan
from nova.runtime.forward_batch import SeqInput, build_forward_batch
from nova.runtime.runner import CacheConfig, ModelRunner
from nova.sampling_params import SamplingParams
from nova.shapes import ImageSizing

ATOL = 1e-4
KINDS = ["qwen2-vl", "qwen2.5-vl"]
QWEN_SHIPPED = ["qwen2-vl-2b", "qwen2-vl-7b", "qwen2.5-vl-3b", "qwen2.5-vl-7b"]


def _image(width: int, height: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _hf_model(kind: str, path):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = (
        Qwen2VLForConditionalGeneration
        if kind == "qwen2-vl"
        else Qwen2_5_VLForConditionalGeneration
    )
    return cls.from_pretrained(path).eval()


def _hf_kwargs(ids: torch.Tensor, vis: VisionInput | None) -> dict:
    if vis is None:
        return {}
    return dict(
        pixel_values=vis.pixel_values,
        image_grid_thw=vis.image_grid_thw,
        mm_token_type_ids=(ids == IMG).int(),
    )


def _hf_logits(hf, token_ids: list[int], vis: VisionInput | None) -> torch.Tensor:
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        return hf(input_ids=ids, **_hf_kwargs(ids, vis)).logits[0].float()


def _prompts(proc: InputProcessor) -> list[PromptInput]:
    """Text only; one image; two images of different sizes (and shapes) with text between."""
    return [
        proc.from_token_ids([1, 5, 6, 7, 8, 9, 10, 11]),
        proc.from_token_ids([1, 5, VSTART, IMG, VEND, 40, 41, 42], [_image(100, 60, 1)]),
        proc.from_token_ids(
            [1, VSTART, IMG, VEND, 50, 51, VSTART, IMG, VEND, 52, 53],
            [_image(130, 200, 2), _image(90, 45, 3)],
        ),
    ]


@pytest.fixture(scope="module")
def setups(tiny_qwen_vl_dirs):
    out = {}
    for kind in KINDS:
        loaded = load_model(tiny_qwen_vl_dirs[kind])
        out[kind] = (loaded, InputProcessor(loaded), _hf_model(kind, tiny_qwen_vl_dirs[kind]))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_batched_prefill_and_decode_after_images_match_transformers(setups, kind):
    loaded, proc, hf = setups[kind]
    model = loaded.model
    prompts = _prompts(proc)
    assert [p.num_images for p in prompts] == [0, 1, 2]
    counts = prompts[2].image_token_counts
    assert len(set(counts)) == 2 and prompts[2].token_ids.count(IMG) == sum(counts)

    runner = ModelRunner(loaded, CacheConfig(block_size=4, num_blocks=256))
    bm = runner.block_manager
    embeds = encode_image_batch(runner.encode_images, [p.pixel_values for p in prompts[1:]])
    plans = [model.position_plan(p.token_ids, p.pixel_values) for p in prompts]
    assert plans[0] is None and plans[1].delta < 0 and plans[2].delta < plans[1].delta
    seqs = [
        SeqInput(
            p.token_ids,
            0,
            bm.allocate(str(i), len(p.token_ids)),
            embeds[i - 1] if i else None,
            mrope_positions=plan.slice(0, len(p.token_ids)) if plan else None,
        )
        for i, (p, plan) in enumerate(zip(prompts, plans))
    ]
    batch = build_forward_batch(seqs, runner.block_size, "cpu", runner.attention)
    assert tuple(batch.positions.shape) == (3, batch.input_ids.numel())
    with torch.inference_mode():
        ours = model.decoder.compute_logits(model.forward(batch, runner.kv_cache))
    offset = 0
    for p in prompts:  # every position of every prompt
        n = len(p.token_ids)
        ref = _hf_logits(hf, p.token_ids, p.pixel_values)
        torch.testing.assert_close(ours[offset : offset + n], ref, atol=ATOL, rtol=0)
        offset += n

    # Several batched decode steps after the images: positions = index + delta per request.
    histories = [list(p.token_ids) for p in prompts]
    for step in range(4):
        seqs = []
        for i, (hist, plan) in enumerate(zip(histories, plans)):
            hist.append(60 + 7 * i + step)
            bm.grow(str(i), len(hist))
            seqs.append(
                SeqInput(
                    [hist[-1]],
                    len(hist) - 1,
                    bm.block_table(str(i)),
                    position_offset=plan.delta if plan else 0,
                )
            )
        logits = runner.forward(seqs)
        for i, (hist, p) in enumerate(zip(histories, prompts)):
            torch.testing.assert_close(
                logits[i], _hf_logits(hf, hist, p.pixel_values)[-1], atol=ATOL, rtol=0
            )
    bm.check_integrity()


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_and_recompute_after_preemption_equal_one_shot(setups, kind):
    """Chunks cut inside images get their slice of the 3-D positions and embeddings; a
    re-prefill of prompt + outputs (after a preemption) places the outputs at index + delta."""
    loaded, proc, _ = setups[kind]
    model = loaded.model
    prompt = _prompts(proc)[2]
    ids = prompt.token_ids
    plan = model.position_plan(ids, prompt.pixel_values)
    runner = ModelRunner(loaded, CacheConfig(block_size=4, num_blocks=256))
    bm = runner.block_manager
    (embeds,) = encode_image_batch(runner.encode_images, [prompt.pixel_values])
    first_image = ids.index(IMG)
    cuts = [0, first_image + 3, first_image + prompt.image_token_counts[0] + 6, len(ids)]
    bm.allocate("c", cuts[1])
    for a, b in itertools.pairwise(cuts):
        bm.grow("c", b)
        before = ids[:a].count(IMG)
        chunk_embeds = embeds[before : before + ids[a:b].count(IMG)]
        logits = runner.forward(
            [
                SeqInput(
                    ids[a:b], a, bm.block_table("c"), chunk_embeds, mrope_positions=plan.slice(a, b)
                )
            ]
        )
    one = runner.forward(
        [
            SeqInput(
                ids, 0, bm.allocate("o", len(ids)), embeds, mrope_positions=plan.slice(0, len(ids))
            )
        ]
    )
    torch.testing.assert_close(logits, one, atol=ATOL, rtol=0)

    outputs = [70, 71, 72]
    for k, tok in enumerate(outputs):  # decode path
        bm.grow("o", len(ids) + k + 1)
        decoded = runner.forward(
            [SeqInput([tok], len(ids) + k, bm.block_table("o"), position_offset=plan.delta)]
        )
    full = ids + outputs  # recompute path: one prefill of prompt + outputs
    recomputed = runner.forward(
        [
            SeqInput(
                full,
                0,
                bm.allocate("r", len(full)),
                embeds,
                mrope_positions=plan.slice(0, len(full)),
            )
        ]
    )
    torch.testing.assert_close(recomputed, decoded, atol=ATOL, rtol=0)
    assert (
        plan.slice(len(ids), len(full)).tolist()
        == [[len(ids) + plan.delta + k for k in range(3)]] * 3
    )


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_matches_transformers_generate(setups, tiny_qwen_vl_dirs, kind):
    _, proc, hf = setups[kind]
    llm = LLM(str(tiny_qwen_vl_dirs[kind]), policy="sequential", block_size=4, num_kv_blocks=256)
    prompts = _prompts(proc)
    params = SamplingParams(max_tokens=8)
    results = llm.generate(prompts, params)  # batched: text-only, one image, two images together
    for p, res in zip(prompts, results):
        ids = torch.tensor([p.token_ids])
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=8,
                do_sample=False,
                **_hf_kwargs(ids, p.pixel_values),
            )
        expected = out[0, ids.shape[1] :].tolist()
        assert res.output_token_ids == expected
        assert res.finish_reason == ("stop" if expected[-1] == 2 else "length")
    bm = llm.llm_engine.runner.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_engine_with_chunked_prefill_equals_sequential_generate(setups, tiny_qwen_vl_dirs):
    """The three-stage engine (vision batches of several requests, prefill chunks cut inside
    images, decode after images) gives the tokens of whole prefills run one stage at a time
    (policy ``sequential``)."""
    from nova.config import EngineConfig
    from nova.engine.llm_engine import LLMEngine

    loaded, proc, _ = setups["qwen2.5-vl"]
    prompts = [
        *_prompts(proc),
        proc.from_token_ids([1, VSTART, IMG, VEND, *list(range(100, 140))], [_image(150, 150, 4)]),
    ]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    sequential = LLM(
        str(tiny_qwen_vl_dirs["qwen2.5-vl"]), policy="sequential", block_size=4, num_kv_blocks=256
    )
    expected = [r.output_token_ids for r in sequential.generate(prompts, params)]
    for policy in ("chunked_prefill", "multi_stream"):
        cfg = EngineConfig(
            model=str(tiny_qwen_vl_dirs["qwen2.5-vl"]),
            policy=policy,
            block_size=4,
            num_kv_blocks=256,
            max_num_seqs=4,
        )
        nova = LLMEngine(cfg, loaded=loaded)
        chunk_starts: list[tuple[int, ...]] = []
        forward = nova.runner.forward

        def recording_forward(seqs, *args, **kwargs):
            chunk_starts.extend(
                tuple(s.token_ids)
                for s in seqs
                if s.mrope_positions is not None and s.num_cached_tokens > 0
            )
            return forward(seqs, *args, **kwargs)

        nova.runner.forward = recording_forward
        if policy == "chunked_prefill":
            nova.scheduler.policy.token_budget = 16  # chunks cut inside images
        reqs = nova.run_all(prompts, params)
        assert [r.output_token_ids for r in reqs] == expected, policy
        assert [r.num_image_tokens for r in reqs] == [sum(p.image_token_counts) for p in prompts]
        if policy == "chunked_prefill":  # some chunk began in the middle of an image
            assert any(chunk[0] == IMG for chunk in chunk_starts)


# -- dynamic resolution -----------------------------------------------------------------------
def test_screenshot_1920x1080_tokens_equal_the_processor():
    from transformers import AutoImageProcessor

    for name in ("qwen2.5-vl-7b", "qwen2-vl-7b"):
        processor = AutoImageProcessor.from_pretrained(SHIPPED_CONFIGS_DIR / name)
        out = processor(images=[_image(1920, 1080)], return_tensors="pt")
        expected = int(out["image_grid_thw"].prod()) // processor.merge_size**2
        sizing = ImageSizing.from_processor(processor)
        assert sizing.num_image_tokens(1920, 1080) == expected
        assert sizing.grid(1920, 1080) == tuple(out["image_grid_thw"][0].tolist())
    assert expected == 2691  # 1932x1092 after resizing: 138 x 78 patches, 2x2 merged


@pytest.mark.parametrize("limits", [None, (28 * 28 * 4, 28 * 28 * 300), (56 * 56, 1280 * 28 * 28)])
def test_token_counts_equal_the_processor_over_many_sizes(limits):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = (
        Qwen2VLImageProcessorPil()
        if limits is None
        else Qwen2VLImageProcessorPil(min_pixels=limits[0], max_pixels=limits[1])
    )
    sizing = ImageSizing.from_processor(processor)
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (27, 29), (1080, 2400), (3840, 2160), (500, 20)]
    sizes += [(int(w), int(h)) for w, h in rng.integers(14, 4000, size=(60, 2))]
    for w, h in sizes:
        patches = processor.get_number_of_image_patches(h, w)
        assert sizing.num_patches(w, h) == patches, (w, h)
        assert sizing.num_image_tokens(w, h) == patches // 4
    for w, h in [(333, 71), (64, 900)]:  # and the real preprocessing, end to end
        grid = processor(images=[_image(w, h)], return_tensors="pt")["image_grid_thw"][0].tolist()
        assert sizing.grid(w, h) == tuple(grid)


def test_server_limits_override_the_processor_and_drive_token_counts(setups):
    loaded, proc, _ = setups["qwen2-vl"]
    assert proc.sizing.max_pixels == QWEN_VL_MAX_PIXELS  # from preprocessor_config.json
    image = _image(1920, 1080)
    default = proc.from_token_ids([1, VSTART, IMG, VEND], [image])
    assert default.image_token_counts == [proc.image_token_count(1920, 1080)]
    bigger = InputProcessor(loaded, max_pixels=28 * 28 * 200)
    p = bigger.from_token_ids([1, VSTART, IMG, VEND], [image])
    assert p.image_token_counts[0] > default.image_token_counts[0]
    assert p.image_token_counts == p.pixel_values.tokens_per_image
    assert p.token_ids.count(IMG) == p.image_token_counts[0] <= 200
    # A prompt that comes already expanded is accepted as is.
    again = bigger.from_token_ids(p.token_ids, [image])
    assert again.token_ids == p.token_ids


def test_clear_errors_outside_the_resize_limits(setups):
    loaded, _, _ = setups["qwen2-vl"]
    strict = InputProcessor(loaded, min_pixels=56 * 56, max_pixels=56 * 56)
    # Above the maximum: a strip cannot shrink under max_pixels (each side >= 28 pixels).
    with pytest.raises(
        InvalidInputError,
        match=r"image 0: image of 1000x28 pixels resizes to "
        r"\d+x28 = \d+ pixels .*above max_pixels=3136",
    ):
        strict.from_token_ids([1, IMG], [_image(1000, 28)])
    # Below the minimum: flooring to multiples of 28 under a narrow [min, max] window.
    with pytest.raises(
        ValueError,
        match=r"image of 1000x900 pixels resizes to 56x28 = 1568 pixels"
        r".*below min_pixels=3136",
    ):
        strict.from_token_ids([1, IMG], [_image(1000, 900)])
    with pytest.raises(InvalidInputError, match="aspect ratio 250.0"):
        InputProcessor(loaded).from_token_ids([1, IMG], [_image(2500, 10)])
    # A fine image on the same processor still works.
    assert strict.from_token_ids([1, IMG], [_image(60, 60)]).image_token_counts == [4]
    with pytest.raises(ValueError, match="min_pixels .* > max_pixels"):
        ImageSizing(min_pixels=5000, max_pixels=4000)


def test_mrope_plan_layout():
    # text(2) | image grid 1x4x6 -> merged 2x3 | text(2)
    ids = [7, 8] + [IMG] * 6 + [9, 10]
    plan = mrope_plan(ids, IMG, [(1, 4, 6)], 2)
    assert plan.positions.tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
    ]
    assert plan.delta == 7 - len(ids)
    text = mrope_plan([1, 2, 3], IMG, [], 2)
    assert text.delta == 0 and text.positions.tolist() == [[0, 1, 2]] * 3
    with pytest.raises(ValueError, match="6 image tokens but its 1 images need 4"):
        mrope_plan(ids, IMG, [(1, 4, 4)], 2)
    with pytest.raises(ValueError, match="not contiguous"):
        mrope_plan([IMG, 5, IMG, IMG, IMG], IMG, [(1, 4, 4)], 2)


def test_mrope_with_equal_rows_is_plain_rope(setups):
    decoder = setups["qwen2-vl"][0].model.decoder
    pos = torch.tensor([0, 3, 17, 250])
    torch.testing.assert_close(decoder.rope_angles(pos.expand(3, -1)), decoder.rope_angles(pos))
    rows = torch.stack([pos, pos + 1, pos + 2])
    assert not torch.allclose(decoder.rope_angles(rows), decoder.rope_angles(pos))


# -- loading ----------------------------------------------------------------------------------
def test_checkpoint_key_layouts_map_onto_our_modules():
    from nova.models.registry import ARCHITECTURES

    arch = ARCHITECTURES["Qwen2_5_VLForConditionalGeneration"]
    for old, new in [
        (
            "model.layers.0.self_attn.q_proj.weight",
            "model.language_model.layers.0.self_attn.q_proj.weight",
        ),
        ("visual.blocks.0.attn.qkv.weight", "model.visual.blocks.0.attn.qkv.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
    ]:
        assert arch.map_name(old) == arch.map_name(new)
    assert arch.map_name("visual.merger.mlp.0.weight") == "vision.visual.merger.mlp.0.weight"
    assert arch.map_name("model.norm.weight") == "decoder.model.norm.weight"


def test_dummy_weights_from_a_config_only_directory(tiny_qwen_vl_dirs, tmp_path):
    src = tiny_qwen_vl_dirs["qwen2.5-vl"]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    loaded = load_model(tmp_path, load_format="dummy")
    proc = InputProcessor(loaded)  # no preprocessor_config.json: the published defaults
    assert proc.sizing.max_pixels == 12845056 and proc.num_image_tokens == 1600
    p = proc.from_token_ids([1, VSTART, IMG, VEND, 5], [_image(84, 56)])
    assert p.image_token_counts == [6]
    llm = LLM(
        str(tmp_path), load_format="dummy", policy="sequential", block_size=4, num_kv_blocks=32
    )
    (res,) = llm.generate([p], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(res.output_token_ids) == 3


def test_shipped_configs_read_as_published_shapes():
    for name in QWEN_SHIPPED:
        cfg = json.loads((SHIPPED_CONFIGS_DIR / name / "config.json").read_text())
        assert cfg["vision_config"]["depth"] == 32 and cfg["rope_scaling"]["mrope_section"] == [
            16,
            24,
            24,
        ]
        pre = json.loads((SHIPPED_CONFIGS_DIR / name / "preprocessor_config.json").read_text())
        assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 12845056)


# -- cost model and GUI workload --------------------------------------------------------------
def test_cost_model_spec_of_the_family():
    from nova.cost.model_spec import ModelSpec

    published = {
        "qwen2-vl-2b": 2.21e9,
        "qwen2-vl-7b": 8.29e9,
        "qwen2.5-vl-3b": 3.75e9,
        "qwen2.5-vl-7b": 8.29e9,
    }
    for name, params in published.items():
        spec = ModelSpec.named(name)
        assert spec.num_params() == pytest.approx(params, rel=0.01), name
        assert spec.dynamic_resolution and spec.image_tokens == 1600  # 1120x1120 reference
        assert spec.image_tokens_for(1920, 1080) == 2691
        hd = spec.for_image(1920, 1080)
        assert (hd.vision_tokens, hd.image_tokens) == (78 * 138, 2691)
        assert hd.vision_flops() > 1.5 * spec.vision_flops()  # more patches, more work
        assert hd.num_params() == spec.num_params()  # rotary: no size-dependent table
    q2, q25 = (
        ModelSpec.named("qwen2-vl-7b").for_image(1920, 1080),
        ModelSpec.named("qwen2.5-vl-7b").for_image(1920, 1080),
    )
    # Window attention: 28 of 32 layers attend within 64-patch windows.
    assert q25.vision_window_tokens == 64 and q25.vision_full_attn_layers == 4
    full = 32 * q25.vision_tokens**2
    windowed = 4 * q25.vision_tokens**2 + 28 * q25.vision_tokens * 64
    assert q25._vision_attention_pairs() == windowed < full == q2._vision_attention_pairs()
    smaller = ModelSpec.named("qwen2.5-vl-7b").with_pixel_limits(
        max_pixels=28 * 28 * 256, image_size=(1920, 1080)
    )
    assert smaller.image_tokens <= 256 and smaller.image_tokens < hd.image_tokens


def test_gui_workload_image_tokens_follow_screenshot_resolution():
    import random

    from nova.cost.model_spec import ModelSpec
    from nova.workload.gui_agent import GuiContentConfig, gui_agent_request, prompt_tokens_for
    from nova.workload.types import ImageSpec

    phone = GuiContentConfig(image_width=1080, image_height=2400)
    desktop = GuiContentConfig(image_width=1920, image_height=1080)
    qwen = ModelSpec.named("qwen2.5-vl-7b")
    assert desktop.image_tokens(qwen) == 2691
    assert phone.image_tokens("qwen2-vl-7b") == qwen.image_sizing().num_image_tokens(1080, 2400)
    assert phone.image_tokens(qwen) != desktop.image_tokens(qwen)
    assert desktop.image_tokens("llava-1.5-7b") == phone.image_tokens("llava-1.5-7b") == 576
    req = gui_agent_request(
        random.Random(0), "r", 0.0, GuiContentConfig(1920, 1080, images_per_request=2)
    )
    assert prompt_tokens_for(qwen, req) == req.num_text_tokens + 2 * 2691
    from nova.workload.gui_agent import image_tokens_for

    with pytest.raises(ValueError, match="aspect ratio"):
        image_tokens_for(qwen, ImageSpec(5000, 10))


@pytest.mark.parametrize("kind", KINDS)
def test_vision_weight_streaming_gives_identical_embeddings(tiny_qwen_vl_dirs, kind):
    from nova.gpu.offload import stream_vision_layers

    loaded = load_model(tiny_qwen_vl_dirs[kind])
    proc = InputProcessor(loaded)
    batches = [
        proc.pixel_values([_image(130, 200, 5), _image(90, 45, 6)]),
        proc.pixel_values([_image(60, 60, 7)]),
    ]
    ref = [loaded.model.encode_images(b) for b in batches]
    streamer = stream_vision_layers(loaded.model.vision, 1, torch.device("cpu"))
    assert streamer is not None and streamer.stats.num_slots == 1
    for b, expected in zip(batches, ref):
        assert torch.equal(loaded.model.encode_images(b), expected)
