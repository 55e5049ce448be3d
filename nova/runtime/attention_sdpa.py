"""The reference attention backend: gather each sequence's context from the paged cache into a
padded ``[B, max_kv]`` view and call ``torch.nn.functional.scaled_dot_product_attention`` with a
causal+padding mask (CPU and GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nova.runtime.attention_backend import (
    AttentionBackend,
    PaddedQueryMetadata,
    PagedBatch,
    padded_query_index,
)
from nova.runtime.kv_cache import PagedKVCache


@dataclass(slots=True)
class SdpaMetadata(PaddedQueryMetadata):
    kv_gather_index: torch.Tensor  # [B, max_kv] int64, slots to read (padding reads slot 0)
    attn_mask: torch.Tensor  # [B, 1, max_q, max_kv] bool, True = may attend


def causal_gather_views(paged: PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_gather_index [B, max_kv], attn_mask [B, 1, max_q, max_kv]).

    Query ``i`` of sequence ``b`` sits at absolute position ``cached_b + i`` and may attend keys
    ``0..that``. Key positions past a sequence's context read slot 0 and are masked. Padded
    query rows attend key 0 only, so softmax never sees an all-masked row (no NaN)."""
    device = paged.slot_mapping.device
    bs, max_q, max_kv = paged.block_size, paged.max_query_len, paged.max_seq_len
    seq_lens = paged.seq_lens.long()
    q_lens = paged.query_lens()
    k_pos = torch.arange(max_kv, device=device)
    # Columns past a table's width only occur for masked positions; clamped to stay in range.
    cols = (k_pos // bs).clamp(max=paged.block_tables.shape[1] - 1)
    blocks = paged.block_tables.long()[:, cols]
    slots = blocks * bs + k_pos % bs
    gather = torch.where(k_pos[None, :] < seq_lens[:, None], slots, 0)
    q_idx = torch.arange(max_q, device=device)
    q_valid = q_idx[None, :] < q_lens[:, None]
    q_pos = (seq_lens - q_lens)[:, None] + q_idx[None, :]
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & q_valid[:, :, None]
    mask[:, :, 0] |= ~q_valid
    return gather, mask[:, None]


class SdpaPagedAttention(AttentionBackend[SdpaMetadata]):
    name = "sdpa"
    static_shapes = False  # gathers to [B, max_kv]: shapes follow the batch's longest context
    metadata_type = SdpaMetadata

    def build_metadata(self, paged: PagedBatch) -> SdpaMetadata:
        gather, mask = causal_gather_views(paged)
        return SdpaMetadata(paged, padded_query_index(paged), gather, mask)

    def attend(
        self,
        q: torch.Tensor,
        layer: int,
        metadata: SdpaMetadata,
        kv_cache: PagedKVCache,
        scale: float,
    ) -> torch.Tensor:
        q_pad = metadata.pad_queries(q)
        k_ctx = kv_cache.k[layer][metadata.kv_gather_index].to(q.dtype).transpose(1, 2)
        v_ctx = kv_cache.v[layer][metadata.kv_gather_index].to(q.dtype).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q_pad,
            k_ctx,
            v_ctx,
            attn_mask=metadata.attn_mask,
            scale=scale,
            enable_gqa=q.shape[1] != k_ctx.shape[1],
        )
        return metadata.unpad_output(out)
