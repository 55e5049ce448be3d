"""Nova's AMX prefill attention kernel (``csrc/cpu_prefill_attention.cpp``).

Its plain C++ reference of the tile arithmetic (``reference=True``) runs on any CPU, so the
packing of keys and values, the causal masking per query row and the softmax are checked
everywhere against attention computed in fp32 from the gathered keys; on a CPU with AMX the
tiles themselves are checked against the reference and the same fp32 attention. The kernel
reads only its own sequence's keys (poisoned slots elsewhere never reach an output), and bad
arguments are errors that name the problem."""

from __future__ import annotations

import math

import pytest
import torch

from nova.runtime.attention_cpu import CpuPagedAttention, amx_takes, cpu_has_amx

BLOCK = 16


@pytest.fixture(scope="module")
def amx(kernels):
    """The kernels, on a CPU whose AMX tiles the OS grants; elsewhere the AMX checks skip
    (their reference twins below run everywhere)."""
    if not kernels.prefill_attention_amx():
        pytest.skip("needs a CPU with AMX-BF16 (the reference path is tested without it)")
    return kernels


def make_batch(seqs, heads, kv_heads, head_dim, seed=0, num_blocks=256):
    """Random bf16 queries and cache; each (cached, new) sequence on shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks * BLOCK, kv_heads, head_dim, generator=g).bfloat16()
    v = torch.randn(num_blocks * BLOCK, kv_heads, head_dim, generator=g).bfloat16()
    order = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(-(-(c + n) // BLOCK) for c, n in seqs)
    tables, lens, starts = [], [], [0]
    for cached, new in seqs:
        used = -(-(cached + new) // BLOCK)
        tables.append(order[:used] + [0] * (max_blocks - used))
        order = order[used:]
        lens.append(cached + new)
        starts.append(starts[-1] + new)
    q = torch.randn(starts[-1], heads, head_dim, generator=g).bfloat16()
    as_int = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return q, k, v, as_int(tables), as_int(lens), as_int(starts)


def fp32_attention(q, k, v, tables, lens, starts, scale):
    """Each new token over its sequence's keys 0..(cached + its index), in fp32."""
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    out = torch.empty(q.shape, dtype=torch.float32)
    for b, length in enumerate(lens.tolist()):
        t0, t1 = int(starts[b]), int(starts[b + 1])
        cached = length - (t1 - t0)
        slots = torch.tensor(
            [int(tables[b, p // BLOCK]) * BLOCK + p % BLOCK for p in range(length)]
        )
        keys, values = k[slots].float(), v[slots].float()
        later = torch.arange(length)[None, :] > (cached + torch.arange(t1 - t0))[:, None]
        for h in range(heads):
            scores = q[t0:t1, h].float() @ keys[:, h // group].T * scale
            out[t0:t1, h] = scores.masked_fill(later, -math.inf).softmax(-1) @ values[:, h // group]
    return out


# (cached, new) per sequence: fresh prompts, prompts on cached prefixes, one-token "prompts",
# row counts that are not multiples of the 16-row tile, a chunk on a long prefix, and a prompt
# longer than one work item's 512 rows
SHAPES = {
    "mixed": [(0, 5), (16, 62), (3, 40), (100, 1)],
    "fresh": [(0, 78)] * 3,
    "long_prefix": [(1000, 33)],
    "over_one_item": [(0, 600)],
}
# (heads, kv heads, head_dim): GQA 3:1 (the peer model), MHA, and head_dims whose value tiles
# fill the 4 accumulators of a pass exactly, not at all (32) or partly (96: 4 + 2 blocks)
GEOMETRIES = [(9, 3, 64), (8, 8, 128), (4, 2, 32), (6, 2, 96)]


def check(kernels, seqs, heads, kv_heads, head_dim, reference):
    q, k, v, tables, lens, starts = make_batch(seqs, heads, kv_heads, head_dim)
    scale = head_dim**-0.5
    out = kernels.prefill_attention(q, k, v, tables, lens, starts, BLOCK, scale, reference)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    want = fp32_attention(q, k, v, tables, lens, starts, scale)
    # bf16 probabilities and one bf16 rounding of the output (outputs are O(1))
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    return out


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_reference_tiles_match_fp32_attention(kernels, shape, geometry):
    check(kernels, SHAPES[shape], *geometry, reference=True)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_amx_tiles_match_fp32_attention_and_the_reference(amx, shape, geometry):
    out = check(amx, SHAPES[shape], *geometry, reference=False)
    ref = check(amx, SHAPES[shape], *geometry, reference=True)
    # the same products and probabilities; only the order of the fp32 sums differs
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("reference", [True, False])
def test_reads_only_its_own_keys(kernels, reference):
    if not reference and not kernels.prefill_attention_amx():
        pytest.skip("needs a CPU with AMX-BF16")
    seqs = [(5, 20), (0, 9)]
    q, k, v, tables, lens, starts = make_batch(seqs, 6, 2, 64)
    clean = kernels.prefill_attention(q, k, v, tables, lens, starts, BLOCK, 0.125, reference)
    owned = set()
    for b, length in enumerate(lens.tolist()):
        owned |= {int(tables[b, p // BLOCK]) * BLOCK + p % BLOCK for p in range(length)}
    poison = torch.tensor(sorted(set(range(k.shape[0])) - owned))
    k[poison], v[poison] = float("nan"), float("inf")  # other blocks and each block's tail
    out = kernels.prefill_attention(q, k, v, tables, lens, starts, BLOCK, 0.125, reference)
    assert torch.isfinite(out.float()).all()
    assert torch.equal(out, clean)


def test_bad_arguments_are_errors_that_name_them(kernels):
    q, k, v, tables, lens, starts = make_batch([(0, 4), (2, 3)], 4, 2, 64)
    call = kernels.prefill_attention
    with pytest.raises(RuntimeError, match="must be bf16"):
        call(q.float(), k.float(), v.float(), tables, lens, starts, BLOCK, 0.1, True)
    q48, k48, v48, *_ = make_batch([(0, 4), (2, 3)], 4, 2, 48)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        call(q48, k48, v48, tables, lens, starts, BLOCK, 0.1, True)
    with pytest.raises(RuntimeError, match="span q's tokens"):
        call(q[:5], k, v, tables, lens, starts, BLOCK, 0.1, True)
    with pytest.raises(RuntimeError, match="more blocks than its table holds"):
        call(q, k, v, tables, lens + 64, starts, BLOCK, 0.1, True)
    with pytest.raises(RuntimeError, match="new tokens but a context of"):
        call(q, k, v, tables, torch.tensor([4, 1], dtype=torch.int32), starts, BLOCK, 0.1, True)


def test_amx_takes_only_bf16_with_head_dim_a_multiple_of_32():
    assert amx_takes(torch.bfloat16, torch.bfloat16, 64)
    assert not amx_takes(torch.float32, torch.float32, 64)
    assert not amx_takes(torch.bfloat16, torch.bfloat16, 48)
    assert not amx_takes(torch.bfloat16, torch.float32, 64)


def test_backend_prefill_path_choice(kernels):
    backend = CpuPagedAttention(kernels=kernels)
    if backend.amx:
        assert backend.prefill_path(62, 78, torch.bfloat16, 64) == "amx"
        assert backend.prefill_path(256, 2304, torch.bfloat16, 64) == "amx"  # chunk, prefix
        assert backend.prefill_path(2000, 2000, torch.bfloat16, 64) == "amx"
        flash = CpuPagedAttention(kernels=kernels, prefill="causal_sdpa")
        assert flash.prefill_path(62, 78, torch.bfloat16, 64) == "causal_sdpa"
    else:
        with pytest.raises(ValueError, match="AMX"):
            CpuPagedAttention(kernels=kernels, prefill="amx")
    # what the kernel does not take keeps the eager paths' rule, which depends on whether the
    # CPU has AMX: with it, the flash path for fresh prompts; without it, the tiled path
    with_amx = CpuPagedAttention(kernels=kernels, amx_cpu=True)
    assert with_amx.prefill_path(62, 78, torch.float32, 64) == "causal_sdpa"
    assert with_amx.prefill_path(62, 78, torch.bfloat16, 48) == "causal_sdpa"
    assert with_amx.prefill_path(4, 2048, torch.float32, 64) == "tiled"
    without = CpuPagedAttention(kernels=False, amx_cpu=False)
    for q, kv, dtype in (
        (62, 78, torch.float32),
        (62, 78, torch.bfloat16),
        (2000, 2000, torch.bfloat16),
    ):
        assert without.prefill_path(q, kv, dtype, 64) == "tiled"
    assert backend.amx_cpu == (backend.amx or cpu_has_amx())
    assert CpuPagedAttention(prefill="tiled").prefill_path(62, 78, torch.bfloat16, 64) == "tiled"
    flash = CpuPagedAttention(kernels=False, prefill="causal_sdpa", amx_cpu=False)
    assert flash.prefill_path(62, 78, torch.bfloat16, 64) == "causal_sdpa"  # (asked for)
