"""LLaVA-style vision side: a CLIP or SigLIP tower (``transformers`` modules) + projector.

Feature selection follows ``transformers``' LLaVA exactly: hidden states of
``vision_feature_layer`` (an int, or a list whose states are concatenated), with the first
(CLS) position dropped when ``vision_feature_select_strategy == "default"``. These, the tower
kind and the image token count come from the parsed shape (``nova.shapes.VisionShape``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nova.runtime.cpu_linear import pack_linear_modules
from nova.shapes import VisionShape


class LlavaVision(nn.Module):
    """pixel_values [N, 3, H, W] -> image embeddings [N, num_image_tokens, text_hidden]."""

    def __init__(self, hf_config: Any, shape: VisionShape) -> None:
        """``shape``: the parse of ``hf_config`` (a CLIP or SigLIP tower; ``nova.shapes``
        refuses others)."""
        super().__init__()
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.vision_tower = AutoModel.from_config(hf_config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(hf_config)
        pack_linear_modules(self)  # prepacked weights on a CPU (nova.runtime.cpu_linear)
        self.feature_layers = shape.feature_layers
        self.select_strategy = shape.feature_select_strategy
        # Known before the tower runs (for KV admission).
        self.num_image_tokens = shape.image_tokens

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
        states = [out.hidden_states[i] for i in self.feature_layers]
        if self.select_strategy == "default":
            states = [s[:, 1:] for s in states]
        return self.multi_modal_projector(torch.cat(states, dim=-1))
