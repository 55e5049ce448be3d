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
from nova.gpu.memory import MemoryReport, module_bytes
from nova.gpu.offload import LayerStreamer, StreamOps, stream_vision_layers
from nova.models.loader import LoadedModel
from nova.models.mm import VisionInput
from nova.runtime.attention import make_attention_backend
from nova.runtime.cuda_graphs import StaticDecodeRunner, graphs_unavailable_reason
from nova.runtime.forward_batch import SeqInput, build_forward_batch
from nova.runtime.host_memory import keep_freed_host_memory
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
    prefix_caching: bool = False
    # device memory set aside for the encoder cache (taken out of a KV cache sized from memory)
    encoder_cache_bytes: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


def _kv_budget_bytes(cfg: CacheConfig, device: torch.device, freed_bytes: int = 0) -> int:
    """Bytes for the KV cache. ``freed_bytes``: device memory vision weight streaming freed; it
    goes to the KV cache unless the size was given. On CUDA it is already out of
    ``memory_allocated`` (streaming is set up first); the CPU default adds it explicitly."""
    if cfg.kv_cache_bytes is not None:
        return cfg.kv_cache_bytes
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        used = torch.cuda.memory_allocated(device)
        return (
            int(total * cfg.gpu_memory_utilization)
            - used
            - GPU_ACTIVATION_RESERVE_BYTES
            - cfg.encoder_cache_bytes
        )
    return DEFAULT_CPU_KV_CACHE_BYTES + freed_bytes


def _activation_reserve_bytes(cfg: CacheConfig, device: torch.device) -> int:
    sized_from_memory = cfg.num_blocks is None and cfg.kv_cache_bytes is None
    return GPU_ACTIVATION_RESERVE_BYTES if sized_from_memory and device.type == "cuda" else 0


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        cache: CacheConfig | None = None,
        attention_backend: str = "auto",
        cuda_graphs: bool = False,
        max_num_seqs: int = 64,
        vision_offload_layers: int = 0,
        offload_ops: StreamOps | None = None,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        if self.device.type == "cpu":
            keep_freed_host_memory()
        cache = cache or CacheConfig()
        dcfg = self.model.decoder.cfg
        per_block = PagedKVCache.bytes_per_block(
            dcfg.num_layers, cache.block_size, dcfg.num_kv_heads, dcfg.head_dim, loaded.dtype
        )
        # Vision weight streaming (K slots) first, so the KV cache gets the memory it frees.
        self.vision_streamer: LayerStreamer | None = None
        if vision_offload_layers > 0:
            if self.model.vision is None:
                raise ValueError("--vision-offload-layers needs a model with a vision encoder")
            self.vision_streamer = stream_vision_layers(
                self.model.vision, vision_offload_layers, self.device, offload_ops
            )
        freed = self.vision_streamer.stats.saved_bytes if self.vision_streamer else 0
        num_blocks = cache.num_blocks or _kv_budget_bytes(cache, self.device, freed) // per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget too small for a single block of {per_block} bytes")
        self.block_size = cache.block_size
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.prefix_caching)
        self.attention = make_attention_backend(attention_backend, self.device, cuda_graphs)
        self.model.decoder.set_attention_backend(self.attention)
        no_graphs = (
            "disabled"
            if not cuda_graphs
            else graphs_unavailable_reason(self.device, self.attention)
        )
        # Decode graphs pad their batch with rows that write a scratch block, and gathering
        # backends pad contexts with reads of it: one block beyond the block manager's, so no
        # sequence ever owns it (graph padding rows write finite values only).
        scratch = no_graphs is None or self.attention.needs_pad_slot
        self.kv_cache = PagedKVCache(
            dcfg.num_layers,
            num_blocks + scratch,
            cache.block_size,
            dcfg.num_kv_heads,
            dcfg.head_dim,
            loaded.dtype,
            self.device,
        )
        if scratch:
            self.kv_cache.pad_slot = num_blocks * cache.block_size
        self.decode_graphs: StaticDecodeRunner | None = None
        if no_graphs is None:
            self.decode_graphs = StaticDecodeRunner(
                self.model,
                self.kv_cache,
                max_num_seqs,
                loaded.max_model_len,
                scratch_block=num_blocks,
                device=self.device,
                attention=self.attention,
            )
        elif cuda_graphs:
            log.info("decode CUDA graphs off: %s", no_graphs)
        log.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB)",
            num_blocks,
            cache.block_size,
            self.kv_cache.num_bytes / 2**20,
        )
        self.memory = self._memory_report(cache, num_blocks)

    def _memory_report(self, cache: CacheConfig, num_blocks: int) -> MemoryReport:
        st = self.vision_streamer.stats if self.vision_streamer else None
        streamed = st.streamed_bytes if st else 0
        slots = st.slot_bytes if st else 0
        on_device = module_bytes(self.model, self.device.type)
        # On a CPU the host copies of streamed layers sit on the "device" too: not resident.
        resident = on_device - (streamed if self.device.type == "cpu" else 0) + slots
        total = (
            torch.cuda.get_device_properties(self.device).total_memory
            if self.device.type == "cuda"
            else None
        )
        return MemoryReport(
            str(self.device),
            resident,
            streamed,
            slots,
            st.saved_bytes if st else 0,
            self.kv_cache.num_bytes,
            num_blocks,
            cache.block_size,
            _activation_reserve_bytes(cache, self.device),
            total,
            cache.encoder_cache_bytes,
            cache.prefix_caching,
        )

    @property
    def vocab_size(self) -> int:
        return self.model.decoder.cfg.vocab_size

    def encode_images(self, pixel_values: torch.Tensor | VisionInput) -> torch.Tensor:
        """[N, 3, H, W] -> [N, num_image_tokens, hidden] on the model's device."""
        return self.model.encode_images(pixel_values.to(self.device))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy KV blocks (src, dst) in every layer: copy-on-write for forks."""
        self.kv_cache.copy_blocks(pairs)

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
        batch = build_forward_batch(seqs, self.block_size, self.device, self.attention)
        return self.model.last_token_logits(batch, self.kv_cache)
