"""A model's whole shape: text decoder, vision tower and image sizing, from a model directory's
``config.json`` and processor config. The one parse both the runtime's decoder
(``nova.models.llama.LlamaDecoder`` takes the ``TextShape`` as its config) and the cost model's
spec (``nova.cost.model_spec.ModelSpec.from_shape``) derive from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nova.shapes.fields import ConfigError, JsonDict, opt_str, read_json_dict
from nova.shapes.processor import ProcessorConfig, dynamic_image_sizing, read_processor_config
from nova.shapes.sizing import ImageSizing
from nova.shapes.text import TextShape, parse_text, text_part
from nova.shapes.vision import VisionShape, parse_vision

CONFIG_FILE = "config.json"
# Configs of real architectures shipped with Nova (for load_format="dummy" and cost modelling).
SHIPPED_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "models" / "configs"


@dataclass(slots=True, frozen=True)
class ModelShape:
    """Everything Nova reads of a model's configs. ``processor_file`` names the processor config
    the image sizing came from; None when the directory has none (``processor_config_missing``
    for a vision model: its images are then sized with the published defaults)."""

    model_type: str  # top-level model_type ("" when absent)
    architectures: tuple[str, ...]  # as in config.json
    text: TextShape
    vision: VisionShape | None = None
    image_sizing: ImageSizing | None = None  # dynamic-resolution towers only
    processor_file: str | None = None
    dtype: str | None = None  # weights' dtype as written (torch_dtype / dtype), "torch." stripped
    note: str = ""  # Nova's own remark on a shipped config (_nova_note)

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    @property
    def processor_config_missing(self) -> bool:
        """A vision model whose directory has no processor config (neither layout)."""
        return self.vision is not None and self.processor_file is None


def parse_model_config(config: JsonDict, processor: ProcessorConfig | None = None) -> ModelShape:
    """The shape of a ``config.json`` dict (raw, or ``transformers``' ``config.to_dict()``) under
    an optional processor config. Raises ``ConfigError`` naming what is missing or wrong."""
    text = parse_text(config)
    vision = parse_vision(config, text.hidden_size)
    sizing = None
    if vision is not None and vision.dynamic_resolution:
        sizing = dynamic_image_sizing(
            vision.patch_size, vision.merge_size, vision.temporal_patch_size, processor
        )
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ConfigError(f"config: 'architectures' must be a list of names, got {architectures!r}")
    return ModelShape(
        model_type=opt_str(config, "model_type", "config") or "",
        architectures=tuple(str(a) for a in architectures),
        text=text,
        vision=vision,
        image_sizing=sizing,
        processor_file=processor.file if processor is not None else None,
        dtype=_dtype(config),
        note=opt_str(config, "_nova_note", "config") or "",
    )


def read_model_shape(path: str | Path) -> ModelShape:
    """The shape of a model directory (``config.json`` and its processor config, either
    layout), or of a config JSON file (with the processor config beside it)."""
    path = Path(path).expanduser()
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path}: no {CONFIG_FILE} to read a model shape from")
    config = read_json_dict(file)
    return parse_model_config(config, read_processor_config(file.parent))


def _dtype(config: JsonDict) -> str | None:
    text, _, _ = text_part(config)
    for d in (config, text):
        for key in ("torch_dtype", "dtype"):
            value = d.get(key)
            if isinstance(value, str):
                return value.removeprefix("torch.")
    return None
