"""Helpers for tests and benchmarks of the server: run an app with uvicorn in a background thread
on a free loopback port, and build a tiny random LLaVA model that has a real tokenizer and chat
template (the demo model's), so chat requests run in milliseconds on a CPU."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8  # -> 16 image tokens per image


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerThread:
    """``with ServerThread(app) as srv: httpx.get(srv.base_url + "/health")``."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"
    ) -> None:
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        self.config = uvicorn.Config(
            app,
            host=host,
            port=self.port,
            log_level=log_level,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="nova-test-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.base_url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_tiny_chat_model(
    path: Path, source_dir: Path | None = None, max_model_len: int = 128, seed: int = 0
) -> Path:
    """A tiny random LLaVA (Llama text, SigLIP vision) with the tokenizer, chat template and image
    processor of ``source_dir`` (default: the demo model, built if needed). Its answers are random
    tokens; it is for exercising the serving path, fast."""
    import torch
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
    )

    if source_dir is None:
        from nova.models.demo import build_demo_model

        source_dir = Path(build_demo_model())
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    src_cfg = json.loads((source_dir / "config.json").read_text())
    text = src_cfg["text_config"]
    image_token_id = int(src_cfg.get("image_token_index", src_cfg.get("image_token_id")))
    text_config = LlamaConfig(
        vocab_size=int(text["vocab_size"]),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_model_len,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=text.get("bos_token_id"),
        eos_token_id=text.get("eos_token_id"),
        pad_token_id=text.get("pad_token_id"),
    )
    vision_config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
    )
    cfg = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=(TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        if (source_dir / name).is_file():
            shutil.copy(source_dir / name, path / name)
    size = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = source_dir / name
        if not f.is_file():
            continue
        data = json.loads(f.read_text())
        if "image_processor" in data:
            data["image_processor"]["size"] = size
            data["patch_size"] = TINY_PATCH_SIZE
        else:
            data["size"] = size
        (path / name).write_text(json.dumps(data, indent=2))
    return path
