"""The prefix-cache keys of a request's KV blocks (``Request.block_hashes``), computed lazily
and incrementally as its tokens become known (prompt first, outputs as they are sampled).

A block's key folds in every image whose placeholder tokens it covers (``ImageKeyPart``:
the image's hash, its start relative to the block, its token count and grid). The chain stops
before the first block that cannot be keyed safely: one that covers an image without a hash,
or any block once some image's position is unknown. Torch-free.
"""

from __future__ import annotations

from nova.core.hashing import BlockHash, ImageKeyPart, block_hash
from nova.types import Request


def _keyable_tokens(req: Request) -> int:
    """Leading prompt tokens that can be keyed: all of them unless an image lacks a hash or a
    position (then up to that image's first placeholder, or none when its position is
    unknown)."""
    limit = len(req.prompt_token_ids) + len(req.output_token_ids)
    for img in req.images:
        if img.offset is None:
            return 0
        if img.mm_hash is None:
            limit = min(limit, img.offset)
    return limit


def _block_images(req: Request, start: int, end: int) -> list[ImageKeyPart]:
    parts: list[ImageKeyPart] = []
    for img in req.images:
        offset = img.offset
        if offset is None or img.mm_hash is None or img.num_tokens == 0:
            continue
        if offset < end and offset + img.num_tokens > start:
            parts.append((img.mm_hash, offset - start, img.num_tokens, img.grid))
    return parts


def extend_block_hashes(req: Request, block_size: int, num_tokens: int) -> list[BlockHash]:
    """``req.block_hashes`` extended to cover the full blocks among the first ``num_tokens``
    tokens of ``req.prefill_token_ids`` (as far as they can be keyed); returns the list."""
    hashes = req.block_hashes
    upto = min(num_tokens, _keyable_tokens(req)) // block_size
    if len(hashes) >= upto:
        return hashes
    prompt, outputs = req.prompt_token_ids, req.output_token_ids
    num_prompt = len(prompt)
    parent = hashes[-1] if hashes else None
    for j in range(len(hashes), upto):
        start, end = j * block_size, (j + 1) * block_size
        tokens = prompt[start:end] if end <= num_prompt else (prompt + outputs)[start:end]
        parent = block_hash(parent, tokens, _block_images(req, start, end) if req.images else ())
        hashes.append(parent)
    return hashes
