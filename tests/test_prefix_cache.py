"""Prefix caching in the block manager: keys, sharing, LRU eviction, fork + copy-on-write, and
the invariants through long random runs (hypothesis)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nova.core.block_manager import BlockManager, OutOfBlocksError
from nova.core.hashing import block_hash, image_key
from nova.core.prefix_keys import extend_block_hashes
from nova.types import ImageInput, Request


def chain(tokens: list[int], bs: int) -> list[bytes]:
    out: list[bytes] = []
    parent = None
    for j in range(len(tokens) // bs):
        parent = block_hash(parent, tokens[j * bs : (j + 1) * bs])
        out.append(parent)
    return out


def test_commit_match_share_and_lru_eviction():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    a = list(range(10))  # 2 full blocks + 2 tokens
    bm.allocate("a", 10)
    assert bm.commit("a", chain(a, 4), 10) == 2
    # a second prompt with the same 8 leading tokens reuses both blocks
    b = [*a[:8], 99, 98, 97]
    hit = bm.match_prefix(chain(b, 4), max_blocks=(len(b) - 1) // 4)
    assert hit == bm.block_table("a")[:2]
    bm.allocate("b", len(b), hit)
    assert [bm.ref_count(x) for x in hit] == [2, 2]
    bm.check_integrity()
    bm.free("a")
    bm.free("b")
    # both keyed blocks wait in the evictable cache; the unkeyed tails are free
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 6 and bm.num_used_blocks == 0
    bm.check_integrity()
    # allocation takes free blocks first, then evicts the least recently used keyed block
    bm.allocate("c", 16)  # 4 free blocks
    assert bm.num_cached_blocks == 2 and bm.num_evictions == 0
    bm.allocate("d", 4)
    assert bm.num_evictions == 1 and bm.num_cached_blocks == 1
    # the survivor is the chain's first block (a sequence's last blocks are evicted first)
    assert bm.match_prefix(chain(a, 4), 2) == [hit[0]]
    bm.check_integrity()


def test_prefix_reuse_counts_evictable_blocks_as_taken():
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    bm.allocate("a", 4)
    bm.commit("a", chain([1, 2, 3, 4], 2), 4)
    bm.free("a")
    hit = bm.match_prefix(chain([1, 2, 3, 4, 5], 2), 2)
    assert len(hit) == 2
    # 2 reused (taken out of the evictable pool) + 1 new: exactly the 3 blocks there are
    assert bm.num_new_blocks_needed("b", 5, hit) == 3
    assert bm.can_allocate("b", 5, hit) and not bm.can_allocate("b", 7, hit)
    with pytest.raises(OutOfBlocksError):
        bm.allocate("b", 7, hit)
    bm.check_integrity()  # the failed allocation changed nothing
    bm.allocate("b", 5, hit)
    assert bm.num_free_blocks == 0
    bm.check_integrity()


def test_duplicate_content_keeps_the_first_block():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    bm.allocate("a", 2)
    bm.allocate("b", 2)  # computed the same block concurrently
    keys = chain([7, 8], 2)
    assert bm.commit("a", keys, 2) == 1
    assert bm.commit("b", keys, 2) == 0  # private copy; freed to the free list
    bm.free("b")
    assert bm.num_cached_blocks == 0
    bm.check_integrity()


def test_fork_shares_blocks_and_copies_the_partial_last_block_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("p", 6)  # blocks: one full, one partial (2 of 4)
    table = bm.block_table("p")
    bm.fork("p", "c1")
    bm.fork("p", "c2")
    assert [bm.ref_count(b) for b in table] == [3, 3]
    assert bm.num_used_blocks == 2
    bm.check_integrity()
    # c1 appends into the shared partial block: copy-on-write
    assert bm.num_new_blocks_needed("c1", 7) == 1
    bm.grow("c1", 7)
    new_last = bm.block_table("c1")[-1]
    assert new_last != table[-1]
    assert bm.take_copies("c1") == [(table[-1], new_last)]
    assert bm.take_copies("c1") == []
    assert bm.ref_count(table[-1]) == 2 and bm.ref_count(table[0]) == 3
    # c2 copies too; then p is the last holder and writes in place
    bm.grow("c2", 7)
    assert len(bm.take_copies("c2")) == 1
    bm.grow("p", 7)
    assert bm.take_copies("p") == [] and bm.block_table("p") == table
    bm.check_integrity()
    for s in ("p", "c1", "c2"):
        bm.free(s)
    assert bm.num_free_blocks == 8
    bm.check_integrity()


def test_fork_at_a_block_boundary_needs_no_copy():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("p", 8)
    bm.fork("p", "c")
    bm.grow("c", 9)
    assert bm.take_copies("c") == [] and bm.ref_count(bm.block_table("c")[-1]) == 1
    bm.check_integrity()


def test_disabled_prefix_caching_never_matches_or_keys():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 4)
    assert bm.commit("a", chain([1, 2, 3, 4], 2), 4) == 0
    bm.free("a")
    assert bm.match_prefix(chain([1, 2, 3, 4], 2), 2) == []
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 4


# -- block keys of requests with images ----------------------------------------------------
IMG = 5  # placeholder token


def _request(rid: str, text: list[int], images: list[tuple[str, int]], tail: list[int]) -> Request:
    """text, then each image's placeholders (key, count), then tail."""
    tokens = list(text)
    imgs = []
    for key, n in images:
        imgs.append(ImageInput(n, key, offset=len(tokens)))
        tokens += [IMG] * n
    return Request(rid, tokens + tail, images=imgs)


def test_different_images_behind_identical_placeholders_never_share_blocks():
    bs = 4
    a = _request("a", [1, 2, 3, 4], [(image_key(b"png-a", "m"), 8)], [9, 9, 9, 9, 9])
    b = _request("b", [1, 2, 3, 4], [(image_key(b"png-b", "m"), 8)], [9, 9, 9, 9, 9])
    assert a.prompt_token_ids == b.prompt_token_ids
    ha = extend_block_hashes(a, bs, len(a.prompt_token_ids))
    hb = extend_block_hashes(b, bs, len(b.prompt_token_ids))
    assert ha[0] == hb[0]  # the text block before the image is shared
    assert all(x != y for x, y in zip(ha[1:], hb[1:]))  # every block from the image on differs
    bm = BlockManager(16, bs, enable_prefix_caching=True)
    bm.allocate("a", len(a.prompt_token_ids))
    bm.commit("a", ha, len(a.prompt_token_ids))
    assert len(bm.match_prefix(hb, 99)) == 1


def test_same_image_at_another_position_does_not_share_blocks():
    bs = 4
    key = image_key(b"png", "m")
    # same tokens, same image, but the image starts one token later inside the same block
    a = _request("a", [1, 2, 3, 4, 1], [(key, 3)], [7, 7, 7, 7, 7, 7, 7])
    b = _request("b", [1, 2, 3, 4, 1, IMG], [(key, 3)], [7, 7, 7, 7, 7, 7])
    b.images[0] = ImageInput(3, key, offset=6)
    a.images[0] = ImageInput(3, key, offset=5)
    a.prompt_token_ids[:] = [1, 2, 3, 4, 1, IMG, IMG, IMG, IMG, 7, 7, 7, 7]
    b.prompt_token_ids[:] = [1, 2, 3, 4, 1, IMG, IMG, IMG, IMG, 7, 7, 7, 7]
    ha = extend_block_hashes(a, bs, 13)
    hb = extend_block_hashes(b, bs, 13)
    assert ha[0] == hb[0]
    assert ha[1] != hb[1] and ha[2] != hb[2]


def test_grid_is_part_of_the_key():
    key = image_key(b"png", "m")
    a = Request("a", [IMG] * 8, images=[ImageInput(8, key, offset=0, grid=(1, 4, 8))])
    b = Request("b", [IMG] * 8, images=[ImageInput(8, key, offset=0, grid=(1, 8, 4))])
    assert extend_block_hashes(a, 4, 8) != extend_block_hashes(b, 4, 8)


def test_unhashed_image_stops_the_chain_at_its_first_placeholder():
    r = _request("r", [1, 2, 3, 4, 5, 6, 7, 8], [("x", 8)], [1, 2, 3, 4])
    r.images[0] = ImageInput(8, None, offset=8)
    assert len(extend_block_hashes(r, 4, len(r.prompt_token_ids))) == 2
    r2 = _request("r2", [1, 2, 3, 4], [("x", 4)], [1, 2, 3, 4])
    r2.images[0] = ImageInput(4, "x", offset=None)
    assert extend_block_hashes(r2, 4, 12) == []


def test_block_hashes_extend_over_outputs():
    r = Request("r", [1, 2, 3, 4, 5, 6])
    assert len(extend_block_hashes(r, 4, 6)) == 1
    r.output_token_ids += [7, 8]
    h = extend_block_hashes(r, 4, 8)
    assert len(h) == 2 and h == chain([1, 2, 3, 4, 5, 6, 7, 8], 4)


# -- long random runs ----------------------------------------------------------------------
class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate (reusing cached prefixes) / grow / fork / commit / free / preempt over a
    small token alphabet, so prompts share prefixes often and the pool is often exhausted.
    A model of each physical block's content (what the executor would have written, copies
    included) checks that a reused block holds exactly the tokens of the prompt reusing it."""

    def __init__(self) -> None:
        super().__init__()
        self.bs = 2
        self.bm = BlockManager(num_blocks=12, block_size=self.bs, enable_prefix_caching=True)
        self.tokens: dict[str, list[int]] = {}  # live sequence -> its tokens
        self.phys: dict[int, list[int | None]] = {}  # block -> slot contents
        self.n = 0

    def _write(self, sid: str, start: int) -> None:
        """The executor: copies first, then the sequence's tokens from ``start`` on."""
        for src, dst in self.bm.take_copies(sid):
            assert self.bm.ref_count(dst) == 1 and self.bm.ref_count(src) >= 1
            self.phys[dst] = list(self.phys[src])
        table = self.bm.block_table(sid)
        for p in range(start, len(self.tokens[sid])):
            block = self.phys.setdefault(table[p // self.bs], [None] * self.bs)
            block[p % self.bs] = self.tokens[sid][p]

    def _commit(self, sid: str) -> None:
        toks = self.tokens[sid]
        self.bm.commit(sid, chain(toks, self.bs), len(toks))

    @rule(
        prompt=st.lists(st.integers(0, 2), min_size=1, max_size=9),
        commit=st.booleans(),
    )
    def allocate(self, prompt: list[int], commit: bool) -> None:
        sid = f"s{self.n}"
        self.n += 1
        hit = self.bm.match_prefix(chain(prompt, self.bs), (len(prompt) - 1) // self.bs)
        for j, b in enumerate(hit):  # reused blocks hold exactly this prompt's tokens
            assert self.phys[b] == prompt[j * self.bs : (j + 1) * self.bs]
        try:
            self.bm.allocate(sid, len(prompt), hit)
        except OutOfBlocksError:
            return
        self.tokens[sid] = list(prompt)
        self._write(sid, len(hit) * self.bs)
        if commit:
            self._commit(sid)

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def grow(self, data: st.DataObject, extra: list[int]) -> None:
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        start = len(self.tokens[sid])
        try:
            self.bm.grow(sid, start + len(extra))
        except OutOfBlocksError:
            return
        self.tokens[sid] += extra
        self._write(sid, start)
        self._commit(sid)

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        sid = f"s{self.n}"
        self.n += 1
        self.bm.fork(parent, sid)
        self.tokens[sid] = list(self.tokens[parent])

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data(), preempt=st.booleans())
    def free(self, data: st.DataObject, preempt: bool) -> None:
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        toks = self.tokens.pop(sid)
        self.bm.free(sid)
        if preempt:  # recompute later: re-admit with whatever prefix is still cached
            self.allocate(toks, commit=True)

    @invariant()
    def integrity(self) -> None:
        self.bm.check_integrity()
        for sid, toks in self.tokens.items():  # every live sequence reads its own tokens
            table = self.bm.block_table(sid)
            got = [self.phys[table[p // self.bs]][p % self.bs] for p in range(len(toks))]
            assert got == toks, sid
        owners = sum(len(self.bm.block_table(s)) for s in self.tokens)
        assert owners == sum(self.bm.ref_count(b) for b in range(self.bm.num_blocks))


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("seed", range(3))
def test_long_random_run_with_sharing_keeps_integrity(seed):
    """Thousands of operations (a longer run than hypothesis' examples)."""
    rng = random.Random(seed)
    bs = 4
    bm = BlockManager(num_blocks=48, block_size=bs, enable_prefix_caching=True)
    live: dict[str, list[int]] = {}
    prefixes = [[rng.randint(0, 3) for _ in range(rng.randint(4, 40))] for _ in range(6)]
    for step in range(4000):
        op = rng.random()
        if op < 0.3 or not live:
            toks = rng.choice(prefixes) + [rng.randint(0, 3) for _ in range(rng.randint(1, 12))]
            hit = bm.match_prefix(chain(toks, bs), (len(toks) - 1) // bs)
            try:
                bm.allocate(f"s{step}", len(toks), hit)
            except OutOfBlocksError:
                continue
            live[f"s{step}"] = toks
            bm.commit(f"s{step}", chain(toks, bs), len(toks))
        elif op < 0.6:
            sid = rng.choice(list(live))
            extra = [rng.randint(0, 3) for _ in range(rng.randint(1, 6))]
            try:
                bm.grow(sid, len(live[sid]) + len(extra))
            except OutOfBlocksError:
                continue
            bm.take_copies(sid)
            live[sid] += extra
            bm.commit(sid, chain(live[sid], bs), len(live[sid]))
        elif op < 0.7:
            parent = rng.choice(list(live))
            bm.fork(parent, f"f{step}")
            live[f"f{step}"] = list(live[parent])
        else:
            sid = rng.choice(list(live))
            num = len(bm.block_table(sid))
            assert bm.free(sid) == num
            del live[sid]
            assert bm.free(sid) == 0  # already freed: nothing
        if step % 50 == 0:
            bm.check_integrity()
    for sid in list(live):
        bm.free(sid)
    bm.check_integrity()
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks
