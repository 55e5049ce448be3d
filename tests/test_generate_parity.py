"""Greedy generation through our engine (``LLM``, policy ``sequential``) equals
transformers.generate token for token."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_TOKEN_ID

from nova.llm import LLM
from nova.models.inputs import InputProcessor, PromptInput
from nova.models.loader import load_model
from nova.sampling_params import SamplingParams

MAX_NEW = 12


def _hf_greedy(hf, input_ids: list[int], pixel_values=None, max_new=MAX_NEW) -> list[int]:
    kwargs = {"pixel_values": pixel_values} if pixel_values is not None else {}
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor([input_ids]),
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            **kwargs,
        )
    return out[0, len(input_ids) :].tolist()


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2"])
def test_text_greedy_matches_transformers(tiny_dirs, kind):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[kind]).eval()
    llm = LLM(str(tiny_dirs[kind]), policy="sequential", block_size=4, num_kv_blocks=128)
    prompts = [[1, 5, 9, 13], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48], [1, 77]]
    # Both stop at EOS (id 2) or after MAX_NEW tokens; transformers keeps the EOS it emitted.
    params = SamplingParams(max_tokens=MAX_NEW)
    # batched: three prompts of different lengths together
    results = llm.generate([PromptInput(p) for p in prompts], params)
    for p, res in zip(prompts, results):
        expected = _hf_greedy(hf, p)
        assert res.output_token_ids == expected
        assert res.finish_reason == ("stop" if expected[-1] == 2 else "length")
    bm = llm.llm_engine.runner.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("kind", ["llava-clip", "llava-siglip-qwen2"])
def test_llava_greedy_with_image_matches_transformers(tiny_dirs, kind):
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(tiny_dirs[kind]).eval()
    llm = LLM(str(tiny_dirs[kind]), policy="sequential", block_size=8, num_kv_blocks=128)
    proc = llm.processor
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32)
    from nova.models.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="1 image placeholders but 0 images"):
        proc.from_token_ids([1, 7, IMAGE_TOKEN_ID, 8, 9])
    img_a = PromptInput(
        [1, 7] + [IMAGE_TOKEN_ID] * proc.num_image_tokens + [8, 9], pixels[:1], num_images=1
    )
    img_b = PromptInput(
        [1] + [IMAGE_TOKEN_ID] * proc.num_image_tokens + [30, 31, 32], pixels[1:], num_images=1
    )
    text = PromptInput([1, 60, 61, 62])
    params = SamplingParams(max_tokens=MAX_NEW)
    results = llm.generate([img_a, text, img_b], params)
    assert results[0].output_token_ids == _hf_greedy(hf, img_a.token_ids, pixels[:1])
    assert results[1].output_token_ids == _hf_greedy(hf, text.token_ids)
    assert results[2].output_token_ids == _hf_greedy(hf, img_b.token_ids, pixels[1:])
    # vision ran for the requests with an image only
    assert results[0].metrics.vision_s > 0 and results[1].metrics.vision_s is None


def test_image_embeddings_match_transformers(tiny_dirs):
    from transformers import LlavaForConditionalGeneration

    for kind in ("llava-clip", "llava-siglip-qwen2"):
        hf = LlavaForConditionalGeneration.from_pretrained(tiny_dirs[kind]).eval()
        loaded = load_model(tiny_dirs[kind])
        pixels = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            ref = hf.model.get_image_features(pixel_values=pixels).pooler_output
        ours = loaded.model.encode_images(pixels)
        assert ours.shape[1] == InputProcessor(loaded).num_image_tokens
        torch.testing.assert_close(ours, torch.stack(list(ref)), atol=1e-5, rtol=0)


def test_placeholder_expansion_counts(tiny_dirs):
    loaded = load_model(tiny_dirs["llava-clip"])
    proc = InputProcessor(loaded)
    from PIL import Image

    img = Image.new("RGB", (50, 40), (10, 200, 30))
    with pytest.raises(Exception, match="image processor|does not take images"):
        proc.from_token_ids([1, IMAGE_TOKEN_ID, 3], [img])  # tiny dir has no image processor
    from nova.models.errors import InvalidInputError
    from nova.models.inputs import expand_image_placeholders

    out = expand_image_placeholders([1, IMAGE_TOKEN_ID, 3, IMAGE_TOKEN_ID], IMAGE_TOKEN_ID, 4, 2)
    assert out == [1] + [IMAGE_TOKEN_ID] * 4 + [3] + [IMAGE_TOKEN_ID] * 4
    with pytest.raises(InvalidInputError, match="2 image placeholders but 1 images"):
        expand_image_placeholders([1, IMAGE_TOKEN_ID, 3, IMAGE_TOKEN_ID], IMAGE_TOKEN_ID, 4, 1)
