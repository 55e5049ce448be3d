"""A LLaVA and a Qwen2-VL saved the way the installed transformers saves them (the model, then
its processor with ``save_pretrained``: the image processor nested in processor_config.json,
the chat template beside the tokenizer) load in Nova, serve an image request over the API, and
generate greedily what transformers generates from the inputs its own processor builds."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
import torch
from conftest import (
    QWEN_VL_IMAGE_TOKEN_ID,
    QWEN_VL_MAX_PIXELS,
    QWEN_VL_MIN_PIXELS,
    tiny_qwen_vl_config,
)
from test_qwen_vl_server import save_tiny_tokenizer

from nova.config import EngineConfig
from nova.engine.llm_engine import LLMEngine
from nova.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

MAX_NEW = 8


def _image(width: int, height: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def save_llava(path):
    """Tiny random LLaVA over the demo tokenizer, saved with LlavaProcessor.save_pretrained."""
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    from nova.models.demo import build_demo_model

    demo = build_demo_model()
    tok = AutoTokenizer.from_pretrained(demo)
    image_token = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            eos_token_id=2,
            initializer_range=0.1,
        ),
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        image_token_index=image_token,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=16,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=tok.chat_template,
    ).save_pretrained(path)
    return path


def save_qwen2_vl(path):
    """Tiny random Qwen2-VL, the model saved with save_pretrained and its processor config in
    the nested layout ProcessorMixin.save_pretrained writes. (Qwen2VLProcessor itself cannot be
    built with this transformers without torchvision, which its video processor needs: the
    image processor's own ``to_dict`` fills the ``image_processor`` entry instead.)"""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(tiny_qwen_vl_config("qwen2-vl")).save_pretrained(path)
    save_tiny_tokenizer(path)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=QWEN_VL_MIN_PIXELS, max_pixels=QWEN_VL_MAX_PIXELS
    )
    (path / "processor_config.json").write_text(
        json.dumps(
            {"image_processor": image_processor.to_dict(), "processor_class": "Qwen2VLProcessor"},
            indent=2,
        )
    )
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved-by-transformers")
    return {"llava": save_llava(root / "llava"), "qwen2-vl": save_qwen2_vl(root / "qwen2-vl")}


def _hf_inputs(kind: str, path, messages, images) -> tuple[object, dict]:
    """transformers' model and the inputs its own processing builds for ``messages``."""
    from transformers import (
        AutoImageProcessor,
        AutoProcessor,
        AutoTokenizer,
        LlavaForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    if kind == "llava":
        processor = AutoProcessor.from_pretrained(path)
        rendered = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        inputs = processor(text=[rendered], images=images, return_tensors="pt")
        return LlavaForConditionalGeneration.from_pretrained(path).eval(), dict(inputs)
    # Qwen2VLProcessor's expansion: one <|image_pad|> per merged patch of each image's grid
    tok = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    pix = image_processor(images=images, return_tensors="pt")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(ids, add_special_tokens=False)["input_ids"]
    merge = image_processor.merge_size**2
    counts = iter(int(g.prod()) // merge for g in pix["image_grid_thw"])
    expanded = []
    for t in ids:
        expanded += [t] * next(counts) if t == QWEN_VL_IMAGE_TOKEN_ID else [t]
    inputs = {"input_ids": torch.tensor([expanded]), **pix}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    # what the processor adds for M-RoPE: which tokens are image tokens
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == QWEN_VL_IMAGE_TOKEN_ID).int()
    return Qwen2VLForConditionalGeneration.from_pretrained(path).eval(), inputs


@pytest.mark.parametrize("kind", ["llava", "qwen2-vl"])
def test_saved_layout_is_the_nested_processor_config(saved, kind):
    nested = json.loads((saved[kind] / "processor_config.json").read_text())
    assert "image_processor" in nested


@pytest.mark.parametrize("kind", ["llava", "qwen2-vl"])
def test_greedy_with_images_equals_transformers(saved, kind):
    path = saved[kind]
    images = [_image(40, 30, 1), _image(64, 90, 2)]
    text = "which button?"
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}],
        }
    ]
    hf, inputs = _hf_inputs(kind, path, messages, images)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()

    engine = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=128))
    assert engine.processor.image_processor is not None
    prompt = engine.processor.from_chat(messages, images)
    assert prompt.token_ids == inputs["input_ids"][0].tolist()  # same prompt, images expanded
    [req] = engine.run_all([prompt], SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))
    assert req.output_token_ids[: len(expected)] == expected
    if kind == "qwen2-vl":
        assert prompt.token_ids.count(QWEN_VL_IMAGE_TOKEN_ID) == sum(prompt.image_token_counts)

    # and over the API, with the images as data URLs
    from nova.engine.async_engine import AsyncEngine
    from nova.server.app import create_app
    from nova.server.config import ServerConfig

    served = AsyncEngine(llm_engine=LLMEngine(EngineConfig(model=str(path), num_kv_blocks=128)))
    try:
        app = create_app(served, ServerConfig(served_model_name=kind))
        content = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in images]
        body = {
            "messages": [{"role": "user", "content": [*content, {"type": "text", "text": text}]}],
            "max_tokens": MAX_NEW,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": True,
        }

        async def ask():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await c.post("/v1/chat/completions", json=body, timeout=120)

        resp = asyncio.run(ask())
    finally:
        served.shutdown()
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["usage"]["prompt_tokens"] == len(prompt.token_ids)
    tok = engine.processor.tokenizer
    tokens = [e["token"] for e in got["choices"][0]["logprobs"]["content"]]
    assert tokens == [tok.decode([t]) for t in expected]
    assert [s["width"] for s in got["image_sizes"]] == [40, 64]
