"""The KV block manager, torch-free: allocation, growth, freeing, integrity, exhaustion."""

from __future__ import annotations

import random
import sys

import pytest

from nova.core.block_manager import BlockManager, OutOfBlocksError, num_blocks_for


def test_block_manager_imports_no_torch():
    import subprocess

    code = "import sys, nova.core.block_manager; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocate_grow_free_block_tables():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 5) == [0, 1]
    assert bm.grow("a", 8) == []  # still fits in 2 blocks
    assert bm.grow("a", 9) == [2]
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.allocate("b", 1) == [3]
    assert bm.num_free_blocks == 4 and bm.num_used_blocks == 4
    assert bm.free("a") == 3
    assert bm.num_free_blocks == 7
    assert bm.free("a") == 0  # idempotent
    bm.check_integrity()


def test_exhaustion_is_reported_and_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 6)
    with pytest.raises(OutOfBlocksError, match="needs 2 more, 1 free"):
        bm.allocate("b", 3)
    assert not bm.has_seq("b")
    with pytest.raises(OutOfBlocksError):
        bm.grow("a", 11)
    assert bm.num_tokens("a") == 6 and len(bm.block_table("a")) == 3
    assert not bm.can_allocate("c", 3) and bm.can_allocate("c", 2)
    bm.check_integrity()


def test_invalid_operations_raise():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 2)
    with pytest.raises(ValueError, match="already has blocks"):
        bm.allocate("a", 2)
    with pytest.raises(ValueError, match="cannot shrink"):
        bm.grow("a", 1)
    with pytest.raises(KeyError, match="unknown sequence"):
        bm.grow("zz", 3)
    with pytest.raises(ValueError):
        BlockManager(0, 4)


@pytest.mark.parametrize("seed", range(5))
def test_long_random_sequence_keeps_integrity(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=64, block_size=rng.choice([1, 4, 16]))
    live: dict[str, int] = {}
    num_failures = 0
    for step in range(3000):
        op = rng.random()
        if op < 0.35 or not live:
            sid, n = f"s{step}", rng.randint(0, 100)
            try:
                bm.allocate(sid, n)
                live[sid] = n
            except OutOfBlocksError:
                num_failures += 1
        elif op < 0.8:
            sid = rng.choice(list(live))
            n = live[sid] + rng.randint(0, 20)
            try:
                bm.grow(sid, n)
                live[sid] = n
            except OutOfBlocksError:
                num_failures += 1
        else:
            sid = rng.choice(list(live))
            bm.free(sid)
            del live[sid]
        bm.check_integrity()
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        for sid, n in live.items():
            assert bm.num_tokens(sid) == n
            assert len(bm.block_table(sid)) == num_blocks_for(n, bm.block_size)
    assert num_failures > 0  # the run did exercise exhaustion
    for sid in list(live):
        bm.free(sid)
    assert bm.num_free_blocks == bm.num_blocks


def test_integrity_check_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 3)
    bm._free.append(bm.block_table("a")[0])  # simulate a double-owned block
    with pytest.raises(AssertionError):
        bm.check_integrity()


def test_try_grow_is_can_allocate_then_grow():
    """``try_grow``: ``grow`` and the block table (a tuple) when ``can_allocate`` says it fits;
    None and no change when it does not; a shared last block is copied on write as ``grow``
    does."""
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 3)
    assert bm.try_grow("a", 4) == (0, 1) and bm.num_tokens("a") == 4  # room in block 1
    assert bm.try_grow("a", 5) == (0, 1, 2) and bm.block_table_tuple("a") == (0, 1, 2)
    assert bm.try_grow("a", 9) is None and bm.num_tokens("a") == 5  # needs 2 more, 1 free
    bm.fork("a", "b")  # b shares a's half-full last block: its next token copies it first
    assert bm.try_grow("b", 6) == (0, 1, 3) and bm.take_copies("b") == [(2, 3)]
    assert bm.try_grow("a", 6) == (0, 1, 2) and not bm.has_copies("a")  # a's own now
    with pytest.raises(ValueError, match="cannot shrink"):
        bm.try_grow("a", 1)
    bm.check_integrity()
