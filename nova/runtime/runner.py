"""ModelRunner: owns the loaded model, the KV cache tensors and the block accounting.

The stage workers (engine) and the offline ``generate`` call it: ``encode_images`` for the
vision stage, ``forward`` for prefill and decode (same call, different query lengths).
"""
from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from nova.core.block_manager import BlockManager
from nova.models.loader import LoadedModel
from nova.runtime.attention import make_attention_backend
from nova.runtime.cuda_graphs import StaticDecodeRunner, graphs_unavailable_reason
from nova.runtime.forward_batch import SeqInput, build_forward_batch
from nova.runtime.kv_cache import PagedKVCache

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
GPU_ACTIVATION_RESERVE_BYTES = 2 << 30


@dataclass(slots=True, frozen=True)
class CacheConfig:
    """``num_blocks`` wins over ``kv_cache_bytes``; with neither, a device default is used
    (CPU: 1 GiB; CUDA: ``gpu_memory_utilization`` of the GPU minus what is allocated and an
    activation reserve)."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


def _kv_budget_bytes(cfg: CacheConfig, device: torch.device) -> int:
    if cfg.kv_cache_bytes is not None:
        return cfg.kv_cache_bytes
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        used = torch.cuda.memory_allocated(device)
        return int(total * cfg.gpu_memory_utilization) - used - GPU_ACTIVATION_RESERVE_BYTES
    return DEFAULT_CPU_KV_CACHE_BYTES


class ModelRunner:
    def __init__(
        self, loaded: LoadedModel, cache: CacheConfig | None = None,
        attention_backend: str = "auto", cuda_graphs: bool = False, max_num_seqs: int = 64,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        cache = cache or CacheConfig()
        dcfg = self.model.decoder.cfg
        per_block = PagedKVCache.bytes_per_block(
            dcfg.num_layers, cache.block_size, dcfg.num_kv_heads, dcfg.head_dim, loaded.dtype
        )
        num_blocks = cache.num_blocks or _kv_budget_bytes(cache, self.device) // per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget too small for a single block of {per_block} bytes")
        self.block_size = cache.block_size
        self.block_manager = BlockManager(num_blocks, cache.block_size)
        self.attention = make_attention_backend(attention_backend, self.device, cuda_graphs)
        self.model.decoder.set_attention_backend(self.attention)
        no_graphs = "disabled" if not cuda_graphs else graphs_unavailable_reason(
            self.device, self.attention)
        # Decode graphs pad their batch with rows that write a scratch block: one block beyond
        # the block manager's, so no sequence ever owns it.
        self.kv_cache = PagedKVCache(
            dcfg.num_layers, num_blocks + (no_graphs is None), cache.block_size,
            dcfg.num_kv_heads, dcfg.head_dim, loaded.dtype, self.device,
        )
        self.decode_graphs: StaticDecodeRunner | None = None
        if no_graphs is None:
            self.decode_graphs = StaticDecodeRunner(
                self.model, self.kv_cache, max_num_seqs, loaded.max_model_len,
                scratch_block=num_blocks, device=self.device)
        elif cuda_graphs:
            log.info("decode CUDA graphs off: %s", no_graphs)
        log.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB)",
            num_blocks, cache.block_size, self.kv_cache.num_bytes / 2**20,
        )

    @property
    def vocab_size(self) -> int:
        return self.model.decoder.cfg.vocab_size

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, num_image_tokens, hidden] on the model's device."""
        return self.model.encode_images(pixel_values.to(self.device))

    def forward(self, seqs: list[SeqInput], partition_key: Hashable = None) -> torch.Tensor:
        """Run new tokens of several sequences; logits [B, vocab] at each one's last token.

        Each sequence's block table must already cover ``context_len`` tokens. A decode-only
        batch replays the CUDA graph of ``partition_key`` and its batch-size bucket when
        decode graphs are on and it fits (``nova.runtime.cuda_graphs``); otherwise eager.
        """
        if self.decode_graphs is not None:
            logits = self.decode_graphs.run(seqs, partition_key)
            if logits is not None:
                return logits
        batch = build_forward_batch(seqs, self.block_size, self.device)
        return self.model.last_token_logits(batch, self.kv_cache)
