"""From a chat (text + images) to model inputs: prompt token ids with image placeholders expanded
and pixel values. Images are checked here; a bad one raises ``InvalidInputError`` naming it.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import threading
from collections import OrderedDict
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
from nova.structured.compiler import GrammarCompiler
from nova.types import ImageInput

# Any: a PIL.Image.Image; a CachedImage (encoder-cache hit) or a KeyedImage (decoded, keyed)
ImageSource = bytes | str | Path | Any
# A request's (min_pixels, max_pixels) for its images; None in either keeps the served value.
ImageLimits = tuple[int | None, int | None]


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
    # Per image: (width, height) as given and as the vision tower saw it after resizing, in
    # pixels (empty for a prompt without images); lets a caller map coordinates back.
    image_sizes: list[ImageSize] = field(default_factory=list)
    # (min_pixels, max_pixels) the images were resized within (dynamic resolution), else None
    image_limits: ImageLimits | None = None

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


@dataclass(slots=True, frozen=True)
class ImageSize:
    """One image's size as given and as the model saw it (pixels)."""

    width: int
    height: int
    resized_width: int
    resized_height: int


# Image sizes remembered per key (a few dozen bytes each): far more than an encoder cache holds.
SEEN_SIZES_MAX_ENTRIES = 65536


class _SizeMemo:
    """A thread-safe LRU map of image key -> ``ImageSize`` (preparation runs on many threads)."""

    def __init__(self, max_entries: int) -> None:
        self._entries: OrderedDict[str, ImageSize] = OrderedDict()
        self._max_entries = max_entries
        self._lock = threading.Lock()

    def get(self, key: str) -> ImageSize | None:
        with self._lock:
            size = self._entries.get(key)
            if size is not None:
                self._entries.move_to_end(key)
            return size

    def put(self, key: str, size: ImageSize) -> None:
        with self._lock:
            self._entries[key] = size
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)


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
        # image key -> the image's size given and seen, for the ``image_sizes`` of a request
        # whose image hit the encoder cache (never decoded); bounded, least recently used out
        self._seen_sizes: _SizeMemo = _SizeMemo(SEEN_SIZES_MAX_ENTRIES)
        # The server prepares requests on several threads; images are processed in parallel,
        # tokenizer calls one at a time.
        self._tokenizer_lock = threading.Lock()
        self._grammar_compiler: GrammarCompiler | None = None
        self.image_processor = loaded.image_processor
        self.max_image_pixels = max_image_pixels
        self.image_token_id = loaded.model.image_token_id
        self._max_token_chars: int | None = None
        self._special_pattern = _special_token_pattern(self.tokenizer)
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

    def _keyed(self, source: ImageSource, sizing: ImageSizing | None) -> tuple[str | None, Any]:
        """(key, what to decode) of one image source resized within ``sizing``'s limits;
        (key, CachedImage) on a cache hit."""
        from PIL import Image

        if isinstance(source, CachedImage):
            return source.key, source
        if not self.hash_images:
            return None, source.image if isinstance(source, KeyedImage) else source
        lo = sizing.min_pixels if sizing is not None else None
        hi = sizing.max_pixels if sizing is not None else None
        if isinstance(source, KeyedImage):  # keyed by the caller under the same limits
            key, source = source.key, source.image
        elif isinstance(source, bytes):
            key = self.image_key(source, lo, hi)
        elif isinstance(source, str | Path):
            try:
                data = Path(source).read_bytes()
            except OSError as exc:
                raise InvalidInputError(f"image file not found: {source}") from exc
            key, source = self.image_key(data, lo, hi), data
        elif isinstance(source, Image.Image):
            ctx = f"pixels|{source.mode}|{source.size}|" + image_context(self.model_id, lo, hi)
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

    @property
    def grammar_compiler(self) -> GrammarCompiler | None:
        """Structured output's grammar compiler for this model (None without a tokenizer):
        masks as wide as the logits, a finished grammar allows the model's EOS ids."""
        if self.tokenizer is None:
            return None
        with self._tokenizer_lock:
            if self._grammar_compiler is None:
                self._grammar_compiler = GrammarCompiler(
                    self.tokenizer,
                    self.loaded.model.decoder.cfg.vocab_size,
                    self.loaded.eos_token_ids or (self.tokenizer.eos_token_id,),
                )
            return self._grammar_compiler

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """The chat template applied to ``messages`` (and ``tools``, OpenAI's function-tool
        dicts, for a template that renders them)."""
        tok = self._require_tokenizer()
        extra = {"tools": tools} if tools else {}
        try:
            with self._tokenizer_lock:
                return tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, **extra
                )
        except Exception as exc:
            raise InvalidInputError(f"chat template failed on these messages: {exc}") from exc

    def pixel_values(self, images: list[ImageSource]) -> torch.Tensor | VisionInput | None:
        return self.process_images(images)[0]

    def sizing_for(self, image_limits: ImageLimits | None) -> ImageSizing | None:
        """The sizing of a request with its own (min_pixels, max_pixels) (None in either: the
        served value): within the served limits (an ``InvalidInputError`` naming them
        otherwise). None: the served sizing (None for a fixed-resolution model)."""
        if image_limits is None:
            return self.sizing
        if self.sizing is None:
            raise InvalidInputError(
                "mm_processor_kwargs: min_pixels/max_pixels apply to dynamic-resolution "
                "models (Qwen2-VL family); this model resizes every image to one fixed size"
            )
        served = self.sizing
        low = served.min_pixels if image_limits[0] is None else image_limits[0]
        high = served.max_pixels if image_limits[1] is None else image_limits[1]
        if not served.min_pixels <= low <= high <= served.max_pixels:
            raise InvalidInputError(
                f"mm_processor_kwargs: need {served.min_pixels} <= min_pixels ({low}) <= "
                f"max_pixels ({high}) <= {served.max_pixels} (the server's limits)"
            )
        try:
            return served.with_limits(low, high)
        except ValueError as exc:
            raise InvalidInputError(f"mm_processor_kwargs: {exc}") from exc

    def process_images(
        self, images: list[ImageSource], image_limits: ImageLimits | None = None
    ) -> tuple[torch.Tensor | VisionInput | None, list[int]]:
        """(pixels for the vision stage, placeholder tokens of each image)."""
        pixels, counts, _ = self.process_images_sized(images, image_limits)
        return pixels, counts

    def process_images_sized(
        self, images: list[ImageSource], image_limits: ImageLimits | None = None
    ) -> tuple[torch.Tensor | VisionInput | None, list[int], list[ImageSize]]:
        """(pixels, placeholder tokens of each image, each image's size given and seen)."""
        sizing = self.sizing_for(image_limits)
        if not images:
            return None, [], []
        if self.image_processor is None:
            raise InvalidInputError("this model does not take images")
        pil = [load_image(img, self.max_image_pixels) for img in images]
        if sizing is None:
            out = self.image_processor(images=pil, return_tensors="pt")
            pixels = out["pixel_values"]
            height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
            sizes = [ImageSize(im.size[0], im.size[1], width, height) for im in pil]
            return pixels, [self.num_image_tokens] * len(pil), sizes
        vision, counts = self._dynamic_resolution_pixels(pil, sizing)
        patch = sizing.patch_size
        sizes = [
            ImageSize(im.size[0], im.size[1], int(w) * patch, int(h) * patch)
            for im, (_, h, w) in zip(pil, vision.image_grid_thw.tolist())
        ]
        return vision, counts, sizes

    def _prompt_images(
        self, ids: list[int], images: list[ImageSource], image_limits: ImageLimits | None
    ) -> PromptInput:
        """Key each image under the effective resize limits, take hits from the encoder cache
        (no decoding, no preprocessing), decode and preprocess the rest; the placeholders
        expanded to every image's count."""
        sizing = self.sizing_for(image_limits)
        keyed = [self._keyed(img, sizing) for img in images]
        cached = {i: c for i, (_, c) in enumerate(keyed) if isinstance(c, CachedImage)}
        misses = [src for _, src in keyed if not isinstance(src, CachedImage)]
        pixels, miss_counts, miss_sizes = self.process_images_sized(misses, image_limits)
        miss_grids = pixels.grids if isinstance(pixels, VisionInput) else []
        counts: list[int] = []
        grids: list[tuple[int, int, int]] = []
        sizes: list[ImageSize] = []
        m = 0
        for i, (key, _) in enumerate(keyed):
            if i in cached:
                counts.append(cached[i].num_tokens)
                grid = cached[i].grid
                size = self._seen_sizes.get(key) if key is not None else None
            else:
                counts.append(miss_counts[m])
                grid = miss_grids[m] if miss_grids else None
                size = miss_sizes[m]
                if key is not None:
                    self._seen_sizes.put(key, size)
                m += 1
            if size is not None:
                sizes.append(size)
            if sizing is not None:
                if grid is None:
                    raise ValueError("a dynamic-resolution image without a grid")
                grids.append(grid)
        if len(sizes) != len(images):  # a hit whose size was forgotten: sizes are all or none
            sizes = []
        if self.image_token_id is not None:
            ids = expand_image_placeholders(ids, self.image_token_id, counts, len(images))
        return PromptInput(
            ids,
            pixels,
            len(images),
            counts,
            image_sizes=sizes,
            image_limits=(sizing.min_pixels, sizing.max_pixels) if sizing and images else None,
            image_keys=[k for k, _ in keyed] if self.hash_images else [],
            image_grids=grids,
            cached_images=cached,
        )

    def _dynamic_resolution_pixels(
        self, pil: list[Any], sizing: ImageSizing | None = None
    ) -> tuple[VisionInput, list[int]]:
        sizing = sizing or self.sizing
        processor = self.image_processor
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

    @property
    def vocab_size(self) -> int:
        return int(self.loaded.model.decoder.cfg.vocab_size)

    @property
    def max_token_chars(self) -> int:
        if self._max_token_chars is None:
            # A token's string in the vocabulary (byte-level: one character per byte;
            # SentencePiece: '▁' per space, '<0x0A>' per byte) is at least as long as the text
            # it decodes to.
            tok = self.tokenizer
            longest = max((len(t) for t in tok.get_vocab()), default=1) if tok else 1
            self._max_token_chars = max(1, longest)
        return self._max_token_chars

    def from_token_ids(
        self,
        token_ids: list[int],
        images: list[ImageSource] | None = None,
        image_limits: ImageLimits | None = None,
    ) -> PromptInput:
        images = images or []
        if images and self.image_token_id is None:
            raise InvalidInputError("this model does not take images")
        ids = [int(t) for t in token_ids]
        prompt = self._prompt_images(ids, images, image_limits)
        if not prompt.token_ids:
            raise InvalidInputError("the prompt is empty")
        vocab = self.vocab_size
        bad = [t for t in prompt.token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidInputError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        return prompt

    def _encode(self, text: str, add_special_tokens: bool, split_special_tokens: bool) -> list[int]:
        tok = self._require_tokenizer()
        # verbose=False: a prompt longer than the model's limit is the server's to reject (no
        # "Token indices sequence length is longer than ..." warning per request)
        kwargs: dict[str, Any] = {"add_special_tokens": add_special_tokens, "verbose": False}
        if split_special_tokens:
            kwargs["split_special_tokens"] = True
        with self._tokenizer_lock:  # a fast tokenizer's call mutates its padding/truncation state
            ids = list(tok(text, **kwargs)["input_ids"])
        if len(text) >= RELEASE_MEMORY_CHARS:
            release_freed_memory()
        return ids

    def from_text(
        self,
        prompt: str,
        images: list[ImageSource] | None = None,
        add_special_tokens: bool = True,
        image_limits: ImageLimits | None = None,
    ) -> PromptInput:
        """Tokenise raw text; special tokens' strings in it are parsed as those tokens (a raw
        completion prompt writes the model's own markup)."""
        ids = self._encode(prompt, add_special_tokens, split_special_tokens=False)
        return self.from_token_ids(ids, images, image_limits)

    def from_chat(
        self,
        messages: list[dict[str, Any]],
        images: list[ImageSource] | None = None,
        image_limits: ImageLimits | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> PromptInput:
        """``messages`` in the OpenAI/HF shape; image parts render as the image placeholder.
        The messages' text is text: only the template writes special tokens (a ``<image>`` or
        ``<|im_end|>`` typed by a user is tokenised as those characters)."""
        # The chat template already writes any BOS the model wants.
        self._check_tool_text(messages, tools)
        if not self._special_pattern or not any(
            self._special_pattern.search(t) for t in message_texts(messages)
        ):
            ids = self._encode(self.render_chat(messages, tools), False, split_special_tokens=False)
        else:
            ids = self._encode_chat_text_safely(messages, tools)
        return self.from_token_ids(ids, images, image_limits)

    def _check_tool_text(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> None:
        """Tools and tool-call arguments reach a template as data it writes itself (``tojson``),
        not as message text, so their special-token strings cannot be kept as text: refuse
        them (``InvalidInputError``) instead of letting them become control tokens."""
        if self._special_pattern is None:
            return
        data: list[tuple[str, Any]] = [("tools", tools)] if tools else []
        for i, m in enumerate(messages):
            if m.get("tool_calls"):
                data.append((f"messages[{i}].tool_calls", m["tool_calls"]))
        for where, value in data:
            found = self._special_pattern.search(json.dumps(value, ensure_ascii=False))
            if found:
                raise InvalidInputError(
                    f"{where} contains the special token {found.group(0)!r}, which this "
                    "model's chat template cannot write as text"
                )

    def _encode_chat_text_safely(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Tokens of the rendered chat where the messages' text never becomes a special token:
        the template is rendered with a sentinel in place of each text; the special tokens
        left in the rendering are the template's own; every stretch between two of them
        (template text and message text together, so merges across their boundary are as in
        a plain tokenisation) is tokenised with special-token parsing off."""
        nonce = secrets.token_hex(4)
        texts: list[str] = []

        def stand_in(text: str) -> str:
            texts.append(text)
            return f"\ue000{nonce}:{len(texts) - 1}\ue001"

        rendered = self.render_chat(map_message_texts(messages, stand_in), tools)
        sentinel = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
        pattern = self._special_pattern
        if pattern is None:
            raise RuntimeError("no special tokens to protect")
        tok = self._require_tokenizer()
        ids: list[int] = []
        stretch: list[str] = []

        def flush() -> None:
            if stretch:
                ids.extend(self._encode("".join(stretch), False, split_special_tokens=True))
                stretch.clear()

        pos = 0
        for m in sentinel.finditer(rendered):
            template = rendered[pos : m.start()]
            pos = m.end()
            _split_specials(template, pattern, stretch, ids, flush, tok)
            stretch.append(texts[int(m.group(1))])
        _split_specials(rendered[pos:], pattern, stretch, ids, flush, tok)
        flush()
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self._require_tokenizer().decode(token_ids, skip_special_tokens=True)


# Tokenising this much text leaves the allocator holding its peak (the tokenizer's buffers,
# tens of bytes per character); give it back to the OS afterwards (malloc_trim: ~1 ms). The
# demo's longest acceptable text is 663,552 characters (docs/server.md).
RELEASE_MEMORY_CHARS = 1 << 18


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def message_texts(messages: list[dict[str, Any]]) -> list[str]:
    """Every client-written string of chat messages: contents, text parts, names."""
    out: list[str] = []

    def keep(text: str) -> str:
        out.append(text)
        return text

    map_message_texts(messages, keep)
    return out


def map_message_texts(messages: list[dict[str, Any]], fn: Any) -> list[dict[str, Any]]:
    """Copies of ``messages`` with ``fn`` applied to each string content, text part and name."""
    out = []
    for msg in messages:
        new = dict(msg)
        content = msg.get("content")
        if isinstance(content, str):
            new["content"] = fn(content)
        elif isinstance(content, list):
            new["content"] = [
                {**part, "text": fn(part["text"])}
                if part.get("type") == "text" and isinstance(part.get("text"), str)
                else part
                for part in content
            ]
        if isinstance(msg.get("name"), str):
            new["name"] = fn(msg["name"])
        out.append(new)
    return out


def _split_specials(
    text: str,
    pattern: re.Pattern[str],
    stretch: list[str],
    ids: list[int],
    flush: Any,
    tok: Any,
) -> None:
    """Template text: its special tokens become their ids, the text between joins the
    current stretch."""
    pos = 0
    for m in pattern.finditer(text):
        stretch.append(text[pos : m.start()])
        flush()
        ids.append(int(tok.convert_tokens_to_ids(m.group(0))))
        pos = m.end()
    stretch.append(text[pos:])


def _special_token_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex matching the tokenizer's special tokens (longest first), or None."""
    if tokenizer is None:
        return None
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = {str(t) for t in decoder.values() if getattr(t, "special", False)}
    specials |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials.discard("")
    if not specials:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))


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
