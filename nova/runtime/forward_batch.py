"""What one model forward computes: several sequences, each with some new (query) tokens.

Prefill and decode are the same thing here: a sequence contributes ``len(token_ids)`` new
tokens on top of ``num_cached_tokens`` tokens already in the KV cache. A prefill has
``num_cached_tokens == 0`` (or > 0 for a later chunk), a decode step has one new token. Several
sequences of different lengths and positions go through one forward: the new tokens are packed
into one ``[num_tokens]`` dimension for the dense layers, and padded, where a backend needs it,
only inside attention.

``ForwardBatch`` holds what the model reads (token ids, rotary positions, each sequence's last
token, image embeddings) and the metadata of the attention backend that runs the forward; the
backend builds that from the ``PagedBatch`` (where the new tokens sit in the paged cache) and
alone reads it (``nova.runtime.attention_backend``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nova.runtime.attention_backend import AttentionBackend, AttentionMetadata, PagedBatch
from nova.runtime.attention_sdpa import SdpaPagedAttention


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
    """The tensors of one forward (all on the model's device)."""

    input_ids: torch.Tensor  # [T] int64, packed new tokens
    positions: torch.Tensor  # [T] int64 rotary positions; [3, T] if a sequence gave mrope_positions
    last_token_index: torch.Tensor  # [B] int64, index of each sequence's last new token in [T]
    attn_metadata: AttentionMetadata  # built by the attention backend that runs this forward
    mm_embeds: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def paged(self) -> PagedBatch:
        return self.attn_metadata.paged

    @property
    def slot_mapping(self) -> torch.Tensor:
        """[T] int64, the KV slot each new token writes."""
        return self.attn_metadata.paged.slot_mapping


def build_forward_batch(
    seqs: list[SeqInput],
    block_size: int,
    device: torch.device | str,
    attention: AttentionBackend | None = None,
) -> ForwardBatch:
    """The forward of ``seqs``, with the metadata of ``attention``, the backend that will run
    it (default: the SDPA reference backend, the decoder's default)."""
    paged = build_paged_batch(seqs, block_size, device)
    if attention is None:
        attention = SdpaPagedAttention()
    last_index = paged.query_start_loc[1:].long() - 1
    return ForwardBatch(
        input_ids=token_ids_tensor(seqs, device),
        positions=rotary_positions(seqs, device),
        last_token_index=last_index,
        attn_metadata=attention.build_metadata(paged),
        mm_embeds=[s.mm_embeds for s in seqs],
    )


def token_ids_tensor(seqs: list[SeqInput], device: torch.device | str) -> torch.Tensor:
    """[T] int64, the new tokens of all sequences, packed."""
    return torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.long, device=device)


def build_paged_batch(
    seqs: list[SeqInput], block_size: int, device: torch.device | str
) -> PagedBatch:
    """Where the new tokens of ``seqs`` sit in the paged cache (checks every block table).

    Built in plain Python and turned into tensors once (five small copies per forward): the
    per-sequence work is a few integer operations per new token, whatever the context length.
    """
    if not seqs:
        raise ValueError("a forward needs at least one sequence")
    slots: list[int] = []
    starts = [0]
    seq_lens: list[int] = []
    max_blocks = max(1, max(len(s.block_table) for s in seqs))
    tables: list[int] = []
    for b, s in enumerate(seqs):
        table, cached = s.block_table, s.num_cached_tokens
        num_new = len(s.token_ids)
        if num_new == 0:
            raise ValueError(f"sequence {b} has no new tokens")
        context = cached + num_new
        if len(table) * block_size < context:
            raise ValueError(
                f"sequence {b}: block table of {len(table)} blocks cannot hold "
                f"{context} tokens at block size {block_size}"
            )
        slots.extend(
            table[p // block_size] * block_size + p % block_size for p in range(cached, context)
        )
        tables.extend(table)
        tables.extend([0] * (max_blocks - len(table)))
        starts.append(starts[-1] + num_new)
        seq_lens.append(context)
    return PagedBatch(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device).view(
            len(seqs), max_blocks
        ),
        block_size=block_size,
        max_query_len=max(starts[i + 1] - starts[i] for i in range(len(seqs))),
        max_seq_len=max(seq_lens),
    )


def rotary_positions(seqs: list[SeqInput], device: torch.device | str) -> torch.Tensor:
    """[T] positions of the new tokens (index + ``position_offset``), or [3, T] when any
    sequence carries M-RoPE rows (the others' three rows equal)."""
    flat = [
        p
        for s in seqs
        for p in range(s.num_cached_tokens + s.position_offset, s.context_len + s.position_offset)
    ]
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
