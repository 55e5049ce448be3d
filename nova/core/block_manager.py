"""Paged KV-cache block accounting: which physical blocks each sequence uses, shared blocks,
and the prefix cache.

Torch-free on purpose: the scheduler, the simulator and the real engine share this object.
The tensors live in ``nova.runtime.kv_cache.PagedKVCache``; this module only hands out block ids
(and says which blocks to copy, for copy-on-write).

Prefix caching (``enable_prefix_caching``): a full block whose K/V have been computed is
registered under its content key (``nova.core.hashing.block_hash``: a chain over token ids and
the images it covers). A later sequence whose prompt has the same leading blocks reuses them
(``match_prefix`` then ``allocate(..., prefix_blocks=...)``) instead of recomputing. Blocks are
shared by reference count; a block whose count drops to zero keeps its content and key and
waits in an LRU of evictable cached blocks, evicted only when an allocation finds no free
block. ``fork`` shares a whole block table (``n`` > 1); the shared, partially filled last block
is copied on write: the first sequence to append into it gets a fresh block and a pending copy
(``take_copies``) the executor performs before writing.

Invariants (checked by ``check_integrity``):
- every block id in ``[0, num_blocks)`` is in exactly one of: the free list (count 0, no key),
  the evictable cache (count 0, keyed), in use (count > 0), so free + cached + used == total;
- a block's reference count equals the number of block-table entries naming it (no block is
  freed, cached or reused while a sequence still names it);
- the key index and the blocks' keys agree (one block per key, one key per keyed block);
- a sequence holding ``n`` tokens names exactly ``ceil(n / block_size)`` blocks, none twice.

Running out of blocks raises ``OutOfBlocksError`` and leaves the state unchanged, so the caller
(the scheduler) can preempt or wait; nothing is ever partially allocated.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from nova.core.hashing import BlockHash


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation needs more free blocks than there are."""

    def __init__(self, seq_id: str, num_needed_blocks: int, num_free_blocks: int) -> None:
        super().__init__(
            f"KV cache out of blocks for sequence {seq_id!r}: needs {num_needed_blocks} more, "
            f"{num_free_blocks} free"
        )
        self.seq_id = seq_id
        self.num_needed_blocks = num_needed_blocks
        self.num_free_blocks = num_free_blocks


@dataclass(slots=True)
class _SeqBlocks:
    # a tuple, replaced when it changes (a block added every ``block_size`` tokens, a
    # copy-on-write): the scheduler puts it into batch items as is, without copying it per step
    block_ids: tuple[int, ...] = ()
    num_tokens: int = 0
    num_committed_blocks: int = 0  # leading full blocks already offered to the prefix cache


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens (ceil division)."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Allocates fixed-size KV blocks to sequences; per-sequence block tables; optional
    prefix cache (see the module docstring)."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False
    ) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        # count 0, keyed; first = least recently used (evicted first)
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._refs = [0] * num_blocks
        self._key: list[BlockHash | None] = [None] * num_blocks
        self._by_key: dict[BlockHash, int] = {}
        self._seqs: dict[str, _SeqBlocks] = {}
        self._copies: dict[str, list[tuple[int, int]]] = {}
        # prefix-cache counters (``record_lookup``) and evictions, since start
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.num_evictions = 0

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_blocks(self) -> int:
        """Evictable cached blocks (no sequence uses them; their content is kept)."""
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        """Blocks some sequence uses (a shared block counts once)."""
        return self.num_blocks - len(self._free) - len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1] (evictable cached blocks are not in use)."""
        return self.num_used_blocks / self.num_blocks

    def has_seq(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: str) -> list[int]:
        return list(self._require(seq_id).block_ids)

    def block_table_tuple(self, seq_id: str) -> tuple[int, ...]:
        """``block_table`` as a tuple (not a copy: the sequence's own, which is never mutated)."""
        return self._require(seq_id).block_ids

    def num_tokens(self, seq_id: str) -> int:
        return self._require(seq_id).num_tokens

    def num_committed_blocks(self, seq_id: str) -> int:
        """Leading blocks of ``seq_id`` already offered to the prefix cache (0 if unknown)."""
        seq = self._seqs.get(seq_id)
        return seq.num_committed_blocks if seq is not None else 0

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]

    def _needs_copy(self, seq: _SeqBlocks, num_tokens: int) -> bool:
        """Growing ``seq`` to ``num_tokens`` writes into its partially filled last block, and
        another sequence shares that block (a fork): it must be copied first."""
        return (
            num_tokens > seq.num_tokens
            and seq.num_tokens % self.block_size != 0
            and self._refs[seq.block_ids[-1]] > 1
        )

    def num_new_blocks_needed(
        self, seq_id: str, num_tokens: int, prefix_blocks: Sequence[int] = ()
    ) -> int:
        """Blocks that growing ``seq_id`` (possibly new, reusing ``prefix_blocks``) to
        ``num_tokens`` would take from the free and evictable pools. Reused blocks cost nothing
        unless they are evictable now (using them takes them out of that pool); a copy-on-write
        costs one."""
        bs = self.block_size
        seq = self._seqs.get(seq_id)
        if seq is None:
            new = max(0, -(-num_tokens // bs) - len(prefix_blocks))
            if not prefix_blocks:
                return new
            refs = self._refs
            return new + sum([1 for b in prefix_blocks if refs[b] == 0])
        blocks = seq.block_ids
        need = -(-num_tokens // bs) - len(blocks)
        old = seq.num_tokens
        # = _needs_copy(seq, num_tokens), inline: the decode hot path
        if num_tokens > old and old % bs and self._refs[blocks[-1]] > 1:
            return max(0, need) + 1
        return need if need > 0 else 0

    def can_allocate(self, seq_id: str, num_tokens: int, prefix_blocks: Sequence[int] = ()) -> bool:
        return self.num_new_blocks_needed(seq_id, num_tokens, prefix_blocks) <= (
            len(self._free) + len(self._cached)
        )

    def match_prefix(self, block_hashes: Sequence[BlockHash], max_blocks: int) -> list[int]:
        """Blocks holding the longest run of leading ``block_hashes`` (at most ``max_blocks``),
        in order; [] without prefix caching. Changes nothing (the LRU order is updated when
        the blocks are used, by ``allocate``)."""
        if not self.enable_prefix_caching:
            return []
        out: list[int] = []
        by_key = self._by_key
        for h in block_hashes[:max_blocks]:
            b = by_key.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def record_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Count one prefix-cache lookup (the scheduler calls it once per admitted prefill)."""
        self.num_queried_tokens += num_queried_tokens
        self.num_hit_tokens += num_hit_tokens

    # -- mutations -------------------------------------------------------------------------
    def _take_block(self) -> int:
        """A block for new content: a free one, else the least recently used cached one
        (its key is forgotten). Callers check capacity first."""
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._cached.popitem(last=False)
            key = self._key[b]
            if key is not None:
                del self._by_key[key]
            self._key[b] = None
            self.num_evictions += 1
        self._refs[b] = 1
        return b

    def _take_blocks(self, n: int) -> list[int]:
        """``n`` x ``_take_block()``: from the free list in one go when it holds them (a
        prompt takes ~100 blocks)."""
        free = self._free
        if n > len(free):
            return [self._take_block() for _ in range(n)]
        popleft = free.popleft
        taken = [popleft() for _ in range(n)]
        refs = self._refs
        for b in taken:
            refs[b] = 1
        return taken

    def _share(self, b: int) -> None:
        if self._refs[b] == 0:
            del self._cached[b]  # a reused block leaves the evictable pool
        self._refs[b] += 1

    def allocate(
        self, seq_id: str, num_tokens: int, prefix_blocks: Sequence[int] = ()
    ) -> list[int]:
        """Reserve blocks for a new sequence of ``num_tokens`` tokens whose leading
        ``prefix_blocks`` (from ``match_prefix``: full, computed blocks) are reused; returns
        its block table."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if len(prefix_blocks) * self.block_size > num_tokens:
            raise ValueError(
                f"sequence {seq_id!r}: {len(prefix_blocks)} reused blocks exceed "
                f"{num_tokens} tokens"
            )
        needed = self.num_new_blocks_needed(seq_id, num_tokens, prefix_blocks)
        if needed > self.num_free_blocks:
            raise OutOfBlocksError(seq_id, needed, self.num_free_blocks)
        for b in prefix_blocks:  # first: taking new blocks must not evict these
            self._share(b)
        new = num_blocks_for(num_tokens, self.block_size) - len(prefix_blocks)
        blocks = (*prefix_blocks, *self._take_blocks(new))
        self._seqs[seq_id] = _SeqBlocks(blocks, num_tokens, len(prefix_blocks))
        return list(blocks)

    def grow(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow ``seq_id`` to hold ``num_tokens`` tokens in total; returns newly added block ids
        (a copy-on-write replacement of the last block is not among them: see
        ``take_copies``)."""
        seq = self._require(seq_id)
        if num_tokens < seq.num_tokens:
            raise ValueError(
                f"sequence {seq_id!r} cannot shrink from {seq.num_tokens} to {num_tokens} tokens"
            )
        needed = self.num_new_blocks_needed(seq_id, num_tokens)
        if needed == 0:  # the common decode step: room left in the last, private block
            seq.num_tokens = num_tokens
            return []
        if needed > len(self._free) + len(self._cached):
            raise OutOfBlocksError(seq_id, needed, self.num_free_blocks)
        if self._needs_copy(seq, num_tokens):
            src = seq.block_ids[-1]
            dst = self._take_block()
            self._refs[src] -= 1  # still > 0: another sequence holds it
            seq.block_ids = (*seq.block_ids[:-1], dst)
            self._copies.setdefault(seq_id, []).append((src, dst))
        added = self._take_blocks(num_blocks_for(num_tokens, self.block_size) - len(seq.block_ids))
        seq.block_ids += tuple(added)
        seq.num_tokens = num_tokens
        return added

    def try_grow(self, seq_id: str, num_tokens: int) -> tuple[int, ...] | None:
        """``grow`` if ``can_allocate`` says it fits, then the block table (``block_table_tuple``);
        None, changing nothing, if it does not fit. (One lookup for the three: the scheduler
        calls it for every sequence of every decode step.)"""
        seq = self._seqs.get(seq_id)
        if seq is not None:
            blocks, old = seq.block_ids, seq.num_tokens
            # the common step: room left in the last block, and that block is private (no
            # copy-on-write: not ``_needs_copy``)
            if old <= num_tokens <= len(blocks) * self.block_size and (
                num_tokens == old or old % self.block_size == 0 or self._refs[blocks[-1]] <= 1
            ):
                seq.num_tokens = num_tokens
                return blocks
        if not self.can_allocate(seq_id, num_tokens):
            return None
        self.grow(seq_id, num_tokens)
        return self._seqs[seq_id].block_ids

    def has_copies(self, seq_id: str) -> bool:
        return seq_id in self._copies

    def take_copies(self, seq_id: str) -> list[tuple[int, int]]:
        """The (src, dst) block copies ``seq_id``'s copy-on-writes need, to be done before its
        next tokens are written; forgotten once taken."""
        return self._copies.pop(seq_id, [])

    def fork(self, parent_id: str, child_id: str) -> list[int]:
        """A new sequence ``child_id`` sharing every block of ``parent_id`` (same tokens);
        appending to a shared, partially filled last block copies it first (``grow``)."""
        parent = self._require(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already has blocks")
        for b in parent.block_ids:
            self._refs[b] += 1
        self._seqs[child_id] = _SeqBlocks(
            parent.block_ids, parent.num_tokens, parent.num_committed_blocks
        )
        return list(parent.block_ids)

    def commit(self, seq_id: str, block_hashes: Sequence[BlockHash], num_computed: int) -> int:
        """Offer ``seq_id``'s full blocks whose K/V are computed (its first ``num_computed``
        tokens) to the prefix cache, under ``block_hashes`` (one per block, in order; fewer
        stop the offer there). A key already cached keeps its block (this one stays private).
        Returns how many blocks were newly keyed."""
        seq = self._seqs.get(seq_id)
        if seq is None or not self.enable_prefix_caching:
            return 0
        upto = min(len(block_hashes), num_computed // self.block_size, len(seq.block_ids))
        added = 0
        for j in range(seq.num_committed_blocks, upto):
            b = seq.block_ids[j]
            h = block_hashes[j]
            if self._key[b] is None and h not in self._by_key:
                self._key[b] = h
                self._by_key[h] = b
                added += 1
        seq.num_committed_blocks = max(seq.num_committed_blocks, upto)
        return added

    def free(self, seq_id: str) -> int:
        """Release ``seq_id``'s blocks; returns how many it named. Unknown ids free 0. A block
        no other sequence uses goes to the evictable cache if keyed (the sequence's last
        blocks are evicted first), else to the free list."""
        seq = self._seqs.pop(seq_id, None)
        self._copies.pop(seq_id, None)
        if seq is None:
            return 0
        refs, cached, free, key = self._refs, self._cached, self._free, self._key
        for b in reversed(seq.block_ids):
            refs[b] -= 1
            if refs[b] == 0:
                if key[b] is not None:
                    cached[b] = None
                else:
                    free.append(b)
        return len(seq.block_ids)

    # -- checks ----------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise ``AssertionError`` if any invariant in the module docstring is broken."""
        counts = [0] * self.num_blocks
        for seq_id, seq in self._seqs.items():
            expect = num_blocks_for(seq.num_tokens, self.block_size)
            assert len(seq.block_ids) == expect, (seq_id, len(seq.block_ids), expect)
            assert len(set(seq.block_ids)) == len(seq.block_ids), (seq_id, "block named twice")
            for b in seq.block_ids:
                counts[b] += 1
        assert counts == self._refs, "reference counts differ from the block tables"
        free, cached = set(self._free), set(self._cached)
        assert len(free) == len(self._free), "a block is twice in the free list"
        assert not free & cached, "a block is both free and cached"
        used = {b for b in range(self.num_blocks) if self._refs[b] > 0}
        assert not used & (free | cached), "a block in use is free or cached"
        assert len(free) + len(cached) + len(used) == self.num_blocks, "a block is lost"
        assert all(self._key[b] is None for b in free), "a free block has a key"
        assert all(self._key[b] is not None for b in cached), "a cached block has no key"
        keyed = {b: k for b, k in enumerate(self._key) if k is not None}
        assert len(keyed) == len(self._by_key), "key index and block keys differ"
        assert all(self._by_key.get(k) == b for b, k in keyed.items()), "key index is stale"

    def _require(self, seq_id: str) -> _SeqBlocks:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None
