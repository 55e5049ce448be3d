"""Paged attention for the CPU: grouped-query batched matmuls over a gathered context.

The SDPA reference (``attention_sdpa``) expands K/V over the query heads of each KV head
(``enable_gqa``) and hands PyTorch's CPU flash kernel a boolean mask; for a decode step of 64
sequences that kernel spends most of its time on per-(sequence, head) tiling overhead (measured
with ``benchmarks/cpu_hotpath.py``: 2.3 ms of a 4.6 ms decoder layer). Here the ``G`` query
heads that share a KV head are rows of one small matrix, so each sequence's keys are read once
per KV head:

- keys/values of every sequence's context are gathered with one ``index_select`` per tensor
  into ``[B * kv_heads, max_kv, head_dim]`` (contiguous: the index is built in that order over
  the cache viewed as ``[slots * kv_heads, head_dim]``);
- scores ``[B * kv_heads, max_q * G, max_kv]`` = one ``bmm``; an additive mask (0 / -inf, built
  once per forward) gives causality and padding; softmax; one ``bmm`` with the values.

Decode (one new token per sequence) needs no query padding at all: ``q [B, H, D]`` *is*
``[B * kv_heads, G, D]``. Query head ``h`` uses KV head ``h // G``, as in ``transformers``.

Invariant: padded key positions read ``kv_cache.pad_slot`` (a slot of a block no sequence owns,
reserved by the runner) and are masked, so a non-finite value elsewhere in the cache can never
reach another sequence's output through padding. Padded query rows see key 0 only (no empty
softmax row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nova.runtime.attention_backend import (
    AttentionBackend,
    AttentionMetadata,
    PagedBatch,
    padded_query_index,
)
from nova.runtime.kv_cache import PagedKVCache


@dataclass(slots=True)
class CpuMetadata(AttentionMetadata):
    query_pad_index: torch.Tensor | None  # [T] into [B * max_q]; None for decode (max_q == 1)
    key_slots: torch.Tensor  # [B, max_kv] int64, slot per key position; padding: -1
    allowed: torch.Tensor  # [B, max_q, max_kv] bool, query row may attend key position
    # Built by the forward's first layer, which knows the cache's geometry and the dtype:
    kv_index: torch.Tensor | None = None  # [B * kv_heads * max_kv] rows of [slots*kv_heads, D]
    additive_mask: torch.Tensor | None = None  # [B, 1, max_q, 1, max_kv]: 0 or -inf


def key_slots_and_mask(paged: PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_slots [B, max_kv] with -1 past each context, allowed [B, max_q, max_kv]).

    Query ``i`` of sequence ``b`` sits at position ``cached_b + i`` and sees keys ``0..that``;
    padded query rows see key 0 only."""
    device = paged.slot_mapping.device
    bs, max_q, max_kv = paged.block_size, paged.max_query_len, paged.max_seq_len
    seq_lens = paged.seq_lens.long()
    q_lens = paged.query_lens()
    k_pos = torch.arange(max_kv, device=device)
    cols = (k_pos // bs).clamp(max=paged.block_tables.shape[1] - 1)
    slots = paged.block_tables.long()[:, cols] * bs + k_pos % bs
    key_slots = torch.where(k_pos[None, :] < seq_lens[:, None], slots, -1)
    q_idx = torch.arange(max_q, device=device)
    q_valid = q_idx[None, :] < q_lens[:, None]
    q_pos = (seq_lens - q_lens)[:, None] + q_idx[None, :]
    allowed = (k_pos[None, None, :] <= q_pos[:, :, None]) & q_valid[:, :, None]
    allowed[:, :, 0] |= ~q_valid
    return key_slots, allowed


class CpuPagedAttention(AttentionBackend[CpuMetadata]):
    name = "cpu"
    static_shapes = False  # gathers to [B, max_kv]
    needs_pad_slot = True
    metadata_type = CpuMetadata

    def build_metadata(self, paged: PagedBatch) -> CpuMetadata:
        key_slots, allowed = key_slots_and_mask(paged)
        pad_index = None if paged.max_query_len == 1 else padded_query_index(paged)
        return CpuMetadata(paged, pad_index, key_slots, allowed)

    @staticmethod
    def _layer_views(md: CpuMetadata, kv_cache: PagedKVCache, dtype: torch.dtype) -> None:
        """The gather index and additive mask, once per forward (every layer reuses them)."""
        kv_heads = kv_cache.num_kv_heads
        pad_slot = kv_cache.pad_slot if kv_cache.pad_slot is not None else 0
        slots = torch.where(md.key_slots >= 0, md.key_slots, pad_slot)
        heads = torch.arange(kv_heads, device=slots.device)
        md.kv_index = (slots[:, None, :] * kv_heads + heads[None, :, None]).reshape(-1)
        mask = torch.zeros(md.allowed.shape, dtype=dtype, device=slots.device)
        mask.masked_fill_(~md.allowed, float("-inf"))
        md.additive_mask = mask[:, None, :, None, :]

    def attend(
        self,
        q: torch.Tensor,
        layer: int,
        metadata: CpuMetadata,
        kv_cache: PagedKVCache,
        scale: float,
    ) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        if metadata.kv_index is None or metadata.additive_mask is None:
            self._layer_views(metadata, kv_cache, q.dtype)
        assert metadata.kv_index is not None and metadata.additive_mask is not None
        paged = metadata.paged
        b, max_q, max_kv = paged.num_seqs, paged.max_query_len, paged.max_seq_len
        kv_heads = kv_cache.num_kv_heads
        group = num_heads // kv_heads
        k = kv_cache.k[layer].view(-1, head_dim).index_select(0, metadata.kv_index)
        v = kv_cache.v[layer].view(-1, head_dim).index_select(0, metadata.kv_index)
        k = k.view(b * kv_heads, max_kv, head_dim).to(q.dtype)
        v = v.view(b * kv_heads, max_kv, head_dim).to(q.dtype)
        if metadata.query_pad_index is None:  # decode: [B, H, D] is [B * kv_heads, G, D]
            rows = q.reshape(b * kv_heads, group, head_dim)
        else:
            q_pad = q.new_zeros(b * max_q, num_heads, head_dim)
            q_pad[metadata.query_pad_index] = q
            rows = (
                q_pad.view(b, max_q, kv_heads, group, head_dim)
                .permute(0, 2, 1, 3, 4)
                .reshape(b * kv_heads, max_q * group, head_dim)
            )
        scores = torch.bmm(rows, k.transpose(1, 2)).view(b, kv_heads, max_q, group, max_kv)
        probs = torch.add(metadata.additive_mask, scores, alpha=scale).softmax(-1)
        out = torch.bmm(probs.view(b * kv_heads, max_q * group, max_kv), v)
        if metadata.query_pad_index is None:
            return out.view(num_tokens, num_heads * head_dim)
        out = (
            out.view(b, kv_heads, max_q, group, head_dim)
            .permute(0, 2, 1, 3, 4)
            .reshape(b * max_q, num_heads * head_dim)
        )
        return out[metadata.query_pad_index]
