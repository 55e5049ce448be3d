"""Dynamic resolution of Qwen2-VL / Qwen2.5-VL images: resized size, patch grid, image tokens.

Torch-free (the scheduler, cost model and workloads use it too; ``nova.shapes.processor`` reads
a model's limits from its processor config). The resize rule is the one the models' image
processor applies (``smart_resize`` in ``transformers``), reimplemented here so
the number of image tokens is known before any pixel is touched (KV admission plans with it):

1. each side is rounded to a multiple of ``factor = patch_size * merge_size``;
2. if that exceeds ``max_pixels``, both sides are scaled down by ``sqrt(h*w / max_pixels)``
   and floored to the factor (at least one factor); if it is below ``min_pixels``, both are
   scaled up by ``sqrt(min_pixels / (h*w))`` and ceiled to the factor.

The image then becomes a ``(1, h/patch, w/patch)`` grid of patches and, after the 2x2 (``merge
x merge``) patch merger, ``(h/patch) * (w/patch) / merge**2`` image tokens.

Unlike the processor, which silently accepts any result, :meth:`ImageSizing.resize` raises an
:class:`ImageSizeError` (a ``ValueError``; the input processor turns it into an
``InvalidInputError``) that names the sizes when the resized image still lies outside
``[min_pixels, max_pixels]`` (a long thin strip cannot be scaled under a small ``max_pixels``
because each side is at least one factor; flooring under a narrow ``[min, max]`` window can fall
below ``min_pixels``), or when the aspect ratio exceeds 200 (the processor's own limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_ASPECT_RATIO = 200
# Defaults of Qwen2-VL / Qwen2.5-VL's published preprocessor_config.json (pixels); Nova uses them
# for a model directory without a processor config.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 16384  # 12845056
# The screenshot size plans use when the real one is not known yet (the Nova paper's 1120x1120).
REFERENCE_IMAGE_SIZE = (1120, 1120)


class ImageSizeError(ValueError):
    """An image whose size the model cannot take within the configured resize limits."""


@dataclass(slots=True, frozen=True)
class ImageSizing:
    """Resize limits and patch geometry of one Qwen-VL model (as served: limits may be
    overridden per server)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        if self.max_pixels < self.factor**2:
            raise ValueError(
                f"max_pixels ({self.max_pixels}) is below one {self.factor}x{self.factor} tile "
                f"(patch {self.patch_size} x merge {self.merge_size}): no image fits"
            )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def with_limits(
        self, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> ImageSizing:
        """These limits with ``min_pixels``/``max_pixels`` overridden where given."""
        return ImageSizing(
            self.patch_size,
            self.merge_size,
            self.temporal_patch_size,
            self.min_pixels if min_pixels is None else min_pixels,
            self.max_pixels if max_pixels is None else max_pixels,
        )

    @classmethod
    def from_processor(cls, processor: object) -> ImageSizing:
        """From a ``transformers`` Qwen2-VL image processor object (``size`` holds the pixel
        limits as ``shortest_edge``/``longest_edge`` in transformers 5; older ones have
        attributes). Serving reads the limits from the processor config instead
        (``nova.shapes``); this reads what a live processor would do, to compare the two."""
        size = getattr(processor, "size", None) or {}

        def get(key: str) -> object:
            return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

        min_pixels = get("shortest_edge") or getattr(processor, "min_pixels", None)
        max_pixels = get("longest_edge") or getattr(processor, "max_pixels", None)
        return cls(
            _as_int(getattr(processor, "patch_size", None), 14),
            _as_int(getattr(processor, "merge_size", None), 2),
            _as_int(getattr(processor, "temporal_patch_size", None), 2),
            _as_int(min_pixels, DEFAULT_MIN_PIXELS),
            _as_int(max_pixels, DEFAULT_MAX_PIXELS),
        )

    # -- the resize rule --------------------------------------------------------------------------
    def resize(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the processor resizes a ``width x height`` image to.

        Raises ``ImageSizeError`` (a ``ValueError``) naming the sizes when the image cannot be
        brought within ``[min_pixels, max_pixels]``.
        """
        if width < 1 or height < 1:
            raise ImageSizeError(f"image has no pixels ({width}x{height})")
        ratio = max(width, height) / min(width, height)
        if ratio > MAX_ASPECT_RATIO:
            raise ImageSizeError(
                f"image of {width}x{height} pixels has aspect ratio {ratio:.1f}; at most "
                f"{MAX_ASPECT_RATIO} is supported"
            )
        f = self.factor
        new_h, new_w = _round_to(height, f), _round_to(width, f)
        if new_h * new_w > self.max_pixels:
            shrink = math.sqrt(height * width / self.max_pixels)
            new_h = max(f, math.floor(height / shrink / f) * f)
            new_w = max(f, math.floor(width / shrink / f) * f)
        elif new_h * new_w < self.min_pixels:
            grow = math.sqrt(self.min_pixels / (height * width))
            new_h = math.ceil(height * grow / f) * f
            new_w = math.ceil(width * grow / f) * f
        pixels = new_h * new_w
        if pixels > self.max_pixels or pixels < self.min_pixels or min(new_h, new_w) < f:
            bound = (
                f"above max_pixels={self.max_pixels}"
                if pixels > self.max_pixels
                else f"below min_pixels={self.min_pixels}"
            )
            raise ImageSizeError(
                f"image of {width}x{height} pixels resizes to {new_w}x{new_h} = {pixels} pixels "
                f"(sides multiples of {f}), {bound}; allowed: {self.min_pixels}..{self.max_pixels} "
                f"pixels after resizing"
            )
        return new_w, new_h

    def grid(self, width: int, height: int) -> tuple[int, int, int]:
        """The (t, h, w) patch grid of one image (t = 1 for images)."""
        new_w, new_h = self.resize(width, height)
        return 1, new_h // self.patch_size, new_w // self.patch_size

    def num_patches(self, width: int, height: int) -> int:
        t, h, w = self.grid(width, height)
        return t * h * w

    def num_image_tokens(self, width: int, height: int) -> int:
        """Image tokens (placeholders in the prompt) one ``width x height`` image becomes."""
        return self.num_patches(width, height) // (self.merge_size**2)


def _as_int(value: object, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected an integer from the image processor, got {value!r}")
    return int(value)


def _round_to(x: int, factor: int) -> int:
    # Python's round() (half to even), as the processor uses.
    return round(x / factor) * factor
