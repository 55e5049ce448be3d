"""What a stage executor does: run one batch of one stage and say what came out.

Executors own the request payloads the scheduler never sees (pixels, image embeddings, RNGs).
``execute`` returns a ``StageResult`` whose ``end_s`` is still the batch's ``start_s``: the
engine loop owns the clock and stamps ``end_s`` when it takes the result. ``execute`` must
isolate failures: a part that fails for one request is reported in ``StageResult.failed`` and
the other requests of the batch still get their results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from nova.sampling_params import SamplingParams
from nova.types import Batch, BatchItem, Partition, Stage, StageResult

# Called for each request of a batch before it runs; raising fails that request only.
# Tests use it to inject faults; it is None in production.
FaultHook = Callable[[Stage, str], None]


class Executor(Protocol):
    @property
    def ranks_turns(self) -> bool:
        """Whether stages may take turns on the device and it wants ``rank_turn`` (a CPU
        with few cores)."""

    def register(
        self,
        request_id: str,
        sampling: SamplingParams,
        pixel_values: Any | None,
        prompt_token_ids: tuple[int, ...] = (),
        images: tuple[Any, ...] = (),
        supplied: dict[int, Any] | None = None,
    ) -> None:
        """Take a new request's payload (before it is scheduled). ``images``: its
        ``ImageInput``s; ``supplied``: image index -> embeddings from the encoder cache (those
        images have no pixels in ``pixel_values``)."""

    def execute(self, batch: Batch) -> StageResult:
        """Run ``batch``; called from the stage's own worker thread. ``end_s`` of the result
        is left at ``batch.start_s`` (the caller stamps it)."""

    def release(self, request_id: str) -> None:
        """Forget a finished/aborted/failed request's payload."""

    def set_partition(self, stage: Stage, partition: Partition) -> None:
        """Use ``partition``'s share for ``stage`` from the next batch on."""

    def wait_turn(self, stage: Stage) -> None:
        """Block until ``stage``'s next batch could start at once (on a CPU whose stages take
        turns on the cores: its turn); called by the stage's worker before it plans the
        batch, outside the engine's lock."""

    def decline_turn(self, stage: Stage) -> None:
        """``stage`` has nothing to run now (its worker asked the scheduler and got no
        batch): stages that wait to see whether it runs next need not wait any longer."""

    def rank_turn(self, stage: Stage, rank: tuple[float, ...] | None) -> None:
        """``stage``'s earliest waiting request in the scheduler's service order (None: it has
        none); called under the engine's lock before ``wait_turn`` and again when its queue
        changes while it waits. Where stages take turns, the front stage holding the
        earliest request goes first."""


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_isolated(
    batch: Batch,
    run: Callable[[list[BatchItem]], dict[str, int]],
    fault_hook: FaultHook | None,
) -> StageResult:
    """Run ``batch``'s items as one batch; if that raises, rerun each item alone so that only
    the failing requests fail. ``run`` returns request id -> new token (empty for vision).
    The result's ``end_s`` is ``batch.start_s`` (unstamped)."""
    out = StageResult(batch, batch.start_s)
    ok: list[BatchItem] = []
    for it in batch.items:
        try:
            if fault_hook is not None:
                fault_hook(batch.stage, it.request_id)
            ok.append(it)
        except Exception as exc:  # noqa: BLE001 - any failure belongs to this request
            out.failed[it.request_id] = describe_error(exc)
    if not ok:
        return out
    try:
        out.new_token_ids.update(run(ok))
        return out
    except Exception as exc:  # noqa: BLE001
        if len(ok) == 1:
            out.failed[ok[0].request_id] = describe_error(exc)
            return out
    for it in ok:
        try:
            out.new_token_ids.update(run([it]))
        except Exception as exc:  # noqa: BLE001
            out.failed[it.request_id] = describe_error(exc)
    return out
