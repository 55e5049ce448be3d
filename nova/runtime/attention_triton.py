"""Paged attention through the Triton kernel in ``nova.runtime.kernels.paged_attention``.

Reads K/V from the cache in place through the ``PagedBatch``'s block tables, sequence lengths
and query offsets, which are all its metadata. Its launch shape depends only on
``(num_seqs, max_query_len)``, so a decode step through it can be captured in a CUDA graph.
"""

from __future__ import annotations

import os

import torch

from nova.runtime.attention_backend import AttentionBackend, AttentionMetadata, PagedBatch
from nova.runtime.kv_cache import PagedKVCache


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class TritonPagedAttention(AttentionBackend[AttentionMetadata]):
    name = "triton"
    static_shapes = True  # capturable in a CUDA graph for fixed (num_seqs, max_query_len)
    metadata_type = AttentionMetadata  # the PagedBatch alone

    def __init__(self) -> None:
        try:
            from nova.runtime.kernels import paged_attention as kernel
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "attention backend 'triton' needs the triton package (pip install triton)"
            ) from exc
        self._kernel = kernel

    def build_metadata(self, paged: PagedBatch) -> AttentionMetadata:
        return AttentionMetadata(paged)  # views only: valid over refilled static buffers

    def attend(
        self,
        q: torch.Tensor,
        layer: int,
        metadata: AttentionMetadata,
        kv_cache: PagedKVCache,
        scale: float,
    ) -> torch.Tensor:
        paged = metadata.paged
        out = self._kernel.paged_attention(
            q.contiguous(),
            kv_cache.k[layer],
            kv_cache.v[layer],
            paged.block_tables,
            paged.seq_lens,
            paged.query_start_loc,
            paged.max_query_len,
            kv_cache.block_size,
            scale,
        )
        return out.reshape(q.shape[0], -1)
