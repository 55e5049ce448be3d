"""The cost-model interface: what a stage batch is (``StageWork``) and how long it takes.

Torch-free. A cost model answers one question for the simulator and the adaptive scheduler:
how long does this batch of this stage take with this share of the GPU's SMs, while those
other batches run at the same time? Implementations: ``roofline`` (analytic, any GPU in
``nova.cost.gpus``) and ``profiled`` (tables measured with the real runtime).

Co-running semantics (both models): ``time_s`` assumes the co-running set stays the same for
the batch's whole duration (a steady-state answer). The simulator's fluid model recomputes it
whenever a batch starts or ends, which makes the piecewise answer exact under that model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from nova.cost.gpus import GpuSpec
from nova.registry import Registry
from nova.types import Batch, Stage

if TYPE_CHECKING:
    from nova.cost.model_spec import ModelSpec


class UnknownCostModelError(ValueError):
    """An unknown cost-model kind."""


# ``StageWork.totals_key()``: (stage, num_images) or (stage, num_seqs, new tokens, context,
# causal pairs)
TotalsKey = tuple[Stage | int, ...]

# Enum members as module constants: ``Stage.DECODE`` is looked up through the enum's metaclass
# (about ten times a global's cost in CPython 3.11), and the hot paths below test them for
# every batch and item.
_VISION, _DECODE = Stage.VISION, Stage.DECODE


@dataclass(slots=True, frozen=True)
class StageWork:
    """One stage batch's shape, all a cost model needs.

    vision: ``num_images`` (>= 1). prefill/decode: per sequence ``new_tokens`` (tokens
    computed in this forward; decode: 1 each) and ``context_lens`` (tokens in its KV after
    this forward, i.e. cached + new; so ``context_lens[i] >= new_tokens[i] >= 1``).
    """

    stage: Stage
    num_images: int = 0
    new_tokens: tuple[int, ...] = ()
    context_lens: tuple[int, ...] = ()
    # ``totals_key()`` once computed (not part of equality, hash or repr)
    _totals: TotalsKey | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage", Stage(self.stage))
        object.__setattr__(self, "new_tokens", tuple(int(n) for n in self.new_tokens))
        object.__setattr__(self, "context_lens", tuple(int(c) for c in self.context_lens))
        if self.stage is Stage.VISION:
            if self.num_images < 1:
                raise ValueError(f"a vision batch needs >= 1 image, got {self.num_images}")
            return
        if not self.new_tokens:
            raise ValueError(f"a {self.stage.value} batch needs >= 1 sequence")
        if len(self.new_tokens) != len(self.context_lens):
            raise ValueError(
                f"{self.stage.value}: {len(self.new_tokens)} new-token counts but "
                f"{len(self.context_lens)} context lengths"
            )
        for n, c in zip(self.new_tokens, self.context_lens):
            if n < 1 or c < n:
                raise ValueError(
                    f"{self.stage.value}: each sequence needs 1 <= new_tokens <= context_len, "
                    f"got new={n}, context={c}"
                )

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def vision(cls, num_images: int = 1) -> StageWork:
        return cls(Stage.VISION, num_images=num_images)

    @classmethod
    def prefill(
        cls, new_tokens: Sequence[int] | int, cached_tokens: Sequence[int] | int = 0
    ) -> StageWork:
        new = (new_tokens,) if isinstance(new_tokens, int) else tuple(new_tokens)
        cached = (
            (cached_tokens,) * len(new) if isinstance(cached_tokens, int) else tuple(cached_tokens)
        )
        if len(cached) != len(new):
            raise ValueError(f"need one cached count per sequence, got {new} and {cached}")
        return cls(
            Stage.PREFILL, new_tokens=new, context_lens=tuple(n + c for n, c in zip(new, cached))
        )

    @classmethod
    def decode(cls, context_lens: Sequence[int] | int) -> StageWork:
        """One decode step; ``context_lens``: tokens in each sequence's KV after the step."""
        ctx = (context_lens,) if isinstance(context_lens, int) else tuple(context_lens)
        return cls(Stage.DECODE, new_tokens=(1,) * len(ctx), context_lens=ctx)

    @classmethod
    def trusted(
        cls,
        stage: Stage,
        num_images: int = 0,
        new_tokens: tuple[int, ...] = (),
        context_lens: tuple[int, ...] = (),
    ) -> StageWork:
        """No conversion or validation: for callers whose values are valid by construction
        (the simulator, from batches the scheduler built: ints, ``1 <= new <= context``).
        Equal to (and hashes like) the checked constructor's result for the same values.
        (The simulator builds one per batch; skipping the checks saves ~15% of its time.)"""
        work = object.__new__(cls)
        # the slots' own setters (what object.__setattr__ ends up calling, minus the lookup)
        _SET_STAGE(work, stage)
        _SET_NUM_IMAGES(work, num_images)
        _SET_NEW_TOKENS(work, new_tokens)
        _SET_CONTEXT_LENS(work, context_lens)
        _SET_TOTALS(work, None)
        return work

    @classmethod
    def trusted_decode(cls, context_lens: tuple[int, ...]) -> StageWork:
        """``trusted`` for a decode step (one new token per sequence), its ``totals_key`` filled
        in (the simulator's memo key: a decode step's totals are its context's sum)."""
        work = object.__new__(cls)
        n = len(context_lens)
        total = sum(context_lens)
        _SET_STAGE(work, _DECODE)
        _SET_NUM_IMAGES(work, 0)
        _SET_NEW_TOKENS(work, (1,) * n)
        _SET_CONTEXT_LENS(work, context_lens)
        # = _compute_totals() (decode: pairs = context)
        _SET_TOTALS(work, (_DECODE, n, n, total, total))
        return work

    @classmethod
    def from_batch(cls, batch: Batch) -> StageWork:
        if batch.stage is Stage.VISION:
            return cls(Stage.VISION, num_images=batch.num_images)
        return cls(
            batch.stage,
            new_tokens=tuple(len(it.token_ids) for it in batch.items),
            context_lens=tuple(it.num_cached_tokens + len(it.token_ids) for it in batch.items),
        )

    # -- derived sizes -----------------------------------------------------------------------
    @property
    def num_seqs(self) -> int:
        return len(self.new_tokens)

    @property
    def total_new_tokens(self) -> int:
        return sum(self.new_tokens)

    @property
    def mean_context_len(self) -> float:
        return sum(self.context_lens) / len(self.context_lens) if self.context_lens else 0.0

    def totals_key(self) -> TotalsKey:
        """The batch's shape as totals: ``(stage, num_images)`` for vision, else ``(stage,
        num_seqs, total new tokens, total context, total causal (query, key) pairs)``.

        Both shipped cost models depend on a work only through these (roofline: FLOPs and bytes
        are sums over sequences; profiled: the table axes), so batches with equal keys take
        equal times: a cheap, exact memo key (the simulator's cost cache uses it). All ints,
        so the key does not depend on the order of the sequences. Computed once per work."""
        key = self._totals
        if key is None:
            key = self._compute_totals()
            object.__setattr__(self, "_totals", key)
        return key

    def _compute_totals(self) -> TotalsKey:
        if self.stage is _VISION:
            return (self.stage, self.num_images)
        new, ctx = self.new_tokens, self.context_lens
        total_ctx = sum(ctx)
        if new.count(1) == len(new):  # one new token each (decode): pairs = context
            return (self.stage, len(new), len(new), total_ctx, total_ctx)
        pairs = sum([n * (c - n) + n * (n + 1) // 2 for n, c in zip(new, ctx)])
        return (self.stage, len(new), sum(new), total_ctx, pairs)

    @property
    def cached_tokens(self) -> tuple[int, ...]:
        return tuple(c - n for n, c in zip(self.new_tokens, self.context_lens))


def _slot_setter(name: str) -> Callable[[StageWork, object], None]:
    """The ``__set__`` of ``StageWork``'s slot ``name`` (writes past the frozen guard)."""
    descriptor: Any = getattr(StageWork, name)
    setter: Callable[[StageWork, object], None] = descriptor.__set__
    return setter


_SET_STAGE = _slot_setter("stage")
_SET_NUM_IMAGES = _slot_setter("num_images")
_SET_NEW_TOKENS = _slot_setter("new_tokens")
_SET_CONTEXT_LENS = _slot_setter("context_lens")
_SET_TOTALS = _slot_setter("_totals")

CoRunning = Sequence[tuple[StageWork, float]]


@runtime_checkable
class CostModel(Protocol):
    """Predicts a stage batch's latency.

    ``time_s(work, sm_share, co_running, isolated)``: seconds for ``work`` given its SM share in
    (0, 1] (rounded to what the GPU grants), while the ``co_running`` batches run with their
    shares. ``isolated=True``: SM partitions (green contexts / SM masks), so compute is
    isolated and only HBM bandwidth (and caches) is shared. ``isolated=False``: plain
    multi-stream co-execution; stages contend for SMs too, with extra contention overhead
    (``Partition.isolated`` says which a batch runs under).

    ``gpu()``: the GPU the answers are for. Optionally, ``shape_key(work)``: a hashable key
    such that works with equal keys take equal times (both shipped models have it: their
    ``StageWork.totals_key``); the simulator memoizes answers on it.

    The simulator (``nova.sim``) and the nova policy (``nova.core.nova_policy``) take any
    object of this shape; ``make_cost_model`` builds the shipped ones.
    """

    name: str

    def time_s(
        self, work: StageWork, sm_share: float, co_running: CoRunning = (), isolated: bool = True
    ) -> float: ...

    def gpu(self) -> GpuSpec: ...


# -- registry --------------------------------------------------------------------------------------
CostModelFactory = Callable[..., CostModel]
COST_MODELS: Registry[CostModelFactory] = Registry("cost model kind", UnknownCostModelError)


def register_cost_model(kind: str) -> Callable[[CostModelFactory], CostModelFactory]:
    """Register ``factory(gpu, model, **kw) -> CostModel`` under ``kind`` (once)."""
    return COST_MODELS.register(kind)


def _ensure_registered() -> None:
    # The implementations register themselves on import.
    import nova.cost.profiled
    import nova.cost.roofline  # noqa: F401


def available_cost_models() -> list[str]:
    _ensure_registered()
    return COST_MODELS.names()


def make_cost_model(kind: str, gpu: str | GpuSpec, model: ModelSpec | str, **kw: Any) -> CostModel:
    """A cost model of ``kind`` (``roofline``, ``profiled``) for ``model`` (a ``ModelSpec`` or a
    shipped name, see ``ModelSpec.named``) on ``gpu`` (a name from ``nova.cost.gpus``).

    ``roofline`` takes ``calib=Calibration(...)`` and ``offload_vision_weights=``;
    ``profiled`` takes ``path=`` (default: the shipped ``profiles/<model>-<gpu>.json``).
    """
    _ensure_registered()
    return COST_MODELS.lookup(kind)(gpu, model, **kw)
