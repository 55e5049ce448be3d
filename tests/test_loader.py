"""Loading: shipped configs, dummy weights, and a clear error for each kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nova.models.errors import InvalidInputError, ModelLoadError
from nova.models.inputs import InputProcessor, load_image
from nova.models.loader import SHIPPED_CONFIGS_DIR, load_model, read_config, shipped_configs
from nova.shapes import read_model_shape

# Published parameter counts (billions) of the architectures whose configs Nova ships.
EXPECTED_PARAMS_B = {
    "llava-1.5-7b": 7.06,
    "llava-onevision-qwen2-7b": 8.03,
    "smollm2-135m": 0.1345,
    "llama-3.1-8b": 8.03,
    "qwen2.5-7b": 7.62,
    # Qwen-VL: the model cards' totals (language model + vision tower + patch merger).
    "qwen2-vl-2b": 2.21,
    "qwen2-vl-7b": 8.29,
    "qwen2.5-vl-3b": 3.75,
    "qwen2.5-vl-7b": 8.29,
}


def test_shipped_configs_build_at_real_size():
    assert set(shipped_configs()) == set(EXPECTED_PARAMS_B)
    for name in shipped_configs():
        arch, hf = read_config(SHIPPED_CONFIGS_DIR / name)
        with torch.device("meta"):
            model = arch.build(hf, torch.bfloat16, torch.device("meta"))
        num_b = sum(p.numel() for p in model.parameters()) / 1e9
        assert num_b == pytest.approx(EXPECTED_PARAMS_B[name], rel=0.01), name
        # Built from transformers' config object; the same as the parse of the raw config.json.
        shape = read_model_shape(SHIPPED_CONFIGS_DIR / name)
        assert model.decoder.cfg == shape.text, name


def test_dummy_load_of_a_tiny_config_runs(tiny_dirs, tmp_path):
    src = tiny_dirs["llava-siglip-qwen2"]
    only_config = tmp_path / "cfg"
    only_config.mkdir()
    shutil.copy(src / "config.json", only_config / "config.json")
    loaded = load_model(only_config, load_format="dummy")
    assert loaded.tokenizer is None and loaded.model.is_multimodal
    norms = [p for n, p in loaded.model.named_parameters() if n.endswith("input_layernorm.weight")]
    assert all(bool((p == 1).all()) for p in norms)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        load_model(only_config)


def test_either_processor_config_layout_loads_the_image_processor(
    tiny_qwen_vl_dirs, tmp_path, caplog
):
    """transformers 5 nests the image processor in processor_config.json; a directory with only
    that file loads it as one with preprocessor_config.json does. Without either, the loader
    says so and images get the published defaults."""
    src = tiny_qwen_vl_dirs["qwen2-vl"]
    flat = json.loads((src / "preprocessor_config.json").read_text())
    nested, bare = tmp_path / "nested", tmp_path / "bare"
    for d in (nested, bare):
        d.mkdir()
        shutil.copy(src / "config.json", d / "config.json")
    (nested / "processor_config.json").write_text(json.dumps({"image_processor": flat}))
    reference = InputProcessor(load_model(src, load_format="dummy"))
    loaded = load_model(nested, load_format="dummy")
    assert loaded.image_processor is not None and loaded.shape.processor_file is not None
    assert InputProcessor(loaded).sizing == reference.sizing
    with caplog.at_level("WARNING", logger="nova.models.loader"):
        unprocessed = load_model(bare, load_format="dummy")
    assert unprocessed.shape.processor_config_missing
    assert "has no processor config" in caplog.text
    assert InputProcessor(unprocessed).sizing.max_pixels == 12845056


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_unknown_architecture(tiny_dirs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*GPTNeoXForCausalLM"):
        load_model(d)


def test_truncated_safetensors(tiny_dirs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ModelLoadError, match="corrupt or truncated safetensors file .*model.safetensors"
    ):
        load_model(d)


def test_missing_and_misshaped_weights(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], d)
    tensors = load_file(d / "model.safetensors")
    dropped = {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}
    save_file(dropped, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="1 weights missing.*layers.1.mlp.up_proj"):
        load_model(d)
    bad = dict(tensors)
    bad["model.norm.weight"] = torch.ones(3)
    save_file(bad, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="model.norm.weight has shape \\(3,\\)"):
        load_model(d)


def test_bad_load_format(tiny_dirs):
    with pytest.raises(ModelLoadError, match="unknown load_format"):
        load_model(tiny_dirs["llama"], load_format="pickle")


def test_image_that_is_not_an_image(tmp_path):
    with pytest.raises(InvalidInputError, match="could not be decoded as an image"):
        load_image(b"definitely not a png")
    f = tmp_path / "x.png"
    f.write_text("hello")
    with pytest.raises(InvalidInputError, match=f"file {f} could not be decoded"):
        load_image(f)
    with pytest.raises(InvalidInputError, match="not found"):
        load_image(tmp_path / "missing.png")
    from PIL import Image

    with pytest.raises(InvalidInputError, match="exceeds the limit"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=50 * 50)


@pytest.mark.parametrize("layout", ["llava-hf", "transformers>=4.52"])
def test_llava_checkpoint_key_layouts(tiny_dirs, tmp_path, layout):
    """Published llava-hf names and transformers>=4.52 names load to the same weights."""
    from safetensors.torch import load_file, save_file

    src = tiny_dirs["llava-clip"]
    d = tmp_path / "m"
    shutil.copytree(src, d)
    tensors = load_file(src / "model.safetensors")

    # transformers 5.23 saves: language_model.model.*, language_model.lm_head.*,
    # vision_tower.* (no vision_model level), multi_modal_projector.*
    layouts = {
        "llava-hf": [
            ("language_model.", "language_model."),
            ("vision_tower.", "vision_tower.vision_model."),
            ("multi_modal_projector.", "multi_modal_projector."),
        ],
        "transformers>=4.52": [
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower.vision_model."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ],
    }

    def rename(name: str) -> str:
        for old, new in layouts[layout]:
            if name.startswith(old):
                return new + name[len(old) :]
        raise AssertionError(f"unexpected tensor name {name}")

    save_file(
        {rename(k): v for k, v in tensors.items()},
        d / "model.safetensors",
        metadata={"format": "pt"},
    )
    ref = load_model(src)
    got = load_model(d)
    ref_params = dict(ref.model.named_parameters())
    for name, param in got.model.named_parameters():
        assert torch.equal(param, ref_params[name]), name


def test_decompression_bomb_is_a_clear_error(monkeypatch):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64*64 > 2 * 100: PIL refuses
    with pytest.raises(InvalidInputError, match="too large to decode safely"):
        load_image(buf.getvalue())


def test_small_screenshots_render():
    from nova.screenshots import make_screenshot

    for h in (40, 100, 159, 640):
        assert make_screenshot(seed=1, width=60, height=h).size == (60, h)


def test_checkpoint_dtype_is_read_from_the_config(tiny_dirs):
    from nova.models.loader import checkpoint_dtype

    _, fp16 = read_config(SHIPPED_CONFIGS_DIR / "llava-1.5-7b")
    _, bf16 = read_config(SHIPPED_CONFIGS_DIR / "qwen2.5-vl-7b")
    _, fp32 = read_config(tiny_dirs["llama"])  # saved from a float32 model
    assert checkpoint_dtype(fp16) == torch.float16
    assert checkpoint_dtype(bf16) == torch.bfloat16
    assert checkpoint_dtype(fp32) == torch.float32
    fp32.dtype = None
    assert checkpoint_dtype(fp32) is None


@pytest.mark.parametrize("bf16_cpu", [True, False])
def test_auto_dtype_per_device(monkeypatch, bf16_cpu):
    """``--dtype auto``: the checkpoint's dtype; on a CPU float16 runs as bfloat16, and both
    run as float32 where the CPU has no bfloat16; float32 when the config names none."""
    from types import SimpleNamespace

    from nova.models import loader
    from nova.runtime import cpu_linear

    monkeypatch.setattr(cpu_linear, "cpu_bf16_supported", lambda: bf16_cpu)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    half = torch.bfloat16 if bf16_cpu else torch.float32
    for named, on_cpu, on_cuda in (
        (torch.float16, half, torch.float16),
        (torch.bfloat16, half, torch.bfloat16),
        (torch.float32, torch.float32, torch.float32),
        (None, torch.float32, torch.float32),
    ):
        cfg = SimpleNamespace(dtype=named)
        assert loader.resolve_dtype(cfg, cpu) == on_cpu, named
        assert loader.resolve_dtype(cfg, cuda) == on_cuda, named


def test_engine_default_dtype_is_the_checkpoints(tiny_dirs, tmp_path):
    from nova.config import EngineConfig
    from nova.engine.llm_engine import LLMEngine
    from nova.runtime.cpu_linear import cpu_bf16_supported

    assert EngineConfig().dtype == "auto" and EngineConfig().torch_dtype is None
    path = tmp_path / "bf16"
    shutil.copytree(tiny_dirs["llama"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(cfg))
    want = torch.bfloat16 if cpu_bf16_supported() else torch.float32
    eng = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=16, warmup=False))
    assert eng.loaded.dtype == want
    assert next(eng.loaded.model.parameters()).dtype == want
    explicit = LLMEngine(
        EngineConfig(model=str(path), num_kv_blocks=16, dtype="float32", warmup=False)
    )
    assert explicit.loaded.dtype == torch.float32
    default = LLMEngine(EngineConfig(model=str(tiny_dirs["llama"]), num_kv_blocks=16))
    assert default.loaded.dtype == torch.float32  # saved in float32
