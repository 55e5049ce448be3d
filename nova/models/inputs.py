"""From a chat (text + images) to model inputs: prompt token ids with image placeholders expanded
and pixel values. Images are checked here; a bad one raises ``InvalidInputError`` naming it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nova.models.errors import InvalidInputError
from nova.models.loader import LoadedModel
from nova.models.vision import num_image_tokens

ImageSource = bytes | str | Path | Any  # Any: a PIL.Image.Image


@dataclass(slots=True)
class PromptInput:
    """A tokenised prompt ready for the engine: placeholders already expanded."""

    token_ids: list[int]
    pixel_values: torch.Tensor | None = None  # [num_images, 3, H, W]
    num_images: int = 0


def load_image(source: ImageSource, max_pixels: int | None = None) -> Any:
    """Open an image from bytes, a path or a PIL image; RGB. Raises ``InvalidInputError``."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            if isinstance(source, bytes):
                image = Image.open(io.BytesIO(source))
            else:
                image = Image.open(Path(source))
            image.load()
        except FileNotFoundError as exc:
            raise InvalidInputError(f"image file not found: {source}") from exc
        except Image.DecompressionBombError as exc:
            raise InvalidInputError(f"image is too large to decode safely: {exc}") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            what = "image bytes" if isinstance(source, bytes) else f"file {source}"
            raise InvalidInputError(f"{what} could not be decoded as an image: {exc}") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInputError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidInputError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels}")
    return image.convert("RGB")


def expand_image_placeholders(
    token_ids: list[int], image_token_id: int, num_tokens_per_image: int, num_images: int
) -> list[int]:
    """Replace each image placeholder token by ``num_tokens_per_image`` copies of it.

    A prompt may come already expanded (exactly ``num_images * num_tokens_per_image``
    placeholders); then it is returned unchanged.
    """
    count = token_ids.count(image_token_id)
    if count == num_images * num_tokens_per_image and num_images > 0:
        return list(token_ids)
    if count != num_images:
        raise InvalidInputError(
            f"prompt has {count} image placeholders but {num_images} images were given"
        )
    out: list[int] = []
    for tok in token_ids:
        out.extend([tok] * num_tokens_per_image if tok == image_token_id else [tok])
    return out


def chat_messages(text: str, num_images: int = 0, system: str | None = None) -> list[dict[str, Any]]:
    """One user turn (``num_images`` image parts, then the text), after an optional system turn."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": text})
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


class InputProcessor:
    """Chat template, tokenizer and image processor of one loaded model."""

    def __init__(self, loaded: LoadedModel, max_image_pixels: int | None = None) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.image_processor = loaded.image_processor
        self.max_image_pixels = max_image_pixels
        self.image_token_id = loaded.model.image_token_id
        self.num_image_tokens = (
            num_image_tokens(loaded.hf_config) if loaded.model.is_multimodal else 0
        )

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise InvalidInputError(
                f"model {self.loaded.model_dir} has no tokenizer; send token ids instead of text"
            )
        return self.tokenizer

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        tok = self._require_tokenizer()
        try:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            raise InvalidInputError(f"chat template failed on these messages: {exc}") from exc

    def pixel_values(self, images: list[ImageSource]) -> torch.Tensor | None:
        if not images:
            return None
        if self.image_processor is None:
            raise InvalidInputError("this model does not take images")
        pil = [load_image(img, self.max_image_pixels) for img in images]
        out = self.image_processor(images=pil, return_tensors="pt")
        return out["pixel_values"]

    def from_token_ids(
        self, token_ids: list[int], images: list[ImageSource] | None = None
    ) -> PromptInput:
        images = images or []
        if images and self.image_token_id is None:
            raise InvalidInputError("this model does not take images")
        ids = [int(t) for t in token_ids]
        if self.image_token_id is not None:
            ids = expand_image_placeholders(
                ids, self.image_token_id, self.num_image_tokens, len(images)
            )
        if not ids:
            raise InvalidInputError("the prompt is empty")
        vocab = self.loaded.model.decoder.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidInputError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        return PromptInput(ids, self.pixel_values(images), len(images))

    def from_text(
        self, prompt: str, images: list[ImageSource] | None = None, add_special_tokens: bool = True
    ) -> PromptInput:
        tok = self._require_tokenizer()
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
