"""One forward of each stage before the engine serves, so that the first request does not pay
the one-time costs of the first call: on a CPU, packing every linear weight for oneDNN
(``nova.runtime.cpu_linear``) and building its primitives; on CUDA, library handles and kernel
compilation (decode's CUDA graphs are captured on their own path).

The warm-up writes KV entries into the cache's first blocks without taking them from the block
manager: nothing has been allocated yet, and every block a request gets is written by its own
prefill before attention reads it, so the scratch values are never read. It does not go through
the scheduler, so no policy sees an arrival and no metric counts a request.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nova.profiling.timing import DeviceTimer
from nova.runtime.forward_batch import SeqInput

WARMUP_PROMPT_TOKENS = 16  # a prompt that needs more than one block at the default 16 tokens
WARMUP_DECODE_BATCH = 4  # decode several sequences: the batched path, not a single row
WARMUP_IMAGE_SIDE = 224  # pixels of the blank image the vision encoder runs on


@dataclass(slots=True, frozen=True)
class WarmUpReport:
    """Seconds each warm-up call took (``vision_s`` None: no vision encoder)."""

    vision_s: float | None
    prefill_s: float
    decode_s: float

    def line(self) -> str:
        parts = [] if self.vision_s is None else [f"vision {self.vision_s * 1e3:.0f} ms"]
        parts += [f"prefill {self.prefill_s * 1e3:.0f} ms", f"decode {self.decode_s * 1e3:.0f} ms"]
        return "warm-up: " + ", ".join(parts)


def blank_image_pixels(processor: Any) -> Any:
    """Pixels of a blank ``WARMUP_IMAGE_SIDE``-square image as the processor prepares them for
    the vision stage, or None when the model takes no images."""
    if processor.image_processor is None:
        return None
    from PIL import Image

    side = WARMUP_IMAGE_SIDE
    return processor.pixel_values([Image.new("RGB", (side, side), (255, 255, 255))])


def warm_up(runner: Any, pixels: Any = None, token_id: int = 0) -> WarmUpReport:
    """Encode ``pixels`` (if given), prefill one prompt of ``token_id`` (not the image token)
    and run one decode step of ``WARMUP_DECODE_BATCH`` sequences through ``runner`` (a
    ``ModelRunner``), in scratch KV blocks. Returns each call's seconds."""
    block = runner.block_size
    capacity = runner.block_manager.num_blocks * block
    tokens = max(1, min(WARMUP_PROMPT_TOKENS, capacity - 1))
    table = list(range(math.ceil((tokens + 1) / block)))
    timer = DeviceTimer(runner.device)

    def seconds(job: Callable[[], Any]) -> float:
        return timer.time_s(job, warmup=0, repeats=1)[0]

    decode = [SeqInput([token_id], tokens, table) for _ in range(WARMUP_DECODE_BATCH)]
    with torch.inference_mode():
        vision_s = None if pixels is None else seconds(lambda: runner.encode_images(pixels))
        prefill_s = seconds(lambda: runner.forward([SeqInput([token_id] * tokens, 0, table)]))
        decode_s = seconds(lambda: runner.forward(decode))
    return WarmUpReport(vision_s, prefill_s, decode_s)
