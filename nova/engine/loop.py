"""The engine loop: three stage workers (vision, prefill, decode) running concurrently.

Each worker thread repeatedly asks the scheduler (under one lock) for the next batch of its
stage, runs it on the executor outside the lock, and reports the result back. The scheduler and
the policy are torch-free and clock-free; the loop owns the clock and passes ``now_s`` in (and
stamps each ``StageResult.end_s``). Events (new tokens, finishes) go to per-request listeners,
called from worker threads.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from nova.core.policy import earliest_key
from nova.core.scheduler import Scheduler
from nova.engine.arrivals import QUIET_S, ArrivalHold, Arrivals, Successors
from nova.engine.client import EngineSnapshot
from nova.executor.base import Executor, describe_error
from nova.types import Batch, Request, RequestEvent, Stage, StageResult

log = logging.getLogger(__name__)

Listener = Callable[[RequestEvent, Request], None]


_FRONT = (Stage.VISION, Stage.PREFILL)

IDLE_WAIT_S = 0.05  # re-ask the policy at least this often when idle (time-driven policies)


class EngineLoop:
    def __init__(
        self,
        scheduler: Scheduler,
        executor: Executor,
        clock: Callable[[], float] = time.monotonic,
        arrival_wait_s: float = 0.0,
        successor_hold: bool = True,
    ) -> None:
        """``arrival_wait_s``: how long an idle loop waits for the requests a front end
        announced (``arrivals``) before it starts the ones queued (``nova.engine.arrivals``);
        ``successor_hold``: also for the successors of the answers it just sent, within it."""
        self.scheduler = scheduler
        self.executor = executor
        self._clock = clock
        self._t0 = clock()
        self._cond = threading.Condition()
        self.arrivals = Arrivals(self._cond)
        self._hold = ArrivalHold(arrival_wait_s, QUIET_S)
        self._successors = Successors(arrival_wait_s if successor_hold else 0.0)
        self._last_arrival_s = float("-inf")
        self._listeners: dict[str, Listener] = {}
        self._requests: dict[str, Request] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.num_batches: dict[Stage, int] = dict.fromkeys(Stage, 0)
        # where stages take turns on the device (a CPU with few cores), the executor is told
        # which front stage holds the earliest request (``_rank_turns_locked``)
        self._ranks_turns = executor.ranks_turns

    def now(self) -> float:
        """Seconds since the loop was created."""
        return self._clock() - self._t0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> EngineLoop:
        if self._threads:
            return self
        self._stopping = False
        for stage in Stage:
            t = threading.Thread(
                target=self._worker, args=(stage,), name=f"nova-{stage.value}", daemon=True
            )
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []

    def __enter__(self) -> EngineLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests --------------------------------------------------------------------------
    def add_request(
        self,
        req: Request,
        pixel_values: Any | None = None,
        listener: Listener | None = None,
        forks: Sequence[Request] = (),
        supplied: dict[int, Any] | None = None,
    ) -> None:
        """Submit ``req`` (its arrival time is set to now) and its ``forks`` (``n`` > 1: more
        choices of the same prompt; ``listener`` hears them all). ``supplied``: image index ->
        embeddings the front end took from the encoder cache. Raises ``RequestRejected`` if it
        can never be served; nothing is kept then."""
        prompt = tuple(req.prompt_token_ids)
        if supplied or req.images:
            self.executor.register(
                req.request_id, req.sampling, pixel_values, prompt, tuple(req.images), supplied
            )
        else:
            self.executor.register(req.request_id, req.sampling, pixel_values, prompt)
        for f in forks:
            self.executor.register(f.request_id, f.sampling, None, prompt)
        group = [req, *forks]
        with self._cond:
            try:
                self.scheduler.add_request(req, self.now(), forks)
            except Exception:
                for r in group:
                    self.executor.release(r.request_id)
                raise
            self._last_arrival_s = self.now()
            self._successors.arrived(self._last_arrival_s)
            for r in group:
                self._requests[r.request_id] = r
                if listener is not None:
                    self._listeners[r.request_id] = listener
            self._rank_turns_locked()
            self._cond.notify_all()

    def abort(self, request_id: str) -> bool:
        with self._cond:
            event = self.scheduler.abort(request_id, self.now())
            if event is None:
                return False
            delivered = self._deliver_locked([event, *self.scheduler.take_events()])
            self._rank_turns_locked()
            self._cond.notify_all()
        self._dispatch(delivered)
        return True

    @property
    def is_running(self) -> bool:
        """Started, and every stage worker is alive."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def snapshot(self) -> EngineSnapshot:
        """The scheduler's state, read under the lock (no memory or granted SMs: the loop does
        not know the device; ``LLMEngine.snapshot`` adds them)."""
        with self._cond:
            state, bm = self.scheduler.state, self.scheduler.block_manager
            enc = self.scheduler.encoder_cache
            return EngineSnapshot(
                {s: state.num_in_stage(s) for s in Stage},
                bm.usage,
                bm.num_free_blocks,
                {s: state.partition.share(s) for s in Stage},
                state.num_preemptions,
                prefix_cache_queried_tokens=bm.num_queried_tokens,
                prefix_cache_hit_tokens=bm.num_hit_tokens,
                encoder_cache_queried_images=enc.num_queried_images,
                encoder_cache_hit_images=enc.num_hit_images,
                encoder_cache_used_bytes=enc.used_bytes,
                kv_cache_cached_blocks=bm.num_cached_blocks,
            )

    def has_unfinished(self) -> bool:
        with self._cond:
            return self.scheduler.has_unfinished()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until every submitted request is done; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self.scheduler.has_unfinished():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=IDLE_WAIT_S if left is None else min(left, IDLE_WAIT_S))
        return True

    # -- workers ---------------------------------------------------------------------------
    def _worker(self, stage: Stage) -> None:
        had_turn = False  # waited for this stage's turn since it last planned a batch
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = self.now()
                hold_s = self._arrival_hold_s(now)
                if hold_s > 0:
                    self._cond.wait(timeout=hold_s)
                    continue
                batch: Batch | None = None
                if had_turn or not self.scheduler.state.queue(stage):
                    had_turn = False
                    batch = self.scheduler.schedule(stage, now)
                    if batch is None:
                        # (on a CPU whose stages take turns, a front batch waiting to see
                        # whether decode comes back after its last step need not wait more)
                        self.executor.decline_turn(stage)
                        self._cond.wait(timeout=IDLE_WAIT_S)
                        continue
            if batch is None:
                # work is queued: where stages take turns on the device (a CPU with few
                # cores), wait for ours before planning the batch, so that it holds what
                # queued meanwhile
                self.executor.wait_turn(stage)
                had_turn = True
                continue
            self.executor.set_partition(stage, batch.partition)
            try:
                result = self.executor.execute(batch)
            except Exception as exc:
                log.exception("%s batch %d failed", stage.value, batch.batch_id)
                failed = {rid: describe_error(exc) for rid in batch.request_ids}
                result = StageResult(batch, batch.start_s, failed=failed)
            with self._cond:
                end_s = result.end_s = self.now()
                events = self.scheduler.complete(result, end_s)
                if result.logprobs:
                    events = [_with_logprobs(ev, result) for ev in events]
                events += self.scheduler.take_events()
                self.num_batches[stage] += 1
                self._rank_turns_locked()  # (the front queues may have changed)
                delivered = self._deliver_locked(events)
                for rid in batch.request_ids:
                    if rid not in self._requests:  # done (possibly aborted mid-batch)
                        self.executor.release(rid)
                self._cond.notify_all()
            self._dispatch(delivered)

    def _rank_turns_locked(self) -> None:
        """(Under the lock.) Where stages take turns on the device, tell the executor each
        front stage's earliest waiting request in service order: the one holding the
        earlier goes first (first come, first served across stages, as ``sequential``
        orders them), including over a stage that asked first, e.g. vision's worker
        asking again the moment its batch ended while prefill's worker wakes to the
        requests that batch handed it."""
        if not self._ranks_turns:
            return
        state = self.scheduler.state
        for stage in _FRONT:
            self.executor.rank_turn(stage, earliest_key(state, stage))

    def _arrival_hold_s(self, now_s: float) -> float:
        """(Under the lock.) Seconds to keep waiting for announced requests before starting
        the queued ones: only while no batch runs and nothing is decoding."""
        state = self.scheduler.state
        return self._hold.wait_s(
            now_s,
            pending=self.arrivals.pending,
            idle=not state.any_running() and state.num_in_stage(Stage.DECODE) == 0,
            queued=self.scheduler.has_unfinished(),
            last_arrival_s=self._last_arrival_s,
            due=self._successors.due(now_s),
        )

    def _deliver_locked(
        self, events: list[RequestEvent]
    ) -> list[tuple[RequestEvent, Request, Listener | None]]:
        out = []
        for ev in events:
            req = self._requests[ev.request_id]
            listener = self._listeners.get(ev.request_id)
            if ev.finished:
                if ev.error is None and ev.finish_reason != "abort":
                    self._successors.finished(self.now())  # (an answer went out)
                self._requests.pop(ev.request_id, None)
                self._listeners.pop(ev.request_id, None)
                # An abort can land while the request's batch runs: its payload is released
                # when that batch completes (see _worker), not under the executor's feet.
                if ev.request_id not in self.scheduler.state.in_flight:
                    self.executor.release(ev.request_id)
            out.append((ev, req, listener))
        return out

    @staticmethod
    def _dispatch(delivered: list[tuple[RequestEvent, Request, Listener | None]]) -> None:
        for ev, req, listener in delivered:
            if listener is None:
                continue
            try:
                listener(ev, req)
            except Exception:
                log.exception("listener of request %s raised", ev.request_id)


def _with_logprobs(ev: RequestEvent, result: StageResult) -> RequestEvent:
    """The event carrying the log-probabilities the executor computed for its new token."""
    lp = result.logprobs.get(ev.request_id)
    if lp is None or not ev.new_token_ids:
        return ev
    return dataclasses.replace(ev, logprobs=(lp,))
