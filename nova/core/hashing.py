"""Content hashes for the two caches: KV blocks (prefix caching) and images (encoder cache).

BLAKE3 (the ``blake3`` package): fast (about 0.5 us for one block's key here, a few GB/s on
image bytes) and collision-resistant, so a client cannot craft two different prompts whose
blocks share a key (a 64-bit non-cryptographic hash would let it read another prompt's KV).

- ``image_key``: of an image's raw bytes (before decoding: a hit skips decoding and resizing)
  and everything that changes its embedding: the model, and the processor limits that decide
  its resized size. Hex text, so it can travel as plain data (``ImageInput.mm_hash``).
- ``block_hash``: of one full KV block: the previous block's hash (a chain, so a block's key
  covers every token before it), its token ids, and for each image whose placeholder tokens
  it covers the image's key, where the image starts relative to the block, and its grid
  (M-RoPE positions of Qwen-VL depend on it). Two images behind identical placeholder tokens
  therefore never share a block, and neither does one image at another position.

Torch-free.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import blake3

BLOCK_HASH_BYTES = 16  # 128 bits: collisions are out of reach for any cache size
IMAGE_KEY_BYTES = 16

BlockHash = bytes
# One image's part of a block key: (image key, start offset relative to the block's first
# token (negative: it started in an earlier block), token count, grid or None).
ImageKeyPart = tuple[str, int, int, tuple[int, int, int] | None]


def image_context(model_id: str, min_pixels: int | None, max_pixels: int | None) -> str:
    """What besides the bytes decides an image's embedding: the model (weights, dtype) and
    the effective resize limits (None where the model resizes to a fixed size)."""
    return f"{model_id}|min_pixels={min_pixels}|max_pixels={max_pixels}"


def image_key(data: bytes | memoryview, context: str) -> str:
    """The encoder-cache key of an image given as raw bytes (PNG/JPEG as sent) or as decoded
    pixels (a PIL image's ``tobytes()`` plus its size and mode in ``context``)."""
    h = blake3.blake3(context.encode("utf-8"))
    h.update(b"\x00")
    h.update(data)
    return h.hexdigest(length=IMAGE_KEY_BYTES)


def block_hash(
    parent: BlockHash | None, token_ids: Sequence[int], images: Sequence[ImageKeyPart] = ()
) -> BlockHash:
    """The key of one full block (see the module docstring); ``parent`` None for block 0."""
    h = blake3.blake3(parent if parent is not None else b"\x00" * BLOCK_HASH_BYTES)
    h.update(array("q", token_ids).tobytes())
    if images:
        h.update(repr(tuple(images)).encode("utf-8"))
    return h.digest(length=BLOCK_HASH_BYTES)
