"""Nova's C++ CPU kernels (``nova.runtime.cpu_kernels``): decode attention read in place from
the paged cache equals attention over the gathered context, for every dtype, head layout and
block size the engine can use, and the backend's two decode paths agree."""

from __future__ import annotations

import pytest
import torch

from nova.runtime import cpu_kernels
from nova.runtime.attention_backend import PagedBatch
from nova.runtime.attention_cpu import CpuPagedAttention
from nova.runtime.kv_cache import PagedKVCache


def reference(q, k_cache, v_cache, tables, lens, block_size, scale):
    """Attention of each sequence's one query over its context, in float64."""
    b, h, d = q.shape
    group = h // k_cache.shape[1]
    out = torch.zeros(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        if n == 0:
            continue
        pos = torch.arange(n)
        slots = tables[i].long()[pos // block_size] * block_size + pos % block_size
        k, v = k_cache[slots].double(), v_cache[slots].double()  # [n, kv_heads, d]
        for j in range(h):
            p = (q[i, j].double() @ k[:, j // group].T * scale).softmax(-1)
            out[i, j] = p @ v[:, j // group]
    return out


def random_case(dtype, b, heads, kv_heads, d, block_size, max_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = b * (max_len // block_size + 2) + 3
    k_cache = torch.randn(num_blocks * block_size, kv_heads, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, d, generator=g).to(dtype)
    lens = torch.randint(1, max_len + 1, (b,), generator=g, dtype=torch.int32)
    width = (max_len + block_size - 1) // block_size
    # each sequence's blocks scattered through the cache, in no order
    tables = torch.randperm(num_blocks, generator=g)[: b * width].view(b, width).int()
    q = torch.randn(b, heads, d, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, lens


TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.parametrize(
    ("dtype", "heads", "kv_heads", "d", "block_size"),
    [
        (torch.bfloat16, 9, 3, 64, 16),  # the peer model (SmolLM2-135M): the vectorized bf16 path
        (torch.bfloat16, 28, 4, 128, 16),  # Qwen2-VL-7B's layout
        (torch.bfloat16, 8, 8, 64, 32),  # no grouping, another block size
        (torch.bfloat16, 4, 2, 80, 16),  # head_dim not a multiple of 32: the generic path
        (torch.float32, 9, 3, 64, 16),
        (torch.float32, 4, 2, 16, 8),  # the test checkpoints' layout
        (torch.float16, 6, 2, 64, 16),
    ],
)
def test_decode_attention_equals_attention_over_the_gathered_context(
    kernels, dtype, heads, kv_heads, d, block_size
):
    q, k_cache, v_cache, tables, lens = random_case(dtype, 7, heads, kv_heads, d, block_size, 77)
    lens[0], lens[1] = 1, block_size * 2  # one token; whole blocks only
    scale = d**-0.5
    out = kernels.decode_attention(q, k_cache, v_cache, tables, lens, block_size, scale)
    ref = reference(q, k_cache, v_cache, tables, lens, block_size, scale)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_a_sequence_without_context_gets_zeros_and_bad_input_is_refused(kernels):
    q, k_cache, v_cache, tables, lens = random_case(torch.float32, 3, 4, 2, 16, 8, 20)
    lens[1] = 0
    out = kernels.decode_attention(q, k_cache, v_cache, tables, lens, 8, 0.25)
    assert torch.all(out[1] == 0) and torch.all(out[0] != 0)
    with pytest.raises(RuntimeError, match="int32"):
        kernels.decode_attention(q, k_cache, v_cache, tables.long(), lens, 8, 0.25)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        kernels.decode_attention(q[:, :3].contiguous(), k_cache, v_cache, tables, lens, 8, 0.25)
    with pytest.raises(RuntimeError, match="one dtype"):
        kernels.decode_attention(q.double(), k_cache, v_cache, tables, lens, 8, 0.25)


def test_scores_far_below_the_maximum_weigh_nothing(kernels):
    """exp of very negative arguments (the kernel's own vectorized exp) underflows to ~0, not
    to garbage: one key 1000 above the rest takes all the weight."""
    q = torch.ones(1, 1, 32)
    k_cache = torch.zeros(16, 1, 32)
    k_cache[3] = 100.0  # q . k = 3200, scaled by 1: every other score is 3200 below
    v_cache = torch.arange(16.0)[:, None, None].expand(16, 1, 32).contiguous()
    out = kernels.decode_attention(
        q,
        k_cache,
        v_cache,
        torch.tensor([[0]], dtype=torch.int32),
        torch.tensor([16], dtype=torch.int32),
        16,
        1.0,
    )
    torch.testing.assert_close(out, torch.full((1, 1, 32), 3.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_backends_kernel_and_eager_decode_paths_agree(kernels, dtype):
    """``CpuPagedAttention`` with the kernel against itself without (gather + two bmm's), for
    a decode batch through the paged KV cache as the model calls it."""
    torch.manual_seed(0)
    cache = PagedKVCache(2, 40, 16, 3, 64, dtype, "cpu")
    for layer in range(2):
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    lens = torch.tensor([5, 37, 16, 60], dtype=torch.int32)
    tables = torch.tensor(
        [[3, 0, 0, 0], [7, 1, 9, 0], [2, 0, 0, 0], [4, 5, 6, 8]], dtype=torch.int32
    )
    slots = torch.stack(
        [tables[i, (lens[i] - 1) // 16] * 16 + (lens[i] - 1) % 16 for i in range(4)]
    )
    paged = PagedBatch(
        slot_mapping=slots.long(),
        query_start_loc=torch.arange(5, dtype=torch.int32),
        seq_lens=lens,
        block_tables=tables,
        block_size=16,
        max_query_len=1,
        max_seq_len=int(lens.max()),
    )
    q = torch.randn(4, 9, 64).to(dtype)
    fast, eager = CpuPagedAttention(kernels=kernels), CpuPagedAttention(kernels=False)
    assert fast.kernels is kernels and eager.kernels is None
    for layer in range(2):
        a = fast.attend(q, layer, fast.build_metadata(paged), cache, 0.125)
        b = eager.attend(q, layer, eager.build_metadata(paged), cache, 0.125)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_kernels_off_and_a_failed_build(monkeypatch):
    monkeypatch.setenv("NOVA_CPU_KERNELS", "0")
    assert cpu_kernels.mode() == "off" and cpu_kernels.load() is None
    monkeypatch.setenv("NOVA_CPU_KERNELS", "require")
    assert cpu_kernels.mode() == "require"
    monkeypatch.setenv("NOVA_CPU_KERNELS", "1")
    assert cpu_kernels.mode() == "on"


def test_the_build_key_follows_the_source_and_the_cpu(monkeypatch):
    key = cpu_kernels.build_key()
    monkeypatch.setattr(cpu_kernels, "_cpu_identity", lambda: "another cpu")
    assert cpu_kernels.build_key() != key and len(key) == 16
