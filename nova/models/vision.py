"""LLaVA-style vision side: a CLIP or SigLIP tower (``transformers`` modules) + projector.

Feature selection follows ``transformers``' LLaVA exactly: hidden states of
``vision_feature_layer`` (an int, or a list whose states are concatenated), with the first
(CLS) position dropped when ``vision_feature_select_strategy == "default"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SUPPORTED_VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")


def num_image_tokens(hf_config: Any) -> int:
    """Image tokens one image expands to, known before the tower runs (for KV admission)."""
    vc = hf_config.vision_config
    num_positions = (vc.image_size // vc.patch_size) ** 2
    if vc.model_type == "clip_vision_model":
        num_positions += 1  # CLS
    if hf_config.vision_feature_select_strategy == "default":
        num_positions -= 1
    return num_positions


class LlavaVision(nn.Module):
    """pixel_values [N, 3, H, W] -> image embeddings [N, num_image_tokens, text_hidden]."""

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        vc = hf_config.vision_config
        if vc.model_type not in SUPPORTED_VISION_TOWERS:
            raise ValueError(
                f"unsupported vision tower {vc.model_type!r}; supported: {SUPPORTED_VISION_TOWERS}"
            )
        self.vision_tower = AutoModel.from_config(vc)
        self.multi_modal_projector = LlavaMultiModalProjector(hf_config)
        self.feature_layer = hf_config.vision_feature_layer
        self.select_strategy = hf_config.vision_feature_select_strategy
        self.num_image_tokens = num_image_tokens(hf_config)

    def streamable_layers(self) -> nn.ModuleList:
        """The encoder's stack of identically shaped layers, for weight streaming
        (``nova.gpu.offload``): ``encoder.layers`` of CLIP and SigLIP (under ``vision_model`` in
        older ``transformers``)."""
        return getattr(self.vision_tower, "vision_model", self.vision_tower).encoder.layers

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(
            pixel_values.to(self.dtype), output_hidden_states=True, return_dict=True
        )
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else self.feature_layer
        states = [out.hidden_states[i] for i in layers]
        if self.select_strategy == "default":
            states = [s[:, 1:] for s in states]
        return self.multi_modal_projector(torch.cat(states, dim=-1))
