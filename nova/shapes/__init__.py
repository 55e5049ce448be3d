"""A model's shape from its configs: one torch-free, transformers-free parse of ``config.json``
and the processor config (``processor_config.json`` or ``preprocessor_config.json``).

- ``model``: :class:`ModelShape` (text decoder, vision tower, image sizing) and
  :func:`read_model_shape` / :func:`parse_model_config`;
- ``text``: :class:`TextShape` and each text family's rules (``head_dim``, biases, tied
  embeddings, defaults), as ``transformers`` reads them;
- ``vision``: :class:`VisionShape` (CLIP / SigLIP for LLaVA; Qwen2-VL / Qwen2.5-VL towers);
- ``processor``: both processor-config layouts, and the image sizing of a dynamic-resolution
  model;
- ``sizing``: :class:`ImageSizing`, Qwen-VL's resize rule (resized size, patch grid, tokens);
- ``fields``: typed JSON field readers and :class:`ConfigError`.

The runtime's decoder config and the cost model's spec both derive from a :class:`ModelShape`.
"""

from __future__ import annotations

from nova.shapes.fields import ConfigError
from nova.shapes.model import (
    CONFIG_FILE,
    SHIPPED_CONFIGS_DIR,
    ModelShape,
    parse_model_config,
    read_model_shape,
)
from nova.shapes.processor import ProcessorConfig, read_processor_config
from nova.shapes.sizing import REFERENCE_IMAGE_SIZE, ImageSizeError, ImageSizing
from nova.shapes.text import RopeShape, TextShape
from nova.shapes.vision import VisionShape

__all__ = [
    "CONFIG_FILE",
    "REFERENCE_IMAGE_SIZE",
    "SHIPPED_CONFIGS_DIR",
    "ConfigError",
    "ImageSizeError",
    "ImageSizing",
    "ModelShape",
    "ProcessorConfig",
    "RopeShape",
    "TextShape",
    "VisionShape",
    "parse_model_config",
    "read_model_shape",
    "read_processor_config",
]
