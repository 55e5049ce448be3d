"""The vision tower's shape from a ``config.json`` dict.

Two kinds of tower:

- fixed-size (LLaVA: a CLIP or SigLIP ``vision_config``): every image is resized to
  ``image_size`` and becomes ``(image_size / patch_size)**2`` patches, plus CLIP's CLS token;
  LLaVA's projector reads the hidden states of ``vision_feature_layer`` (an int, or a list whose
  states are concatenated) and, with ``vision_feature_select_strategy == "default"``, drops the
  first position (as ``transformers``' LLaVA does, CLS or not);
- dynamic resolution (Qwen2-VL / Qwen2.5-VL): the patch count follows each image's size
  (``nova.shapes.sizing``); ``merge x merge`` patches become one LLM token. Qwen2-VL: LayerNorm
  ViT, fc1/fc2 MLP of ``mlp_ratio * embed_dim``, merger output ``hidden_size``; Qwen2.5-VL:
  RMSNorm and a SwiGLU MLP of ``intermediate_size``, merger output ``out_hidden_size``, window
  attention (``window_size`` pixels per side) in all layers but ``fullatt_block_indexes``.

Defaults of fields a config may leave out are ``transformers``' config class defaults, except
the merger output size, which defaults to the text model's hidden size (anything else cannot
run).
"""

from __future__ import annotations

from dataclasses import dataclass

from nova.shapes.fields import (
    ConfigError,
    JsonDict,
    dict_field,
    int_list,
    int_or,
    req_int,
    str_or,
)
from nova.shapes.text import LLAVA, QWEN2_5_VL, QWEN_VL_MODEL_TYPES

CLIP_VISION, SIGLIP_VISION = "clip_vision_model", "siglip_vision_model"
FIXED_SIZE_TOWERS = (CLIP_VISION, SIGLIP_VISION)
# transformers' LlavaConfig defaults.
DEFAULT_FEATURE_LAYER = -2
DEFAULT_FEATURE_SELECT_STRATEGY = "default"
# transformers' Qwen2.5-VL vision config defaults.
DEFAULT_WINDOW_SIZE_PX = 112
DEFAULT_FULL_ATTN_BLOCKS = (7, 15, 23, 31)


@dataclass(slots=True, frozen=True)
class VisionShape:
    """Shape of a vision tower (and what decides its token counts)."""

    model_type: str  # clip_vision_model, siglip_vision_model, qwen2_vl_vision, qwen2_5_vl_vision
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    mlp_matrices: int  # 2: fc1/fc2 (CLIP, SigLIP, Qwen2-VL); 3: SwiGLU (Qwen2.5-VL)
    patch_size: int  # pixels per patch side
    dynamic_resolution: bool = False  # True: token counts follow each image's size
    image_size: int = 0  # fixed-size towers: pixels per side of the tower's input
    class_token: bool = False  # CLIP prepends a CLS token to the patches
    feature_layers: tuple[int, ...] = ()  # LLaVA: hidden states the projector reads
    feature_select_strategy: str = ""  # LLaVA: "default" drops the first position, "full" not
    merge_size: int = 1  # merge x merge patches become one LLM token (Qwen-VL: 2)
    temporal_patch_size: int = 1  # frames per patch (Qwen-VL: 2; an image is repeated)
    out_hidden_size: int = 0  # Qwen-VL merger output width (the text hidden size)
    window_tokens: int = 0  # patches per attention window (0: full attention in every layer)
    full_attn_layers: int = 0  # layers with full attention when windowed

    @property
    def tower_tokens(self) -> int:
        """Tokens a fixed-size tower processes per image (patches, + CLS)."""
        self._require_fixed()
        return (self.image_size // self.patch_size) ** 2 + (1 if self.class_token else 0)

    @property
    def image_tokens(self) -> int:
        """Tokens one image becomes in the LLM's prompt (fixed-size towers)."""
        dropped = 1 if self.feature_select_strategy == "default" else 0
        return self.tower_tokens - dropped

    def _require_fixed(self) -> None:
        if self.dynamic_resolution:
            raise ValueError(
                f"{self.model_type}: token counts follow each image's size (see ImageSizing)"
            )


def parse_vision(config: JsonDict, text_hidden_size: int) -> VisionShape | None:
    """The vision tower of a ``config.json`` dict; None for a text-only model."""
    model_type = str_or(config, "model_type", "config", "")
    vision = dict_field(config, "vision_config", "config")
    if vision is None:
        if model_type in (*QWEN_VL_MODEL_TYPES, LLAVA):
            raise ConfigError(f"a {model_type} config needs a vision_config")
        return None
    if model_type in QWEN_VL_MODEL_TYPES:
        return _qwen_vl_vision(vision, model_type, text_hidden_size)
    return _fixed_size_vision(config, vision)


def _qwen_vl_vision(vision: JsonDict, model_type: str, text_hidden_size: int) -> VisionShape:
    where = "vision_config"
    patch = int_or(vision, "patch_size", where, 14)
    if model_type == QWEN2_5_VL:
        hidden = req_int(vision, "hidden_size", where)
        intermediate, mlp_matrices = req_int(vision, "intermediate_size", where), 3
        out_hidden = int_or(vision, "out_hidden_size", where, text_hidden_size)
        window = int_or(vision, "window_size", where, DEFAULT_WINDOW_SIZE_PX) // patch
        full = int_list(vision, "fullatt_block_indexes", where)
        window_tokens = window * window
        full_layers = len(DEFAULT_FULL_ATTN_BLOCKS if full is None else full)
    else:
        hidden = req_int(vision, "embed_dim", where)
        intermediate, mlp_matrices = hidden * int_or(vision, "mlp_ratio", where, 4), 2
        out_hidden = int_or(vision, "hidden_size", where, text_hidden_size)
        window_tokens, full_layers = 0, 0
    return VisionShape(
        model_type=f"{model_type}_vision",
        num_layers=req_int(vision, "depth", where),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_heads=req_int(vision, "num_heads", where),
        mlp_matrices=mlp_matrices,
        patch_size=patch,
        dynamic_resolution=True,
        merge_size=int_or(vision, "spatial_merge_size", where, 2),
        temporal_patch_size=int_or(vision, "temporal_patch_size", where, 2),
        out_hidden_size=out_hidden,
        window_tokens=window_tokens,
        full_attn_layers=full_layers,
    )


def _fixed_size_vision(config: JsonDict, vision: JsonDict) -> VisionShape:
    where = "vision_config"
    vtype = str_or(vision, "model_type", where, CLIP_VISION)
    if vtype not in FIXED_SIZE_TOWERS:
        raise ConfigError(
            f"unsupported vision tower {vtype!r}; supported: {', '.join(FIXED_SIZE_TOWERS)}"
        )
    layers = int_list(config, "vision_feature_layer", "config")
    return VisionShape(
        model_type=vtype,
        num_layers=req_int(vision, "num_hidden_layers", where),
        hidden_size=req_int(vision, "hidden_size", where),
        intermediate_size=req_int(vision, "intermediate_size", where),
        num_heads=req_int(vision, "num_attention_heads", where),
        mlp_matrices=2,
        patch_size=req_int(vision, "patch_size", where),
        image_size=req_int(vision, "image_size", where),
        class_token=vtype == CLIP_VISION,
        feature_layers=(DEFAULT_FEATURE_LAYER,) if layers is None else layers,
        feature_select_strategy=str_or(
            config, "vision_feature_select_strategy", "config", DEFAULT_FEATURE_SELECT_STRATEGY
        ),
    )
