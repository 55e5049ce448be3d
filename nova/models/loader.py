"""Load a model from a local Hugging Face directory, a shipped config (dummy weights) or "demo".

``load_model`` returns a ``LoadedModel``: our ``NovaModel`` plus what serving it needs from the
directory (its parsed shape, ``nova.shapes``; transformers config, tokenizer with chat template,
image processor, EOS ids). Every failure is a ``ModelLoadError`` whose message names the path
and the problem.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nova.models.errors import ModelLoadError
from nova.models.registry import ARCHITECTURES, Architecture
from nova.models.vlm import NovaModel
from nova.sampling_params import GenerationDefaults
from nova.shapes import SHIPPED_CONFIGS_DIR, ConfigError, ModelShape, read_model_shape
from nova.shapes.fields import read_json_dict

log = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")


@dataclass(slots=True)
class LoadedModel:
    model: NovaModel
    hf_config: Any
    architecture: str
    model_dir: Path
    load_format: str
    dtype: torch.dtype
    device: torch.device
    shape: ModelShape  # the one parse of config.json and the processor config
    tokenizer: Any | None = None
    image_processor: Any | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # sampling defaults of the model's generation_config.json (see ``read_generation_defaults``)
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)

    @property
    def text_config(self) -> Any:
        return ARCHITECTURES[self.architecture].text_config(self.hf_config)

    @property
    def max_model_len(self) -> int:
        return self.shape.text.max_position_embeddings

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def shipped_configs() -> list[str]:
    """Names of real architectures' configs shipped with Nova (usable with load_format=dummy)."""
    return sorted(p.name for p in SHIPPED_CONFIGS_DIR.iterdir() if (p / "config.json").is_file())


def resolve_model_dir(model: str | Path) -> Path:
    """ "demo" -> the cached demo model (built on first use); a directory; or a shipped config."""
    if str(model) == "demo":
        from nova.models.demo import build_demo_model, locate_gguf

        try:
            locate_gguf()  # the weights' package: a clear error instead of a traceback
        except RuntimeError as exc:
            from nova.models.demo import demo_model_dir, is_complete

            if not is_complete(demo_model_dir()):
                raise ModelLoadError(str(exc)) from exc
        return build_demo_model()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if (SHIPPED_CONFIGS_DIR / str(model) / "config.json").is_file():
        return SHIPPED_CONFIGS_DIR / str(model)
    if path.exists():
        raise ModelLoadError(f"model path {path} is not a directory")
    raise ModelLoadError(
        f"model directory {path} does not exist (nor is {str(model)!r} 'demo' or a shipped "
        f"config: {', '.join(shipped_configs())})"
    )


def read_config(model_dir: Path) -> tuple[Architecture, Any]:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    raw = read_json_dict(config_file, ModelLoadError)
    archs: Any = raw.get("architectures") or []
    supported = [a for a in archs if a in ARCHITECTURES]
    if not supported:
        raise ModelLoadError(
            f"unsupported architecture {archs or '(none given)'} in {config_file}; Nova supports: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad config
        raise ModelLoadError(f"cannot parse {config_file}: {exc}") from exc
    return ARCHITECTURES[supported[0]], hf_config


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists missing weight files: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no *.safetensors weights in {model_dir} (use load_format='dummy' for random weights)"
        )
    return files


def load_safetensors_weights(model: NovaModel, arch: Architecture, model_dir: Path) -> None:
    from safetensors import SafetensorError, safe_open

    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in _safetensors_files(model_dir):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                    target = arch.map_name(name)
                    if target is None:
                        continue
                    if target not in params:
                        unexpected.append(name)
                        continue
                    tensor = f.get_tensor(name)
                    param = params[target]
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise ModelLoadError(
                            f"{file.name}: tensor {name} has shape {tuple(tensor.shape)}, the "
                            f"config expects {tuple(param.shape)}"
                        )
                    with torch.no_grad():
                        param.copy_(tensor)
                    loaded.add(target)
        except SafetensorError as exc:
            raise ModelLoadError(f"corrupt or truncated safetensors file {file}: {exc}") from exc
        except OSError as exc:
            raise ModelLoadError(f"cannot read weight file {file}: {exc}") from exc
    if unexpected:
        raise ModelLoadError(
            f"{model_dir}: {len(unexpected)} checkpoint tensors do not belong to the "
            f"architecture, e.g. {unexpected[:3]}"
        )
    tied = model.decoder.cfg.tie_word_embeddings
    missing = [
        n for n in params if n not in loaded and not (tied and n == "decoder.lm_head.weight")
    ]
    if missing:
        raise ModelLoadError(
            f"{model_dir}: {len(missing)} weights missing from the checkpoint, e.g. {missing[:3]}"
        )


@torch.no_grad()
def init_dummy_weights(model: NovaModel, seed: int = 0) -> None:
    """Random weights of the right shapes (for benchmarking real sizes without checkpoints).

    Norm weights are 1 and biases 0 so activations stay in a sane range through many layers.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1:
            param.fill_(1.0)
        else:
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * 0.02
            param.copy_(values)


def _load_tokenizer(model_dir: Path) -> Any | None:
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc


def read_shape(model_dir: Path) -> ModelShape:
    """The model's shape (``nova.shapes``); a ``ModelLoadError`` naming the problem."""
    try:
        shape = read_model_shape(model_dir)
    except ConfigError as exc:
        raise ModelLoadError(f"{model_dir}: {exc}") from exc
    if shape.processor_config_missing:
        dynamic = shape.image_sizing is not None
        log.warning(
            "%s has no processor config (processor_config.json or preprocessor_config.json): %s",
            model_dir,
            "images are sized with the published defaults" if dynamic else "it takes no images",
        )
    return shape


def missing_image_processor(loaded: LoadedModel) -> str | None:
    """Why ``loaded`` cannot take images although it is multimodal (a fixed-resolution tower
    whose directory has no processor config: its resize and normalisation are unknown), or
    None. ``nova serve`` refuses to start on such a model rather than answer every image
    request with a 400; offline use (pixel tensors given directly) still loads it."""
    if not loaded.model.is_multimodal or loaded.image_processor is not None:
        return None
    if loaded.shape.image_sizing is not None:  # dynamic resolution: the published defaults
        return None
    return (
        f"{loaded.model_dir} is a multimodal model but has no image processor config "
        "(processor_config.json with an image_processor entry, or preprocessor_config.json); "
        "save the model's processor next to it (AutoProcessor.save_pretrained)"
    )


def _load_image_processor(model_dir: Path, shape: ModelShape) -> Any | None:
    """The image processor of a multimodal model, from either processor config layout
    (``nova.shapes.processor``); a ``ModelLoadError`` when the config names none that loads.
    None only when the directory has no processor config at all (``read_shape`` warned)."""
    if shape.processor_file is None:
        return None
    from transformers import AutoImageProcessor

    errors = []
    # transformers reads either layout itself; the nested entry is tried explicitly too, for
    # versions that read only preprocessor_config.json
    try:
        return AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        errors.append(f"AutoImageProcessor: {exc}")
    nested = _nested_image_processor(model_dir)
    if nested is not None:
        try:
            return _image_processor_from_dict(nested)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"processor_config.json image_processor: {exc}")
    raise ModelLoadError(
        f"{model_dir} is multimodal but its image processor cannot be loaded from "
        f"{shape.processor_file}: {'; '.join(errors)}"
    )


def _nested_image_processor(model_dir: Path) -> dict[str, Any] | None:
    file = model_dir / "processor_config.json"
    if not file.is_file():
        return None
    try:
        entry = json.loads(file.read_text()).get("image_processor")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return entry if isinstance(entry, dict) else None


def _image_processor_from_dict(d: dict[str, Any]) -> Any:
    import transformers

    name = d.get("image_processor_type")
    if not isinstance(name, str):
        raise ValueError("no image_processor_type")
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ValueError(f"transformers has no {name}")
    kwargs = {k: v for k, v in d.items() if k not in ("image_processor_type", "processor_class")}
    return cls(**kwargs)


GENERATION_CONFIG_MODES = ("auto", "vllm")


def read_generation_defaults(model_dir: Path, mode: str = "auto") -> GenerationDefaults:
    """The sampling defaults requests get when they leave a field unset: ``auto`` reads the
    model's ``generation_config.json`` (temperature, top_p, top_k, min_p, repetition_penalty,
    max_new_tokens); ``vllm`` ignores it (the server's own defaults); another value is a
    directory holding a ``generation_config.json``. A malformed file is a ``ModelLoadError``."""
    if mode == "vllm":
        return GenerationDefaults(source="--generation-config vllm")
    folder = model_dir if mode == "auto" else Path(mode).expanduser()
    file = folder / "generation_config.json"
    if not file.is_file():
        if mode != "auto":
            raise ModelLoadError(f"--generation-config {mode}: no generation_config.json there")
        return GenerationDefaults(source=f"{model_dir} has no generation_config.json")
    try:
        raw = json.loads(file.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return GenerationDefaults.from_dict(raw, str(file))
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{file}: {exc}") from exc


def _eos_token_ids(model_dir: Path, text_config: Any, tokenizer: Any | None) -> tuple[int, ...]:
    ids: list[int] = []
    gen_file = model_dir / "generation_config.json"
    sources = [getattr(text_config, "eos_token_id", None)]
    if gen_file.is_file():
        sources.insert(0, json.loads(gen_file.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    for src in sources:
        for tok in src if isinstance(src, list) else [src]:
            if tok is not None and int(tok) not in ids:
                ids.append(int(tok))
    return tuple(ids)


def checkpoint_dtype(hf_config: Any) -> torch.dtype | None:
    """The dtype the checkpoint's config names (``torch_dtype``, or ``dtype`` as newer
    ``transformers`` write it; the text model's for a VLM that names none at the top), or
    None."""
    for cfg in (hf_config, getattr(hf_config, "text_config", None)):
        if cfg is None:
            continue
        # (``dtype`` first: reading ``torch_dtype`` warns in transformers 5)
        value = getattr(cfg, "dtype", None) or vars(cfg).get("torch_dtype")
        if isinstance(value, str):
            value = getattr(torch, value, None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    return None


def resolve_dtype(hf_config: Any, device: torch.device) -> torch.dtype:
    """``--dtype auto``: the checkpoint's dtype (what vLLM's ``auto`` starts from), float32 when
    its config names none. On a CPU, float16 runs as bfloat16 (same width, and oneDNN's
    bfloat16 GEMMs are the fast path; float16 ones are not on most CPUs), and bfloat16 runs as
    float32 where the CPU has no bfloat16 support (it would be emulated)."""
    dtype = checkpoint_dtype(hf_config) or torch.float32
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        from nova.runtime.cpu_linear import cpu_bf16_supported

        return torch.bfloat16 if cpu_bf16_supported() else torch.float32
    return dtype


def load_model(
    model: str | Path,
    load_format: str = "auto",
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    generation_config: str = "auto",
) -> LoadedModel:
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load_format {load_format!r}; choose one of {LOAD_FORMATS}")
    model_dir = resolve_model_dir(model)
    arch, hf_config = read_config(model_dir)
    shape = read_shape(model_dir)
    device = torch.device(device)
    if dtype is None:  # --dtype auto
        dtype = resolve_dtype(hf_config, device)
    torch.manual_seed(seed)
    try:
        nova_model = arch.build(hf_config, dtype, device)
    except ValueError as exc:
        raise ModelLoadError(f"{model_dir}: {exc}") from exc
    if load_format == "dummy":
        init_dummy_weights(nova_model, seed)
    else:
        load_safetensors_weights(nova_model, arch, model_dir)
    nova_model.eval().requires_grad_(False)
    tokenizer = _load_tokenizer(model_dir)
    loaded = LoadedModel(
        model=nova_model,
        hf_config=hf_config,
        architecture=arch.name,
        model_dir=model_dir,
        load_format=load_format,
        dtype=dtype,
        device=device,
        shape=shape,
        tokenizer=tokenizer,
        image_processor=(
            _load_image_processor(model_dir, shape) if nova_model.is_multimodal else None
        ),
        eos_token_ids=_eos_token_ids(model_dir, arch.text_config(hf_config), tokenizer),
        generation_defaults=read_generation_defaults(model_dir, generation_config),
    )
    log.info(
        "loaded %s (%s, %.1fM params, %s) from %s",
        arch.name,
        load_format,
        loaded.num_params() / 1e6,
        dtype,
        model_dir,
    )
    return loaded
