"""Paged attention through ``torch.nn.attention.flex_attention`` over the whole cache.

Keys/values are the cache tensors themselves, viewed as one long sequence of slots
``[1, num_kv_heads, num_slots, head_dim]`` (expanded over the batch without a copy). A
``BlockMask`` built from the block tables tells the kernel which cache blocks each query tile
visits (KV block size = the cache's block size), and a ``mask_mod`` maps a slot back to
(owning sequence, logical position) so the causal rule "query at position p sees its own
sequence's keys 0..p" holds exactly, also in PyTorch's eager (dense) flex path.

Per forward, the slot -> (owner, logical block) maps are ``O(num_blocks)``: the BlockMask is
built by the first layer's call (it needs the cache's geometry) and kept in the forward's
``FlexMetadata`` for the other layers. On CUDA, ``flex_attention`` is wrapped in
``torch.compile`` (its eager path is a dense reference, not a kernel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from nova.runtime.attention_backend import (
    AttentionBackend,
    PaddedQueryMetadata,
    PagedBatch,
    padded_query_index,
)
from nova.runtime.kv_cache import PagedKVCache

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

Q_TILE = 128  # query rows per BlockMask row tile


@dataclass(slots=True)
class FlexMetadata(PaddedQueryMetadata):
    block_mask: BlockMask | None = None  # built by the first layer of the forward


def build_block_mask(paged: PagedBatch, kv_cache: PagedKVCache) -> BlockMask:
    """The BlockMask of one forward over ``kv_cache`` (see the module docstring)."""
    from torch.nn.attention.flex_attention import BlockMask

    device = paged.slot_mapping.device
    bs, num_blocks = kv_cache.block_size, kv_cache.num_blocks
    b, max_q = paged.num_seqs, paged.max_query_len
    tables = paged.block_tables.long()
    seq_lens = paged.seq_lens.long()
    num_cached = seq_lens - paged.query_lens()
    logical = torch.arange(tables.shape[1], device=device)
    used = logical[None, :] * bs < seq_lens[:, None]  # [B, max_blocks]
    # owner[blk] = batch row owning physical block blk (-1: none); index num_blocks is a sink.
    target = torch.where(used, tables, torch.full_like(tables, num_blocks)).flatten()
    owner = torch.full((num_blocks + 1,), -1, dtype=torch.long, device=device)
    owner.scatter_(0, target, torch.arange(b, device=device).repeat_interleave(tables.shape[1]))
    block_logical = torch.zeros(num_blocks + 1, dtype=torch.long, device=device)
    block_logical.scatter_(0, target, logical.repeat(b))
    owner[num_blocks] = -1
    q_pos = num_cached[:, None] + torch.arange(max_q, device=device)[None, :]  # [B, max_q]

    def mask_mod(
        bi: torch.Tensor, hi: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        blk = kv_idx // bs
        k_pos = block_logical[blk] * bs + kv_idx % bs
        return (owner[blk] == bi) & (k_pos <= q_pos[bi, q_idx])

    num_q_tiles = -(-max_q // Q_TILE)
    tile_end = torch.arange(1, num_q_tiles + 1, device=device) * Q_TILE  # exclusive, per tile
    # Keys a q tile needs: positions < min(seq_len, num_cached + tile_end) -> that many pages.
    kv_tokens = torch.minimum(seq_lens[:, None], num_cached[:, None] + tile_end[None, :])
    kv_num_blocks = (-(-kv_tokens // bs)).to(torch.int32)[:, None, :]  # [B, 1, tiles]
    kv_indices = (
        paged.block_tables.to(torch.int32)[:, None, None, :]
        .expand(b, 1, num_q_tiles, tables.shape[1])
        .contiguous()
    )
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        BLOCK_SIZE=(Q_TILE, bs),
        mask_mod=mask_mod,
        seq_lengths=(max_q, num_blocks * bs),
        compute_q_blocks=False,
    )


class FlexPagedAttention(AttentionBackend[FlexMetadata]):
    name = "flex"
    static_shapes = False
    metadata_type = FlexMetadata

    def __init__(self, use_compile: bool = False) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=True) if use_compile else flex_attention
        # Without return_lse, flex_attention returns the output tensor alone.
        self._flex = cast(Callable[..., torch.Tensor], flex)

    def build_metadata(self, paged: PagedBatch) -> FlexMetadata:
        return FlexMetadata(paged, padded_query_index(paged))

    def attend(
        self,
        q: torch.Tensor,
        layer: int,
        metadata: FlexMetadata,
        kv_cache: PagedKVCache,
        scale: float,
    ) -> torch.Tensor:
        if metadata.block_mask is None:
            metadata.block_mask = build_block_mask(metadata.paged, kv_cache)
        q_pad = metadata.pad_queries(q)
        b = metadata.paged.num_seqs
        k_all = kv_cache.k[layer].permute(1, 0, 2)[None].expand(b, -1, -1, -1)
        v_all = kv_cache.v[layer].permute(1, 0, 2)[None].expand(b, -1, -1, -1)
        out = self._flex(
            q_pad,
            k_all,
            v_all,
            block_mask=metadata.block_mask,
            scale=scale,
            enable_gqa=q.shape[1] != k_all.shape[1],
        )
        return metadata.unpad_output(out)
