"""Multimodal rotary positions (M-RoPE) of Qwen2-VL / Qwen2.5-VL.

Every prompt token gets three positions (temporal, height, width). Text tokens have the same
value in all three rows, one more than the previous token's largest position. The tokens of an
image whose merged grid is ``gh x gw`` (patch grid / merge size) starting at position ``p`` get
``(p, p + row, p + col)`` in row-major grid order, and the next token continues at
``p + max(gh, gw)``. So after an image, positions run *behind* token indices: the prompt's
``delta = next position - len(prompt)`` (usually negative) is added to the index of every later
token (decode, or a re-prefill of outputs after a preemption), in all three rows.

Inside the decoder the head dimension's frequency halves are split into ``mrope_section``
(e.g. 16/24/24 of 64): section ``i`` rotates by row ``i`` of the positions. A token whose rows
are equal (all text) therefore gets plain RoPE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(slots=True, frozen=True)
class MRopePlan:
    """3-row positions of one prompt and the offset of every token after it."""

    positions: torch.Tensor  # [3, prompt_len] int64 (CPU)
    delta: int  # token at index i >= prompt_len sits at position i + delta (all rows)

    @property
    def prompt_len(self) -> int:
        return int(self.positions.shape[1])

    def slice(self, start: int, end: int) -> torch.Tensor:
        """Positions [3, end - start] of tokens ``start..end-1`` (may run past the prompt)."""
        if not 0 <= start <= end:
            raise ValueError(f"bad token range {start}..{end}")
        n = self.prompt_len
        inside = self.positions[:, min(start, n) : min(end, n)]
        if end <= n:
            return inside
        after = torch.arange(max(start, n), end, dtype=torch.long) + self.delta
        return torch.cat([inside, after.expand(3, -1)], dim=1)


def mrope_plan(
    token_ids: Sequence[int],
    image_token_id: int,
    image_grids: Sequence[Sequence[int]],
    spatial_merge_size: int,
) -> MRopePlan:
    """M-RoPE positions of a prompt whose image placeholders are already expanded.

    ``image_grids``: the (t, h, w) patch grid of each image, in prompt order; image ``k`` fills
    the next ``t*h*w / merge**2`` consecutive placeholder tokens.
    """
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    n = int(ids.numel())
    image_index = torch.nonzero(ids == image_token_id).flatten().tolist()
    m = spatial_merge_size
    counts = [int(t) * int(h) * int(w) // (m * m) for t, h, w in image_grids]
    if sum(counts) != len(image_index):
        raise ValueError(
            f"prompt has {len(image_index)} image tokens but its {len(counts)} images need "
            f"{sum(counts)} ({counts})"
        )
    pieces: list[torch.Tensor] = []
    next_pos = 0  # position of the next token
    cursor = 0  # next token index not yet placed
    consumed = 0  # image placeholders placed so far
    for k, ((t, h, w), count) in enumerate(zip(image_grids, counts)):
        start = image_index[consumed] if count else cursor
        if count and image_index[consumed + count - 1] != start + count - 1:
            raise ValueError(f"the {count} placeholder tokens of image {k} are not contiguous")
        if start > cursor:  # text before the image
            pieces.append(torch.arange(next_pos, next_pos + start - cursor).expand(3, -1))
            next_pos += start - cursor
        gt, gh, gw = int(t), int(h) // m, int(w) // m
        tt = torch.arange(gt).view(-1, 1, 1).expand(gt, gh, gw)
        hh = torch.arange(gh).view(1, -1, 1).expand(gt, gh, gw)
        ww = torch.arange(gw).view(1, 1, -1).expand(gt, gh, gw)
        pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + next_pos)
        next_pos += max(gh, gw)  # as transformers' get_rope_index (images have t = 1)
        cursor = start + count
        consumed += count
    if cursor < n:
        pieces.append(torch.arange(next_pos, next_pos + n - cursor).expand(3, -1))
        next_pos += n - cursor
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    return MRopePlan(positions.contiguous(), next_pos - n)


def mrope_frequency_rows(mrope_section: Sequence[int], half_dim: int) -> torch.Tensor:
    """For each of the ``half_dim`` rotary frequencies, the position row (0 t, 1 h, 2 w) it uses."""
    sections = [int(s) for s in mrope_section]
    if len(sections) != 3 or sum(sections) != half_dim or min(sections) < 0:
        raise ValueError(
            f"mrope_section {list(mrope_section)} must be three sizes summing to head_dim/2 = "
            f"{half_dim}"
        )
    # Explicitly on the CPU: decoders are built inside a meta-device context.
    return torch.cat(
        [torch.full((s,), i, dtype=torch.long, device="cpu") for i, s in enumerate(sections)]
    )
