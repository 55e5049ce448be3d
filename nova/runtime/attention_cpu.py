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
When Nova's C++ kernels built (``nova.runtime.cpu_kernels``), decode skips the gather: the
kernel reads each sequence's keys and values in place through its block table.

Prefill in bf16 on a CPU with AMX (``prefill="auto"`` or ``"amx"``) goes to Nova's AMX kernel
(``csrc/cpu_prefill_attention.cpp``): it reads each sequence's keys and values through its
block table, as decode does, and computes the scores and the weighted values in AMX tiles
with each row's causal softmax in between. Otherwise prefill, by default
(``prefill="auto"``) on a CPU with AMX, goes through PyTorch's causal flash kernel
(``scaled_dot_product_attention(is_causal=True)``, no mask): the queries are laid out like the
gathered keys, ``[B, max_kv]``, each new token at its own position (``causal_query_index``),
so the top-left causal mask the kernel applies is every token's own causal mask; rows of the
cached prefix and of the padding are computed and dropped. That costs ``max_kv^2 / 2`` scores
a sequence, the same as the tiled path below for a fresh prompt and more for a short chunk on
a long cached prefix, so ``auto`` keeps the tiled path where the flash kernel would compute
more than ``CAUSAL_FLASH_SPEEDUP`` times its scores. A mask handed to the flash kernel made it
no faster than the tiled path (docs/cpu.md); without one, it skips the masked key blocks. On a
CPU without AMX the flash kernel measured slower than the tiled path in whole forwards, so
there ``auto`` takes the tiled path (``causal_flash_pays``).

The tiled path runs in tiles of query rows (``score_tile_bytes``): the scores of all rows at
once are ``B x H x max_q x max_kv`` floats (76 MB per layer for one 1,453-token prompt), and the
scores, the masked scores and the probabilities are each written and read back once per layer.
Above 64 MB glibc serves an allocation from a worker thread's arena with a fresh ``mmap``
whatever its mmap threshold (a non-main arena's heap holds at most 64 MB), so every one was
page-faulted in again: measured on the demo model, one thread, a 1,399-token prefill cost 7.6 s
of thread CPU on a worker thread against 4.9 s on the main thread. A tile's scores stay within
the budget (cache-sized), and a tile reads only the keys its rows may see (causality: rows
``r0..r1`` of a sequence with ``c`` cached tokens see keys ``0..c + r1``), so a prompt's
attention costs about half the full square. Masked keys contribute exact zeros to a softmax, so
leaving them out changes only the order of the floating-point sums.

Invariant: padded key positions read ``kv_cache.pad_slot`` (a slot of a block no sequence owns,
reserved by the runner) and are masked (the causal flash path: seen only by dropped rows), so a
non-finite value elsewhere in the cache can never reach another sequence's output through
padding. Padded query rows see key 0 only (no empty softmax row).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from nova.runtime import cpu_kernels
from nova.runtime.attention_backend import (
    AttentionBackend,
    AttentionMetadata,
    PagedBatch,
    padded_query_index,
)
from nova.runtime.cpu_fused import kernels_for
from nova.runtime.kv_cache import PagedKVCache


@dataclass(slots=True)
class CpuMetadata(AttentionMetadata):
    query_pad_index: torch.Tensor | None  # [T] into [B * max_q]; None for decode (max_q == 1)
    key_slots: torch.Tensor  # [B, max_kv] int64, slot per key position; padding: -1
    allowed: torch.Tensor  # [B, max_q, max_kv] bool, query row may attend key position
    # (empty on the causal flash path, whose kernel masks itself)
    # Built by the forward's first layer, which knows the cache's geometry and the dtype:
    kv_index: torch.Tensor | None = None  # [B * kv_heads * max_kv] rows of [slots*kv_heads, D]
    additive_mask: torch.Tensor | None = None  # [B, 1, max_q, 1, max_kv]: 0 or -inf
    # prefill: (first row, end row, keys seen) per tile of padded query rows (``query_tiles``)
    tiles: list[tuple[int, int, int]] | None = None
    # a mixed batch (decode tokens beside prompt chunks: a fused chunked-prefill step): the
    # token indices and metadata of its decode sequences and of its prompt sequences, each
    # attended on its own (``split_mixed``); None otherwise
    parts: list[tuple[torch.Tensor, CpuMetadata]] | None = None
    # decode through the C++ kernel, which reads the block tables itself (no gather index,
    # no mask: ``key_slots`` and ``allowed`` are empty)
    in_place: bool = False
    # prefill with the C++ softmax: keys each padded query row sees, [B, max_q] int32 (the
    # causal mask as lengths: row i of sequence b sees its keys 0..cached_b + i; padding key 0)
    row_lens: torch.Tensor | None = None
    # prefill through PyTorch's causal flash kernel (``prefill="causal_sdpa"``): where each new
    # token sits in the key-aligned queries [B * max_kv] (token i of sequence b at
    # b * max_kv + cached_b + i, ``causal_query_index``); None on the other paths
    causal_index: torch.Tensor | None = None
    # prefill through Nova's AMX kernel (``prefill="amx"``; bf16): it reads the block tables
    # itself, so ``key_slots`` and ``allowed`` stay empty unless the cache turns out not to be
    # bf16 (then an eager path's fields are built on first use: ``_eager_fields``)
    amx: bool = False

    @classmethod
    def without_gather(cls, paged: PagedBatch) -> CpuMetadata:
        """Metadata whose own gather fields are empty (its batch is attended otherwise)."""
        empty = torch.empty(0, dtype=torch.long, device=paged.slot_mapping.device)
        return cls(paged, None, empty, empty.bool())


def sub_batch(
    paged: PagedBatch, seqs: list[int], query_lens: list[int]
) -> tuple[torch.Tensor, PagedBatch]:
    """The sequences ``seqs`` of ``paged`` (in order) as a batch of their own, with the
    indices of their tokens in ``paged``'s ``T`` new tokens."""
    device = paged.slot_mapping.device
    starts = paged.query_start_loc.tolist()
    tokens = [t for b in seqs for t in range(starts[b], starts[b + 1])]
    token_index = torch.tensor(tokens, dtype=torch.long, device=device)
    seq_index = torch.tensor(seqs, dtype=torch.long, device=device)
    lens = [query_lens[b] for b in seqs]
    loc = torch.zeros(len(seqs) + 1, dtype=paged.query_start_loc.dtype)
    loc[1:] = torch.tensor(lens).cumsum(0)
    seq_lens = paged.seq_lens.index_select(0, seq_index)
    part = PagedBatch(
        paged.slot_mapping.index_select(0, token_index),
        loc.to(device),
        seq_lens,
        paged.block_tables.index_select(0, seq_index),
        paged.block_size,
        max(lens),
        int(seq_lens.max()),
    )
    return token_index, part


def split_mixed(paged: PagedBatch) -> list[tuple[torch.Tensor, PagedBatch]] | None:
    """A batch with one-token (decode) sequences beside longer ones, as two batches: the
    decode sequences and the others, each with the indices of its tokens in the whole batch.
    Attended together, every decode sequence would be padded to the longest prompt chunk's
    query rows (a fused step of 31 decodes and one 70-token chunk: 32 x 70 rows for 101 real
    ones). None when the batch is not mixed."""
    if paged.max_query_len == 1:
        return None
    query_lens = paged.query_lens().tolist()
    decode = [b for b, n in enumerate(query_lens) if n == 1]
    if not decode:
        return None
    prompt = [b for b, n in enumerate(query_lens) if n != 1]
    return [sub_batch(paged, seqs, query_lens) for seqs in (decode, prompt)]


def key_slots(paged: PagedBatch) -> torch.Tensor:
    """[B, max_kv] int64: the slot of each key position of each sequence, -1 past its context."""
    device = paged.slot_mapping.device
    bs, max_kv = paged.block_size, paged.max_seq_len
    k_pos = torch.arange(max_kv, device=device)
    cols = (k_pos // bs).clamp(max=paged.block_tables.shape[1] - 1)
    slots = paged.block_tables.long()[:, cols] * bs + k_pos % bs
    return torch.where(k_pos[None, :] < paged.seq_lens.long()[:, None], slots, -1)


def key_slots_and_mask(paged: PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(``key_slots``, allowed [B, max_q, max_kv]).

    Query ``i`` of sequence ``b`` sits at position ``cached_b + i`` and sees keys ``0..that``;
    padded query rows see key 0 only."""
    device = paged.slot_mapping.device
    max_q, max_kv = paged.max_query_len, paged.max_seq_len
    seq_lens = paged.seq_lens.long()
    q_lens = paged.query_lens()
    k_pos = torch.arange(max_kv, device=device)
    q_idx = torch.arange(max_q, device=device)
    q_valid = q_idx[None, :] < q_lens[:, None]
    q_pos = (seq_lens - q_lens)[:, None] + q_idx[None, :]
    allowed = (k_pos[None, None, :] <= q_pos[:, :, None]) & q_valid[:, :, None]
    allowed[:, :, 0] |= ~q_valid
    return key_slots(paged), allowed


def causal_query_index(paged: PagedBatch) -> torch.Tensor:
    """[T] int64: each new token's row in queries laid out like the keys, ``[B * max_kv]``:
    token ``i`` of sequence ``b`` at ``b * max_kv + cached_b + i`` (its own position).

    With queries at their positions, every sequence's keys at ``0..seq_len_b`` and padding
    after them, a causal mask aligned at the top-left (PyTorch's ``is_causal``) is exactly
    each token's causal mask: row ``p`` sees keys ``0..p``, all of its own sequence. The rows
    of other positions (the cached prefix, the padding) are computed and dropped."""
    device = paged.slot_mapping.device
    q_lens = paged.query_lens().long()
    cached = paged.seq_lens.long() - q_lens
    seq = torch.repeat_interleave(
        torch.arange(paged.num_seqs, device=device), q_lens, output_size=paged.num_tokens
    )
    offset = torch.arange(paged.num_tokens, device=device) - paged.query_start_loc.long()[seq]
    return seq * paged.max_seq_len + cached[seq] + offset


def prefill_row_lens(paged: PagedBatch) -> torch.Tensor:
    """[B, max_q] int32: keys padded query row ``i`` of sequence ``b`` may attend, a prefix
    ``0..cached_b + i`` (``key_slots_and_mask``'s ``allowed`` as lengths); padded rows 1."""
    q_lens = paged.query_lens().long()
    cached = paged.seq_lens.long() - q_lens
    q_idx = torch.arange(paged.max_query_len, device=q_lens.device)
    lens = cached[:, None] + q_idx[None, :] + 1
    return torch.where(q_idx[None, :] < q_lens[:, None], lens, 1).to(torch.int32).contiguous()


# Scores of one prefill tile (fp32 bytes): fits a core's share of the L3 cache, and far below
# the 64 MB above which a worker thread's allocations are mmap-ed (module docstring).
SCORE_TILE_BYTES = 2 << 20
SCORE_BYTES_PER_ELEMENT = 4  # the widest score dtype the backend runs (fp32)


def query_tiles(
    seq_lens: list[int], query_lens: list[int], num_heads: int, tile_bytes: int
) -> list[tuple[int, int, int]]:
    """``(r0, r1, kv_len)`` per tile of the padded query rows ``0..max_q``: rows of a tile
    together see keys ``0..kv_len`` at most (row ``i`` of sequence ``b`` sits at position
    ``seq_lens[b] - query_lens[b] + i``; padded rows see key 0). Rows per tile: as many as keep
    ``B x num_heads x rows x kv_len`` scores within ``tile_bytes`` (at least one)."""
    if tile_bytes < 1:
        raise ValueError(f"tile_bytes must be >= 1, got {tile_bytes}")
    max_q = max(query_lens)
    cached = [s - q for s, q in zip(seq_lens, query_lens)]
    per_key_row = len(seq_lens) * num_heads * SCORE_BYTES_PER_ELEMENT
    tiles: list[tuple[int, int, int]] = []
    r0 = 0

    def rows_within(width: int) -> int:
        return max(1, tile_bytes // (per_key_row * width))

    while r0 < max_q:
        # The width seen by the tile's first row gives an upper bound on its rows; if the
        # rows that bound admits see more keys than it assumed, the width they see gives the
        # rows again (fewer: their width is no larger, so that tile fits, or is one row).
        r1 = min(max_q, r0 + rows_within(_keys_seen(seq_lens, cached, r0 + 1)))
        if r1 > r0 + 1 and per_key_row * (r1 - r0) * _keys_seen(seq_lens, cached, r1) > tile_bytes:
            r1 = min(r1 - 1, r0 + rows_within(_keys_seen(seq_lens, cached, r1)))
        tiles.append((r0, r1, _keys_seen(seq_lens, cached, r1)))
        r0 = r1
    return tiles


def _keys_seen(seq_lens: list[int], cached: list[int], rows: int) -> int:
    """Keys the first ``rows`` padded query rows of any sequence may attend (at least 1)."""
    return max(1, max(min(s, c + rows) for s, c in zip(seq_lens, cached)))


PREFILL_PATHS = ("auto", "amx", "causal_sdpa", "tiled")
# Per score, PyTorch's causal flash kernel against the tiled path (two bmm's, the C++ prefix
# softmax, the query padding and gathers), on a CPU with AMX tiles: about twice as fast in an op
# profile of a 6 x 320 bf16 prefill of the peer model on a 2-core Intel Xeon (a scratch
# profile). benchmarks/results/cpu_prefill_paths.md checks the rule on whole forwards there: the
# path ``auto`` picks is the faster in every shape.
CAUSAL_FLASH_SPEEDUP = 2.0
# On a CPU without AMX the flash kernel was the slower path in whole forwards: on a 2-core AMD
# EPYC (AVX-512 with BF16, no AMX) 0.83-0.96x the tiled path's speed in all six bf16 shapes
# (benchmarks/results/cpu_prefill_paths_amd.md) and 0.43-0.98x in five of six fp32 shapes, the
# sixth a 2,000-token prompt at 1.16x (cpu_prefill_paths_amd_fp32.md). So there ``auto`` keeps
# the tiled path.


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU reports AMX tiles (``amx_tile`` among /proc/cpuinfo's flags; False where
    there is no /proc/cpuinfo). Read once per process."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(
        line.startswith("flags") and "amx_tile" in line.split() for line in text.splitlines()
    )


def causal_flash_pays(max_q: int, max_kv: int, amx_cpu: bool = True) -> bool:
    """Whether ``auto`` sends a prompt batch through the causal flash path: on a CPU with AMX
    (``amx_cpu``), when the scores it computes (every key position's row, ``max_kv^2 / 2`` a
    sequence) are at most ``CAUSAL_FLASH_SPEEDUP`` times the tiled path's (``max_q`` rows on
    ``max_kv - max_q`` cached keys and their own causal square): a fresh prompt or one on a
    short cached prefix takes it, a short chunk on a long cached prefix does not. On a CPU
    without AMX, never (the comment above)."""
    if not amx_cpu:
        return False
    causal = max_kv * max_kv / 2
    tiled = max_q * (max_kv - max_q / 2)
    return causal <= CAUSAL_FLASH_SPEEDUP * tiled


def amx_takes(dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the AMX prefill kernel takes queries of ``dtype`` on a cache of ``cache_dtype``:
    both bf16 (AMX-BF16 tiles), and a head_dim that is a multiple of 32 (one tile row holds 32
    bf16)."""
    return dtype == torch.bfloat16 and cache_dtype == torch.bfloat16 and head_dim % 32 == 0


def _in_place_args(
    q: torch.Tensor, layer: int, paged: PagedBatch, kv_cache: PagedKVCache
) -> tuple[torch.Tensor, ...]:
    """The arguments both C++ attention kernels start with: the queries, the layer's caches,
    and the block tables and context lengths they read the caches through."""
    return (
        q.contiguous(),
        kv_cache.k[layer],
        kv_cache.v[layer],
        paged.block_tables.contiguous(),
        paged.seq_lens.contiguous(),
    )


def _amx_usable(kernels: ModuleType) -> bool:
    probe = getattr(kernels, "prefill_attention_amx", None)
    return bool(probe is not None and probe())


class CpuPagedAttention(AttentionBackend[CpuMetadata]):
    name = "cpu"
    static_shapes = False  # gathers to [B, max_kv]
    needs_pad_slot = True
    metadata_type = CpuMetadata

    def __init__(
        self,
        score_tile_bytes: int = SCORE_TILE_BYTES,
        kernels: ModuleType | bool | None = True,
        prefill: str = "auto",
        amx_cpu: bool | None = None,
    ) -> None:
        if score_tile_bytes < 1:
            raise ValueError(f"score_tile_bytes must be >= 1, got {score_tile_bytes}")
        if prefill not in PREFILL_PATHS:
            raise ValueError(f"prefill must be one of {PREFILL_PATHS}, got {prefill!r}")
        self.score_tile_bytes = score_tile_bytes
        # prompts: "causal_sdpa" (PyTorch's flash kernel, causal without a mask, on queries
        # laid out like the keys), "tiled" (score tiles, two bmm's and a masked softmax each)
        # or "auto" (the first unless it computes far more rows: ``_causal``)
        self.prefill = prefill
        # Nova's C++ decode attention (``cpu_kernels``): True loads it (built on first use),
        # False / None runs decode attention eager (gather + bmm)
        if kernels is True:
            kernels = cpu_kernels.load()
        self.kernels: ModuleType | None = kernels or None
        # the AMX prefill kernel: built with AMX and granted the tile state by the OS
        self.amx = self.kernels is not None and _amx_usable(self.kernels)
        if prefill == "amx" and not self.amx:
            raise ValueError("prefill='amx' needs Nova's CPU kernels built on a CPU with AMX")
        # the CPU has AMX tiles (whether or not Nova's kernel uses them): ``auto``'s rule
        # between the flash and the tiled paths depends on it (``causal_flash_pays``)
        self.amx_cpu = self.amx or cpu_has_amx() if amx_cpu is None else amx_cpu

    def build_metadata(self, paged: PagedBatch) -> CpuMetadata:
        split = split_mixed(paged)
        if split is not None:
            # (the whole batch's own fields are unused: every layer attends the parts)
            md = CpuMetadata.without_gather(paged)
            md.parts = [(index, self.build_metadata(part)) for index, part in split]
            return md
        if paged.max_query_len == 1 and self.kernels is not None and paged.seq_lens.is_cpu:
            md = CpuMetadata.without_gather(paged)
            md.in_place = True
            return md
        md = CpuMetadata.without_gather(paged)
        if paged.max_query_len > 1 and self._amx():
            md.amx = paged.seq_lens.is_cpu
        if not md.amx:
            self._eager_fields(md)
        return md

    def _eager_fields(self, md: CpuMetadata) -> None:
        """The fields of the paths built from PyTorch ops: decode's gather and mask; for a
        prompt batch the causal flash path's (the flash kernel applies the causal mask itself:
        no ``allowed`` tensor) or the tiled path's, by the ``auto`` rule (``_causal``)."""
        paged = md.paged
        if paged.max_query_len > 1 and self._causal(paged.max_query_len, paged.max_seq_len):
            md.key_slots = key_slots(paged)
            md.causal_index = causal_query_index(paged)
            return
        md.key_slots, md.allowed = key_slots_and_mask(paged)
        if paged.max_query_len > 1:
            md.query_pad_index = padded_query_index(paged)

    def prefill_path(self, max_q: int, max_kv: int, dtype: torch.dtype, head_dim: int) -> str:
        """The path a prompt batch of these sizes, dtype and head_dim takes: "amx" (where the
        CPU has AMX and the kernel takes them, unless another path is asked for), else
        "causal_sdpa" or "tiled"."""
        if self._amx() and amx_takes(dtype, dtype, head_dim):
            return "amx"
        return "causal_sdpa" if self._causal(max_q, max_kv) else "tiled"

    def _amx(self) -> bool:
        """Whether prompt batches go to the AMX kernel (if their dtype and head_dim suit it):
        ``auto`` or ``amx`` on a CPU with AMX. In whole bf16 forwards it was the faster path in
        every shape measured (benchmarks/results/cpu_prefill_paths.md)."""
        return self.amx and self.prefill in ("auto", "amx")

    def _causal(self, max_q: int, max_kv: int) -> bool:
        if self.prefill not in ("auto", "amx"):  # ("amx" on a dtype it does not take: auto)
            return self.prefill == "causal_sdpa"
        return causal_flash_pays(max_q, max_kv, self.amx_cpu)

    @staticmethod
    def _gather_index(md: CpuMetadata, kv_cache: PagedKVCache) -> None:
        """The gather index, once per forward (every layer reuses it)."""
        kv_heads = kv_cache.num_kv_heads
        pad_slot = kv_cache.pad_slot if kv_cache.pad_slot is not None else 0
        slots = torch.where(md.key_slots >= 0, md.key_slots, pad_slot)
        heads = torch.arange(kv_heads, device=slots.device)
        md.kv_index = (slots[:, None, :] * kv_heads + heads[None, :, None]).reshape(-1)

    @staticmethod
    def _additive_mask(md: CpuMetadata, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask (0 / -inf), once per forward, for the paths that add it (not
        the C++ prefill softmax, which takes the mask as row lengths)."""
        if md.additive_mask is None:
            mask = torch.zeros(md.allowed.shape, dtype=dtype, device=md.allowed.device)
            mask.masked_fill_(~md.allowed, float("-inf"))
            md.additive_mask = mask[:, None, :, None, :]
        return md.additive_mask

    def attend(
        self,
        q: torch.Tensor,
        layer: int,
        metadata: CpuMetadata,
        kv_cache: PagedKVCache,
        scale: float,
    ) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        if metadata.parts is not None:
            out = q.new_empty(num_tokens, num_heads * head_dim)
            for index, part in metadata.parts:
                out[index] = self.attend(q.index_select(0, index), layer, part, kv_cache, scale)
            return out
        paged = metadata.paged
        if metadata.in_place and self.kernels is not None:  # decode, read in place
            out = self.kernels.decode_attention(
                *_in_place_args(q, layer, paged, kv_cache), paged.block_size, scale
            )
            return out.view(num_tokens, num_heads * head_dim)
        if metadata.amx:
            if amx_takes(q.dtype, kv_cache.k[layer].dtype, head_dim):
                assert self.kernels is not None
                out = self.kernels.prefill_attention(
                    *_in_place_args(q, layer, paged, kv_cache),
                    paged.query_start_loc.contiguous(),
                    paged.block_size,
                    scale,
                    False,  # (the AMX tiles, not their reference)
                )
                return out.view(num_tokens, num_heads * head_dim)
            metadata.amx = False  # (not bf16, or head_dim not a multiple of 32): an eager
            # path, for every layer
            self._eager_fields(metadata)
        if metadata.kv_index is None:
            self._gather_index(metadata, kv_cache)
        assert metadata.kv_index is not None
        b, max_q, max_kv = paged.num_seqs, paged.max_query_len, paged.max_seq_len
        kv_heads = kv_cache.num_kv_heads
        group = num_heads // kv_heads
        k = kv_cache.k[layer].view(-1, head_dim).index_select(0, metadata.kv_index)
        v = kv_cache.v[layer].view(-1, head_dim).index_select(0, metadata.kv_index)
        k = k.view(b * kv_heads, max_kv, head_dim).to(q.dtype)
        v = v.view(b * kv_heads, max_kv, head_dim).to(q.dtype)
        if metadata.causal_index is not None:  # prefill: queries at their key positions
            index = metadata.causal_index
            q_full = q.new_zeros(b * max_kv, num_heads, head_dim).index_copy_(0, index, q)
            out = F.scaled_dot_product_attention(
                q_full.view(b, max_kv, num_heads, head_dim).transpose(1, 2),
                k.view(b, kv_heads, max_kv, head_dim),
                v.view(b, kv_heads, max_kv, head_dim),
                is_causal=True,
                scale=scale,
                enable_gqa=kv_heads != num_heads,
            )
            return out.transpose(1, 2).reshape(b * max_kv, num_heads * head_dim)[index]
        if metadata.query_pad_index is None:  # decode: [B, H, D] is [B * kv_heads, G, D]
            rows = q.reshape(b * kv_heads, group, head_dim)
            scores = torch.bmm(rows, k.transpose(1, 2)).view(b, kv_heads, 1, group, max_kv)
            mask = self._additive_mask(metadata, q.dtype)
            probs = torch.add(mask, scores, alpha=scale).softmax(-1)
            out = torch.bmm(probs.view(b * kv_heads, group, max_kv), v)
            return out.view(num_tokens, num_heads * head_dim)
        if metadata.tiles is None:
            metadata.tiles = query_tiles(
                paged.seq_lens.tolist(),
                paged.query_lens().tolist(),
                num_heads,
                self.score_tile_bytes,
            )
        q_pad = q.new_zeros(b * max_q, num_heads, head_dim)
        q_pad[metadata.query_pad_index] = q
        q_rows = q_pad.view(b, max_q, kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
        out = q.new_empty(b, max_q, kv_heads, group, head_dim)
        # (the causal softmax in one C++ pass over each row's key prefix, in place, where the
        # kernels are on: no mask add, no masked tail through exp)
        fused = kernels_for(q) if self.kernels is not None else None
        if fused is not None and metadata.row_lens is None:
            metadata.row_lens = prefill_row_lens(paged)
        for r0, r1, kv_len in metadata.tiles:
            n = r1 - r0
            rows = q_rows[:, :, r0:r1].reshape(b * kv_heads, n * group, head_dim)
            keys = k[:, :kv_len]
            scores = torch.bmm(rows, keys.transpose(1, 2)).view(b, kv_heads, n, group, kv_len)
            if fused is not None and metadata.row_lens is not None:
                fused.prefix_softmax_(scores, metadata.row_lens, r0, scale)
                probs = scores
            else:
                mask = self._additive_mask(metadata, q.dtype)[:, :, r0:r1, :, :kv_len]
                probs = torch.add(mask, scores, alpha=scale).softmax(-1)
            tile = torch.bmm(probs.view(b * kv_heads, n * group, kv_len), v[:, :kv_len])
            out[:, r0:r1] = tile.view(b, kv_heads, n, group, head_dim).permute(0, 2, 1, 3, 4)
        return out.view(b * max_q, num_heads * head_dim)[metadata.query_pad_index]
