"""Shared fixtures: tiny random Hugging Face checkpoints of each supported architecture."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Nova's C++ CPU kernels must build here (a failed build is an error, not a quiet fallback to
# the eager path, which tests/test_cpu_kernels.py checks on its own)
os.environ.setdefault("NOVA_CPU_KERNELS", "require")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TEXT_KW = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
IMAGE_TOKEN_ID = 300


def tiny_text_config(kind: str):
    from transformers import LlamaConfig, Qwen2Config

    if kind == "llama":
        return LlamaConfig(**TEXT_KW, bos_token_id=1, eos_token_id=2)
    if kind == "llama3":  # llama3 RoPE scaling, tied embeddings
        kw = dict(TEXT_KW, tie_word_embeddings=True)
        return LlamaConfig(
            **kw,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if kind == "qwen2":
        return Qwen2Config(**TEXT_KW, bos_token_id=1, eos_token_id=2)
    raise ValueError(kind)


def tiny_vision_config(kind: str):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    kw = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    if kind == "clip":
        return CLIPVisionConfig(**kw, projection_dim=32)
    return SiglipVisionConfig(**kw)


def save_tiny_causal_lm(path: Path, kind: str) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_text_config(kind))
    model.save_pretrained(path)
    return path


def save_tiny_llava(path: Path, text: str, vision: str, strategy: str) -> Path:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(
        text_config=tiny_text_config(text),
        vision_config=tiny_vision_config(vision),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-2 if strategy == "default" else -1,
    )
    model = LlavaForConditionalGeneration(cfg)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def kernels():
    """Nova's compiled CPU kernels (``nova.runtime.cpu_kernels``); a test that asks for them
    fails, not skips, when they are off or did not build."""
    from nova.runtime import cpu_kernels

    module = cpu_kernels.load()
    assert module is not None, "the kernels are off (NOVA_CPU_KERNELS=0?)"
    return module


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    dirs = {k: save_tiny_causal_lm(root / k, k) for k in ("llama", "llama3", "qwen2")}
    dirs["llava-clip"] = save_tiny_llava(root / "llava-clip", "llama", "clip", "default")
    dirs["llava-siglip-qwen2"] = save_tiny_llava(root / "llava-siglip", "qwen2", "siglip", "full")
    return dirs


# --- Qwen2-VL / Qwen2.5-VL (issue 7) -------------------------------------------------------------
QWEN_VL_IMAGE_TOKEN_ID, QWEN_VL_VISION_START_ID, QWEN_VL_VISION_END_ID = 300, 301, 302
QWEN_VL_MIN_PIXELS, QWEN_VL_MAX_PIXELS = 28 * 28, 28 * 28 * 40  # tiny: images of 1..40 tokens


def tiny_qwen_vl_config(kind: str):
    """Tiny random Qwen2-VL ("qwen2-vl") or Qwen2.5-VL ("qwen2.5-vl") config: 2-layer decoder
    (head_dim 16, mrope_section 2/3/3), 2-block vision tower with patch 14 and 2x2 merging;
    Qwen2.5-VL: window attention in block 0 (56-pixel windows), full attention in block 1."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    # initializer_range 0.1 (not 0.02): larger logits, so a wrong position changes greedy tokens.
    text = dict(
        TEXT_KW,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    ids = dict(
        image_token_id=QWEN_VL_IMAGE_TOKEN_ID,
        video_token_id=303,
        vision_start_token_id=QWEN_VL_VISION_START_ID,
        vision_end_token_id=QWEN_VL_VISION_END_ID,
    )
    if kind == "qwen2-vl":
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=TEXT_KW["hidden_size"],
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return Qwen2VLConfig(text_config=text, vision_config=vision, initializer_range=0.1, **ids)
    if kind == "qwen2.5-vl":
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            out_hidden_size=TEXT_KW["hidden_size"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        return Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, initializer_range=0.1, **ids
        )
    raise ValueError(kind)


def save_tiny_qwen_vl(path: Path, kind: str) -> Path:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    cls = (
        Qwen2VLForConditionalGeneration
        if kind == "qwen2-vl"
        else Qwen2_5_VLForConditionalGeneration
    )
    cls(tiny_qwen_vl_config(kind)).save_pretrained(path)
    Qwen2VLImageProcessorPil(
        min_pixels=QWEN_VL_MIN_PIXELS, max_pixels=QWEN_VL_MAX_PIXELS
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen_vl_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-qwen-vl")
    return {k: save_tiny_qwen_vl(root / k, k) for k in ("qwen2-vl", "qwen2.5-vl")}


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests need CUDA: skipped, with the reason shown, on a machine "
    "without."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def save_byte_level_tokenizer(path: Path, specials: dict[str, int], chat_template: str) -> None:
    """A tokenizer for the tiny checkpoints: byte-level BPE without merges (ids 3..258: bytes;
    0..2: end of text, im_start, im_end) plus ``specials`` at their ids, with ``chat_template``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({ch: 3 + i for i, ch in enumerate(sorted(alphabet))})
    vocab.update(specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = chat_template
    fast.save_pretrained(path)


def png_data_url(width: int, height: int, seed: int) -> str:
    """A random RGB PNG of ``width`` x ``height`` as a data URL (``seed``: its pixels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
