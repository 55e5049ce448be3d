"""The text decoder's shape from a ``config.json`` dict, with each family's rules written out.

Families and where their text fields live:

- ``llama``, ``qwen2``, ``mistral``: a causal LM, fields at the top level;
- ``llava``: the language model's fields in ``text_config`` (its ``model_type`` names the
  family; ``llama`` when absent, as in ``transformers``);
- ``qwen2_vl``, ``qwen2_5_vl``: fields at the top level in the published checkpoints, in
  ``text_config`` (``model_type`` ``qwen2_vl_text`` / ``qwen2_5_vl_text``) as ``transformers`` 5
  saves them; both are read.

Rules per family, as ``transformers`` 5.x (5.24) builds each model, checked against it by
``tests/test_shapes.py``:

- ``head_dim``: Llama, Qwen2 and Mistral use ``head_dim`` when the config states one, else
  ``hidden_size // num_attention_heads``. Qwen2-VL and Qwen2.5-VL text attention always uses
  ``hidden_size // num_attention_heads`` (their text config has no ``head_dim``); a stated
  ``head_dim`` that differs is refused, since ``transformers``' own rotary embedding then takes
  the stated value and the model cannot run.
- Biases: Llama puts ``attention_bias`` on q/k/v/o and ``mlp_bias`` on the MLP; Qwen2 and the
  Qwen-VL text models always have q/k/v biases and no other (both flags ignored); Mistral has
  none (both flags ignored).
- Tied embeddings: the top-level ``tie_word_embeddings`` or the text config's (``transformers``
  5 forwards a ``text_config`` value of true to the top level for LLaVA and Qwen-VL).
- Sliding window: Qwen2 and Qwen-VL only with ``use_sliding_window``; Mistral whenever
  ``sliding_window`` is not null (4096 when absent); Llama never.
- Defaults of fields a config may leave out (``max_position_embeddings``, ``rms_norm_eps``,
  ``rope_theta``) are the family's config class defaults; other families (cost modelling only)
  get Llama's rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nova.shapes.fields import (
    ConfigError,
    JsonDict,
    bool_or,
    dict_field,
    float_or,
    int_list,
    int_or,
    opt_bool,
    opt_int,
    opt_str,
    req_int,
    str_or,
)

LLAMA, QWEN2, MISTRAL = "llama", "qwen2", "mistral"
QWEN2_VL, QWEN2_5_VL = "qwen2_vl", "qwen2_5_vl"
QWEN_VL_MODEL_TYPES = (QWEN2_VL, QWEN2_5_VL)
LLAVA = "llava"
# transformers' default M-RoPE split of the rotary frequencies over (temporal, height, width).
DEFAULT_MROPE_SECTION = (16, 24, 24)


@dataclass(slots=True, frozen=True)
class FamilyRules:
    """How ``transformers`` reads one text family's config (see the module doc)."""

    stated_head_dim: bool  # head_dim from the config when stated (False: hidden // heads)
    biases: Literal["config", "qkv", "none"]
    sliding_window: Literal["never", "flag", "always"]
    max_position_embeddings: int  # tokens
    rms_norm_eps: float
    rope_theta: float


FAMILY_RULES: dict[str, FamilyRules] = {
    LLAMA: FamilyRules(True, "config", "never", 2048, 1e-6, 10000.0),
    QWEN2: FamilyRules(True, "qkv", "flag", 32768, 1e-6, 10000.0),
    MISTRAL: FamilyRules(True, "none", "always", 131072, 1e-6, 10000.0),
    QWEN2_VL: FamilyRules(False, "qkv", "flag", 32768, 1e-5, 1000000.0),
    QWEN2_5_VL: FamilyRules(False, "qkv", "flag", 32768, 1e-5, 1000000.0),
}
SLIDING_WINDOW_DEFAULT_TOKENS = 4096  # Qwen2's and Mistral's config default


@dataclass(slots=True, frozen=True)
class RopeShape:
    """Rotary position embedding of the decoder."""

    rope_type: str = "default"  # a transformers ROPE_INIT_FUNCTIONS key; Qwen-VL's "mrope" reads
    # as "default" (M-RoPE only splits the default frequencies)
    theta: float = 10000.0  # base of the rotary frequencies
    # Qwen-VL: rotary frequencies per position row (temporal, height, width); None: 1-D RoPE.
    mrope_section: tuple[int, ...] | None = None


@dataclass(slots=True, frozen=True)
class TextShape:
    """The text decoder's shape; ``nova.models.llama.LlamaDecoder`` takes it as its config."""

    family: str  # llama, qwen2, mistral, qwen2_vl, qwen2_5_vl; another model_type as written
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int  # tokens
    hidden_act: str
    rope: RopeShape
    sliding_window: int | None = None  # tokens a query attends back; None: full attention


def text_part(config: JsonDict) -> tuple[JsonDict, str, str]:
    """(dict holding the text fields, its name for messages, text family) of a config."""
    model_type = opt_str(config, "model_type", "config") or ""
    text_config = dict_field(config, "text_config", "config")
    if model_type in QWEN_VL_MODEL_TYPES:
        if text_config is not None:
            return text_config, "text_config", model_type
        return config, "config", model_type
    if text_config is not None:
        text_type = str_or(text_config, "model_type", "text_config", LLAMA)
        return text_config, "text_config", text_type
    return config, "config", model_type


def parse_text(config: JsonDict) -> TextShape:
    """The text decoder's shape of a ``config.json`` dict (any family; see the module doc)."""
    text, where, family = text_part(config)
    rules = FAMILY_RULES.get(family, FAMILY_RULES[LLAMA])
    hidden = req_int(text, "hidden_size", where)
    heads = req_int(text, "num_attention_heads", where)
    if heads < 1:
        raise ConfigError(f"{where}: num_attention_heads must be >= 1, got {heads}")
    qkv_bias, o_bias, mlp_bias = _biases(text, where, rules)
    tied = bool(opt_bool(config, "tie_word_embeddings", "config"))
    if text is not config:
        tied = tied or bool(opt_bool(text, "tie_word_embeddings", where))
    return TextShape(
        family=family,
        vocab_size=req_int(text, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=req_int(text, "intermediate_size", where),
        num_layers=req_int(text, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=int_or(text, "num_key_value_heads", where, heads),
        head_dim=_head_dim(text, where, rules, hidden, heads),
        rms_norm_eps=float_or(text, "rms_norm_eps", where, rules.rms_norm_eps),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        tie_word_embeddings=tied,
        max_position_embeddings=int_or(
            text, "max_position_embeddings", where, rules.max_position_embeddings
        ),
        hidden_act=str_or(text, "hidden_act", where, "silu"),
        rope=_rope(text, where, rules, family),
        sliding_window=_sliding_window(text, where, rules),
    )


def _head_dim(text: JsonDict, where: str, rules: FamilyRules, hidden: int, heads: int) -> int:
    stated = opt_int(text, "head_dim", where)
    if rules.stated_head_dim:
        return hidden // heads if stated is None else stated
    if hidden % heads:
        raise ConfigError(
            f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        )
    if stated is not None and stated != hidden // heads:
        raise ConfigError(
            f"{where}: head_dim {stated} differs from hidden_size / num_attention_heads = "
            f"{hidden // heads}, which this family's attention uses; transformers cannot run "
            f"this config either"
        )
    return hidden // heads


def _biases(text: JsonDict, where: str, rules: FamilyRules) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o bias, MLP bias)."""
    if rules.biases == "qkv":
        return True, False, False
    if rules.biases == "none":
        return False, False, False
    attention = bool_or(text, "attention_bias", where, False)
    return attention, attention, bool_or(text, "mlp_bias", where, False)


def _sliding_window(text: JsonDict, where: str, rules: FamilyRules) -> int | None:
    if rules.sliding_window == "never":
        return None
    if rules.sliding_window == "flag" and not bool_or(text, "use_sliding_window", where, False):
        return None
    if "sliding_window" not in text:
        return SLIDING_WINDOW_DEFAULT_TOKENS
    return opt_int(text, "sliding_window", where)


def _rope(text: JsonDict, where: str, rules: FamilyRules, family: str) -> RopeShape:
    """From ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta`` (older)."""
    params = (
        dict_field(text, "rope_parameters", where) or dict_field(text, "rope_scaling", where) or {}
    )
    rope_where = f"{where} rope parameters"
    rope_type = opt_str(params, "rope_type", rope_where) or opt_str(params, "type", rope_where)
    theta = float_or(
        params, "rope_theta", rope_where, float_or(text, "rope_theta", where, rules.rope_theta)
    )
    section = None
    if family in QWEN_VL_MODEL_TYPES:
        section = int_list(params, "mrope_section", rope_where) or DEFAULT_MROPE_SECTION
    return RopeShape(
        rope_type="default" if rope_type in (None, "mrope") else rope_type,
        theta=theta,
        mrope_section=section,
    )
