"""Decode CUDA graphs: bucket choice, eager fallback, padding to a scratch slot. On a CPU the
padded static-shape decode step runs eagerly (Triton kernel in the interpreter) and must equal
the unpadded SDPA forward without touching any real sequence's cache; on a GPU the same step is
captured and replayed."""

from __future__ import annotations

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

import pytest  # noqa: E402

from nova.models.loader import load_model  # noqa: E402
from nova.runtime.attention_sdpa import SdpaPagedAttention  # noqa: E402
from nova.runtime.cuda_graphs import (  # noqa: E402
    StaticDecodeRunner,
    batch_buckets,
    eager_reason,
    graphs_unavailable_reason,
    pick_bucket,
)
from nova.runtime.forward_batch import SeqInput  # noqa: E402
from nova.runtime.runner import CacheConfig, ModelRunner  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BLOCK, NUM_BLOCKS = 4, 48
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 33)), [99, 98], [1, 2, 3, 4, 5]]


def test_buckets_and_pick():
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 48, 64)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert batch_buckets(1) == (1,)
    for max_seqs in (1, 5, 16, 40, 64):
        buckets = batch_buckets(max_seqs)
        for n in range(1, max_seqs + 1):
            b = pick_bucket(n, buckets)
            assert b is not None and b >= n
            assert all(c < n for c in buckets if c < b), "not the smallest bucket that fits"
        assert pick_bucket(max_seqs + 1, buckets) is None


def test_eager_reason():
    buckets = batch_buckets(4)
    dec = [SeqInput([1], 5, [0, 1]), SeqInput([2], 1, [2])]
    assert eager_reason(dec, buckets, max_blocks_per_seq=4) is None
    assert "decode" in eager_reason([SeqInput([1, 2], 0, [0])], buckets, 4)
    img = [SeqInput([1], 3, [0], mm_embeds=torch.zeros(1, 8))]
    assert "image" in eager_reason(img, buckets, 4)
    assert "largest bucket" in eager_reason([SeqInput([1], 0, [i]) for i in range(5)], buckets, 4)
    assert "block table" in eager_reason([SeqInput([1], 16, [0, 1, 2, 3, 4])], buckets, 4)
    assert eager_reason([], buckets, 4) == "empty batch"


def test_graphs_off_on_cpu_and_for_dynamic_backends(tiny_dirs):
    assert "CUDA device" in graphs_unavailable_reason(torch.device("cpu"), object())
    assert "triton" in graphs_unavailable_reason(torch.device("cuda"), SdpaPagedAttention())
    runner = ModelRunner(
        load_model(tiny_dirs["llama"]),
        CacheConfig(block_size=4, num_blocks=16),
        attention_backend="sdpa",
        cuda_graphs=True,
    )
    assert runner.decode_graphs is None
    assert runner.kv_cache.num_blocks == 16  # no scratch block without graphs (or padding)
    with pytest.raises(ValueError, match="static shapes"):
        StaticDecodeRunner(
            runner.model, runner.kv_cache, 4, 64, 15, "cpu", attention=SdpaPagedAttention()
        )


def _prefill(runner: ModelRunner) -> list[list[int]]:
    bm = runner.block_manager
    runner.forward([SeqInput(p, 0, bm.allocate(str(i), len(p))) for i, p in enumerate(PROMPTS)])
    return [list(p) for p in PROMPTS]


def _decode_step(runner: ModelRunner, hist: list[list[int]], rows: list[int], step: int):
    seqs = []
    for i in rows:
        hist[i].append(60 + 3 * i + step)
        runner.block_manager.grow(str(i), len(hist[i]))
        seqs.append(
            SeqInput([hist[i][-1]], len(hist[i]) - 1, runner.block_manager.block_table(str(i)))
        )
    return seqs


def test_padded_static_decode_equals_unpadded_forward(tiny_dirs):
    """Decode batches of 5, 3, 1 and 2 rows (buckets 8, 4, 1, 2) through static padded buffers
    equal the plain SDPA forward; padding writes only the scratch block."""
    ref = ModelRunner(
        load_model(tiny_dirs["llama"], device=DEVICE),
        CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS),
        attention_backend="sdpa",
    )
    run = ModelRunner(
        load_model(tiny_dirs["llama"], device=DEVICE),
        CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS),
        attention_backend="triton",
    )
    scratch = NUM_BLOCKS - 1
    static = StaticDecodeRunner(
        run.model,
        run.kv_cache,
        max_num_seqs=8,
        max_model_len=64,
        scratch_block=scratch,
        device=DEVICE,
        attention=run.attention,
        use_graphs=DEVICE == "cuda",
    )
    hist_ref, hist_run = _prefill(ref), _prefill(run)
    schedule = [
        ([0, 1, 2, 3, 4], "p0"),
        ([4, 1, 0], "p0"),
        ([2], "p1"),
        ([3, 0], "p0"),
        ([0, 1, 2, 3, 4], "p1"),
    ]
    for step, (rows, key) in enumerate(schedule):
        want = ref.forward(_decode_step(ref, hist_ref, rows, step))
        got = static.run(_decode_step(run, hist_run, rows, step), partition_key=key)
        assert got is not None and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert static.stats.replays == len(schedule)
    assert set(static._entries) == {("p0", 8), ("p0", 4), ("p1", 1), ("p0", 2), ("p1", 8)}
    # The scratch block was never handed out, so padding rows wrote only there.
    owned = {b for i in range(len(PROMPTS)) for b in run.block_manager.block_table(str(i))}
    assert scratch not in owned
    sl = slice(scratch * BLOCK, (scratch + 1) * BLOCK)
    for layer in range(run.kv_cache.num_layers):
        keep = torch.ones(run.kv_cache.k[layer].shape[0], dtype=torch.bool)
        keep[sl] = False
        torch.testing.assert_close(
            run.kv_cache.k[layer][keep], ref.kv_cache.k[layer][keep], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            run.kv_cache.v[layer][keep], ref.kv_cache.v[layer][keep], atol=1e-5, rtol=0
        )
    assert run.kv_cache.k[0][scratch * BLOCK].abs().sum() > 0  # padding K/V landed there
    assert run.kv_cache.k[0][scratch * BLOCK + 1 : (scratch + 1) * BLOCK].abs().sum() == 0


def test_static_decode_through_a_phase_split_backend(tiny_dirs):
    """What ``auto`` with a measured table gives under CUDA graphs: triton for decode, another
    backend for prefill. The static runner builds the decode phase's metadata over its buffers
    and matches the plain SDPA forward."""
    from nova.runtime.attention_backend import PhaseSplitAttention
    from nova.runtime.attention_triton import TritonPagedAttention

    ref = ModelRunner(
        load_model(tiny_dirs["llama"], device=DEVICE),
        CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS),
        attention_backend="sdpa",
    )
    run = ModelRunner(
        load_model(tiny_dirs["llama"], device=DEVICE),
        CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS),
        attention_backend="sdpa",
    )
    split = PhaseSplitAttention(TritonPagedAttention(), SdpaPagedAttention())
    run.model.decoder.set_attention_backend(split)
    run.attention = split
    static = StaticDecodeRunner(
        run.model,
        run.kv_cache,
        max_num_seqs=4,
        max_model_len=64,
        scratch_block=NUM_BLOCKS - 1,
        device=DEVICE,
        attention=split,
        use_graphs=DEVICE == "cuda",
    )
    hist_ref, hist_run = _prefill(ref), _prefill(run)  # prefill through the sdpa phase
    for step, rows in enumerate([[0, 2, 4], [1, 3, 0], [2]]):  # bucket 4 twice
        want = ref.forward(_decode_step(ref, hist_ref, rows, step))
        got = static.run(_decode_step(run, hist_run, rows, step))
        assert got is not None
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert static.stats.replays == 3 and len(static._entries) == 2


def test_static_runner_falls_back_for_prefill(tiny_dirs):
    run = ModelRunner(
        load_model(tiny_dirs["llama"], device=DEVICE),
        CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS),
        attention_backend="triton",
    )
    static = StaticDecodeRunner(
        run.model,
        run.kv_cache,
        max_num_seqs=4,
        max_model_len=64,
        scratch_block=NUM_BLOCKS - 1,
        device=DEVICE,
        attention=run.attention,
        use_graphs=False,
    )
    seqs = [SeqInput([1, 2, 3], 0, run.block_manager.allocate("a", 3))]
    assert static.run(seqs) is None
    assert static.stats.replays == 0 and sum(static.stats.eager.values()) == 1


# -- on a GPU ----------------------------------------------------------------------------------
@gpu
@needs_cuda
def test_gpu_graph_replay_equals_eager(tiny_dirs):
    """ModelRunner with decode graphs (captured lazily per partition key and bucket) against
    the same runner without graphs, over decode steps of varying batch size."""
    out = {}
    for graphs in (False, True):
        runner = ModelRunner(
            load_model(tiny_dirs["qwen2"], device="cuda"),
            CacheConfig(block_size=16, num_blocks=64),
            attention_backend="triton",
            cuda_graphs=graphs,
            max_num_seqs=8,
        )
        assert (runner.decode_graphs is not None) == graphs
        hist = _prefill(runner)
        steps = []
        for step, rows in enumerate([[0, 1, 2, 3, 4], [1, 2], [0, 1, 2, 3, 4], [3]]):
            steps.append(
                runner.forward(
                    _decode_step(runner, hist, rows, step), partition_key="decode-0.5"
                ).cpu()
            )
        out[graphs] = steps
        if graphs:
            stats = runner.decode_graphs.stats
            assert stats.captured == [("decode-0.5", 8), ("decode-0.5", 2), ("decode-0.5", 1)]
            assert stats.replays == 4
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


@gpu
@needs_cuda
def test_gpu_graph_capture_on_a_side_stream(tiny_dirs):
    """The executor runs each stage on its own stream: capture and replay there work too."""
    runner = ModelRunner(
        load_model(tiny_dirs["llama"], device="cuda"),
        CacheConfig(block_size=16, num_blocks=64),
        attention_backend="triton",
        cuda_graphs=True,
        max_num_seqs=4,
    )
    hist = _prefill(runner)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        a = runner.forward(_decode_step(runner, hist, [0, 1, 2], 0), partition_key=None)
        b = runner.forward(_decode_step(runner, hist, [0, 1, 2], 1), partition_key=None)
    stream.synchronize()
    assert runner.decode_graphs.stats.captured == [(None, 4)]
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and not torch.equal(a, b)
