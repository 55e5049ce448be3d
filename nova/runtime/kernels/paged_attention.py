"""A Triton kernel for attention over the paged KV cache, reading blocks in place.

One kernel serves prefill (varlen, causal, on top of a cached context: chunked prefill) and
decode (one query per sequence). Program ``(seq, tile, kv_head)`` takes a tile of query rows of
one sequence and one KV head and streams that sequence's keys/values straight from the cache
through its block table (no gather into a padded copy), with an online softmax in fp32.

Grouped-query attention: the ``GROUP = num_heads // num_kv_heads`` query heads that share a KV
head are packed into the rows of one tile (row ``r`` = query token ``r // GROUP``, head
``kv_head * GROUP + r % GROUP``), so each K/V tile is loaded once for the whole group. A decode
tile is therefore ``GROUP`` rows (padded to 16 for ``tl.dot``), not 16 copies of one row.

Masking invariant: the query at absolute position ``p`` (``p = num_cached + i`` for the ``i``-th
new token) attends the keys at positions ``0..p`` of its own sequence. Rows past the
sequence's new tokens are computed and never stored; every row sees key 0, so no softmax row is
empty.

Shapes are static given ``(num_seqs, max_query_len)``: the grid is ``(num_seqs,
ceil(max_query_len / tokens_per_tile), num_kv_heads)`` and every length is read from device
tensors inside the kernel, so a decode launch can be captured in a CUDA graph.

Importing this module imports ``triton``; set ``TRITON_INTERPRET=1`` before the first import to
run the kernel on CPU tensors (slow; for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    scale,
    stride_q_tok,
    stride_q_head,
    stride_k_slot,
    stride_k_head,
    stride_v_slot,
    stride_v_head,
    stride_o_tok,
    stride_o_head,
    stride_bt_seq,
    PAGE_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TOKENS_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    num_cached = seq_len - q_len
    tok0 = tile * TOKENS_PER_TILE
    if tok0 < q_len:
        rows = tl.arange(0, BLOCK_M)
        row_tok = tok0 + rows // GROUP
        row_head = kv_head * GROUP + rows % GROUP
        row_valid = (rows < TOKENS_PER_TILE * GROUP) & (row_tok < q_len)
        row_pos = num_cached + row_tok  # absolute position of each row's query
        d = tl.arange(0, BLOCK_D)
        d_valid = d < HEAD_DIM
        q_offs = (
            (q_start + row_tok).to(tl.int64)[:, None] * stride_q_tok
            + row_head[:, None] * stride_q_head
            + d[None, :]
        )
        q = tl.load(q_ptr + q_offs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)

        last_tok = tl.minimum(tok0 + TOKENS_PER_TILE, q_len) - 1
        kv_end = num_cached + last_tok + 1  # keys this tile may need: positions [0, kv_end)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start in range(0, kv_end, BLOCK_N):
            k_pos = start + tl.arange(0, BLOCK_N)
            k_valid = k_pos < kv_end
            block = tl.load(
                block_tables_ptr + seq * stride_bt_seq + k_pos // PAGE_SIZE, mask=k_valid, other=0
            )
            slot = block.to(tl.int64) * PAGE_SIZE + k_pos % PAGE_SIZE
            kt = tl.load(  # [BLOCK_D, BLOCK_N]
                k_cache_ptr + slot[None, :] * stride_k_slot + kv_head * stride_k_head + d[:, None],
                mask=k_valid[None, :] & d_valid[:, None],
                other=0.0,
            )
            s = tl.dot(q, kt, input_precision="ieee") if IEEE_FP32 else tl.dot(q, kt)
            s = s * scale
            allowed = (k_pos[None, :] <= row_pos[:, None]) & k_valid[None, :]
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(  # [BLOCK_N, BLOCK_D]
                v_cache_ptr + slot[:, None] * stride_v_slot + kv_head * stride_v_head + d[None, :],
                mask=k_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            if IEEE_FP32:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        o_offs = (
            (q_start + row_tok).to(tl.int64)[:, None] * stride_o_tok
            + row_head[:, None] * stride_o_head
            + d[None, :]
        )
        tl.store(
            out_ptr + o_offs,
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & d_valid[None, :],
        )


def tile_shape(group: int, max_query_len: int) -> tuple[int, int]:
    """(BLOCK_M rows, query tokens per tile). Decode packs one token's GROUP heads (>= 16 rows
    for ``tl.dot``); prefill packs up to 64 rows (or GROUP if that is larger)."""
    min_rows = 16 if max_query_len == 1 else 64
    block_m = max(min_rows, triton.next_power_of_2(group))
    return block_m, max(1, block_m // group)


def paged_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    max_query_len: int,
    page_size: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    _num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last (head_dim) dimension")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"cache dtype {k_cache.dtype} differs from query dtype {q.dtype}")
    group = num_heads // num_kv_heads
    block_m, tokens_per_tile = tile_shape(group, max_query_len)
    num_seqs = block_tables.shape[0]
    out = torch.empty_like(q) if out is None else out
    grid = (num_seqs, triton.cdiv(max_query_len, tokens_per_tile), num_kv_heads)
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        PAGE_SIZE=page_size,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(max(16, head_dim)),
        TOKENS_PER_TILE=tokens_per_tile,
        BLOCK_M=block_m,
        BLOCK_N=64 if max_query_len > 1 else 32,
        IEEE_FP32=q.dtype == torch.float32,
    )
    return out
