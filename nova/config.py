"""Typed engine configuration, validated at construction."""
from __future__ import annotations

from dataclasses import dataclass

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """``"bfloat16"`` -> ``torch.bfloat16``; a ValueError naming the choices otherwise."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose {', '.join(DTYPE_NAMES)}")
    import torch

    return getattr(torch, name)


@dataclass(slots=True, frozen=True)
class EngineConfig:
    model: str = "demo"
    load_format: str = "auto"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"
    policy: str = "multi_stream"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: size the cache from kv_cache_bytes / device memory
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 64  # decode batch cap (and prefill requests per batch)
    max_prefill_tokens: int = 4096  # prefill batch token budget
    max_vision_images: int = 8  # images per vision batch
    max_image_pixels: int | None = 4096 * 4096
    seed: int = 0

    def __post_init__(self) -> None:
        torch_dtype(self.dtype)  # validates the name
        for name in ("block_size", "max_num_seqs", "max_prefill_tokens", "max_vision_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        from nova.core.policy import available_policies

        if self.policy not in available_policies():
            raise ValueError(
                f"unknown policy {self.policy!r}; choose one of {', '.join(available_policies())}")

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)
