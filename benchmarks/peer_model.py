"""The peer benchmarks' model: the demo's language model as a plain ``LlamaForCausalLM`` directory.

vLLM-CPU (and any text-only server) wants a text-model directory. The demo model's language model
is the real SmolLM2-135M-Instruct; this writes it as bf16 safetensors with ``config.json`` from the
demo's ``text_config``, the tokenizer files and the chat template. Nova loads the same directory,
so both systems run the same weights.

Usage: .venv/bin/python benchmarks/peer_model.py [--out DIR]   (prints the directory)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

PREFIX = "language_model."
TOKENIZER_FILES = ("tokenizer.json", "chat_template.jinja", "generation_config.json")


def default_dir() -> Path:
    root = Path(os.environ.get("NOVA_CACHE_DIR", Path.home() / ".cache" / "nova"))
    return root / "smollm2-135m-instruct-text-bf16"


def export_text_model(out: Path | None = None, dtype: str = "bfloat16") -> Path:
    """Write (once) the demo's language model to ``out`` and return the directory."""
    import torch
    from safetensors.torch import load_file, save_file

    from nova.models.demo import build_demo_model

    out = Path(out or default_dir())
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    src = Path(build_demo_model())
    cfg = json.loads((src / "config.json").read_text())
    text = dict(cfg["text_config"])
    text.update(architectures=["LlamaForCausalLM"], model_type="llama", dtype=dtype)
    text["torch_dtype"] = dtype
    state = load_file(str(src / "model.safetensors"))
    cast = getattr(torch, dtype)
    lm = {
        k[len(PREFIX) :]: v.to(cast).contiguous() for k, v in state.items() if k.startswith(PREFIX)
    }
    if not lm:
        raise ValueError(f"{src}: no {PREFIX}* tensors in the demo checkpoint")
    if text.get("tie_word_embeddings"):
        lm.pop("lm_head.weight", None)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(lm, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(text, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, tmp / name)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    # A text model: no processor; the generic fast tokenizer class older transformers know too.
    for key in ("processor_class", "image_token", "model_specific_special_tokens"):
        tok_cfg.pop(key, None)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    print(export_text_model(args.out))


if __name__ == "__main__":
    main()
