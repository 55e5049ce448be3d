"""CUDA graphs for decode: one graph per (partition key, batch-size bucket), replayed when the
batch fits, eager otherwise.

A decode step launches hundreds of small kernels; replaying them as one graph removes the CPU
launch cost, which at small batch is a large part of the step. A graph fixes every tensor
address and shape, so a decode step is run on *static buffers* of ``bucket`` rows:

- rows ``0..n-1`` hold the real sequences (token, position, KV slot, block table, length);
- rows ``n..bucket-1`` are padding: token 0 at position 0, writing its K/V to a **scratch
  slot** in a cache block that no sequence owns (the runner allocates one extra block beyond
  the block manager's), reading only that slot (``seq_len = 1``), so padding never touches a
  real sequence's cache;
- block tables are padded to ``max_blocks_per_seq`` (the model's max length) with the scratch
  block; the attention kernel reads only the first ``ceil(seq_len / block_size)`` entries.

The attention backend must have static launch shapes (``static_shapes = True``: the Triton
paged kernel, whose grid depends only on ``(num_seqs, max_query_len)``). Its metadata is built
once per (partition key, bucket), through the same ``build_metadata`` as an eager forward, over
a ``PagedBatch`` of views into the static buffers; a static-shape backend's metadata only holds
those views, so refilling the buffers before a replay updates what the graph reads.

Partitions: kernels captured while a partition (e.g. a green context's stream) is current run
with that partition's resources on replay, so graphs are kept per partition key -- an opaque
hashable the executor passes (``None`` = no partition).

The decisions (which bucket, when to fall back to eager, how to pad) are plain functions,
tested on a CPU; ``StaticDecodeRunner`` runs the same padded static-shape step eagerly (CPU
tests, or ``use_graphs=False``) or captures and replays it (CUDA).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from nova.runtime.attention_backend import AttentionBackend, PagedBatch
from nova.runtime.forward_batch import (
    ForwardBatch,
    SeqInput,
    build_paged_batch,
    rotary_positions,
    token_ids_tensor,
)
from nova.runtime.kv_cache import PagedKVCache

log = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, 16, then steps of 16 up to ``max_num_seqs`` (which is always included)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    buckets = {b for b in (1, 2, 4, 8) if b < max_num_seqs}
    buckets.update(range(16, max_num_seqs, 16))
    buckets.add(max_num_seqs)
    return tuple(sorted(buckets))


def pick_bucket(num_seqs: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding ``num_seqs`` rows; None if none does."""
    return next((b for b in sorted(buckets) if b >= num_seqs), None)


def eager_reason(
    seqs: Sequence[SeqInput], buckets: Sequence[int], max_blocks_per_seq: int
) -> str | None:
    """Why this batch cannot replay a decode graph (None: it can)."""
    if not seqs:
        return "empty batch"
    if any(s.num_new_tokens != 1 for s in seqs):
        return "not a decode batch (a sequence has more than one new token)"
    if any(s.mm_embeds is not None for s in seqs):
        return "image embeddings in the batch"
    if pick_bucket(len(seqs), buckets) is None:
        return f"{len(seqs)} sequences exceed the largest bucket ({max(buckets)})"
    if any(len(s.block_table) > max_blocks_per_seq for s in seqs):
        return f"a block table is longer than the graphs' {max_blocks_per_seq} blocks"
    return None


@dataclass(slots=True)
class PaddedRows:
    """What the padded rows ``n..bucket-1`` of the static buffers hold (plain data)."""

    slot: int  # scratch slot they write their K/V to
    block: int  # scratch block their (and the real rows' spare) block-table entries name
    seq_len: int = 1  # they attend only the scratch slot


def scratch_rows(scratch_block: int, block_size: int) -> PaddedRows:
    return PaddedRows(slot=scratch_block * block_size, block=scratch_block)


class DecodeModel(Protocol):
    """What the static runner needs of a model (``nova.models.vlm.NovaModel``)."""

    def last_token_logits(self, batch: ForwardBatch, kv_cache: PagedKVCache) -> torch.Tensor: ...

    def modules(self) -> Iterator[nn.Module]: ...


@dataclass(slots=True)
class _StaticBuffers:
    """Max-size inputs shared by every bucket and partition (bucket b uses the first b rows;
    the decode worker runs one step at a time, so sharing is safe)."""

    input_ids: torch.Tensor  # [max_rows] int64
    positions: torch.Tensor | None  # [..., max_rows] int64; shape prefix from the first batch
    slot_mapping: torch.Tensor  # [max_rows] int64
    block_tables: torch.Tensor  # [max_rows, max_blocks] int32
    seq_lens: torch.Tensor  # [max_rows] int32
    query_start_loc: torch.Tensor  # [max_rows + 1] int32, = arange (one token per row)
    row_index: torch.Tensor  # [max_rows] int64, = arange


@dataclass(slots=True)
class _Entry:
    batch: ForwardBatch
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # the graph's output buffer [bucket, vocab]
    num_replays: int = 0


@dataclass(slots=True)
class GraphStats:
    captured: list[tuple[Hashable, int]] = field(default_factory=list)
    replays: int = 0
    eager: dict[str, int] = field(default_factory=dict)


class StaticDecodeRunner:
    """Runs decode-only batches on static padded buffers; captures a CUDA graph per
    (partition key, bucket) when ``use_graphs``.

    ``model`` is a ``NovaModel`` (``last_token_logits(batch, kv_cache)``) whose layers call
    ``attention``, which must have static shapes. ``scratch_block`` must be a cache block no
    sequence owns.
    """

    def __init__(
        self,
        model: DecodeModel,
        kv_cache: PagedKVCache,
        max_num_seqs: int,
        max_model_len: int,
        scratch_block: int,
        device: torch.device | str,
        attention: AttentionBackend,
        use_graphs: bool = True,
    ) -> None:
        if not attention.static_shapes:
            raise ValueError(
                f"decode graphs need an attention backend with static shapes; "
                f"{attention.name} has data-dependent shapes"
            )
        if not 0 <= scratch_block < kv_cache.num_blocks:
            raise ValueError(
                f"scratch block {scratch_block} is not in the cache (0..{kv_cache.num_blocks - 1})"
            )
        self.model = model
        self.attention = attention
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = torch.device(device)
        self.use_graphs = use_graphs
        self.buckets = batch_buckets(max_num_seqs)
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.pad = scratch_rows(scratch_block, self.block_size)
        self.stats = GraphStats()
        self._entries: dict[tuple[Hashable, int], _Entry] = {}
        # One memory pool shared by every captured graph (only ever one replays at a time).
        self._pool = (
            torch.cuda.graph_pool_handle() if use_graphs and self.device.type == "cuda" else None
        )
        rows = max(self.buckets)
        dev = self.device
        self._buf = _StaticBuffers(
            input_ids=torch.zeros(rows, dtype=torch.long, device=dev),
            positions=None,
            slot_mapping=torch.full((rows,), self.pad.slot, dtype=torch.long, device=dev),
            block_tables=torch.full(
                (rows, self.max_blocks_per_seq), self.pad.block, dtype=torch.int32, device=dev
            ),
            seq_lens=torch.ones(rows, dtype=torch.int32, device=dev),
            query_start_loc=torch.arange(rows + 1, dtype=torch.int32, device=dev),
            row_index=torch.arange(rows, dtype=torch.long, device=dev),
        )

    # -- decisions ----------------------------------------------------------------------------
    def eager_reason(self, seqs: Sequence[SeqInput]) -> str | None:
        return eager_reason(seqs, self.buckets, self.max_blocks_per_seq)

    # -- running ------------------------------------------------------------------------------
    def run(self, seqs: list[SeqInput], partition_key: Hashable = None) -> torch.Tensor | None:
        """Logits ``[len(seqs), vocab]``, or None when the batch must run eagerly."""
        reason = self.eager_reason(seqs)
        if reason is not None:
            self.stats.eager[reason] = self.stats.eager.get(reason, 0) + 1
            return None
        bucket = pick_bucket(len(seqs), self.buckets)
        assert bucket is not None
        self._fill(seqs, bucket)
        key = (partition_key, bucket)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(self._static_batch(bucket))
            if self.use_graphs:
                self._capture(entry, partition_key)
                self.stats.captured.append(key)
        logits = entry.logits  # the graph's output buffer (set with the graph)
        if entry.graph is not None and logits is not None:
            entry.graph.replay()
        else:
            logits = self.model.last_token_logits(entry.batch, self.kv_cache)
        entry.num_replays += 1
        self.stats.replays += 1
        # A copy: the graph's output buffer is overwritten by the next replay.
        return logits[: len(seqs)].clone()

    def _fill(self, seqs: list[SeqInput], bucket: int) -> None:
        """Copy the real rows into the static buffers and reset rows n..bucket-1 to padding."""
        n, buf = len(seqs), self._buf
        # Positions in the model's layout ([T] or e.g. [3, T] for M-RoPE), as an eager forward
        # has them; only the last dimension (tokens) is padded here.
        positions = rotary_positions(seqs, self.device)
        paged = build_paged_batch(seqs, self.block_size, self.device)
        static_positions = buf.positions
        if static_positions is None or static_positions.shape[:-1] != positions.shape[:-1]:
            static_positions = buf.positions = torch.zeros(
                *positions.shape[:-1],
                buf.input_ids.shape[0],
                dtype=positions.dtype,
                device=self.device,
            )
            self._entries.clear()  # graphs captured on the old buffer are stale
        buf.input_ids[:n].copy_(token_ids_tensor(seqs, self.device))
        buf.input_ids[n:bucket].zero_()
        static_positions[..., :n].copy_(positions)
        static_positions[..., n:bucket].zero_()
        buf.slot_mapping[:n].copy_(paged.slot_mapping)
        buf.slot_mapping[n:bucket].fill_(self.pad.slot)
        width = paged.block_tables.shape[1]
        buf.block_tables[:bucket].fill_(self.pad.block)
        buf.block_tables[:n, :width].copy_(paged.block_tables)
        buf.seq_lens[:n].copy_(paged.seq_lens)
        buf.seq_lens[n:bucket].fill_(self.pad.seq_len)

    def _static_batch(self, bucket: int) -> ForwardBatch:
        """The first ``bucket`` rows of the static buffers as a forward, with the backend's
        metadata built over them (views: valid for every later fill)."""
        buf = self._buf
        if buf.positions is None:
            raise RuntimeError("the static buffers are filled before a batch is built on them")
        rows = buf.row_index[:bucket]
        paged = PagedBatch(
            slot_mapping=buf.slot_mapping[:bucket],
            query_start_loc=buf.query_start_loc[: bucket + 1],
            seq_lens=buf.seq_lens[:bucket],
            block_tables=buf.block_tables[:bucket],
            block_size=self.block_size,
            max_query_len=1,
            max_seq_len=self.max_blocks_per_seq * self.block_size,
        )
        return ForwardBatch(
            input_ids=buf.input_ids[:bucket],
            positions=buf.positions[..., :bucket],
            last_token_index=rows,
            attn_metadata=self.attention.build_metadata(paged),
            mm_embeds=[None] * bucket,
        )

    def _capture(self, entry: _Entry, partition_key: Hashable) -> None:
        """Warm up (compiles kernels; writes the same K/V the replay will), then capture."""
        _move_plain_tensors(self.model, self.device)
        stream = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            self.model.last_token_logits(entry.batch, self.kv_cache)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Capture on the caller's stream when it is not the default one (a partition's stream
        # must be current while its graph is captured).
        capture_stream = None if stream == torch.cuda.default_stream(self.device) else stream
        with torch.cuda.graph(graph, pool=self._pool, stream=capture_stream):
            entry.logits = self.model.last_token_logits(entry.batch, self.kv_cache)
        entry.graph = graph
        log.info(
            "captured decode CUDA graph: partition %r, %d rows",
            partition_key,
            entry.batch.paged.num_seqs,
        )


def _move_plain_tensors(model: DecodeModel, device: torch.device) -> None:
    """Move tensors held as plain attributes (not parameters/buffers: e.g. RoPE inverse
    frequencies kept on the CPU) to the device once, so the captured forward does no host
    copies (illegal during capture)."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            # Parameters and buffers live in module._parameters/_buffers, not in vars().
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(module, name, value.to(device))


def graphs_unavailable_reason(device: torch.device, attention: AttentionBackend) -> str | None:
    """Why decode graphs are off for this runner (None: they can be used)."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if not attention.static_shapes:
        return (
            f"the {attention.name} attention backend has data-dependent "
            f"shapes (use triton for decode graphs)"
        )
    return None
