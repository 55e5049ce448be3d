"""Server-level settings (the engine has its own ``EngineConfig``).

Each field's metadata declares its ``nova serve`` flag (``nova.flags``). Torch-, FastAPI- and
httpx-free, so building the ``nova serve`` parser needs none of them."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nova.flags import check_minimums, flag, from_flags

if TYPE_CHECKING:
    from nova.server.media import MediaPolicy

DEFAULT_MAX_QUEUE = 512
# "auto" and the names of nova.tools.parsers.TOOL_PARSERS (kept here: building the flags must
# not import the parsers)
TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json")
SERVER_GROUP = "server"
MEDIA_GROUP = "media"


@dataclass(slots=True)
class ServerConfig:
    host: str = field(
        default="127.0.0.1",
        metadata=flag("bind address (default: loopback only)", group=SERVER_GROUP),
    )
    port: int = field(default=8000, metadata=flag("TCP port", group=SERVER_GROUP))
    served_model_name: str = field(
        default="nova",
        metadata=flag("model id in the API (default: --model)", group=SERVER_GROUP),
    )
    # None: no authentication
    api_key: str | None = field(
        default=None,
        repr=False,
        metadata=flag(
            "require 'Authorization: Bearer KEY' on /v1/* (default: $NOVA_API_KEY)",
            env="NOVA_API_KEY",
            group=SERVER_GROUP,
        ),
    )
    # Requests accepted and not yet finished (being prepared, queued or generating); beyond it
    # the server answers 503 with Retry-After. None: unbounded.
    max_queue: int | None = field(
        default=DEFAULT_MAX_QUEUE,
        metadata=flag(
            "unfinished requests beyond which the server answers 503 with Retry-After",
            minimum=1,
            group=SERVER_GROUP,
        ),
    )
    retry_after_s: int = field(
        default=1,
        metadata=flag("Retry-After seconds of a 503 (queue full)", group=SERVER_GROUP),
    )
    # None or 0: no limit
    max_image_pixels: int | None = field(
        default=4096 * 4096,
        metadata=flag("largest image (width*height) accepted; 0: no limit", group=MEDIA_GROUP),
    )
    max_images_per_request: int = field(
        default=8, metadata=flag("images one request may carry", minimum=0, group=MEDIA_GROUP)
    )
    max_media_bytes: int = field(
        default=20 * 1024 * 1024,
        metadata=flag("largest encoded image accepted", minimum=1, group=MEDIA_GROUP),
    )
    allow_remote_media: bool = field(
        default=False,
        metadata=flag("fetch http(s) image URLs (public addresses only)", group=MEDIA_GROUP),
    )
    media_fetch_timeout_s: float = field(
        default=10.0, metadata=flag("seconds one remote image fetch may take", group=MEDIA_GROUP)
    )
    max_media_redirects: int = field(
        default=3,
        metadata=flag("redirects followed by a remote image fetch", group=MEDIA_GROUP),
    )
    allowed_local_media_path: str | None = field(
        default=None,
        metadata=flag("allow file:// image URLs under this directory", group=MEDIA_GROUP),
    )
    # whole HTTP body (base64 images included)
    max_request_bytes: int = field(
        default=128 * 1024 * 1024,
        metadata=flag(
            "largest HTTP request body accepted (413 beyond)", minimum=1, group=SERVER_GROUP
        ),
    )
    # Threads that turn requests into prompts (image decode, resize/normalise, chat template,
    # tokenisation). One 1920x1080 screenshot costs tens of ms of CPU there (more for the
    # Qwen-VL processor); PIL and numpy release the GIL, so several run in parallel and a burst of
    # screenshots does not queue behind one thread.
    preprocess_workers: int = field(
        default=4,
        metadata=flag(
            "threads decoding and preprocessing request images (default 4)",
            minimum=1,
            group=MEDIA_GROUP,
        ),
    )

    # How tool calls are read from the model's text (nova.tools.parsers); "auto": from the chat
    # template (Llama 3 JSON for Llama 3 templates, else Hermes <tool_call> blocks).
    tool_call_parser: str = field(
        default="auto",
        metadata=flag(
            "tool-call format of the model: auto (from its chat template), hermes, llama3_json",
            choices=TOOL_CALL_PARSERS,
            group=SERVER_GROUP,
        ),
    )

    def __post_init__(self) -> None:
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"tool_call_parser must be one of {TOOL_CALL_PARSERS}, "
                f"got {self.tool_call_parser!r}"
            )
        if self.max_image_pixels is not None and self.max_image_pixels <= 0:
            self.max_image_pixels = None
        check_minimums(self)  # the flags' minimums: max_queue >= 1, ...

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        """The fields present in ``args`` (``nova serve`` flags); defaults for the others. No
        ``served_model_name`` (None or absent): ``args.model``, else the default."""
        name = getattr(args, "served_model_name", None)
        if name is None:
            model = getattr(args, "model", None)
            name = str(model) if model else _default(cls, "served_model_name")
        return from_flags(cls, args, served_model_name=name)

    def media_policy(self) -> MediaPolicy:
        from nova.server.media import MediaPolicy

        return MediaPolicy(
            max_image_pixels=self.max_image_pixels,
            max_media_bytes=self.max_media_bytes,
            allow_remote_media=self.allow_remote_media,
            fetch_timeout_s=self.media_fetch_timeout_s,
            max_redirects=self.max_media_redirects,
            allowed_local_media_path=self.allowed_local_media_path,
        )


def _default(cls: type, name: str) -> str:
    [f] = [f for f in dataclasses.fields(cls) if f.name == name]
    return str(f.default)
