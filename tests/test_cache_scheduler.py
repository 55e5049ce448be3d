"""The scheduler with both caches and forks, torch-free: prefix hits planned and admitted for
the uncached suffix only, shared blocks counted once, encoder-cache hits skipping vision, n > 1
sharing the prompt's blocks, and outputs equal with the caches on and off (a paged fake
executor reads every token back from the KV slots the block tables name)."""

from __future__ import annotations

import random

import pytest

from nova.core.block_manager import BlockManager
from nova.core.encoder_cache import EncoderCacheAccounting
from nova.core.policy import StageLimits, make_policy
from nova.core.scheduler import Scheduler
from nova.executor.fake import FakeExecutor
from nova.sampling_params import SamplingParams
from nova.types import STAGES, ImageInput, Request, RequestEvent, RequestStatus, Stage

BS = 4
IMG = 999


def make(
    num_blocks: int = 64,
    caching: bool = True,
    encoder_bytes: int = 0,
    policy: str = "multi_stream",
    **limits: int,
) -> Scheduler:
    return Scheduler(
        make_policy(policy, limits=StageLimits(**limits)),
        BlockManager(num_blocks, BS, enable_prefix_caching=caching),
        encoder_cache=EncoderCacheAccounting(encoder_bytes, 1),
    )


def request(
    rid: str,
    tokens: list[int],
    max_tokens: int = 3,
    images: list[tuple[str, int, int]] = (),  # (key, offset, count)
    seed: int | None = None,
    temperature: float = 0.0,
) -> Request:
    imgs = [ImageInput(n, key, off) for key, off, n in images]
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=seed, temperature=temperature)
    return Request(rid, list(tokens), sp, imgs)


def drain(s: Scheduler, ex: FakeExecutor, now: float = 0.0, check: bool = True) -> float:
    """Run every stage until nothing is left (one batch per stage per round)."""
    for _ in range(10_000):
        if not s.has_unfinished():
            return now
        progressed = False
        for stage in STAGES:
            batch = s.schedule(stage, now)
            if batch is None:
                continue
            progressed = True
            now += 1.0
            result = ex.execute(batch)
            result.end_s = now
            s.complete(result, now)
            s.take_events()
            if check:
                s.block_manager.check_integrity()
                s.encoder_cache.check_integrity()
        if not progressed:
            raise AssertionError("stalled")
    raise AssertionError("did not finish")


def run(reqs: list[Request], s: Scheduler, sequential: bool = True) -> list[list[int]]:
    ex = FakeExecutor(block_size=BS)
    now = 0.0
    for r in reqs:
        s.add_request(r, now)
        if sequential:
            now = drain(s, ex, now)
    drain(s, ex, now)
    return [r.output_token_ids for r in reqs]


def test_prefix_hit_is_admitted_planned_and_costed_for_the_suffix_only():
    shared = list(range(1, 38))  # 37 tokens: 9 full blocks + 1
    s = make()
    ex = FakeExecutor(block_size=BS)
    a = request("a", [*shared, 50, 51])
    s.add_request(a, 0.0)
    drain(s, ex)
    b = request("b", [*shared, 60, 61, 62])
    s.add_request(b, 10.0)
    assert b.prefix_hit_tokens == 36  # probed on entering the prefill queue
    assert b.num_uncached_prompt_tokens == len(b.prompt_token_ids) - 36
    batch = s.schedule(Stage.PREFILL, 10.0)
    [item] = batch.items
    assert item.num_cached_tokens == 36 and item.token_ids == tuple(b.prompt_token_ids[36:])
    assert batch.num_tokens == 4  # the cost model sees the uncached suffix
    assert b.num_cached_prompt_tokens == 36
    assert s.block_manager.num_hit_tokens == 36
    assert s.block_manager.num_queried_tokens == len(a.prompt_token_ids) + len(b.prompt_token_ids)


def test_a_hit_never_covers_the_whole_prompt():
    s = make()
    ex = FakeExecutor(block_size=BS)
    tokens = list(range(1, 17))  # exactly 4 blocks
    s.add_request(request("a", tokens), 0.0)
    drain(s, ex)
    b = request("b", tokens)
    s.add_request(b, 5.0)
    [item] = s.schedule(Stage.PREFILL, 5.0).items
    assert item.num_cached_tokens == 12 and len(item.token_ids) == 4  # one block recomputed


def test_outputs_equal_with_caching_on_and_off():
    rng = random.Random(0)
    prefixes = [[rng.randint(1, 50) for _ in range(rng.randint(5, 30))] for _ in range(3)]

    def workload() -> list[Request]:
        r = random.Random(1)
        return [
            request(
                f"r{i}",
                r.choice(prefixes) + [r.randint(1, 50) for _ in range(r.randint(1, 9))],
                max_tokens=r.randint(1, 6),
            )
            for i in range(30)
        ]

    on = make(num_blocks=48, caching=True)
    off = make(num_blocks=48, caching=False)
    assert run(workload(), on) == run(workload(), off)
    assert on.block_manager.num_hit_tokens > 0
    # concurrently too (preemptions, shared blocks in flight)
    on2, off2 = make(num_blocks=24), make(num_blocks=24, caching=False)
    assert run(workload(), on2, sequential=False) == run(workload(), off2, sequential=False)


def test_kv_admission_counts_shared_blocks_once():
    prefix = list(range(1, 33))  # 8 blocks
    s = make(num_blocks=12)
    ex = FakeExecutor(block_size=BS)
    a = request("a", [*prefix, 40], max_tokens=10)
    s.add_request(a, 0.0)
    # a prefills and keeps decoding (9 blocks held)
    while a.status is not RequestStatus.DECODING:
        drain_one(s, ex, Stage.PREFILL)
    # b shares a's 8 blocks: it needs 1 new block, which fits next to a's 9 of 12
    b = request("b", [*prefix, 41, 42], max_tokens=1)
    s.add_request(b, 1.0)
    batch = s.schedule(Stage.PREFILL, 1.0)
    assert batch is not None and batch.items[0].num_cached_tokens == 32
    assert s.block_manager.num_used_blocks == 10  # 9 + 1, the 8 shared counted once


def drain_one(s: Scheduler, ex: FakeExecutor, stage: Stage, now: float = 0.0) -> None:
    batch = s.schedule(stage, now)
    assert batch is not None
    res = ex.execute(batch)
    s.complete(res, now)


def test_different_images_behind_identical_placeholders_do_not_share_kv():
    text = list(range(1, 9))
    tokens = text + [IMG] * 8 + [70, 71, 72]
    s = make(encoder_bytes=100)
    ex = FakeExecutor(block_size=BS)
    a = request("a", tokens, images=[("img-a", 8, 8)])
    s.add_request(a, 0.0)
    drain(s, ex)
    b = request("b", tokens, images=[("img-b", 8, 8)])
    s.add_request(b, 5.0)
    drain_one(s, ex, Stage.VISION, 5.0)
    pb = s.schedule(Stage.PREFILL, 6.0)
    assert pb.items[0].num_cached_tokens == 8  # the text before the image only
    s.complete(ex.execute(pb), 7.0)
    drain(s, ex, 7.0)
    c = request("c", tokens, images=[("img-a", 8, 8)])
    s.add_request(c, 20.0)
    [item] = s.schedule(Stage.PREFILL, 20.0).items  # img-a's KV is reused (no vision either)
    assert item.num_cached_tokens == 16


def test_encoder_cache_hits_skip_vision_and_misses_alone_are_encoded():
    s = make(encoder_bytes=100)
    ex = FakeExecutor(block_size=BS)
    tokens = [1] + [IMG] * 4 + [2] + [IMG] * 4 + [3]
    a = request("a", tokens, images=[("k1", 1, 4), ("k2", 6, 4)])
    s.add_request(a, 0.0)
    assert a.status is RequestStatus.WAITING_VISION and a.encoder_cache_hits == [False, False]
    vb = s.schedule(Stage.VISION, 0.0)
    assert vb.items[0].encode_images == (0, 1) and vb.items[0].cache_images == (0, 1)
    assert "k1" not in s.encoder_cache  # pending until the batch completes
    s.complete(ex.execute(vb), 1.0)
    assert "k1" in s.encoder_cache and "k2" in s.encoder_cache
    drain(s, ex, 1.0)
    # all hits: straight to prefill
    b = request("b", tokens, images=[("k1", 1, 4), ("k2", 6, 4)])
    s.add_request(b, 10.0)
    assert b.status is RequestStatus.WAITING_PREFILL and b.encoder_cache_hits == [True, True]
    drain(s, ex, 10.0)
    # one hit, one miss: vision encodes the miss only
    c = request("c", tokens, images=[("k1", 1, 4), ("k3", 6, 4)])
    s.add_request(c, 20.0)
    vb = s.schedule(Stage.VISION, 20.0)
    assert vb.items[0].encode_images == (1,) and vb.num_images == 1
    s.complete(ex.execute(vb), 21.0)
    drain(s, ex, 21.0)
    enc = s.encoder_cache
    assert (enc.num_queried_images, enc.num_hit_images) == (6, 3)


def test_encoder_cache_is_bounded_lru_and_never_evicts_pinned_entries():
    s = make(encoder_bytes=8)  # two 4-token images
    ex = FakeExecutor(block_size=BS)
    tokens = [1] + [IMG] * 4 + [2]
    for i, key in enumerate(("k1", "k2")):
        s.add_request(request(f"r{i}", tokens, images=[(key, 1, 4)]), float(i))
        drain(s, ex, float(i))
    # k3 evicts the least recently used (k1); the batch carries the eviction
    r3 = request("r3", tokens, images=[("k3", 1, 4)])
    s.add_request(r3, 5.0)
    vb = s.schedule(Stage.VISION, 5.0)
    assert vb.evict_mm_hashes == ("k1",)
    s.complete(ex.execute(vb), 6.0)
    # r3 holds k3 pinned until its prefill; k2 is pinned by r4 (a hit) -> k5 cannot fit
    r4 = request("r4", tokens, images=[("k2", 1, 4)])
    s.add_request(r4, 7.0)
    r5 = request("r5", tokens, images=[("k5", 1, 4)])
    s.add_request(r5, 7.0)
    vb = s.schedule(Stage.VISION, 7.0)
    assert vb.items[0].request_id == "r5" and vb.items[0].cache_images == ()
    assert vb.evict_mm_hashes == ()
    s.complete(ex.execute(vb), 8.0)
    s.encoder_cache.check_integrity()
    drain(s, ex, 8.0)
    assert s.encoder_cache.used_bytes <= 8 and s.encoder_cache.pinned_keys("r3") == set()


def test_forks_share_the_prompt_and_match_n_equals_1():
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks + a partial one
    s = make(caching=False)
    ex = FakeExecutor(block_size=BS)
    parent = request("p", prompt, max_tokens=5)
    forks = [request(f"p-{i}", prompt, max_tokens=5) for i in (1, 2)]
    s.add_request(parent, 0.0, forks)
    pb = s.schedule(Stage.PREFILL, 0.0)
    assert pb.items[0].fork_ids == ("p-1", "p-2") and len(pb.items) == 1
    events = s.complete(ex.execute(pb), 1.0)
    assert sorted(e.request_id for e in events) == ["p", "p-1", "p-2"]
    bm = s.block_manager
    table = bm.block_table("p")
    assert all(bm.block_table(f.request_id) == table for f in forks)
    assert [bm.ref_count(b) for b in table] == [3, 3, 3]  # the prompt's blocks, shared
    db = s.schedule(Stage.DECODE, 1.0)
    copies = [it.block_copies for it in db.items]
    assert sum(len(c) for c in copies) == 2  # two of three copy the shared partial block
    s.complete(ex.execute(db), 2.0)
    drain(s, ex, 2.0)
    alone = run([request("q", prompt, max_tokens=5)], make(caching=False))[0]
    assert parent.output_token_ids == alone
    assert all(f.output_token_ids == alone for f in forks)
    assert bm.num_free_blocks == bm.num_blocks


def test_aborting_a_parent_before_its_prefill_ends_its_forks():
    s = make()
    parent = request("p", list(range(1, 9)))
    forks = [request("p-1", list(range(1, 9)))]
    s.add_request(parent, 0.0, forks)
    assert s.abort("p", 1.0) == RequestEvent("p", (), True, "abort")
    assert s.take_events() == [RequestEvent("p-1", (), True, "abort", None)]
    assert forks[0].status is RequestStatus.ABORTED and not s.has_unfinished()
    # a waiting fork can be aborted alone
    s.add_request(request("x", [1, 2, 3]), 2.0, [request("x-1", [1, 2, 3])])
    assert s.abort("x-1", 2.0) is not None
    drain(s, FakeExecutor(block_size=BS), 2.0)
    assert s.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("seed", range(3))
def test_random_concurrent_runs_with_forks_caches_and_preemption(seed):
    """Many requests with shared prefixes, images and n > 1 through a small KV cache (so
    preemptions happen): outputs as with no cache and n = 1 each; invariants after every
    batch; nothing leaks."""
    rng = random.Random(seed)
    prefixes = [[rng.randint(1, 40) for _ in range(rng.randint(4, 24))] for _ in range(3)]
    specs = []
    for i in range(25):
        toks = rng.choice(prefixes) + [rng.randint(1, 40) for _ in range(rng.randint(1, 6))]
        images = []
        if rng.random() < 0.4:
            off = len(toks)
            toks = toks + [IMG] * 4 + [rng.randint(1, 40)]
            images = [(f"img{rng.randint(0, 3)}", off, 4)]
        specs.append((f"r{i}", toks, rng.randint(1, 8), images, rng.choice([1, 1, 2, 3])))

    def build(n_forks: bool) -> tuple[list[Request], list[list[Request]]]:
        reqs, forks = [], []
        for rid, toks, mt, images, n in specs:
            reqs.append(request(rid, toks, mt, images))
            forks.append(
                [request(f"{rid}-{k}", toks, mt, images) for k in range(1, n)] if n_forks else []
            )
        return reqs, forks

    s = make(num_blocks=14, encoder_bytes=12)
    ex = FakeExecutor(block_size=BS)
    reqs, forks = build(True)
    now = 0.0
    for r, f in zip(reqs, forks):
        s.add_request(r, now, f)
        now += 0.5
        if rng.random() < 0.3:
            now = drain(s, ex, now)
    drain(s, ex, now)
    assert s.state.num_preemptions > 0  # the small cache forces recomputes
    base = make(num_blocks=400, caching=False)
    plain, _ = build(False)
    expect = run(plain, base, sequential=False)
    for r, f, want in zip(reqs, forks, expect):
        assert r.output_token_ids == want
        assert all(x.output_token_ids == want for x in f)
    bm = s.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks
    assert not any(s.encoder_cache.pinned_keys(r.request_id) for r in reqs)
