"""The attention backend interface: a backend builds, and alone reads, its own metadata.

A forward's new tokens are described once, the same way for every backend (``PagedBatch``:
the KV slot each new token writes, and which cache blocks and how many tokens each sequence
reads). The backend that runs the forward turns it into its own metadata (``build_metadata``),
once per forward; every decoder layer then calls ``backend(q, k, v, layer, metadata, kv_cache,
scale)``, which writes the new K/V at their slots and attends over the cache.

Invariant for ``static_shapes`` backends (decode CUDA graphs, ``nova.runtime.cuda_graphs``):
their metadata only holds the ``PagedBatch`` tensors it was built from (views, nothing derived
from their values), so metadata built once over static buffers stays valid while the buffers
are refilled before each replay.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import torch

from nova.runtime.kv_cache import PagedKVCache


@dataclass(slots=True, frozen=True)
class PagedBatch:
    """Where one forward's ``T`` new tokens of ``B`` sequences sit in the paged KV cache (all
    tensors on the model's device)."""

    slot_mapping: torch.Tensor  # [T] int64, KV slot each new token writes
    query_start_loc: torch.Tensor  # [B + 1] int32, offsets of each sequence in [T]
    seq_lens: torch.Tensor  # [B] int32, context length (cached + new) per sequence
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    block_size: int  # tokens per cache block
    max_query_len: int  # most new tokens of one sequence
    max_seq_len: int  # longest context (an upper bound for static buffers)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    def query_lens(self) -> torch.Tensor:
        """[B] int64, new tokens per sequence."""
        return (self.query_start_loc[1:] - self.query_start_loc[:-1]).long()


def padded_query_index(paged: PagedBatch) -> torch.Tensor:
    """[T] int64: where each new token goes in the flattened ``[B * max_query_len]`` padded
    queries (token ``i`` of sequence ``b`` -> ``b * max_query_len + i``)."""
    device = paged.slot_mapping.device
    starts = paged.query_start_loc.long()
    seq = torch.repeat_interleave(
        torch.arange(paged.num_seqs, device=device),
        paged.query_lens(),
        output_size=paged.num_tokens,
    )
    offset = torch.arange(paged.num_tokens, device=device) - starts[seq]
    return seq * paged.max_query_len + offset


@dataclass(slots=True)
class AttentionMetadata:
    """What a backend reads in every layer of one forward; backends subclass it for more."""

    paged: PagedBatch


@dataclass(slots=True)
class PaddedQueryMetadata(AttentionMetadata):
    """Metadata of a backend that runs its kernel on queries padded to ``[B, num_heads,
    max_query_len, head_dim]`` (one row of ``max_query_len`` per sequence)."""

    query_pad_index: torch.Tensor  # [T] int64, index into the flattened [B * max_q] queries

    def pad_queries(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` [T, num_heads, head_dim] -> [B, num_heads, max_q, head_dim], zeros as padding."""
        _num_tokens, num_heads, head_dim = q.shape
        b, max_q = self.paged.num_seqs, self.paged.max_query_len
        q_pad = q.new_zeros(b * max_q, num_heads, head_dim)
        q_pad[self.query_pad_index] = q
        return q_pad.view(b, max_q, num_heads, head_dim).transpose(1, 2)

    def unpad_output(self, out: torch.Tensor) -> torch.Tensor:
        """The kernel's ``out`` [B, num_heads, max_q, head_dim] -> [T, num_heads * head_dim]."""
        b, num_heads, max_q, head_dim = out.shape
        out = out.transpose(1, 2).reshape(b * max_q, num_heads * head_dim)
        return out[self.query_pad_index]


MetadataT = TypeVar("MetadataT", bound=AttentionMetadata)


class AttentionBackend(ABC, Generic[MetadataT]):
    """Paged attention over the KV cache, with the metadata it needs (one subclass per kernel).

    ``name``: the ``--attention-backend`` name. ``static_shapes``: the launch shapes depend only
    on ``(num_seqs, max_query_len)`` and the metadata only views its ``PagedBatch`` (capturable
    in a CUDA graph). ``metadata_type``: what ``build_metadata`` returns; a call with any other
    metadata is refused with a clear error.
    """

    name: str = "base"
    static_shapes: bool = False
    # Pads gathered contexts with reads of ``PagedKVCache.pad_slot`` (the runner reserves a
    # block for it).
    needs_pad_slot: bool = False
    metadata_type: type[AttentionMetadata] = AttentionMetadata

    @abstractmethod
    def build_metadata(self, paged: PagedBatch) -> MetadataT:
        """This backend's metadata for one forward (built once, read by every layer)."""

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        layer: int,
        metadata: MetadataT,
        kv_cache: PagedKVCache,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        """Attention of the new tokens' queries over their sequences' cached keys/values (the
        new tokens' own K/V already written)."""

    def own_metadata(self, metadata: AttentionMetadata) -> MetadataT:
        """``metadata`` as this backend's type, or a ValueError naming what was given."""
        if not isinstance(metadata, self.metadata_type):
            raise ValueError(
                f"the {self.name} attention backend reads {self.metadata_type.__name__} (from "
                f"its build_metadata), got {type(metadata).__name__}: build the forward batch "
                "with the backend that runs it"
            )
        return cast(MetadataT, metadata)

    def __call__(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        layer: int,
        metadata: AttentionMetadata,
        kv_cache: PagedKVCache,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        """Write the new K/V at their slots, then attend."""
        own = self.own_metadata(metadata)
        kv_cache.write(layer, own.paged.slot_mapping, k, v)
        return self.attend(q, layer, own, kv_cache, scale)


class PhaseSplitAttention(AttentionBackend[AttentionMetadata]):
    """One backend for decode-only forwards (every sequence has one new token), another for
    the rest (prefill, chunked prefill, mixed batches). The metadata is the chosen phase's."""

    def __init__(self, decode: AttentionBackend, prefill: AttentionBackend) -> None:
        self.decode, self.prefill = decode, prefill
        self.name = decode.name if decode.name == prefill.name else f"{prefill.name}+{decode.name}"
        # What matters for CUDA graphs: the decode path.
        self.static_shapes = decode.static_shapes
        self.needs_pad_slot = decode.needs_pad_slot or prefill.needs_pad_slot

    def phase(self, paged: PagedBatch) -> AttentionBackend:
        return self.decode if paged.max_query_len == 1 else self.prefill

    def build_metadata(self, paged: PagedBatch) -> AttentionMetadata:
        return self.phase(paged).build_metadata(paged)

    def attend(
        self,
        q: torch.Tensor,
        layer: int,
        metadata: AttentionMetadata,
        kv_cache: PagedKVCache,
        scale: float,
    ) -> torch.Tensor:
        backend = self.phase(metadata.paged)
        return backend.attend(q, layer, backend.own_metadata(metadata), kv_cache, scale)
