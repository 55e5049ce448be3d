"""Server-level settings (the engine has its own ``EngineConfig``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from nova.server.media import MediaPolicy

DEFAULT_MAX_QUEUE = 512


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = "nova"
    api_key: str | None = field(default=None, repr=False)  # None: no authentication
    # Requests accepted and not yet finished (being prepared, queued or generating); beyond it
    # the server answers 503 with Retry-After. None: unbounded.
    max_queue: int | None = DEFAULT_MAX_QUEUE
    retry_after_s: int = 1
    max_image_pixels: int | None = 4096 * 4096  # None or 0: no limit
    max_images_per_request: int = 8
    max_media_bytes: int = 20 * 1024 * 1024
    allow_remote_media: bool = False
    media_fetch_timeout_s: float = 10.0
    max_media_redirects: int = 3
    allowed_local_media_path: str | None = None
    max_request_bytes: int = 128 * 1024 * 1024  # whole HTTP body (base64 images included)
    # Threads that turn requests into prompts (image decode, resize/normalise, chat template,
    # tokenisation). One 1920x1080 screenshot costs tens of ms of CPU there (more for the
    # Qwen-VL processor); PIL and numpy release the GIL, so several run in parallel and a burst of
    # screenshots does not queue behind one thread.
    preprocess_workers: int = 4

    def __post_init__(self) -> None:
        if self.max_image_pixels is not None and self.max_image_pixels <= 0:
            self.max_image_pixels = None
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.max_images_per_request < 0:
            raise ValueError(
                f"max_images_per_request must be >= 0, got {self.max_images_per_request}"
            )
        if self.max_media_bytes < 1:
            raise ValueError(f"max_media_bytes must be >= 1, got {self.max_media_bytes}")
        if self.preprocess_workers < 1:
            raise ValueError(f"preprocess_workers must be >= 1, got {self.preprocess_workers}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        """The fields present in ``args`` (``nova serve`` flags); defaults for the others."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in vars(args).items() if k in names}
        if "served_model_name" not in kwargs or kwargs["served_model_name"] is None:
            kwargs["served_model_name"] = str(getattr(args, "model", None) or cls.served_model_name)
        return cls(**kwargs)

    def media_policy(self) -> MediaPolicy:
        return MediaPolicy(
            max_image_pixels=self.max_image_pixels,
            max_media_bytes=self.max_media_bytes,
            allow_remote_media=self.allow_remote_media,
            fetch_timeout_s=self.media_fetch_timeout_s,
            max_redirects=self.max_media_redirects,
            allowed_local_media_path=self.allowed_local_media_path,
        )
