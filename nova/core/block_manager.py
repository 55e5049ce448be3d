"""Paged KV-cache block accounting: which physical blocks each sequence owns.

Torch-free on purpose: the scheduler, the simulator and the real engine share this object.
The tensors live in ``nova.runtime.kv_cache.PagedKVCache``; this module only hands out block ids.

Invariants (checked by ``check_integrity``):
- every block id in ``[0, num_blocks)`` is either free or owned by exactly one sequence;
- ``num_free_blocks + num_used_blocks == num_blocks``;
- a sequence holding ``n`` tokens owns exactly ``ceil(n / block_size)`` blocks.

Running out of blocks raises ``OutOfBlocksError`` and leaves the state unchanged, so the caller
(the scheduler) can preempt or wait; nothing is ever partially allocated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


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
    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens (ceil division)."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Allocates fixed-size KV blocks to sequences; per-sequence block tables."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._seqs: dict[str, _SeqBlocks] = {}

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return sum(len(s.block_ids) for s in self._seqs.values())

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    def has_seq(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: str) -> list[int]:
        return list(self._require(seq_id).block_ids)

    def num_tokens(self, seq_id: str) -> int:
        return self._require(seq_id).num_tokens

    def num_new_blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Extra blocks that growing ``seq_id`` (possibly new) to ``num_tokens`` would take."""
        have = len(self._seqs[seq_id].block_ids) if seq_id in self._seqs else 0
        return max(0, num_blocks_for(num_tokens, self.block_size) - have)

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        return self.num_new_blocks_needed(seq_id, num_tokens) <= len(self._free)

    # -- mutations -------------------------------------------------------------------------
    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Reserve blocks for a new sequence of ``num_tokens`` tokens; returns its block table."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        needed = num_blocks_for(num_tokens, self.block_size)
        if needed > len(self._free):
            raise OutOfBlocksError(seq_id, needed, len(self._free))
        self._seqs[seq_id] = _SeqBlocks([self._free.popleft() for _ in range(needed)], num_tokens)
        return self.block_table(seq_id)

    def grow(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow ``seq_id`` to hold ``num_tokens`` tokens in total; returns newly added block ids."""
        seq = self._require(seq_id)
        if num_tokens < seq.num_tokens:
            raise ValueError(
                f"sequence {seq_id!r} cannot shrink from {seq.num_tokens} to {num_tokens} tokens"
            )
        needed = self.num_new_blocks_needed(seq_id, num_tokens)
        if needed > len(self._free):
            raise OutOfBlocksError(seq_id, needed, len(self._free))
        added = [self._free.popleft() for _ in range(needed)]
        seq.block_ids.extend(added)
        seq.num_tokens = num_tokens
        return added

    def free(self, seq_id: str) -> int:
        """Return all blocks of ``seq_id`` to the pool; returns how many. Unknown ids free 0."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return 0
        self._free.extend(seq.block_ids)
        return len(seq.block_ids)

    # -- checks ----------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise ``AssertionError`` if any invariant in the module docstring is broken."""
        owned = [b for s in self._seqs.values() for b in s.block_ids]
        every = owned + list(self._free)
        assert len(every) == self.num_blocks, (len(every), self.num_blocks)
        assert sorted(every) == list(range(self.num_blocks)), "a block is lost or double-owned"
        for seq_id, seq in self._seqs.items():
            expect = num_blocks_for(seq.num_tokens, self.block_size)
            assert len(seq.block_ids) == expect, (seq_id, len(seq.block_ids), expect)

    def _require(self, seq_id: str) -> _SeqBlocks:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None
