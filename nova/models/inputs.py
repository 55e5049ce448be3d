"""From a chat (text + images) to model inputs: prompt token ids with image placeholders expanded
and pixel values. Images are checked here; a bad one raises ``InvalidInputError`` naming it.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nova.core.hashing import image_context, image_key
from nova.models.errors import InvalidInputError
from nova.models.loader import LoadedModel
from nova.models.mm import VisionInput
from nova.models.mm_cache import CachedImage, EmbeddingStore, KeyedImage
from nova.shapes import REFERENCE_IMAGE_SIZE, ImageSizeError, ImageSizing
from nova.types import ImageInput

# Any: a PIL.Image.Image; a CachedImage (encoder-cache hit) or a KeyedImage (decoded, keyed)
ImageSource = bytes | str | Path | Any


@dataclass(slots=True)
class PromptInput:
    """A tokenised prompt ready for the engine: placeholders already expanded."""

    token_ids: list[int]
    # LLaVA: [num_images, 3, H, W]; Qwen-VL: a VisionInput (flattened patches + grids).
    pixel_values: torch.Tensor | VisionInput | None = None
    num_images: int = 0
    # Placeholder tokens each image fills, in order (empty: every image fills the model's fixed
    # ``InputProcessor.num_image_tokens``).
    image_token_counts: list[int] = field(default_factory=list)
    # Per image, in order: its key (``nova.core.hashing.image_key``; None: not hashed, so
    # neither cache is used for it) and, for Qwen-VL, its (t, h, w) patch grid.
    image_keys: list[str | None] = field(default_factory=list)
    image_grids: list[tuple[int, int, int]] = field(default_factory=list)
    # Images whose embeddings came from the encoder cache (index -> entry); ``pixel_values``
    # holds only the other images' pixels, in order.
    cached_images: dict[int, CachedImage] = field(default_factory=dict)

    def image_inputs(self, image_token_id: int | None, fixed_tokens: int) -> list[ImageInput]:
        """The scheduler's view of the images: token count, key, first placeholder, grid."""
        n = self.num_images
        counts = self.image_token_counts or [fixed_tokens] * n
        offsets: list[int | None] = [None] * n
        if image_token_id is not None and n:
            where = [i for i, t in enumerate(self.token_ids) if t == image_token_id]
            k = 0
            for i, c in enumerate(counts):
                if k < len(where) and c > 0 and where[k + c - 1] - where[k] == c - 1:
                    offsets[i] = where[k]
                k += c
        keys = self.image_keys or [None] * n
        grids: list[tuple[int, int, int] | None] = list(self.image_grids) or [None] * n
        return [
            ImageInput(
                int(counts[i]), keys[i], offsets[i], grids[i], has_embeds=i in self.cached_images
            )
            for i in range(n)
        ]


def load_image(source: ImageSource, max_pixels: int | None = None) -> Any:
    """Open an image from bytes, a path or a PIL image; RGB. Raises ``InvalidInputError``."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        image = source
    else:
        label = "<bytes>" if isinstance(source, bytes) else str(source)
        try:
            if isinstance(source, bytes):
                image = Image.open(io.BytesIO(source))
            else:
                image = Image.open(Path(source))
            image.load()
        except FileNotFoundError as exc:
            raise InvalidInputError(f"image file not found: {label}") from exc
        except Image.DecompressionBombError as exc:
            raise InvalidInputError(f"image is too large to decode safely: {exc}") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            what = "image bytes" if isinstance(source, bytes) else f"file {label}"
            raise InvalidInputError(f"{what} could not be decoded as an image: {exc}") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInputError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidInputError(
            f"image of {width}x{height} pixels exceeds the limit of {max_pixels}"
        )
    return image.convert("RGB")


def expand_image_placeholders(
    token_ids: list[int],
    image_token_id: int,
    num_tokens_per_image: int | Sequence[int],
    num_images: int,
) -> list[int]:
    """Replace the placeholder token of image ``k`` by ``num_tokens_per_image[k]`` copies of it
    (an int: the same count for every image).

    A prompt may come already expanded (exactly the sum of the counts in placeholders); then it
    is returned unchanged.
    """
    counts = (
        [num_tokens_per_image] * num_images
        if isinstance(num_tokens_per_image, int)
        else [int(c) for c in num_tokens_per_image]
    )
    if len(counts) != num_images:
        raise ValueError(f"{len(counts)} token counts for {num_images} images")
    count = token_ids.count(image_token_id)
    if count == sum(counts) and num_images > 0:
        return list(token_ids)
    if count != num_images:
        raise InvalidInputError(
            f"prompt has {count} image placeholders but {num_images} images were given"
        )
    out: list[int] = []
    next_image = 0
    for tok in token_ids:
        if tok == image_token_id:
            out.extend([tok] * counts[next_image])
            next_image += 1
        else:
            out.append(tok)
    return out


def chat_messages(
    text: str, num_images: int = 0, system: str | None = None
) -> list[dict[str, Any]]:
    """One user turn (``num_images`` image parts, then the text), after an optional system turn."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": text})
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": content}]


class InputProcessor:
    """Chat template, tokenizer and image processor of one loaded model."""

    def __init__(
        self,
        loaded: LoadedModel,
        max_image_pixels: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        """``max_image_pixels``: largest image accepted before any resizing (decode safety).
        ``min_pixels``/``max_pixels``: resize limits of dynamic-resolution models (Qwen-VL),
        overriding the image processor's; None keeps the processor's."""
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        # Caches (the engine sets these): hash images (the encoder cache's and the prefix
        # cache's key), and look embeddings up in the encoder cache before decoding.
        self.hash_images = False
        self.encoder_store: EmbeddingStore | None = None
        self.model_id = f"{loaded.model_dir}|{loaded.dtype}"
        # The server prepares requests on several threads; images are processed in parallel,
        # tokenizer calls one at a time.
        self._tokenizer_lock = threading.Lock()
        self.image_processor = loaded.image_processor
        self.max_image_pixels = max_image_pixels
        self.image_token_id = loaded.model.image_token_id
        # Dynamic resolution: the resize limits and patch geometry images are sized with (the
        # model's processor config as parsed by nova.shapes, then the server's overrides); the
        # image processor is always called with these limits.
        self.sizing: ImageSizing | None = None
        shape = loaded.shape
        if loaded.model.dynamic_resolution:
            if shape.image_sizing is None:
                raise ValueError(f"{loaded.model_dir}: a dynamic-resolution model without sizing")
            self.sizing = shape.image_sizing.with_limits(min_pixels, max_pixels)
            if self.image_processor is None:
                self.image_processor = _default_qwen_processor(shape.image_sizing)
            # Image tokens vary with the image; this is a reference screenshot's count, for
            # plans made before an image is seen (the real count comes with each image).
            self.num_image_tokens = self.sizing.num_image_tokens(*REFERENCE_IMAGE_SIZE)
        else:
            vision = shape.vision if loaded.model.is_multimodal else None
            self.num_image_tokens = vision.image_tokens if vision is not None else 0

    def image_token_count(self, width: int, height: int) -> int:
        """Image tokens a ``width x height`` image becomes in the prompt (before any pixel is
        processed). Raises ``InvalidInputError`` for a size outside the resize limits."""
        if self.sizing is not None:
            try:
                return self.sizing.num_image_tokens(width, height)
            except ImageSizeError as exc:
                raise InvalidInputError(str(exc)) from exc
        if not self.loaded.model.is_multimodal:
            raise InvalidInputError("this model does not take images")
        return self.num_image_tokens

    def image_key(
        self, data: bytes, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> str:
        """The encoder-cache key of an image's raw bytes under the effective resize limits
        (a request's own, else the engine's; fixed-size towers have none)."""
        lo = hi = None
        if self.sizing is not None:
            lo = min_pixels if min_pixels is not None else self.sizing.min_pixels
            hi = max_pixels if max_pixels is not None else self.sizing.max_pixels
        return image_key(data, image_context(self.model_id, lo, hi))

    def cached_image(self, key: str | None) -> CachedImage | None:
        """The encoder cache's entry for ``key`` (None: not cached, or the cache is off)."""
        store = self.encoder_store
        return store.get(key) if store is not None else None

    def _keyed(self, source: ImageSource) -> tuple[str | None, Any]:
        """(key, what to decode) of one image source; (key, CachedImage) on a cache hit."""
        from PIL import Image

        if isinstance(source, CachedImage):
            return source.key, source
        if not self.hash_images:
            return None, source.image if isinstance(source, KeyedImage) else source
        if isinstance(source, KeyedImage):
            key, source = source.key, source.image
        elif isinstance(source, bytes):
            key = self.image_key(source)
        elif isinstance(source, str | Path):
            try:
                data = Path(source).read_bytes()
            except OSError as exc:
                raise InvalidInputError(f"image file not found: {source}") from exc
            key, source = self.image_key(data), data
        elif isinstance(source, Image.Image):
            ctx = f"pixels|{source.mode}|{source.size}|" + image_context(self.model_id, None, None)
            if self.sizing is not None:
                ctx += f"|{self.sizing.min_pixels}|{self.sizing.max_pixels}"
            key = image_key(source.tobytes(), ctx)
        else:
            return None, source
        cached = self.cached_image(key)
        return key, cached if cached is not None else source

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise InvalidInputError(
                f"model {self.loaded.model_dir} has no tokenizer; send token ids instead of text"
            )
        return self.tokenizer

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        tok = self._require_tokenizer()
        try:
            with self._tokenizer_lock:
                return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            raise InvalidInputError(f"chat template failed on these messages: {exc}") from exc

    def pixel_values(self, images: list[ImageSource]) -> torch.Tensor | VisionInput | None:
        return self.process_images(images)[0]

    def process_images(
        self, images: list[ImageSource]
    ) -> tuple[torch.Tensor | VisionInput | None, list[int]]:
        """(pixels for the vision stage, placeholder tokens of each image)."""
        if not images:
            return None, []
        if self.image_processor is None:
            raise InvalidInputError("this model does not take images")
        pil = [load_image(img, self.max_image_pixels) for img in images]
        if self.sizing is None:
            out = self.image_processor(images=pil, return_tensors="pt")
            return out["pixel_values"], [self.num_image_tokens] * len(pil)
        return self._dynamic_resolution_pixels(pil)

    def _prompt_images(self, ids: list[int], images: list[ImageSource]) -> PromptInput:
        """Key each image, take hits from the encoder cache (no decoding, no preprocessing),
        decode and preprocess the rest; the placeholders expanded to every image's count."""
        keyed = [self._keyed(img) for img in images]
        cached = {i: c for i, (_, c) in enumerate(keyed) if isinstance(c, CachedImage)}
        misses = [src for _, src in keyed if not isinstance(src, CachedImage)]
        pixels, miss_counts = self.process_images(misses)
        miss_grids = pixels.grids if isinstance(pixels, VisionInput) else []
        counts: list[int] = []
        grids: list[tuple[int, int, int]] = []
        m = 0
        for i in range(len(images)):
            if i in cached:
                counts.append(cached[i].num_tokens)
                grid = cached[i].grid
            else:
                counts.append(miss_counts[m])
                grid = miss_grids[m] if miss_grids else None
                m += 1
            if self.sizing is not None:
                if grid is None:
                    raise ValueError("a dynamic-resolution image without a grid")
                grids.append(grid)
        if self.image_token_id is not None:
            ids = expand_image_placeholders(ids, self.image_token_id, counts, len(images))
        return PromptInput(
            ids,
            pixels,
            len(images),
            counts,
            [k for k, _ in keyed] if self.hash_images else [],
            grids,
            cached,
        )

    def _dynamic_resolution_pixels(self, pil: list[Any]) -> tuple[VisionInput, list[int]]:
        sizing, processor = self.sizing, self.image_processor
        if sizing is None or processor is None:
            raise ValueError("dynamic-resolution pixels need the sizing and an image processor")
        grids = []
        for k, image in enumerate(pil):
            try:
                grids.append(sizing.grid(*image.size))
            except ImageSizeError as exc:
                raise InvalidInputError(f"image {k}: {exc}") from exc
        out = processor(
            images=pil,
            return_tensors="pt",
            size={"shortest_edge": sizing.min_pixels, "longest_edge": sizing.max_pixels},
        )
        grid_thw = out["image_grid_thw"].long()
        if [tuple(g) for g in grid_thw.tolist()] != grids:
            raise RuntimeError(
                f"image processor produced grids {grid_thw.tolist()}, Nova's sizing {grids}"
            )
        vision = VisionInput(out["pixel_values"], grid_thw, sizing.merge_size)
        return vision, vision.tokens_per_image

    def from_token_ids(
        self, token_ids: list[int], images: list[ImageSource] | None = None
    ) -> PromptInput:
        images = images or []
        if images and self.image_token_id is None:
            raise InvalidInputError("this model does not take images")
        ids = [int(t) for t in token_ids]
        if images and self.image_processor is None:
            raise InvalidInputError("this model does not take images")
        prompt = self._prompt_images(ids, images)
        if not prompt.token_ids:
            raise InvalidInputError("the prompt is empty")
        vocab = self.loaded.model.decoder.cfg.vocab_size
        bad = [t for t in prompt.token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidInputError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        return prompt

    def from_text(
        self, prompt: str, images: list[ImageSource] | None = None, add_special_tokens: bool = True
    ) -> PromptInput:
        tok = self._require_tokenizer()
        with self._tokenizer_lock:  # a fast tokenizer's call mutates its padding/truncation state
            ids = tok(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        return self.from_token_ids(ids, images)

    def from_chat(
        self, messages: list[dict[str, Any]], images: list[ImageSource] | None = None
    ) -> PromptInput:
        """``messages`` in the OpenAI/HF shape; image parts render as the image placeholder."""
        # The chat template already writes any BOS the model wants.
        return self.from_text(self.render_chat(messages), images, add_special_tokens=False)

    def decode(self, token_ids: list[int]) -> str:
        return self._require_tokenizer().decode(token_ids, skip_special_tokens=True)


def _default_qwen_processor(sizing: ImageSizing) -> Any:
    """The Qwen2-VL image processor (PIL backend: no torchvision needed) for a model directory
    without a processor config: ``sizing`` holds the vision config's patch geometry and the
    published limits (``nova.shapes.processor``)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=sizing.patch_size,
        merge_size=sizing.merge_size,
        temporal_patch_size=sizing.temporal_patch_size,
        min_pixels=sizing.min_pixels,
        max_pixels=sizing.max_pixels,
    )
