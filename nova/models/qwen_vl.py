"""Qwen2-VL / Qwen2.5-VL vision side: ``transformers``' own vision towers (patch embedding,
ViT blocks with 2-D rotary positions, Qwen2.5-VL's window attention, and the 2x2 patch merger
that maps 4 neighbouring patches to one LLM token).

Input: flattened patches of several images and their (t, h, w) patch grids, as the model's
image processor produces them (:class:`nova.models.mm.VisionInput`). Output: the image tokens
of all images, packed in image order ``[sum of t*h*w/merge**2, text_hidden]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nova.runtime.cpu_linear import pack_linear_modules
from nova.shapes import VisionShape

# model_type of the top-level config -> (vision model_type, tower class name in transformers)
QWEN_VL_TOWERS = {
    "qwen2_vl": (
        "qwen2_vl_vision",
        "transformers.models.qwen2_vl.modeling_qwen2_vl",
        "Qwen2VisionTransformerPretrainedModel",
    ),
    "qwen2_5_vl": (
        "qwen2_5_vl_vision",
        "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
        "Qwen2_5_VisionTransformerPretrainedModel",
    ),
}


def _tower_class(hf_config: Any) -> Any:
    """The transformers tower class (a ``PreTrainedModel`` subclass) of a Qwen-VL config."""
    import importlib

    model_type = hf_config.model_type
    if model_type not in QWEN_VL_TOWERS:
        raise ValueError(f"not a Qwen-VL config: model_type {model_type!r}")
    vision_type, module, name = QWEN_VL_TOWERS[model_type]
    if hf_config.vision_config.model_type != vision_type:
        raise ValueError(
            f"{model_type} needs a {vision_type} vision_config, got "
            f"{hf_config.vision_config.model_type!r}"
        )
    return getattr(importlib.import_module(module), name)


class QwenVLVision(nn.Module):
    """(patches [P, patch_dim], grid_thw [N, 3]) -> image tokens [sum P_i / merge**2, hidden]."""

    def __init__(
        self, hf_config: Any, shape: VisionShape, dtype: torch.dtype | None = None
    ) -> None:
        """``shape``: the parse of ``hf_config``'s vision tower (``nova.shapes``)."""
        super().__init__()
        cls = _tower_class(hf_config)
        # dtype passed explicitly: _from_config would otherwise follow config.json's torch_dtype.
        self.visual = cls._from_config(
            hf_config.vision_config, dtype=dtype or torch.get_default_dtype()
        )
        pack_linear_modules(self.visual)  # prepacked weights on a CPU (nova.runtime.cpu_linear)
        self.spatial_merge_size = shape.merge_size

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.patch_embed.proj.weight.dtype

    def streamable_layers(self) -> nn.ModuleList:
        """The identically shaped ViT blocks, for vision-weight streaming (``nova.gpu.offload``);
        Qwen2.5-VL's window and full-attention blocks differ only in what they are called with."""
        return self.visual.blocks

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        out = self.visual(pixel_values.to(self.dtype), grid_thw=grid_thw)
        return out.pooler_output
