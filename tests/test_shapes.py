"""The one parse of a model's configs (nova.shapes): torch-free; the decoder config and the cost
model's spec derived from it agree for every shipped config and spec; each family's head_dim,
bias and default rules equal what transformers builds; both processor-config layouts give the
same image sizing, which equals the live image processor's."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nova.cost.model_spec import SPECS_DIR, ModelSpec
from nova.shapes import (
    SHIPPED_CONFIGS_DIR,
    ConfigError,
    ImageSizing,
    ModelShape,
    TextShape,
    parse_model_config,
    read_model_shape,
    read_processor_config,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.name for p in SHIPPED_CONFIGS_DIR.iterdir() if (p / "config.json").is_file())
QWEN_SHIPPED = [n for n in SHIPPED if n.startswith("qwen2") and "-vl-" in n]
# Nova spec files with no loadable config behind them (shape estimates for cost modelling only).
SPEC_ONLY = {"cogagent-9b"}
# (decoder config field, model spec field) of what both describe.
SHARED_FIELDS = [
    ("num_layers", "text_layers"),
    ("num_heads", "text_heads"),
    ("num_kv_heads", "text_kv_heads"),
    ("head_dim", "text_head_dim"),
    ("hidden_size", "text_hidden"),
    ("intermediate_size", "text_intermediate"),
    ("vocab_size", "vocab_size"),
    ("tie_word_embeddings", "tie_word_embeddings"),
]


def _assert_agree(decoder: TextShape, spec: ModelSpec, what: str) -> None:
    for ours, theirs in SHARED_FIELDS:
        assert getattr(decoder, ours) == getattr(spec, theirs), (what, ours)


# -- torch-free ---------------------------------------------------------------------------------
def test_parse_is_torch_and_transformers_free():
    code = (
        "import sys\n"
        "from nova.shapes import SHIPPED_CONFIGS_DIR, read_model_shape\n"
        "for d in SHIPPED_CONFIGS_DIR.iterdir():\n"
        "    read_model_shape(d)\n"
        "from nova.cost.model_spec import ModelSpec\n"
        "ModelSpec.named('qwen2.5-vl-7b').for_image(1920, 1080)\n"
        "bad = [m for m in ('torch', 'transformers', 'nova.models') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# -- one source of truth ------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED)
def test_decoder_config_and_model_spec_agree_for_shipped_configs(name):
    shape = read_model_shape(SHIPPED_CONFIGS_DIR / name)
    _assert_agree(shape.text, ModelSpec.named(name), name)


@pytest.mark.parametrize("name", SHIPPED)
def test_raw_config_and_transformers_config_parse_alike(name):
    """The loader builds the decoder from transformers' config object (its to_dict(), nested
    text_config and rope_parameters as transformers 5 writes them); the cost model reads the raw
    config.json (flat Qwen-VL fields, rope_scaling). Both parse to the same shape."""
    from transformers import AutoConfig

    from nova.models.registry import model_shape

    raw = read_model_shape(SHIPPED_CONFIGS_DIR / name)
    hf = AutoConfig.from_pretrained(SHIPPED_CONFIGS_DIR / name, local_files_only=True)
    via_transformers = model_shape(hf)
    assert via_transformers.text == raw.text
    assert via_transformers.vision == raw.vision


def test_cost_specs_agree_with_their_models():
    """Every Nova spec in nova/cost/specs/ is either a spec-only estimate (listed) or the shape
    of a loadable model, whose decoder config it agrees with."""
    from nova.models.demo import build_demo_model

    specs = sorted(p.stem for p in SPECS_DIR.glob("*.json"))
    assert set(SPEC_ONLY) < set(specs)
    model_dirs = {"demo": build_demo_model()}
    assert set(specs) - SPEC_ONLY == set(model_dirs)
    for name, model_dir in model_dirs.items():
        shape = read_model_shape(model_dir)
        spec = ModelSpec.named(name)
        _assert_agree(shape.text, spec, name)
        assert spec.image_tokens == shape.vision.image_tokens
    for name in SPEC_ONLY:
        spec = ModelSpec.named(name)
        assert (
            spec.text_heads * spec.text_head_dim > 0 and not (SHIPPED_CONFIGS_DIR / name).exists()
        )


def test_tiny_checkpoints_parse_alike_raw_and_loaded(tiny_dirs, tiny_qwen_vl_dirs):
    """transformers 5's own save_pretrained layout (nested text_config, rope_parameters)."""
    from nova.models.loader import load_model

    for name, d in {**tiny_dirs, **tiny_qwen_vl_dirs}.items():
        loaded = load_model(d, load_format="dummy")
        shape = read_model_shape(d)
        assert loaded.model.decoder.cfg == shape.text, name
        assert loaded.shape == shape
        _assert_agree(loaded.model.decoder.cfg, ModelSpec.from_dir(d), name)


# -- each family's rules, as transformers builds the model ---------------------------------------
TINY = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _tiny_transformers_model(family: str, **text_kw):
    """(transformers config, its text model's first attention and MLP) of a tiny model."""
    import transformers as tf

    text = dict(TINY, **text_kw)
    if family in ("llama", "qwen2", "mistral"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}
        cfg = cls[family](**text)
        model = tf.AutoModelForCausalLM.from_config(cfg)
        layer = model.model.layers[0]
    elif family.startswith("llava-"):
        text_cls = {"llava-llama": tf.LlamaConfig, "llava-qwen2": tf.Qwen2Config}[family]
        cfg = tf.LlavaConfig(
            text_config=text_cls(**text),
            vision_config=tf.CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=16,
            ),
        )
        model = tf.LlavaForConditionalGeneration(cfg)
        layer = model.model.language_model.layers[0]
    else:
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3]}
        if family == "qwen2_vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2)
            cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision)
            model = tf.Qwen2VLForConditionalGeneration(cfg)
        else:
            vision = dict(
                depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64
            )
            cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision)
            model = tf.Qwen2_5_VLForConditionalGeneration(cfg)
        layer = model.model.language_model.layers[0]
    return cfg, model, layer.self_attn, layer.mlp


FAMILIES = ["llama", "qwen2", "mistral", "llava-llama", "llava-qwen2", "qwen2_vl", "qwen2_5_vl"]
# A stated head_dim for the Qwen-VL families: test_qwen_vl_refuses_a_head_dim_...
HEAD_DIM_CASES = [(f, hd) for f in FAMILIES for hd in (None, 32) if hd is None or "_" not in f]


@pytest.mark.parametrize(("family", "head_dim"), HEAD_DIM_CASES)
@pytest.mark.parametrize("flags", [{}, {"attention_bias": True, "mlp_bias": True}])
def test_head_dim_and_bias_rules_equal_transformers(family, head_dim, flags):
    kw = dict(flags, **({} if head_dim is None else {"head_dim": head_dim}))
    cfg, _, attn, mlp = _tiny_transformers_model(family, **kw)
    ours = parse_model_config(cfg.to_dict()).text
    assert attn.q_proj.out_features == ours.num_heads * ours.head_dim
    assert attn.k_proj.out_features == ours.num_kv_heads * ours.head_dim
    assert ours.head_dim == (head_dim or TINY["hidden_size"] // TINY["num_attention_heads"])
    for proj, bias in [("q_proj", ours.qkv_bias), ("k_proj", ours.qkv_bias)]:
        assert (getattr(attn, proj).bias is not None) == bias, proj
    assert (attn.v_proj.bias is not None) == ours.qkv_bias
    assert (attn.o_proj.bias is not None) == ours.o_bias
    assert (mlp.gate_proj.bias is not None) == ours.mlp_bias
    assert (mlp.down_proj.bias is not None) == ours.mlp_bias


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_refuses_a_head_dim_transformers_cannot_run(family):
    cfg, model, attn, _ = _tiny_transformers_model(family, head_dim=32)
    assert attn.head_dim == 16  # transformers' attention ignores head_dim ...
    with pytest.raises(RuntimeError):  # ... and its rotary embedding does not: no forward
        model(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ConfigError, match="head_dim 32 differs from .* = 16"):
        parse_model_config(cfg.to_dict())


def _minimal_raw(family: str) -> dict:
    text = dict(TINY)
    if family in ("llama", "qwen2", "mistral"):
        return dict(text, model_type=family)
    if family.startswith("llava-"):
        vision = dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        )
        text["model_type"] = family.removeprefix("llava-")
        return dict(model_type="llava", text_config=text, vision_config=vision)
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, num_heads=2)
    else:
        vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2)
    return dict(text, model_type=family, vision_config=vision)


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_of_left_out_fields_equal_transformers(family):
    """A config that states only the required fields: our family defaults (max positions, norm
    eps, rope theta, kv heads, biases, tie, sliding window, vision geometry) equal the config
    classes' of transformers."""
    from transformers import AutoConfig

    raw = _minimal_raw(family)
    hf = AutoConfig.for_model(**raw)
    ours, theirs = parse_model_config(raw), parse_model_config(hf.to_dict())
    assert ours.text == theirs.text
    if family.startswith("qwen2_"):  # transformers' default merger width is 3584: unrunnable
        assert ours.vision == dataclasses.replace(theirs.vision, out_hidden_size=64)
    else:
        assert ours.vision == theirs.vision


def test_transformers_5_rope_and_sliding_window_fields():
    shape = read_model_shape(SHIPPED_CONFIGS_DIR / "llama-3.1-8b")
    assert (shape.text.rope.rope_type, shape.text.rope.theta) == ("llama3", 500000.0)
    qwen = read_model_shape(SHIPPED_CONFIGS_DIR / "qwen2-vl-7b").text
    assert qwen.rope.rope_type == "default" and qwen.rope.mrope_section == (16, 24, 24)
    assert qwen.sliding_window is None  # use_sliding_window false
    mistral = parse_model_config(dict(TINY, model_type="mistral"))
    assert mistral.text.sliding_window == 4096


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="config lacks 'hidden_size'"):
        parse_model_config({"num_hidden_layers": 2})
    with pytest.raises(ConfigError, match="'num_hidden_layers' must be an integer, got '2'"):
        parse_model_config(dict(TINY, num_hidden_layers="2"))
    with pytest.raises(ConfigError, match="text_config lacks 'vocab_size'"):
        text = {k: v for k, v in TINY.items() if k != "vocab_size"}
        parse_model_config({"model_type": "llava", "text_config": text, "vision_config": {}})
    with pytest.raises(ConfigError, match="unsupported vision tower 'dinov2'"):
        parse_model_config(dict(TINY, vision_config={"model_type": "dinov2"}))
    with pytest.raises(ConfigError, match="qwen2_vl config needs a vision_config"):
        parse_model_config(dict(TINY, model_type="qwen2_vl"))


# -- processor configs ----------------------------------------------------------------------------
def _copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def _nested_only(src: Path, dst: Path) -> Path:
    """src's flat preprocessor_config.json moved under processor_config.json's image_processor,
    as transformers 5's ProcessorMixin.save_pretrained writes it."""
    _copy_config(src, dst)
    flat = json.loads((src / "preprocessor_config.json").read_text())
    nested = {"image_processor": flat, "processor_class": flat.get("processor_class", "")}
    (dst / "processor_config.json").write_text(json.dumps(nested))
    return dst


@pytest.mark.parametrize("name", QWEN_SHIPPED)
def test_both_processor_layouts_give_the_same_sizing(name, tmp_path):
    src = SHIPPED_CONFIGS_DIR / name
    flat = read_model_shape(src)
    nested = read_model_shape(_nested_only(src, tmp_path / "nested"))
    assert flat.processor_file == "preprocessor_config.json"
    assert nested.processor_file == "processor_config.json"
    assert nested.image_sizing == flat.image_sizing == ImageSizing(14, 2, 2, 3136, 12845056)
    assert ModelSpec.from_dir(tmp_path / "nested", name) == ModelSpec.from_dir(src, name)


def test_sizing_equals_the_live_image_processor(tiny_qwen_vl_dirs, tmp_path):
    """transformers' AutoImageProcessor reads either layout; our parse of the file gives the
    limits and geometry of the processor it builds."""
    from transformers import AutoImageProcessor

    dirs = {f"{n}-flat": SHIPPED_CONFIGS_DIR / n for n in QWEN_SHIPPED}
    dirs |= {f"{k}-flat": d for k, d in tiny_qwen_vl_dirs.items()}
    dirs |= {f"{k}-nested": _nested_only(d, tmp_path / k) for k, d in tiny_qwen_vl_dirs.items()}
    for what, d in dirs.items():
        processor = AutoImageProcessor.from_pretrained(d, local_files_only=True)
        assert read_model_shape(d).image_sizing == ImageSizing.from_processor(processor), what


def test_processor_config_precedence_and_missing(tmp_path):
    src = SHIPPED_CONFIGS_DIR / "qwen2-vl-7b"
    both = _nested_only(src, tmp_path / "both")
    flat = json.loads((src / "preprocessor_config.json").read_text())
    (both / "preprocessor_config.json").write_text(json.dumps(dict(flat, max_pixels=28 * 28 * 9)))
    assert read_model_shape(both).image_sizing.max_pixels == 12845056  # nested wins
    legacy = _copy_config(src, tmp_path / "legacy")  # a processor_config.json without one
    (legacy / "processor_config.json").write_text(json.dumps({"processor_class": "X"}))
    (legacy / "preprocessor_config.json").write_text(json.dumps(dict(flat, min_pixels=784)))
    assert read_model_shape(legacy).image_sizing.min_pixels == 784
    none = read_model_shape(_copy_config(src, tmp_path / "none"))
    assert none.processor_config_missing and none.processor_file is None
    assert none.image_sizing == ImageSizing(14, 2, 2, 3136, 12845056)  # published defaults
    text_only = read_model_shape(SHIPPED_CONFIGS_DIR / "llama-3.1-8b")
    assert not text_only.processor_config_missing
    assert read_model_shape(SHIPPED_CONFIGS_DIR / "llava-1.5-7b").processor_config_missing


def test_processor_limits_keys_and_defaults(tmp_path):
    src = SHIPPED_CONFIGS_DIR / "qwen2-vl-7b"
    d = _copy_config(src, tmp_path / "m")

    def sizing(pre: dict) -> ImageSizing:
        (d / "preprocessor_config.json").write_text(json.dumps(pre))
        shape: ModelShape = read_model_shape(d)
        assert read_processor_config(d) is not None
        return shape.image_sizing

    size = {"shortest_edge": 784, "longest_edge": 28 * 28 * 50}
    assert sizing({"size": size}) == ImageSizing(14, 2, 2, 784, 28 * 28 * 50)
    # min_pixels / max_pixels win over size, as in the image processor's constructor.
    assert sizing({"size": size, "min_pixels": 1568}).min_pixels == 1568
    # A processor config that states no limits: the processor class's defaults.
    assert sizing({}) == ImageSizing(14, 2, 2, 56 * 56, 28 * 28 * 1280)
    with pytest.raises(
        ConfigError, match="image processor's merge_size is 1, the vision config's 2"
    ):
        sizing({"merge_size": 1})
