"""The model Nova runs: a decoder, optionally with a vision side (text-only LMs have none)."""
from __future__ import annotations

import torch
from torch import nn

from nova.models.llama import LlamaDecoder
from nova.models.vision import LlavaVision
from nova.runtime.forward_batch import ForwardBatch
from nova.runtime.kv_cache import PagedKVCache


class NovaModel(nn.Module):
    def __init__(
        self, decoder: LlamaDecoder, vision: LlavaVision | None, image_token_id: int | None
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.vision = vision
        self.image_token_id = image_token_id

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, num_image_tokens, hidden] in the decoder's dtype."""
        if self.vision is None:
            raise ValueError("this model has no vision tower; it cannot take images")
        return self.vision(pixel_values).to(self.decoder.lm_head.weight.dtype)

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        """Token embeddings with image embeddings merged at the image-placeholder positions."""
        hidden = self.decoder.embed(batch.input_ids)
        if not any(e is not None for e in batch.mm_embeds):
            return hidden
        if self.image_token_id is None:
            raise ValueError("image embeddings given to a model without an image token")
        is_image = batch.input_ids == self.image_token_id
        embeds = torch.cat([e.reshape(-1, hidden.shape[-1]) for e in batch.mm_embeds if e is not None])
        num_placeholders = int(is_image.sum())
        if num_placeholders != embeds.shape[0]:
            raise ValueError(
                f"{num_placeholders} image placeholder tokens but {embeds.shape[0]} image embeddings"
            )
        hidden[is_image] = embeds.to(hidden.dtype)
        return hidden

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: PagedKVCache) -> torch.Tensor:
        """Final hidden states of every new token, [T, hidden]."""
        return self.decoder(self.embed(batch), batch, kv_cache)

    @torch.inference_mode()
    def last_token_logits(self, batch: ForwardBatch, kv_cache: PagedKVCache) -> torch.Tensor:
        """Logits [B, vocab] (float32) at each sequence's last new token."""
        hidden = self.forward(batch, kv_cache)
        return self.decoder.compute_logits(hidden[batch.last_token_index])
