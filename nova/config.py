"""Typed engine configuration, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_NAMES = ("float32", "bfloat16", "float16")
PARTITION_NAMES = ("auto", "green_context", "none", "cpu")
ATTENTION_NAMES = ("auto", "sdpa", "triton", "flex")


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
    # GPU mechanisms (issue 5). All fall back cleanly on a CPU.
    partition: str = "auto"  # auto | green_context | none | cpu
    cuda_graphs: bool = True  # decode graphs per partition and batch bucket; CUDA only
    attention_backend: str = "auto"  # auto | sdpa | triton | flex
    vision_offload_layers: int = 0  # 0: encoder resident; K>0: stream weights through K slots
    # Dynamic-resolution vision (Qwen2-VL family, issue 7): None keeps the processor's value.
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        torch_dtype(self.dtype)  # validates the name
        for name in ("block_size", "max_num_seqs", "max_prefill_tokens", "max_vision_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.partition not in PARTITION_NAMES:
            raise ValueError(
                f"unknown partition backend {self.partition!r}; choose {', '.join(PARTITION_NAMES)}"
            )
        if self.attention_backend not in ATTENTION_NAMES:
            raise ValueError(
                f"unknown attention backend {self.attention_backend!r}; "
                f"choose {', '.join(ATTENTION_NAMES)}"
            )
        if self.vision_offload_layers < 0:
            raise ValueError(
                f"vision_offload_layers must be >= 0, got {self.vision_offload_layers}"
            )
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (
            self.min_pixels is not None
            and self.max_pixels is not None
            and self.min_pixels > self.max_pixels
        ):
            raise ValueError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        from nova.core.policy import available_policies

        if self.policy not in available_policies():
            raise ValueError(
                f"unknown policy {self.policy!r}; choose one of {', '.join(available_policies())}"
            )

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)
