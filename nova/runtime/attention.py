"""Attention over the paged KV cache.

``SdpaPagedAttention`` is the reference path (CPU and GPU): write the new K/V into their slots,
gather each sequence's context from the cache into a padded ``[B, max_kv]`` view and call
``torch.nn.functional.scaled_dot_product_attention`` with a causal+padding mask. A faster GPU
kernel can replace it behind the same ``__call__`` signature.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nova.runtime.forward_batch import ForwardBatch
from nova.runtime.kv_cache import PagedKVCache


class SdpaPagedAttention:
    name = "sdpa"

    def __call__(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        layer: int,
        batch: ForwardBatch,
        kv_cache: PagedKVCache,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        kv_cache.write(layer, batch.slot_mapping, k, v)
        num_tokens, num_heads, head_dim = q.shape
        b, max_q = batch.num_seqs, batch.max_query_len
        q_pad = q.new_zeros(b * max_q, num_heads, head_dim)
        q_pad[batch.query_pad_index] = q
        q_pad = q_pad.view(b, max_q, num_heads, head_dim).transpose(1, 2)
        k_ctx = kv_cache.k[layer][batch.kv_gather_index].to(q.dtype).transpose(1, 2)
        v_ctx = kv_cache.v[layer][batch.kv_gather_index].to(q.dtype).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q_pad, k_ctx, v_ctx, attn_mask=batch.attn_mask, scale=scale,
            enable_gqa=num_heads != k_ctx.shape[1],
        )
        out = out.transpose(1, 2).reshape(b * max_q, num_heads * head_dim)
        return out[batch.query_pad_index]
