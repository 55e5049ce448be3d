"""Preprocessed images as the vision stage takes them, for every model family.

- LLaVA (fixed-size towers): a tensor ``[num_images, 3, H, W]``; every image becomes the same
  number of tokens.
- Qwen2-VL / Qwen2.5-VL (dynamic resolution): a :class:`VisionInput` holding the flattened
  patches of all images ``[sum of t*h*w, C * temporal_patch * patch * patch]`` and their patch
  grids ``image_grid_thw [num_images, 3]``; images of different sizes become different numbers of
  tokens.

:func:`encode_image_batch` runs the images of several requests through one tower call and
hands each request back its embeddings ``[its image tokens, hidden]``, whichever form they
came in; the executor and the offline loop use it and stay model-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass(slots=True, frozen=True)
class VisionInput:
    """Flattened patches of several images plus their grids (Qwen-VL family)."""

    pixel_values: torch.Tensor  # [sum(t*h*w), patch_dim]
    image_grid_thw: torch.Tensor  # [num_images, 3] int64
    spatial_merge_size: int = 2

    def __post_init__(self) -> None:
        if self.image_grid_thw.dim() != 2 or self.image_grid_thw.shape[1] != 3:
            raise ValueError(
                f"image_grid_thw must be [num_images, 3], got {tuple(self.image_grid_thw.shape)}"
            )
        if int(self.image_grid_thw.prod(-1).sum()) != self.pixel_values.shape[0]:
            raise ValueError(
                f"{self.pixel_values.shape[0]} patches but the grids {self.grids} need "
                f"{int(self.image_grid_thw.prod(-1).sum())}"
            )

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])

    def __len__(self) -> int:
        return self.num_images

    @property
    def grids(self) -> list[tuple[int, int, int]]:
        return [tuple(int(v) for v in g) for g in self.image_grid_thw.tolist()]  # type: ignore[misc]

    @property
    def patches_per_image(self) -> list[int]:
        return [t * h * w for t, h, w in self.grids]

    @property
    def tokens_per_image(self) -> list[int]:
        m2 = self.spatial_merge_size**2
        return [p // m2 for p in self.patches_per_image]

    def image_patches(self) -> list[torch.Tensor]:
        """Per image, its patches ``[t*h*w, patch_dim]``."""
        return list(torch.split(self.pixel_values, self.patches_per_image))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.image_patches())

    def select(self, indices: Sequence[int]) -> VisionInput:
        """The images at ``indices`` (in that order)."""
        parts = self.image_patches()
        return VisionInput(
            torch.cat([parts[i] for i in indices]),
            self.image_grid_thw[list(indices)],
            self.spatial_merge_size,
        )

    def to(self, device: torch.device | str) -> VisionInput:
        return VisionInput(
            self.pixel_values.to(device), self.image_grid_thw.to(device), self.spatial_merge_size
        )

    @classmethod
    def cat(cls, inputs: Sequence[VisionInput]) -> VisionInput:
        if not inputs:
            raise ValueError("no images to concatenate")
        merge = {x.spatial_merge_size for x in inputs}
        if len(merge) != 1:
            raise ValueError(f"inputs of different merge sizes {sorted(merge)}")
        return cls(
            torch.cat([x.pixel_values for x in inputs]),
            torch.cat([x.image_grid_thw for x in inputs]),
            merge.pop(),
        )


def num_images(pixels: torch.Tensor | VisionInput) -> int:
    return len(pixels) if isinstance(pixels, VisionInput) else int(pixels.shape[0])


def select_images(
    pixels: torch.Tensor | VisionInput, indices: Sequence[int]
) -> torch.Tensor | VisionInput:
    """The images at ``indices`` of a batch of pixels, either form."""
    if isinstance(pixels, VisionInput):
        return pixels.select(indices)
    if list(indices) == list(range(int(pixels.shape[0]))):
        return pixels
    return pixels[list(indices)]


def encode_image_batch(
    encode: Callable[[torch.Tensor | VisionInput], torch.Tensor],
    inputs: Sequence[torch.Tensor | VisionInput],
) -> list[torch.Tensor]:
    """One tower call for the images of several requests; per request ``[tokens, hidden]``.

    ``encode``: e.g. ``ModelRunner.encode_images`` (a tensor of fixed-size images ->
    ``[N, tokens, hidden]``; a :class:`VisionInput` -> packed ``[sum tokens, hidden]``).
    """
    if not inputs:
        return []
    if all(isinstance(x, VisionInput) for x in inputs):
        vis = [x for x in inputs if isinstance(x, VisionInput)]
        embeds = encode(VisionInput.cat(vis))
        sizes = [sum(x.tokens_per_image) for x in vis]
        if embeds.shape[0] != sum(sizes):
            raise RuntimeError(
                f"vision tower returned {embeds.shape[0]} tokens, expected {sum(sizes)}"
            )
        return list(torch.split(embeds, sizes))
    if any(isinstance(x, VisionInput) for x in inputs):
        raise TypeError("cannot batch fixed-size pixel tensors with dynamic-resolution inputs")
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    embeds = encode(torch.cat(tensors))
    out, offset = [], 0
    for x in tensors:
        n = int(x.shape[0])
        out.append(embeds[offset : offset + n].reshape(-1, embeds.shape[-1]))
        offset += n
    return out
