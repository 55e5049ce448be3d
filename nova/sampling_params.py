"""Per-request sampling parameters: plain data, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nova.structured.compiler import CompiledGrammar


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How to pick the next token, and when to stop.

    ``temperature == 0`` means greedy (argmax); ``top_k is None`` and ``top_p == 1.0`` disable
    those filters. ``seed`` makes one request's sampled tokens reproducible whatever else is
    batched with it. Generation stops at ``max_tokens`` or at a token in ``stop_token_ids``
    (the model's EOS ids are added by the runtime unless ``ignore_eos``).

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

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

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
