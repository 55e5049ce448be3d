"""The image-processor part of a model directory's processor config, and the image sizing of a
dynamic-resolution (Qwen2-VL / Qwen2.5-VL) model that follows from it.

Two layouts exist, and Nova reads both with ``transformers`` 5's precedence:

1. ``processor_config.json`` whose ``image_processor`` entry holds the image processor's
   settings (what ``transformers`` 5 writes on ``ProcessorMixin.save_pretrained``);
2. ``preprocessor_config.json``, flat (the published Qwen-VL and LLaVA checkpoints, and what an
   image processor's own ``save_pretrained`` writes).

A ``processor_config.json`` without an ``image_processor`` entry (older processors wrote only
their own arguments there) does not count; the flat file is read then.

Qwen-VL limits: ``min_pixels`` / ``max_pixels`` when given, else ``size.shortest_edge`` /
``size.longest_edge`` (``transformers`` 5 stores them there; ``min_pixels``/``max_pixels`` win
when both are written, as in its image processor's constructor), else the image processor
class's defaults (``56*56`` and ``28*28*1280`` pixels; patch 14, merge 2, temporal patch 2).
A model directory with no processor config at all is sized with the vision config's patch
geometry and the published checkpoints' limits (``3136`` .. ``12845056`` pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nova.shapes.fields import ConfigError, JsonDict, dict_field, opt_int, read_json_dict
from nova.shapes.sizing import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, ImageSizing

PROCESSOR_CONFIG_FILE = "processor_config.json"  # nested: {"image_processor": {...}, ...}
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"  # flat
# transformers 5's Qwen2VLImageProcessor class defaults, for keys a processor config leaves out.
PROCESSOR_DEFAULT_PATCH_SIZE = 14
PROCESSOR_DEFAULT_MERGE_SIZE = 2
PROCESSOR_DEFAULT_TEMPORAL_PATCH_SIZE = 2
PROCESSOR_DEFAULT_MIN_PIXELS = 56 * 56
PROCESSOR_DEFAULT_MAX_PIXELS = 28 * 28 * 1280


@dataclass(slots=True, frozen=True)
class ProcessorConfig:
    """What Nova reads of an image processor's settings; None where the file does not say."""

    file: str  # the file it came from (PROCESSOR_CONFIG_FILE or PREPROCESSOR_CONFIG_FILE)
    patch_size: int | None = None  # pixels per patch side
    merge_size: int | None = None  # patches per merged-token side
    temporal_patch_size: int | None = None  # frames per patch
    min_pixels: int | None = None  # resize limits of a dynamic-resolution processor (pixels)
    max_pixels: int | None = None


def parse_processor_config(d: JsonDict, file: str) -> ProcessorConfig:
    """The image processor's settings from the JSON object of ``file``: the ``image_processor``
    entry of a nested ``processor_config.json``, or the flat dict itself."""
    nested = dict_field(d, "image_processor", file)
    pre = nested if nested is not None else d
    where = f"{file} image_processor" if nested is not None else file
    size = dict_field(pre, "size", where) or {}
    min_pixels = opt_int(pre, "min_pixels", where)
    max_pixels = opt_int(pre, "max_pixels", where)
    return ProcessorConfig(
        file=file,
        patch_size=opt_int(pre, "patch_size", where),
        merge_size=opt_int(pre, "merge_size", where),
        temporal_patch_size=opt_int(pre, "temporal_patch_size", where),
        min_pixels=min_pixels if min_pixels is not None else opt_int(size, "shortest_edge", where),
        max_pixels=max_pixels if max_pixels is not None else opt_int(size, "longest_edge", where),
    )


def read_processor_config(model_dir: Path) -> ProcessorConfig | None:
    """The processor config of ``model_dir`` (either layout, see the module doc); None if the
    directory has neither file."""
    nested_file = model_dir / PROCESSOR_CONFIG_FILE
    if nested_file.is_file():
        d = read_json_dict(nested_file)
        if "image_processor" in d:
            return parse_processor_config(d, PROCESSOR_CONFIG_FILE)
    flat_file = model_dir / PREPROCESSOR_CONFIG_FILE
    if flat_file.is_file():
        return parse_processor_config(read_json_dict(flat_file), PREPROCESSOR_CONFIG_FILE)
    return None


def dynamic_image_sizing(
    patch_size: int, merge_size: int, temporal_patch_size: int, processor: ProcessorConfig | None
) -> ImageSizing:
    """Image sizing of a dynamic-resolution tower of the given patch geometry (its vision
    config), under ``processor`` (None: no processor config). The processor cuts the patches the
    tower embeds, so a processor whose geometry differs from the tower's is refused."""
    if processor is None:
        return ImageSizing(
            patch_size, merge_size, temporal_patch_size, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS
        )
    geometry = {
        "patch_size": (processor.patch_size, PROCESSOR_DEFAULT_PATCH_SIZE, patch_size),
        "merge_size": (processor.merge_size, PROCESSOR_DEFAULT_MERGE_SIZE, merge_size),
        "temporal_patch_size": (
            processor.temporal_patch_size,
            PROCESSOR_DEFAULT_TEMPORAL_PATCH_SIZE,
            temporal_patch_size,
        ),
    }
    for name, (stated, default, tower) in geometry.items():
        used = default if stated is None else stated
        if used != tower:
            raise ConfigError(
                f"{processor.file}: the image processor's {name} is {used}"
                f"{'' if stated is not None else ' (its default)'}, the vision config's {tower}"
            )
    try:
        return ImageSizing(
            patch_size,
            merge_size,
            temporal_patch_size,
            _or(processor.min_pixels, PROCESSOR_DEFAULT_MIN_PIXELS),
            _or(processor.max_pixels, PROCESSOR_DEFAULT_MAX_PIXELS),
        )
    except ValueError as exc:
        raise ConfigError(f"{processor.file}: {exc}") from exc


def _or(value: int | None, default: int) -> int:
    return default if value is None else value
