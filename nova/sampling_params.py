"""Per-request sampling parameters: plain data, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nova.structured.compiler import CompiledGrammar

MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's top_logprobs limit)
MAX_PENALTY = 2.0  # presence/frequency penalties lie in [-2, 2] (OpenAI)
MAX_LOGIT_BIAS = 100.0  # a bias lies in [-100, 100] (OpenAI)


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How to pick the next token, and when to stop.

    ``temperature == 0`` means greedy (argmax); ``top_k is None``, ``top_p == 1.0`` and
    ``min_p == 0.0`` disable those filters. ``seed`` makes one request's sampled tokens
    reproducible whatever else is batched with it. Generation stops at ``max_tokens`` or at a
    token in ``stop_token_ids`` (the model's EOS ids are added by the runtime unless
    ``ignore_eos``).

    The fields after ``ignore_eos`` change the logits before a token is picked (in the order
    ``nova.runtime.sampler`` documents): ``repetition_penalty`` (> 0; 1 = off) divides the
    positive logits and multiplies the negative ones of every token seen in the prompt or the
    output; ``presence_penalty``/``frequency_penalty`` (in [-2, 2]) subtract
    ``presence * (count > 0) + frequency * count`` for each output token's count (OpenAI's
    formula); ``logit_bias``: (token id, bias in [-100, 100]) pairs added to the logits;
    ``min_tokens``: EOS and the stop tokens are not allowed before that many output tokens.
    ``logprobs``: None for none, else how many alternatives (0-20) to report with each
    sampled token's own log-probability.

    ``structured_output``: a compiled grammar the output must match (``nova.structured``);
    each sampled token is restricted to the tokens it allows, and once it is complete only EOS
    is allowed, which then ends generation even with ``ignore_eos``.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    structured_output: CompiledGrammar | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise ValueError(
                f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"
            )
        bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        for tok, b in bias:
            if tok < 0 or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
                raise ValueError(
                    f"logit_bias: token {tok} bias {b}: token ids are >= 0 and biases in "
                    f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
                )
        if len({t for t, _ in bias}) != len(bias):
            raise ValueError("logit_bias names a token more than once")
        object.__setattr__(self, "logit_bias", bias)
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0):
            raise ValueError(
                f"repetition_penalty must be finite and > 0, got {self.repetition_penalty!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_token_history(self) -> bool:
        """The sampler must know the request's tokens (penalties, min_tokens)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.min_tokens > 0
        )

    def stop_reason(
        self, token: int, num_output_tokens: int, eos_token_ids: frozenset[int]
    ) -> str | None:
        """Why generation ends after ``token`` (the ``num_output_tokens``-th output): "stop" for
        a stop token or EOS (unless ``ignore_eos``), "length" at ``max_tokens``; else None."""
        if token in self.stop_token_ids or (
            token in eos_token_ids and (not self.ignore_eos or self.structured_output is not None)
        ):
            return "stop"
        if num_output_tokens >= self.max_tokens:
            return "length"
        return None


# generation_config.json keys a request's unset sampling fields default to (as vLLM reads them);
# max_new_tokens becomes the default max_tokens.
GENERATION_CONFIG_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_new_tokens",
)


@dataclass(slots=True, frozen=True)
class GenerationDefaults:
    """A model's sampling defaults (its ``generation_config.json``), for requests that do not
    set a field; None: the server's own default. ``source`` names where they came from."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    source: str = "none"

    @classmethod
    def from_dict(cls, d: dict[str, object], source: str) -> GenerationDefaults:
        """From a parsed ``generation_config.json``; a value of the wrong type or range is a
        ValueError naming the key (a model's defaults are checked once, at load)."""
        out: dict[str, float | int | None] = {}
        for key in GENERATION_CONFIG_KEYS:
            value = d.get(key)
            if value is None:
                continue
            name = "max_tokens" if key == "max_new_tokens" else key
            integral = key in ("top_k", "max_new_tokens")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{source}: {key} must be a number, got {value!r}")
            if integral and not float(value).is_integer():
                raise ValueError(f"{source}: {key} must be an integer, got {value!r}")
            out[name] = int(value) if integral else float(value)
        defaults = cls(**out, source=source)  # type: ignore[arg-type]
        defaults.check()
        return defaults

    def check(self) -> None:
        bad = (
            (self.temperature is not None and not self.temperature >= 0.0)
            or (self.top_p is not None and not 0.0 < self.top_p <= 1.0)
            or (self.min_p is not None and not 0.0 <= self.min_p <= 1.0)
            or (self.repetition_penalty is not None and not self.repetition_penalty > 0.0)
            or (self.max_tokens is not None and self.max_tokens < 1)
        )
        if bad:
            raise ValueError(f"{self.source}: sampling defaults out of range: {self}")

    def describe(self) -> str:
        fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")
        set_ = [f"{f}={getattr(self, f)}" for f in fields if getattr(self, f) is not None]
        return f"{', '.join(set_) or 'none'} (from {self.source})"
