"""The grid of batch shapes a profile measures, the token contents of its batches, and how
samples are summarised. Torch-free."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

STATISTICS: dict[str, Callable[[Sequence[float]], float]] = {
    "median": lambda xs: float(statistics.median(xs)),
    # On a machine shared with other processes, the fastest run is the least disturbed one.
    "min": lambda xs: float(min(xs)),
}


@dataclass(slots=True, frozen=True)
class ProfileGrid:
    """Grid points per stage axis (see ``nova.cost.profiled.STAGE_AXES``).

    The default took 5.0 minutes for the demo model in fp32 and 1.3 in bf16 on 2 CPU cores
    (``--passes 2``); ``quick()`` a few
    seconds (for tests and smoke runs). Points a model cannot run (beyond its max length)
    are dropped by ``clipped``.
    """

    num_images: tuple[int, ...] = (1, 2, 4, 8)
    # prefill batches as large as the engine's (``--max-prefill-tokens`` 4096; a burst of
    # screenshot prompts fills them with 10-16 sequences) and decode batches of 32, so that
    # such batches are interpolated from measurements, not extrapolated past the grid
    prefill_tokens: tuple[int, ...] = (32, 128, 256, 512, 1024, 2048, 4096)
    prefill_seqs: tuple[int, ...] = (1, 2, 4, 8, 16)
    decode_batch: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    decode_context: tuple[int, ...] = (64, 256, 1024)
    # Representative batches for the co-running measurement.
    corun_images: int = 1
    corun_prefill_tokens: int = 256
    corun_decode_batch: int = 4
    corun_decode_context: int = 256

    @classmethod
    def quick(cls) -> ProfileGrid:
        return cls(
            num_images=(1, 2),
            prefill_tokens=(16, 64),
            prefill_seqs=(1, 2),
            decode_batch=(1, 2),
            decode_context=(16, 64),
            corun_images=1,
            corun_prefill_tokens=32,
            corun_decode_batch=2,
            corun_decode_context=32,
        )

    def clipped(self, max_model_len: int) -> ProfileGrid:
        prefill = tuple(t for t in self.prefill_tokens if t <= max_model_len) or (max_model_len,)
        context = tuple(c for c in self.decode_context if c <= max_model_len) or (max_model_len,)
        seqs = tuple(s for s in self.prefill_seqs if s <= prefill[0]) or (1,)
        return dataclasses.replace(
            self,
            prefill_tokens=prefill,
            decode_context=context,
            prefill_seqs=seqs,
            corun_prefill_tokens=min(self.corun_prefill_tokens, max_model_len),
            corun_decode_context=min(self.corun_decode_context, max_model_len),
        )

    def kv_blocks_needed(self, block_size: int) -> int:
        """KV-cache blocks enough for the largest batch of the grid, with slack for the
        mixed-length variants (same totals, one partial block per sequence)."""

        def blocks(n_seqs: int, tokens_each: int) -> int:
            return n_seqs * math.ceil(tokens_each / block_size)

        decode = blocks(max(self.decode_batch), max(self.decode_context))
        prefill = max(self.prefill_seqs) + blocks(1, max(self.prefill_tokens))
        corun = blocks(self.corun_decode_batch, self.corun_decode_context) + blocks(
            1, self.corun_prefill_tokens
        )
        return max(decode, prefill, corun) + 8 + max(self.decode_batch) + self.corun_decode_batch


def split_total(total: int, parts: int, rng: random.Random, minimum: int = 1) -> list[int]:
    """``total`` as ``parts`` integers >= ``minimum`` with random proportions (weights uniform
    in [0.5, 1.5]): the mixed lengths of real batches, with the grid point's exact total."""
    if parts * minimum > total:
        raise ValueError(f"cannot split {total} into {parts} parts of at least {minimum}")
    weights = [rng.uniform(0.5, 1.5) for _ in range(parts)]
    spare = total - parts * minimum
    out = [minimum + int(spare * w / sum(weights)) for w in weights]
    for i in range(total - sum(out)):  # the rounding remainder, one each
        out[i % parts] += 1
    rng.shuffle(out)
    return out


class TextTokens:
    """Deterministic text token ids for profiling batches: below the image placeholder id (no
    placeholders without image embeddings) and the vocabulary size."""

    def __init__(self, vocab_size: int, image_token_id: int | None) -> None:
        self.limit = (
            image_token_id
            if image_token_id is not None and image_token_id < vocab_size
            else vocab_size
        )

    def __call__(self, n: int, offset: int = 0) -> list[int]:
        """``n`` token ids; sequences with different ``offset`` differ."""
        return [(7 * i + 3 + offset) % self.limit for i in range(n)]
