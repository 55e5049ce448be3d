"""Nova's CPU KV-cache write kernel (``csrc/cpu_kv_write.cpp``) against ``index_copy_``: every
token's keys and values land at its slot and nothing else changes, for fp32/bf16/fp16 and
values that are a strided view of the q/k/v GEMM's output; ``PagedKVCache.write`` goes through
it on a CPU and falls back to ``index_copy_`` for what it does not take; bad slots are errors."""

from __future__ import annotations

import pytest
import torch

from nova.runtime import cpu_kernels
from nova.runtime.kv_cache import PagedKVCache

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def new_kv(tokens: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    """k contiguous; v a view of a wider [tokens, q + k + v] tensor, as the model's."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (2 + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, generator=g).to(dtype)
    v = qkv[:, -kv_heads * head_dim :].view(tokens, kv_heads, head_dim)
    return k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_equals_index_copy(kernels, dtype, tokens):
    cache = PagedKVCache(1, 64, 16, 3, 32, dtype, "cpu")
    ref = PagedKVCache(1, 64, 16, 3, 32, dtype, "cpu")
    for c in (cache, ref):
        c.k[0].fill_(7.0)
        c.v[0].fill_(-7.0)
    slots = torch.randperm(64 * 16, generator=torch.Generator().manual_seed(tokens))[:tokens]
    k, v = new_kv(tokens, 3, 32, dtype, tokens)
    assert tokens == 1 or not v.is_contiguous()
    kernels.kv_write(cache.k[0], cache.v[0], slots, k, v)
    ref.k[0].index_copy_(0, slots, k)
    ref.v[0].index_copy_(0, slots, v)
    assert torch.equal(cache.k[0], ref.k[0]) and torch.equal(cache.v[0], ref.v[0])


def test_paged_cache_write_goes_through_the_kernel(kernels, monkeypatch):
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def kv_write(self, *args):
            calls.append(args[2].shape[0])
            return kernels.kv_write(*args)

    monkeypatch.setattr(cpu_kernels, "load", lambda: Spy())
    cache = PagedKVCache(2, 8, 4, 2, 16, torch.bfloat16, "cpu")
    k, v = new_kv(5, 2, 16, torch.bfloat16)
    slots = torch.tensor([3, 0, 31, 8, 9])
    cache.write(1, slots, k, v)
    assert calls == [5]
    assert torch.equal(cache.k[1][slots], k) and torch.equal(cache.v[1][slots], v)
    assert cache.k[0].abs().sum() == 0  # another layer untouched
    # keys of another dtype take index_copy_ with a cast (not the kernel)
    cache.write(0, slots, k.float(), v.float())
    assert calls == [5] and torch.equal(cache.k[0][slots], k)
    # and with the kernels off the result is the same
    monkeypatch.setenv("NOVA_CPU_KERNELS", "0")
    other = PagedKVCache(2, 8, 4, 2, 16, torch.bfloat16, "cpu")
    other.write(1, slots, k, v)
    assert torch.equal(other.k[1], cache.k[1]) and torch.equal(other.v[1], cache.v[1])


def test_bad_input_is_an_error_naming_the_problem(kernels):
    cache = PagedKVCache(1, 4, 4, 2, 8, torch.float32, "cpu")
    k, v = new_kv(3, 2, 8, torch.float32)
    with pytest.raises(RuntimeError, match="outside the cache's 16 slots"):
        kernels.kv_write(cache.k[0], cache.v[0], torch.tensor([0, 16, 1]), k, v)
    with pytest.raises(RuntimeError, match="outside"):
        kernels.kv_write(cache.k[0], cache.v[0], torch.tensor([0, -1, 1]), k, v)
    with pytest.raises(RuntimeError, match="3 slots for"):
        kernels.kv_write(cache.k[0], cache.v[0], torch.tensor([0, 1, 2]), k[:2], v)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        kernels.kv_write(cache.k[0], cache.v[0], torch.tensor([0, 1, 2]), k.double(), v)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        kernels.kv_write(
            cache.k[0], cache.v[0], torch.tensor([0, 1, 2]), torch.randn(3, 8, 2).transpose(1, 2), v
        )
    with pytest.raises(RuntimeError, match="int64"):
        kernels.kv_write(cache.k[0], cache.v[0], torch.tensor([0, 1, 2]).int(), k, v)
