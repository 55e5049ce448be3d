"""Plain data for workloads: what to send, when, and with which images. Torch-free.

Times are seconds. An open-loop workload gives every request an ``arrival_s`` offset from t=0
(the client sends it then, whatever the server is doing). A closed-loop workload is a set of
sessions: a session's first step has its start offset in ``arrival_s``; each later step has
``arrival_s=None`` and is sent ``think_time_s`` after the previous step's answer came back.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class ImageSpec:
    """One image of a request, in pixels. Its content is synthesised from the request's seed,
    or, when ``seed`` is set, from ``seed`` and ``revision``: the screen of one agent session
    (``seed``) after ``revision`` steps, a little different from the one before
    (``nova.screenshots.make_session_screenshot``); equal specs are byte-identical images."""

    width: int
    height: int
    seed: int | None = None
    revision: int = 0

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")
        if self.revision < 0:
            raise ValueError(f"revision must be >= 0, got {self.revision}")

    @property
    def content_key(self) -> str | None:
        """Identifies the image's content across requests (None: synthesised per request)."""
        if self.seed is None:
            return None
        return f"screen:{self.seed}:{self.revision}:{self.width}x{self.height}"


@dataclass(slots=True, frozen=True)
class ChatTurn:
    """One message of a multi-turn request: a role ("system", "user", "assistant"), its text
    and optionally one image (shown before the text)."""

    role: str
    text: str = ""
    image: ImageSpec | None = None

    def __post_init__(self) -> None:
        if self.role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {self.role!r}")
        if self.image is not None and self.role != "user":
            raise ValueError("only user turns carry images")


@dataclass(slots=True, frozen=True)
class WorkloadRequest:
    """One request to send.

    ``arrival_s``: open loop: arrival offset (s) from t=0; closed loop: the start offset of the
    session's first step, ``None`` for later steps.
    ``instruction``: the user text (instruction plus any action history), used as chat content.
    ``num_text_tokens``: text tokens of the prompt: a trace's own count, or for generated
    requests :func:`nova.workload.text_tokens_estimate` of ``instruction``.
    ``max_tokens``: output tokens to generate.
    ``think_time_s``: closed loop: wait after the previous step's answer before sending this.
    ``deadline_s``: optional latency target, seconds after arrival. ``priority``: lower first.
    ``seed``: seeds a deterministic synthetic screenshot for this request's images.
    ``turns``: the whole conversation, when the request is multi-turn (agent sessions resend
    the system prompt, the history and the last screenshots every step); then ``images`` are
    the turns' images in order and ``instruction`` is the last user text. Empty: one user turn
    of ``images`` then ``instruction``.
    """

    request_id: str
    arrival_s: float | None
    instruction: str
    num_text_tokens: int
    images: tuple[ImageSpec, ...]
    max_tokens: int
    session_id: str | None = None
    step: int = 0
    think_time_s: float = 0.0
    deadline_s: float | None = None
    priority: int = 0
    seed: int = 0
    turns: tuple[ChatTurn, ...] = ()

    def __post_init__(self) -> None:
        if self.turns:
            turn_images = tuple(t.image for t in self.turns if t.image is not None)
            if turn_images != self.images:
                raise ValueError(f"request {self.request_id!r}: images differ from the turns'")
        if self.max_tokens < 1:
            raise ValueError(
                f"request {self.request_id!r}: max_tokens must be >= 1, got {self.max_tokens}"
            )
        if self.num_text_tokens < 0:
            raise ValueError(f"request {self.request_id!r}: num_text_tokens must be >= 0")
        if self.think_time_s < 0:
            raise ValueError(f"request {self.request_id!r}: think_time_s must be >= 0")

    @property
    def num_images(self) -> int:
        return len(self.images)


@dataclass(slots=True, frozen=True)
class Workload:
    """A named, reproducible list of requests.

    Open loop: ``requests`` are in arrival order. Closed loop (``closed_loop=True``): requests
    are grouped by session (sessions in start order), each session's steps in order.
    ``notes``: what the builder wants a reader to know, e.g. rows of a trace it skipped.
    """

    name: str
    requests: tuple[WorkloadRequest, ...]
    closed_loop: bool = False
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.requests)

    def sessions(self) -> dict[str, list[WorkloadRequest]]:
        """Requests that belong to a session, by session id (first-seen order), steps in order."""
        out: dict[str, list[WorkloadRequest]] = {}
        for req in self.requests:
            if req.session_id is not None:
                out.setdefault(req.session_id, []).append(req)
        for steps in out.values():
            steps.sort(key=lambda r: r.step)
        return out

    @property
    def duration_s(self) -> float | None:
        """The last open-loop arrival (s); ``None`` for a closed-loop workload (its length depends
        on how fast the server answers) or one without arrivals."""
        if self.closed_loop:
            return None
        arrivals = [r.arrival_s for r in self.requests if r.arrival_s is not None]
        return max(arrivals) if arrivals else None
