"""Architectures Nova can run, keyed by the ``architectures`` entry of ``config.json``.

Each entry builds a ``NovaModel`` skeleton from a transformers config and maps a checkpoint
tensor name onto our parameter names (``None`` = tensor not used, e.g. rotary caches).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from nova.models.llama import LlamaDecoder, rope_inverse_frequencies
from nova.models.qwen_vl import QwenVLVision
from nova.models.vision import LlavaVision
from nova.models.vlm import NovaModel
from nova.registry import Registry
from nova.shapes import ModelShape, VisionShape, parse_model_config
from nova.shapes.text import LLAMA, MISTRAL, QWEN2


@dataclass(slots=True, frozen=True)
class Architecture:
    name: str
    build: Callable[[Any, torch.dtype, torch.device], NovaModel]
    map_name: Callable[[str], str | None]
    text_config: Callable[[Any], Any]


ARCHITECTURES: Registry[Architecture] = Registry("architecture")


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


BuildFn = Callable[[Any, torch.dtype, torch.device], NovaModel]
MapNameFn = Callable[[str], str | None]


def register(
    name: str, text_config: Callable[[Any], Any]
) -> Callable[[tuple[BuildFn, MapNameFn]], tuple[BuildFn, MapNameFn]]:
    """Register the architecture ``name`` (once): ``register(name, text_config)((build,
    map_name))``."""

    def wrap(fns: tuple[BuildFn, MapNameFn]) -> tuple[BuildFn, MapNameFn]:
        build, map_name = fns
        ARCHITECTURES.add(name, Architecture(name, build, map_name, text_config))
        return fns

    return wrap


def model_shape(hf: Any) -> ModelShape:
    """The one parse of a model's config (``nova.shapes``), here of transformers' config object
    (its ``to_dict()``: the same fields as config.json, defaults filled in)."""
    return parse_model_config(hf.to_dict())


def _vision_shape(shape: ModelShape) -> VisionShape:
    if shape.vision is None:
        raise ValueError(f"{shape.model_type} config without a vision tower")
    return shape.vision


def _build_decoder(
    shape: ModelShape, text_cfg: Any, dtype: torch.dtype, device: torch.device
) -> LlamaDecoder:
    inv_freq, scaling = rope_inverse_frequencies(text_cfg, shape.text)
    # Built on the meta device then materialised empty: no time spent on random init of weights
    # that the loader (or the dummy initialiser) overwrites anyway.
    with torch.device("meta"), default_dtype(dtype):
        decoder = LlamaDecoder(shape.text, inv_freq, scaling)
    decoder = decoder.to_empty(device=device)
    if shape.text.tie_word_embeddings:
        decoder.lm_head.weight = decoder.model.embed_tokens.weight
    return decoder


def _causal_lm_name(name: str) -> str | None:
    if "rotary_emb" in name:
        return None
    return "decoder." + name


def _build_causal_lm(hf: Any, dtype: torch.dtype, device: torch.device) -> NovaModel:
    decoder = _build_decoder(model_shape(hf), hf, dtype, device)
    return NovaModel(decoder, vision=None, image_token_id=None)


for _arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
    register(_arch, text_config=lambda hf: hf)((_build_causal_lm, _causal_lm_name))


# LLaVA checkpoints exist in two key layouts: the older one (most published llava-hf weights)
# ``language_model.model.*`` / ``language_model.lm_head`` / ``vision_tower.*`` /
# ``multi_modal_projector.*``, and transformers >= 4.52's ``model.language_model.*`` /
# ``lm_head`` / ``model.vision_tower.*`` / ``model.multi_modal_projector.*``. Published
# checkpoints also keep a ``vision_model.`` level inside the tower that transformers 5's
# CLIP/SigLIP vision modules no longer have.
_LLAVA_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(?:model\.)?language_model\.model\.(.*)$"), r"decoder.model.\1"),
    (re.compile(r"^(?:model\.)?language_model\.lm_head\.(.*)$"), r"decoder.lm_head.\1"),
    (re.compile(r"^model\.language_model\.(.*)$"), r"decoder.model.\1"),
    (re.compile(r"^lm_head\.(.*)$"), r"decoder.lm_head.\1"),
    (re.compile(r"^(?:model\.)?vision_tower\.vision_model\.(.*)$"), r"vision.vision_tower.\1"),
    (re.compile(r"^(?:model\.)?vision_tower\.(.*)$"), r"vision.vision_tower.\1"),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.(.*)$"), r"vision.multi_modal_projector.\1"),
]


def _renamer(rules: list[tuple[re.Pattern[str], str]]) -> Callable[[str], str | None]:
    """Checkpoint name -> our module name by the first matching rule (rotary buffers: None,
    not loaded; a name no rule matches is kept and reported by the loader as unexpected)."""

    def rename(name: str) -> str | None:
        if "rotary_emb" in name:
            return None
        for pattern, repl in rules:
            if pattern.match(name):
                return pattern.sub(repl, name)
        return name

    return rename


_llava_name = _renamer(_LLAVA_RULES)


def _build_llava(hf: Any, dtype: torch.dtype, device: torch.device) -> NovaModel:
    shape = model_shape(hf)
    if shape.text.family not in (LLAMA, QWEN2, MISTRAL):
        raise ValueError(
            f"unsupported LLaVA text model {shape.text.family!r} (llama, qwen2, mistral)"
        )
    decoder = _build_decoder(shape, hf.text_config, dtype, device)
    with default_dtype(dtype):
        vision = LlavaVision(hf, _vision_shape(shape)).to(device=device, dtype=dtype)
    return NovaModel(decoder, vision, image_token_id=hf.image_token_id)


register("LlavaForConditionalGeneration", text_config=lambda hf: hf.text_config)(
    (_build_llava, _llava_name)
)


# Qwen2-VL / Qwen2.5-VL. transformers (4.52+, and 5.x when loading) names the modules
# ``model.language_model.*`` / ``model.visual.*`` / ``lm_head``; published checkpoints (and
# transformers 5's save_pretrained) use ``model.*`` (the LM) / ``visual.*`` / ``lm_head``.
_QWEN_VL_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^model\.language_model\.(.*)$"), r"decoder.model.\1"),
    (re.compile(r"^(?:model\.)?visual\.(.*)$"), r"vision.visual.\1"),
    (re.compile(r"^lm_head\.(.*)$"), r"decoder.lm_head.\1"),
    (re.compile(r"^model\.(.*)$"), r"decoder.model.\1"),
]


_qwen_vl_name = _renamer(_QWEN_VL_RULES)


def _build_qwen_vl(hf: Any, dtype: torch.dtype, device: torch.device) -> NovaModel:
    shape = model_shape(hf)
    if shape.text.sliding_window is not None:
        raise ValueError("Qwen-VL text models with use_sliding_window are not supported")
    decoder = _build_decoder(shape, hf.text_config, dtype, device)
    with default_dtype(dtype):
        vision = QwenVLVision(hf, _vision_shape(shape), dtype)
    vision = vision.to(device=device)
    return NovaModel(decoder, vision, image_token_id=hf.image_token_id)


for _arch in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"):
    register(_arch, text_config=lambda hf: hf.text_config)((_build_qwen_vl, _qwen_vl_name))
