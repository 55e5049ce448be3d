"""The model Nova runs: a decoder, optionally with a vision side (text-only LMs have none).

Vision sides: ``LlavaVision`` (fixed-size images ``[N, 3, H, W]`` -> ``[N, tokens, hidden]``) and
``QwenVLVision`` (dynamic resolution: a ``VisionInput`` of flattened patches and grids ->
packed ``[sum tokens, hidden]``). Qwen-VL decoders use M-RoPE: ``position_plan`` gives a
prompt's 3-row positions and the offset of the tokens after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nova.models.llama import LlamaDecoder
from nova.models.mm import VisionInput
from nova.models.mrope import MRopePlan, mrope_plan
from nova.runtime.forward_batch import ForwardBatch
from nova.runtime.kv_cache import PagedKVCache


class NovaModel(nn.Module):
    def __init__(
        self, decoder: LlamaDecoder, vision: nn.Module | None, image_token_id: int | None
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.vision = vision
        self.image_token_id = image_token_id

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @property
    def uses_mrope(self) -> bool:
        return self.decoder.uses_mrope

    @property
    def dynamic_resolution(self) -> bool:
        """True when images come as a ``VisionInput`` (patches + grids), not ``[N, 3, H, W]``."""
        return self.vision is not None and hasattr(self.vision, "spatial_merge_size")

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor | VisionInput) -> torch.Tensor:
        """LLaVA: [N, 3, H, W] -> [N, num_image_tokens, hidden]. Qwen-VL: a ``VisionInput`` ->
        [sum of image tokens, hidden] (images in order). In the decoder's dtype."""
        if self.vision is None:
            raise ValueError("this model has no vision tower; it cannot take images")
        dtype = self.decoder.lm_head.weight.dtype
        if self.dynamic_resolution:
            if not isinstance(pixel_values, VisionInput):
                raise TypeError("this model takes images as a VisionInput (patches and grids)")
            return self.vision(pixel_values.pixel_values, pixel_values.image_grid_thw).to(dtype)
        if isinstance(pixel_values, VisionInput):
            raise TypeError("this model takes images as a [N, 3, H, W] tensor")
        return self.vision(pixel_values).to(dtype)

    def position_plan(
        self,
        token_ids: Sequence[int],
        pixel_values: torch.Tensor | VisionInput | Sequence[Sequence[int]] | None,
    ) -> MRopePlan | None:
        """M-RoPE positions of a prompt with images; None where plain positions are right
        (no M-RoPE, or no image: text-only M-RoPE positions equal token indices).
        ``pixel_values``: the images' ``VisionInput``, or their (t, h, w) grids in prompt order
        (images from the encoder cache come without pixels)."""
        if not self.uses_mrope or self.image_token_id is None or pixel_values is None:
            return None
        if isinstance(pixel_values, VisionInput):
            grids: Sequence[Sequence[int]] = pixel_values.grids
            merge = pixel_values.spatial_merge_size
        elif isinstance(pixel_values, torch.Tensor):
            return None
        else:
            grids = pixel_values
            merge = int(getattr(self.vision, "spatial_merge_size", 2))
        if not grids:
            return None
        return mrope_plan(token_ids, self.image_token_id, grids, merge)

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        """Token embeddings with image embeddings merged at the image-placeholder positions."""
        hidden = self.decoder.embed(batch.input_ids)
        if not any(e is not None for e in batch.mm_embeds):
            return hidden
        if self.image_token_id is None:
            raise ValueError("image embeddings given to a model without an image token")
        is_image = batch.input_ids == self.image_token_id
        embeds = torch.cat(
            [e.reshape(-1, hidden.shape[-1]) for e in batch.mm_embeds if e is not None]
        )
        num_placeholders = int(is_image.sum())
        if num_placeholders != embeds.shape[0]:
            is_image = self._placeholders(batch, is_image, int(hidden.shape[-1]))
            num_placeholders = int(is_image.sum())
        if num_placeholders != embeds.shape[0]:
            raise ValueError(
                f"{num_placeholders} image placeholder tokens but {embeds.shape[0]} image "
                "embeddings"
            )
        hidden[is_image] = embeds.to(hidden.dtype)
        return hidden

    @staticmethod
    def _placeholders(batch: ForwardBatch, is_image: torch.Tensor, hidden: int) -> torch.Tensor:
        """Image-token positions that take embeddings: in each sequence, the first ones, as
        many as it brought embeddings for (the prompt's placeholders come before any output;
        an output token equal to the image token, recomputed after a preemption, is text)."""
        mask = torch.zeros_like(is_image)
        bounds = batch.paged.query_start_loc.tolist()
        for i, e in enumerate(batch.mm_embeds):
            if e is None:
                continue
            start, end = int(bounds[i]), int(bounds[i + 1])
            where = torch.nonzero(is_image[start:end]).flatten()[: e.numel() // hidden]
            mask[start + where] = True
        return mask

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: PagedKVCache) -> torch.Tensor:
        """Final hidden states of every new token, [T, hidden]."""
        return self.decoder(self.embed(batch), batch, kv_cache)

    @torch.inference_mode()
    def last_token_logits(self, batch: ForwardBatch, kv_cache: PagedKVCache) -> torch.Tensor:
        """Logits [B, vocab] (float32) at each sequence's last new token."""
        hidden = self.forward(batch, kv_cache)
        return self.decoder.compute_logits(hidden[batch.last_token_index])
