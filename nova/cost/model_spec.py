"""A model's shape, as far as its cost is concerned: parameter counts, FLOPs and bytes per stage.

Torch-free (reads ``config.json`` as plain JSON, never ``transformers``). Two input formats:

- a Hugging Face model directory or ``config.json`` dict, read by ``nova.shapes`` (the same
  parse the runtime's decoder config derives from): LLaVA (CLIP or SigLIP tower, LLaVA's
  two-layer MLP projector), Qwen2-VL / Qwen2.5-VL (dynamic resolution, see below) or a plain
  Llama/Qwen2/Mistral causal LM; :meth:`ModelSpec.from_shape` maps a ``ModelShape`` here;
- Nova's own spec format (``{"format": "nova-model-spec", ...}``, the dataclass's fields), for
  shapes that are not LLaVA, e.g. ``specs/cogagent-9b.json``.

Conventions (all estimates count matmul FLOPs only, 2 FLOPs per multiply-add):

- The decoder computes logits only at each sequence's last new token (as Nova's runtime does),
  so the LM head costs ``2 * hidden * vocab`` FLOPs per sequence, not per token.
- Attention is causal for the decoder (query ``i`` of a sequence with ``c`` cached tokens sees
  ``c + i + 1`` keys) and full for the vision tower; score and value products both counted.
- Bytes are device-memory traffic of one forward: weights read once per batch, KV cache read
  for cached context and written for new tokens, and layer input/output activations
  (flash-style attention: no score matrix in memory). Norms, biases, rotary and softmax
  are ignored (< 1% at the shapes that matter).

Dynamic resolution (Qwen2-VL / Qwen2.5-VL): the tower's work depends on the image. A spec
describes one image size (``image_size``, square; by default the 1120x1120 reference
screenshot) whose ``vision_tokens`` (patches) and ``image_tokens`` (patches / merge**2) come
from the processor's resize rule within ``min_pixels``/``max_pixels``
(``nova.shapes.sizing``); :meth:`ModelSpec.for_image` gives the spec of another
resolution (e.g. a 1920x1080 screenshot) and :meth:`ModelSpec.image_tokens_for` its token
count. Qwen2.5-VL's window attention: all but ``vision_full_attn_layers`` layers attend within
windows of ``vision_window_tokens`` patches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nova.shapes import (
    CONFIG_FILE,
    REFERENCE_IMAGE_SIZE,
    SHIPPED_CONFIGS_DIR,
    ConfigError,
    ImageSizing,
    ModelShape,
    VisionShape,
    parse_model_config,
    read_processor_config,
)
from nova.shapes.fields import read_json_dict

SPEC_FORMAT = "nova-model-spec"
SPECS_DIR = Path(__file__).parent / "specs"

DEFAULT_BYTES_PER_PARAM = 2.0  # serving default when a config names no dtype: bf16
_DTYPE_BYTES = {
    "float32": 4.0,
    "float": 4.0,
    "float16": 2.0,
    "half": 2.0,
    "bfloat16": 2.0,
    "float8_e4m3fn": 1.0,
    "float8_e5m2": 1.0,
    "int8": 1.0,
}


# One GEMM shape: (M rows, N columns, K inner dimension, how many times it runs).
Gemm = tuple[int, int, int, int]


class UnknownModelError(ValueError):
    """An unknown model name or an unusable config (a ``ValueError`` for CLIs)."""


def _seq(x: Sequence[int] | int) -> tuple[int, ...]:
    return (int(x),) if isinstance(x, int) else tuple(int(v) for v in x)


@dataclass(slots=True, frozen=True)
class ModelSpec:
    """Shape of a (vision-)language model. Vision fields are 0 for a text-only model.

    ``vision_tokens``: tokens the vision tower itself processes per image (patches, + CLS).
    ``image_tokens``: tokens one image becomes in the LLM's prompt (after feature selection /
    downsampling). ``projector_params``: parameters of what maps vision features to LLM
    embeddings; it runs on ``image_tokens`` tokens per image (LLaVA: the MLP; GLM-4V: the
    2x2 conv + GLU, whose conv also produces ``image_tokens`` outputs).
    ``bytes_per_param``: weights, activations and KV cache are all stored in this precision.
    """

    name: str
    text_layers: int
    text_hidden: int
    text_intermediate: int
    text_heads: int
    text_kv_heads: int
    text_head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    text_mlp_matrices: int = 3  # SwiGLU: gate, up, down
    vision_layers: int = 0
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_heads: int = 0
    image_size: int = 0
    patch_size: int = 0
    vision_tokens: int = 0
    image_tokens: int = 0
    vision_mlp_matrices: int = 2  # fc1, fc2 (CLIP, SigLIP, EVA-CLIP)
    projector_params: int = 0
    # Dynamic resolution (0 / defaults: a fixed-size tower such as CLIP or SigLIP).
    vision_merge_size: int = 1  # merge x merge patches become one image token (Qwen-VL: 2)
    vision_temporal_patch: int = 1  # frames per patch (Qwen-VL: 2, an image is repeated)
    vision_pos_embed: bool = True  # learned position table (False: rotary, Qwen-VL)
    vision_window_tokens: int = 0  # patches per attention window (0: full attention everywhere)
    vision_full_attn_layers: int = 0  # layers with full attention when windowed
    min_pixels: int = 0  # resize limits of a dynamic-resolution tower (0: fixed image_size)
    max_pixels: int = 0
    bytes_per_param: float = 2.0
    description: str = ""

    def __post_init__(self) -> None:
        text = (
            self.text_layers,
            self.text_hidden,
            self.text_intermediate,
            self.text_heads,
            self.text_kv_heads,
            self.text_head_dim,
            self.vocab_size,
        )
        if min(text) < 1:
            raise ValueError(f"model spec {self.name!r}: text shape fields must be >= 1")
        if self.text_heads % self.text_kv_heads:
            raise ValueError(f"model spec {self.name!r}: heads must be a multiple of kv heads")
        vision = (
            self.vision_layers,
            self.vision_hidden,
            self.vision_intermediate,
            self.vision_heads,
            self.vision_tokens,
            self.image_tokens,
        )
        if any(v > 0 for v in vision) and min(vision) < 1:
            raise ValueError(
                f"model spec {self.name!r}: vision fields must be all >= 1 (or all 0 for a "
                f"text-only model), got layers/hidden/intermediate/heads/vision_tokens/"
                f"image_tokens = {vision}"
            )
        if self.bytes_per_param <= 0:
            raise ValueError(f"model spec {self.name!r}: bytes_per_param must be > 0")
        if self.vision_merge_size < 1 or self.vision_temporal_patch < 1:
            raise ValueError(
                f"model spec {self.name!r}: merge and temporal patch sizes must be >= 1"
            )
        if self.vision_full_attn_layers > self.vision_layers or self.vision_window_tokens < 0:
            raise ValueError(f"model spec {self.name!r}: bad window-attention fields")
        if (self.min_pixels > 0) != (self.max_pixels > 0) or self.min_pixels > self.max_pixels:
            raise ValueError(
                f"model spec {self.name!r}: min_pixels/max_pixels must be both 0 or "
                f"0 < min <= max, got {self.min_pixels}/{self.max_pixels}"
            )

    # -- parameters --------------------------------------------------------------------------
    @property
    def has_vision(self) -> bool:
        return self.vision_layers > 0

    @property
    def text_layer_params(self) -> int:
        """Matmul parameters of one decoder layer (q, k, v, o projections and the MLP)."""
        h, hd = self.text_hidden, self.text_head_dim
        attn = h * self.text_heads * hd * 2 + h * self.text_kv_heads * hd * 2
        return attn + self.text_mlp_matrices * h * self.text_intermediate

    @property
    def lm_head_params(self) -> int:
        return self.text_hidden * self.vocab_size

    def text_params(self) -> int:
        """All decoder parameters: layers, embedding and (unless tied) the LM head."""
        embeds = self.lm_head_params * (1 if self.tie_word_embeddings else 2)
        return self.text_layers * self.text_layer_params + embeds

    @property
    def vision_layer_params(self) -> int:
        h = self.vision_hidden
        return 4 * h * h + self.vision_mlp_matrices * h * self.vision_intermediate

    def vision_params(self) -> int:
        """Vision tower (layers, patch embedding, position embedding) plus projector."""
        if not self.has_vision:
            return 0
        patch_embed = self._patch_dim * self.vision_hidden
        pos_embed = self.vision_tokens * self.vision_hidden if self.vision_pos_embed else 0
        return (
            self.vision_layers * self.vision_layer_params
            + patch_embed
            + pos_embed
            + self.projector_params
        )

    @property
    def _patch_dim(self) -> int:
        return 3 * self.vision_temporal_patch * self.patch_size * self.patch_size

    # -- dynamic resolution ------------------------------------------------------------------
    @property
    def dynamic_resolution(self) -> bool:
        return self.max_pixels > 0

    def image_sizing(self) -> ImageSizing:
        """The resize rule of a dynamic-resolution tower (``nova.shapes.sizing``)."""
        if not self.dynamic_resolution:
            raise ValueError(f"model {self.name!r} takes fixed-size images")
        return ImageSizing(
            self.patch_size,
            self.vision_merge_size,
            self.vision_temporal_patch,
            self.min_pixels,
            self.max_pixels,
        )

    def image_tokens_for(self, width: int, height: int) -> int:
        """Image tokens a ``width x height`` image becomes in the prompt (fixed-size towers:
        ``image_tokens`` whatever the size, as their processor resizes to ``image_size``)."""
        self._require_vision()
        if not self.dynamic_resolution:
            return self.image_tokens
        return self.image_sizing().num_image_tokens(width, height)

    def for_image(self, width: int, height: int) -> ModelSpec:
        """This spec with the vision work of a ``width x height`` image (dynamic resolution;
        a fixed-size tower's spec is returned unchanged)."""
        self._require_vision()
        if not self.dynamic_resolution:
            return self
        patches = self.image_sizing().num_patches(width, height)
        return dataclasses.replace(
            self, vision_tokens=patches, image_tokens=patches // self.vision_merge_size**2
        )

    def with_pixel_limits(
        self,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> ModelSpec:
        """Served with other resize limits (``nova serve --min-pixels/--max-pixels``), sized
        for ``image_size`` (default: the spec's square ``image_size``)."""
        spec = dataclasses.replace(
            self,
            min_pixels=self.min_pixels if min_pixels is None else int(min_pixels),
            max_pixels=self.max_pixels if max_pixels is None else int(max_pixels),
        )
        w, h = image_size or (self.image_size, self.image_size)
        return spec.for_image(w, h)

    def num_params(self) -> int:
        return self.text_params() + self.vision_params()

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes one token occupies (all layers, K and V)."""
        return 2 * self.text_layers * self.text_kv_heads * self.text_head_dim * self.bytes_per_param

    # -- vision --------------------------------------------------------------------------------
    def _require_vision(self) -> None:
        if not self.has_vision:
            raise ValueError(f"model {self.name!r} has no vision tower")

    def vision_flops(self, num_images: int = 1) -> float:
        """FLOPs to encode ``num_images`` images (tower + projector)."""
        self._require_vision()
        t, h = self.vision_tokens, self.vision_hidden
        dense = 2.0 * self.vision_layers * self.vision_layer_params * t
        attn = 4.0 * h * self._vision_attention_pairs()  # scores + weighted values
        patch = 2.0 * t * self._patch_dim * h
        projector = 2.0 * self.projector_params * self.image_tokens
        return num_images * (dense + attn + patch + projector)

    def vision_gemms(self, num_images: int = 1) -> tuple[Gemm, ...]:
        """The tower's per-layer GEMMs as ``(M, N, K, count)`` (``count`` layers), images
        batched along M: qkv, out projection, the MLP's up (fused gate+up for SwiGLU) and down.
        They hold all of ``vision_layer_params``; patch embedding, projector and attention are
        the rest of ``vision_flops``."""
        self._require_vision()
        m, h, i, n = (
            num_images * self.vision_tokens,
            self.vision_hidden,
            self.vision_intermediate,
            self.vision_layers,
        )
        up = (self.vision_mlp_matrices - 1) * i
        return ((m, 3 * h, h, n), (m, h, h, n), (m, up, h, n), (m, h, i, n))

    def _vision_attention_pairs(self) -> float:
        """(query, key) pairs of one image summed over layers: full attention sees all
        ``vision_tokens``; a windowed layer at most ``vision_window_tokens`` keys per query."""
        t = self.vision_tokens
        if self.vision_window_tokens <= 0:
            return float(self.vision_layers * t * t)
        windowed = self.vision_layers - self.vision_full_attn_layers
        return float(
            self.vision_full_attn_layers * t * t + windowed * t * min(t, self.vision_window_tokens)
        )

    def vision_bytes(self, num_images: int = 1) -> float:
        """Device-memory bytes to encode ``num_images`` images: weights once per batch, plus
        per-image layer activations (each matmul reads its input and writes its output)."""
        self._require_vision()
        h, i = self.vision_hidden, self.vision_intermediate
        act_per_token_layer = (h + 3 * h) + (h + h) + (h + i) + (i + h)  # qkv, o, fc1, fc2
        act = self.vision_layers * self.vision_tokens * act_per_token_layer
        proj_act = self.image_tokens * (self.vision_hidden * 4 + 2 * self.text_hidden)
        return self.bytes_per_param * (self.vision_params() + num_images * (act + proj_act))

    # -- decoder (prefill and decode are the same computation with different shapes) ----------
    def llm_flops(
        self, new_tokens: Sequence[int] | int, context_lens: Sequence[int] | int
    ) -> float:
        """FLOPs of one decoder forward over several sequences: sequence ``s`` computes
        ``new_tokens[s]`` tokens on top of ``context_lens[s] - new_tokens[s]`` cached ones."""
        new, ctx = self._check_llm(new_tokens, context_lens)
        dense = 2.0 * self.text_layers * self.text_layer_params * sum(new)
        pairs = sum(n * (c - n) + n * (n + 1) / 2 for n, c in zip(new, ctx))  # causal (q, k)
        attn = 4.0 * self.text_layers * self.text_heads * self.text_head_dim * pairs
        lm_head = 2.0 * self.lm_head_params * len(new)
        return dense + attn + lm_head

    def llm_gemms(self, num_tokens: int, num_seqs: int) -> tuple[Gemm, ...]:
        """The decoder's GEMMs for a forward over ``num_tokens`` new tokens of ``num_seqs``
        sequences, as ``(M, N, K, count)``: per layer fused qkv, out projection, the MLP's up
        (fused gate+up) and down; then the LM head on each sequence's last token. They hold all
        of ``llm_flops`` but attention."""
        h, i, hd, n = self.text_hidden, self.text_intermediate, self.text_head_dim, self.text_layers
        q, kv = self.text_heads * hd, self.text_kv_heads * hd
        up = (self.text_mlp_matrices - 1) * i
        return (
            (num_tokens, q + 2 * kv, h, n),
            (num_tokens, h, q, n),
            (num_tokens, up, h, n),
            (num_tokens, h, i, n),
            (num_seqs, self.vocab_size, h, 1),
        )

    def llm_bytes(
        self, new_tokens: Sequence[int] | int, context_lens: Sequence[int] | int
    ) -> float:
        """Device-memory bytes of one decoder forward: layer weights and LM head (read once),
        embedding rows, KV cache (cached tokens read, new tokens written and read), and
        layer activations."""
        new, ctx = self._check_llm(new_tokens, context_lens)
        h, i, hd = self.text_hidden, self.text_intermediate, self.text_head_dim
        q, kv = self.text_heads * hd, self.text_kv_heads * hd
        weights = self.text_layers * self.text_layer_params + self.lm_head_params
        act_per_token_layer = (
            (h + q + 2 * kv) + (q + h) + (h + (self.text_mlp_matrices - 1) * i) + (i + h)
        )
        act = self.text_layers * act_per_token_layer * sum(new) + h * sum(new)  # + embeddings
        elems = weights + act
        kv_bytes = self.kv_bytes_per_token * (sum(ctx) + sum(new))  # read context, write new
        return self.bytes_per_param * elems + kv_bytes

    def prefill_flops(
        self, new_tokens: Sequence[int] | int, cached_tokens: Sequence[int] | int = 0
    ) -> float:
        new, cached = self._with_cached(new_tokens, cached_tokens)
        return self.llm_flops(new, [n + c for n, c in zip(new, cached)])

    def prefill_bytes(
        self, new_tokens: Sequence[int] | int, cached_tokens: Sequence[int] | int = 0
    ) -> float:
        new, cached = self._with_cached(new_tokens, cached_tokens)
        return self.llm_bytes(new, [n + c for n, c in zip(new, cached)])

    def decode_flops(self, context_lens: Sequence[int] | int) -> float:
        """One decode step; ``context_lens``: tokens in each sequence's KV after the step."""
        ctx = _seq(context_lens)
        return self.llm_flops((1,) * len(ctx), ctx)

    def decode_bytes(self, context_lens: Sequence[int] | int) -> float:
        ctx = _seq(context_lens)
        return self.llm_bytes((1,) * len(ctx), ctx)

    def _check_llm(
        self, new_tokens: Sequence[int] | int, context_lens: Sequence[int] | int
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        new, ctx = _seq(new_tokens), _seq(context_lens)
        if not new or len(new) != len(ctx):
            raise ValueError(f"need one context length per sequence, got {new} and {ctx}")
        if any(n < 1 or c < n for n, c in zip(new, ctx)):
            raise ValueError(f"each sequence needs 1 <= new tokens <= context, got {new}, {ctx}")
        return new, ctx

    @staticmethod
    def _with_cached(
        new_tokens: Sequence[int] | int, cached_tokens: Sequence[int] | int
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        new = _seq(new_tokens)
        cached = (
            (int(cached_tokens),) * len(new)
            if isinstance(cached_tokens, int)
            else _seq(cached_tokens)
        )
        if len(cached) != len(new):
            raise ValueError(f"need one cached count per sequence, got {new} and {cached}")
        return new, cached

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": SPEC_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Nova's own spec format (the dataclass fields, plus ``format``)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - {"format"})
        if unknown:
            raise ValueError(f"unknown model spec fields {unknown}; known: {sorted(fields)}")
        try:
            return cls(**{k: v for k, v in d.items() if k != "format"})
        except TypeError as exc:
            raise ValueError(f"incomplete model spec: {exc}") from exc

    @classmethod
    def from_config_dict(cls, d: dict[str, Any], name: str | None = None) -> ModelSpec:
        """From a HF ``config.json`` dict (no processor config: published image limits) or a
        Nova spec dict."""
        if d.get("format") == SPEC_FORMAT:
            spec = cls.from_dict(d)
            return dataclasses.replace(spec, name=name) if name else spec
        default_name = str(d.get("_name_or_path") or d.get("model_type") or "model")
        return cls.from_shape(parse_model_config(d), name or default_name)

    @classmethod
    def from_shape(cls, shape: ModelShape, name: str) -> ModelSpec:
        """The cost model's view of a parsed model shape (``nova.shapes``)."""
        text = shape.text
        vision: dict[str, Any] = {}
        if shape.vision is not None and shape.image_sizing is not None:
            vision = _dynamic_vision(shape.vision, shape.image_sizing)
        elif shape.vision is not None:
            vision = _fixed_size_vision(shape.vision, text.hidden_size)
        return cls(
            name=name,
            text_layers=text.num_layers,
            text_hidden=text.hidden_size,
            text_intermediate=text.intermediate_size,
            text_heads=text.num_heads,
            text_kv_heads=text.num_kv_heads,
            text_head_dim=text.head_dim,
            vocab_size=text.vocab_size,
            tie_word_embeddings=text.tie_word_embeddings,
            bytes_per_param=_DTYPE_BYTES.get(shape.dtype or "", DEFAULT_BYTES_PER_PARAM),
            description=shape.note,
            **vision,
        )

    @classmethod
    def from_dir(cls, path: str | Path, name: str | None = None) -> ModelSpec:
        """From a model directory's ``config.json`` and processor config (or a JSON file path,
        with the processor config beside it). Reads JSON only."""
        path = Path(path).expanduser()
        file = path / CONFIG_FILE if path.is_dir() else path
        if not file.is_file():
            raise UnknownModelError(f"{path}: no config.json to read a model shape from")
        default_name = path.name if path.is_dir() else path.stem
        try:
            d = read_json_dict(file)
            if d.get("format") == SPEC_FORMAT:
                return cls.from_config_dict(d, name or default_name)
            shape = parse_model_config(d, read_processor_config(file.parent))
            return cls.from_shape(shape, name or default_name)
        except (ConfigError, TypeError, ValueError) as exc:
            raise UnknownModelError(f"{file}: cannot read a model shape: {exc}") from exc

    @classmethod
    def named(cls, name: str) -> ModelSpec:
        """A shipped shape: ``nova/cost/specs/<name>.json`` or a loader config under
        ``nova/models/configs/<name>``; or a model directory path."""
        sources = _named_sources()
        if name in sources:
            return cls.from_dir(sources[name], name=name)
        if Path(name).expanduser().is_dir():
            return cls.from_dir(name)
        raise UnknownModelError(
            f"unknown model {name!r}; shipped shapes: {', '.join(sorted(sources))} "
            f"(or pass a model directory)"
        )


def available_model_specs() -> list[str]:
    return sorted(_named_sources())


def get_model_spec(model: ModelSpec | str) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else ModelSpec.named(model)


def _named_sources() -> dict[str, Path]:
    sources: dict[str, Path] = {}
    if SHIPPED_CONFIGS_DIR.is_dir():
        for p in SHIPPED_CONFIGS_DIR.iterdir():
            if (p / "config.json").is_file():
                sources[p.name] = p / "config.json"
    for p in SPECS_DIR.glob("*.json"):
        sources[p.stem] = p  # Nova's own specs win over a loader config of the same name
    return sources


# -- vision sides of a parsed shape ---------------------------------------------------------------
def _dynamic_vision(vision: VisionShape, sizing: ImageSizing) -> dict[str, Any]:
    """Qwen2-VL (LayerNorm ViT, fc1/fc2 MLP) or Qwen2.5-VL (RMSNorm, SwiGLU, window attention)
    tower, rotary positions (no table), and the patch merger: LayerNorm -> Linear(4h, 4h) ->
    GELU -> Linear(4h, out_hidden) on every 2x2 group of patches. Sized for the reference
    screenshot (``for_image`` for others)."""
    merge = vision.merge_size
    merged = vision.hidden_size * merge * merge
    width, height = REFERENCE_IMAGE_SIZE
    patches = sizing.num_patches(width, height)
    return dict(
        vision_layers=vision.num_layers,
        vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size,
        vision_heads=vision.num_heads,
        image_size=width,
        patch_size=vision.patch_size,
        vision_tokens=patches,
        image_tokens=patches // (merge * merge),
        vision_mlp_matrices=vision.mlp_matrices,
        projector_params=merged * merged + merged * vision.out_hidden_size,
        vision_merge_size=merge,
        vision_temporal_patch=vision.temporal_patch_size,
        vision_pos_embed=False,
        vision_window_tokens=vision.window_tokens,
        vision_full_attn_layers=vision.full_attn_layers,
        min_pixels=sizing.min_pixels,
        max_pixels=sizing.max_pixels,
    )


def _fixed_size_vision(vision: VisionShape, text_hidden: int) -> dict[str, Any]:
    """LLaVA's vision side, as ``nova.models.vision`` runs it (the whole tower; the projector is
    Linear(vision_hidden * layers selected, text_hidden) -> GELU -> Linear(text, text))."""
    selected = len(vision.feature_layers)
    projector = vision.hidden_size * selected * text_hidden + text_hidden * text_hidden
    return dict(
        vision_layers=vision.num_layers,
        vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size,
        vision_heads=vision.num_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        vision_tokens=vision.tower_tokens,
        image_tokens=vision.image_tokens,
        vision_mlp_matrices=vision.mlp_matrices,
        projector_params=projector,
    )
