"""Command-line flags come from the config dataclasses' field metadata (``nova.flags``): every
``EngineConfig`` / ``ServerConfig`` field has a flag or says why not, the commands' defaults are
the configs' defaults, and parsed flags build the configs back."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from nova.cli import (
    DEMO_ENGINE_FLAGS,
    GENERATE_ENGINE_DEFAULTS,
    GENERATE_ENGINE_EXCLUDED,
    build_parser,
)
from nova.config import EngineConfig
from nova.flags import (
    FlagSpec,
    NoFlag,
    add_flags,
    check_minimums,
    flag,
    flag_name,
    flag_spec,
    from_flags,
    no_flag,
)
from nova.profiling.cli import ENGINE_FLAG_DEFAULTS as PROFILE_DEFAULTS
from nova.profiling.cli import ENGINE_FLAGS as PROFILE_ENGINE_FLAGS
from nova.server.cli import SERVE_FLAG_DEFAULTS, engine_config_from_args
from nova.server.config import ServerConfig

REQUIRED = {"generate": ["--prompt", "x"]}


def parsed_defaults(command: str) -> dict:
    """The namespace of ``nova COMMAND`` with no flags given: dest -> default."""
    args = build_parser([command]).parse_args([command, *REQUIRED.get(command, [])])
    return vars(args)


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser([command]).parse_args([command, "--help"])
    return capsys.readouterr().out


def config_defaults(cls: type) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls", [EngineConfig, ServerConfig])
def test_every_field_declares_a_flag_or_why_not(cls):
    for f in dataclasses.fields(cls):
        spec = flag_spec(f)
        assert isinstance(spec, FlagSpec | NoFlag)
        if isinstance(spec, NoFlag):
            assert spec.reason
        else:
            assert spec.help


def test_serve_has_a_flag_for_every_field_with_the_configs_defaults(monkeypatch, capsys):
    monkeypatch.delenv("NOVA_API_KEY", raising=False)
    got = parsed_defaults("serve")
    text = help_text("serve", capsys)
    for cls in (EngineConfig, ServerConfig):
        for f in dataclasses.fields(cls):
            spec = flag_spec(f)
            if isinstance(spec, NoFlag):
                continue
            assert flag_name(f, spec) in text, f.name
            expected = SERVE_FLAG_DEFAULTS.get(f.name, f.default)
            assert got[f.name] == expected, f.name
    # the only EngineConfig field without a flag is set from ServerConfig's flag of that name
    no_flags = [
        f.name for f in dataclasses.fields(EngineConfig) if isinstance(flag_spec(f), NoFlag)
    ]
    assert no_flags == ["max_image_pixels"] and "--max-image-pixels" in text
    # the flags the README and tests use, spelled as before
    for name in ("--no-cuda-graphs", "--num-kv-blocks", "--max-pixels", "--allow-remote-media"):
        assert name in text


def test_serve_without_flags_builds_the_default_configs(monkeypatch):
    monkeypatch.delenv("NOVA_API_KEY", raising=False)
    args = build_parser(["serve"]).parse_args(["serve"])
    assert engine_config_from_args(args) == EngineConfig()
    assert ServerConfig.from_args(args) == ServerConfig(served_model_name="demo")


def test_serve_flags_build_the_configs(monkeypatch):
    monkeypatch.setenv("NOVA_API_KEY", "secret")
    argv = [
        "serve",
        "--model",
        "qwen2.5-vl-7b",
        "--load-format",
        "dummy",
        "--dtype",
        "bfloat16",
        "--policy",
        "nova",
        "--no-cuda-graphs",
        "--num-kv-blocks",
        "512",
        "--max-pixels",
        "1003520",
        "--max-image-pixels",
        "0",
        "--port",
        "8123",
        "--allow-remote-media",
        "--max-queue",
        "3",
        "--served-model-name",
        "agent",
    ]
    args = build_parser(["serve"]).parse_args(argv)
    engine = engine_config_from_args(args)
    assert engine == EngineConfig(
        model="qwen2.5-vl-7b",
        load_format="dummy",
        dtype="bfloat16",
        policy="nova",
        cuda_graphs=False,
        num_kv_blocks=512,
        max_pixels=1003520,
        max_image_pixels=None,
    )
    server = ServerConfig.from_args(args)
    assert (server.port, server.allow_remote_media, server.max_queue) == (8123, True, 3)
    assert server.served_model_name == "agent" and server.api_key == "secret"
    assert server.max_image_pixels is None  # 0: no limit


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--block-size", "0"], "must be >= 1, got 0"),
        (["--max-queue", "0"], "must be >= 1, got 0"),
        (["--vision-offload-layers", "-1"], "must be >= 0, got -1"),
        (["--partition", "mig"], "invalid choice"),
        (["--max-num-seqs", "many"], "invalid int value"),
    ],
)
def test_bad_flag_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser(["serve"]).parse_args(["serve", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_takes_the_engine_flags_with_its_own_defaults():
    got = parsed_defaults("generate")
    for name, default in config_defaults(EngineConfig).items():
        if name in GENERATE_ENGINE_EXCLUDED or isinstance(
            flag_spec(EngineConfig.__dataclass_fields__[name]), NoFlag
        ):
            assert name not in got
            continue
        assert got[name] == GENERATE_ENGINE_DEFAULTS.get(name, default), name
    assert got["policy"] == "sequential"
    # --seed seeds sampling; the engine's weight seed stays at its default
    args = build_parser(["generate"]).parse_args(["generate", "--prompt", "x", "--seed", "7"])
    assert args.sampling_seed == 7 and from_flags(EngineConfig, args).seed == 0
    assert args.max_tokens == 64 and args.block_size == 16 and args.image == []


def test_demo_and_profile_take_their_engine_flags():
    demo = parsed_defaults("demo")
    for name in DEMO_ENGINE_FLAGS:
        assert demo[name] == config_defaults(EngineConfig)[name], name
    assert demo["max_tokens"] == 48 and demo["agent_steps"] == 6
    profile = parsed_defaults("profile")
    for name in PROFILE_ENGINE_FLAGS:
        assert profile[name] == PROFILE_DEFAULTS.get(name, config_defaults(EngineConfig)[name])
    assert profile["partition"] is None and profile["device"] == "cpu"


def test_config_minimums_apply_in_code_too():
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="num_kv_blocks must be >= 1, got 0"):
        EngineConfig(num_kv_blocks=0)
    with pytest.raises(ValueError, match="vision_offload_layers must be >= 0, got -1"):
        EngineConfig(vision_offload_layers=-1)
    with pytest.raises(ValueError, match="preprocess_workers must be >= 1, got 0"):
        ServerConfig(preprocess_workers=0)
    check_minimums(EngineConfig(num_kv_blocks=None))  # None: not set, passes


# -- the helper on its own ---------------------------------------------------------------------


@dataclass(slots=True)
class _Example:
    name: str = field(default="a", metadata=flag("a name", choices=("a", "b")))
    count: int | None = field(default=None, metadata=flag("how many", minimum=2, metavar="N"))
    ratio: float = field(default=0.5, metadata=flag("a ratio", name="share"))
    fast: bool = field(default=True, metadata=flag("be slow"))
    loud: bool = field(default=False, metadata=flag("be loud", group="noise"))
    internal: int = field(default=3, metadata=no_flag("set by the program"))


def test_helper_round_trip():
    p = argparse.ArgumentParser()
    assert add_flags(p, _Example) == ["name", "count", "ratio", "fast", "loud"]
    args = p.parse_args(["--name", "b", "--count", "4", "--share", "0.25", "--no-fast", "--loud"])
    assert from_flags(_Example, args) == _Example("b", 4, 0.25, False, True, 3)
    assert from_flags(_Example, p.parse_args([])) == _Example()
    assert from_flags(_Example, p.parse_args([]), internal=9).internal == 9
    p = argparse.ArgumentParser()
    add_flags(p, _Example, include=("count",), defaults={"count": 5})
    assert vars(p.parse_args([])) == {"count": 5}
    with pytest.raises(ValueError, match="has no fields"):
        add_flags(argparse.ArgumentParser(), _Example, exclude=("nope",))


def test_a_field_without_a_declaration_is_an_error():
    @dataclass
    class Undeclared:
        size: int = 1

    with pytest.raises(TypeError, match="declares neither"):
        add_flags(argparse.ArgumentParser(), Undeclared)


def test_the_auto_policy_resolves_per_device():
    from nova.config import CPU_DEFAULT_POLICY, GPU_DEFAULT_POLICY, resolve_policy

    assert EngineConfig().policy == "auto"
    assert EngineConfig().resolved_policy == CPU_DEFAULT_POLICY == "chunked_prefill[budget=2048]"
    assert resolve_policy("auto", "cuda:1") == GPU_DEFAULT_POLICY == "multi_stream"
    assert resolve_policy("sequential", "cpu") == "sequential"  # a named policy stays
    assert EngineConfig(device="cuda").resolved_policy == "multi_stream"
    with pytest.raises(ValueError, match="nonesuch"):
        EngineConfig(policy="nonesuch")
