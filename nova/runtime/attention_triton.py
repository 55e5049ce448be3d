"""Paged attention through the Triton kernel in ``nova.runtime.kernels.paged_attention``.

Same call as ``SdpaPagedAttention``; reads K/V from the cache in place through
``ForwardBatch.block_tables`` / ``seq_lens`` / ``query_start_loc``. Its launch shape depends only
on ``(num_seqs, max_query_len)``, so a decode step through it can be captured in a CUDA graph.
"""

from __future__ import annotations

import os

import torch

from nova.runtime.forward_batch import ForwardBatch
from nova.runtime.kv_cache import PagedKVCache


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class TritonPagedAttention:
    name = "triton"
    needs_gather_views = False  # reads the paged cache in place
    static_shapes = True  # capturable in a CUDA graph for fixed (num_seqs, max_query_len)

    def __init__(self) -> None:
        try:
            from nova.runtime.kernels import paged_attention as kernel
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "attention backend 'triton' needs the triton package (pip install triton)"
            ) from exc
        self._kernel = kernel

    def __call__(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        layer: int,
        batch: ForwardBatch,
        kv_cache: PagedKVCache,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        batch.require_paged_metadata("triton")
        kv_cache.write(layer, batch.slot_mapping, k, v)
        out = self._kernel.paged_attention(
            q.contiguous(),
            kv_cache.k[layer],
            kv_cache.v[layer],
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            batch.max_query_len,
            kv_cache.block_size,
            scale,
        )
        return out.reshape(q.shape[0], -1)
