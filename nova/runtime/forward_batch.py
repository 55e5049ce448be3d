"""What one model forward computes: several sequences, each with some new (query) tokens.

Prefill and decode are the same thing here: a sequence contributes ``len(token_ids)`` new
tokens on top of ``num_cached_tokens`` tokens already in the KV cache. A prefill has
``num_cached_tokens == 0`` (or > 0 for a later chunk), a decode step has one new token. Several
sequences of different lengths and positions go through one forward: the new tokens are packed
into one ``[num_tokens]`` dimension for the dense layers, and padded to ``[num_seqs, max_q]`` /
``[num_seqs, max_kv]`` only inside attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class SeqInput:
    """One sequence's part of a forward (plain data; the block table comes from the BlockManager).

    ``mm_embeds``: embeddings ``[n, hidden]`` that replace, in order, the ``n`` tokens of
    ``token_ids`` equal to the model's image token id (image features from the vision worker).
    """

    token_ids: list[int]
    num_cached_tokens: int
    block_table: list[int]
    mm_embeds: torch.Tensor | None = None
    # Rotary positions when they are not the token indices (M-RoPE, Qwen-VL): either
    # ``mrope_positions`` [3, num_new_tokens] int64 for the new tokens (a prefill chunk with
    # images), or ``position_offset`` added to every new token's index (tokens after an image:
    # all three rows equal index + offset).
    mrope_positions: torch.Tensor | None = None
    position_offset: int = 0

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.num_cached_tokens + len(self.token_ids)


@dataclass(slots=True)
class ForwardBatch:
    """Tensors derived from a list of ``SeqInput`` (all on the model's device)."""

    input_ids: torch.Tensor  # [T] int64, packed new tokens
    positions: torch.Tensor  # [T] int64 rotary positions; [3, T] if a sequence gave mrope_positions
    slot_mapping: torch.Tensor  # [T] int64, KV slot each new token writes
    query_pad_index: torch.Tensor  # [T] int64, index into the flattened [B * max_q] padded queries
    # The SDPA reference path's padded views (None when built with gather_views=False: the
    # in-place kernels never read them, and they cost O(B * max_kv) host work per forward).
    kv_gather_index: torch.Tensor | None  # [B, max_kv] int64, slots to read (padding reads slot 0)
    attn_mask: torch.Tensor | None  # [B, 1, max_q, max_kv] bool, True = may attend
    last_token_index: torch.Tensor  # [B] int64, index of each sequence's last new token in [T]
    num_seqs: int
    max_query_len: int
    mm_embeds: list[torch.Tensor | None] = field(default_factory=list)
    # For attention kernels that read the paged cache in place (nova.runtime.attention_*):
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor | None = None  # [B] int32, context length (cached + new) per sequence
    query_start_loc: torch.Tensor | None = None  # [B + 1] int32, offsets of each sequence in [T]
    max_seq_len: int = 0
    # Per-forward scratch an attention backend builds once and reuses across layers.
    attn_metadata: dict = field(default_factory=dict)

    def require_paged_metadata(self, backend: str) -> None:
        """A clear error when a paged-in-place backend gets a batch without its tensors."""
        if self.block_tables is None or self.seq_lens is None or self.query_start_loc is None:
            raise ValueError(
                f"the {backend} attention backend needs block_tables, seq_lens and "
                "query_start_loc in the ForwardBatch"
            )


def build_forward_batch(
    seqs: list[SeqInput], block_size: int, device: torch.device | str, gather_views: bool = True
) -> ForwardBatch:
    """``gather_views``: also build the SDPA path's ``kv_gather_index`` and ``attn_mask``
    (``False`` for backends that read the paged cache in place)."""
    if not seqs:
        raise ValueError("a forward needs at least one sequence")
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    pad_index: list[int] = []
    last_index: list[int] = []
    max_q = max(s.num_new_tokens for s in seqs)
    max_kv = max(s.context_len for s in seqs)
    gather = torch.zeros(len(seqs), max_kv, dtype=torch.long) if gather_views else None
    for b, s in enumerate(seqs):
        if s.num_new_tokens == 0:
            raise ValueError(f"sequence {b} has no new tokens")
        if len(s.block_table) * block_size < s.context_len:
            raise ValueError(
                f"sequence {b}: block table of {len(s.block_table)} blocks cannot hold "
                f"{s.context_len} tokens at block size {block_size}"
            )
        table = torch.tensor(s.block_table, dtype=torch.long)
        # Slots of the whole context for the gather view, else of the new tokens only.
        first = 0 if gather_views else s.num_cached_tokens
        pos = torch.arange(first, s.context_len, dtype=torch.long)
        seq_slots = table[pos // block_size] * block_size + pos % block_size
        if gather is not None:
            gather[b, : s.context_len] = seq_slots
        new_pos = list(
            range(s.num_cached_tokens + s.position_offset, s.context_len + s.position_offset)
        )
        ids.extend(s.token_ids)
        positions.extend(new_pos)
        slots.extend(seq_slots[s.num_cached_tokens - first :].tolist())
        pad_index.extend(b * max_q + i for i in range(s.num_new_tokens))
        last_index.append(len(ids) - 1)
    return ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=_rotary_positions(seqs, positions, device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        query_pad_index=torch.tensor(pad_index, dtype=torch.long, device=device),
        kv_gather_index=gather.to(device) if gather is not None else None,
        attn_mask=_causal_mask(seqs, max_q, max_kv).to(device) if gather_views else None,
        last_token_index=torch.tensor(last_index, dtype=torch.long, device=device),
        num_seqs=len(seqs),
        max_query_len=max_q,
        mm_embeds=[s.mm_embeds for s in seqs],
        **_paged_kernel_fields(seqs, device),
    )


def _causal_mask(seqs: list[SeqInput], max_q: int, max_kv: int) -> torch.Tensor:
    """[B, 1, max_q, max_kv]: query i of sequence b sits at absolute position cached_b + i and
    may attend keys 0..that. Padded query rows attend key 0 only, so softmax never sees an
    all-masked row (no NaN)."""
    q_pos = torch.zeros(len(seqs), max_q, dtype=torch.long)
    q_valid = torch.zeros(len(seqs), max_q, dtype=torch.bool)
    for b, s in enumerate(seqs):
        q_pos[b, : s.num_new_tokens] = torch.arange(s.num_cached_tokens, s.context_len)
        q_valid[b, : s.num_new_tokens] = True
    k_pos = torch.arange(max_kv)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]
    mask &= q_valid[:, :, None]
    mask[:, :, 0] |= ~q_valid
    return mask[:, None]


def _paged_kernel_fields(seqs: list[SeqInput], device: torch.device | str) -> dict:
    """block_tables / seq_lens / query_start_loc for kernels that index the cache in place."""
    max_blocks = max(len(s.block_table) for s in seqs)
    tables = torch.zeros(len(seqs), max(1, max_blocks), dtype=torch.int32)
    starts = [0]
    for b, s in enumerate(seqs):
        tables[b, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
        starts.append(starts[-1] + s.num_new_tokens)
    return dict(
        block_tables=tables.to(device),
        seq_lens=torch.tensor([s.context_len for s in seqs], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        max_seq_len=max(s.context_len for s in seqs),
    )


def _rotary_positions(
    seqs: list[SeqInput], flat: list[int], device: torch.device | str
) -> torch.Tensor:
    """[T] positions, or [3, T] when any sequence carries M-RoPE rows (the others' rows equal)."""
    if all(s.mrope_positions is None for s in seqs):
        return torch.tensor(flat, dtype=torch.long, device=device)
    rows, offset = [], 0
    for b, s in enumerate(seqs):
        n = s.num_new_tokens
        if s.mrope_positions is None:
            rows.append(torch.tensor(flat[offset : offset + n], dtype=torch.long).expand(3, -1))
        else:
            if tuple(s.mrope_positions.shape) != (3, n):
                raise ValueError(
                    f"sequence {b}: mrope_positions of shape {tuple(s.mrope_positions.shape)}, "
                    f"expected (3, {n})"
                )
            rows.append(s.mrope_positions.to("cpu", torch.long))
        offset += n
    return torch.cat(rows, dim=1).to(device)
