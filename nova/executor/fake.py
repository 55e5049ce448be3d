"""A deterministic executor without a model, for tests (and later the simulator parity test).

The token after a sequence is a pure function of the whole sequence so far, so outputs do not
depend on batching, timing or preemption — exactly the property the real engine must have for
greedy decoding. Optional per-stage delays make batches take time (real sleeps).

With ``block_size`` it models the paged KV cache itself: each batch item's tokens are written
into the slots its block table names (after the batch's copy-on-write copies), and the
sequence the next token depends on is read back from those slots. Shared prefix blocks and
forks then give the same tokens as computing everything privately only if the block
accounting is right.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from nova.executor.base import FaultHook, run_isolated
from nova.sampling_params import SamplingParams
from nova.types import Batch, BatchItem, Partition, Stage, StageResult


def next_token(sequence: list[int], vocab_size: int) -> int:
    """Deterministic 'model': a rolling hash of the sequence."""
    h = 17
    for t in sequence:
        h = (h * 1_000_003 + t) % 2_147_483_647
    return h % vocab_size


class FakeExecutor:
    ranks_turns = False  # no device to share: no turns

    def __init__(
        self,
        vocab_size: int = 1000,
        delay_s: dict[Stage, float] | None = None,
        fault_hook: FaultHook | None = None,
        block_size: int | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.block_size = block_size
        self._slots: dict[int, list[int | None]] = {}  # paged model: block -> its slots
        self.delay_s = delay_s or {}
        self.fault_hook = fault_hook
        self._seqs: dict[str, list[int]] = {}  # tokens whose KV would be cached
        self._lock = threading.Lock()
        self.batches: list[Batch] = []
        self.released: list[str] = []
        self.partitions: dict[Stage, Partition] = {}

    def register(
        self,
        request_id: str,
        sampling: SamplingParams,
        pixel_values: Any | None,
        prompt_token_ids: tuple[int, ...] = (),
        images: tuple[Any, ...] = (),
        supplied: dict[int, Any] | None = None,
    ) -> None:
        with self._lock:
            self._seqs[request_id] = []

    def release(self, request_id: str) -> None:
        with self._lock:
            if self._seqs.pop(request_id, None) is not None:
                self.released.append(request_id)

    def set_partition(self, stage: Stage, partition: Partition) -> None:
        self.partitions[stage] = partition

    def wait_turn(self, stage: Stage) -> None:
        pass  # no device to share: batches start at once

    def decline_turn(self, stage: Stage) -> None:
        pass

    def rank_turn(self, stage: Stage, rank: tuple[float, ...] | None) -> None:
        pass

    def execute(self, batch: Batch) -> StageResult:
        with self._lock:
            self.batches.append(batch)
        delay = self.delay_s.get(batch.stage, 0.0)
        if delay:
            time.sleep(delay)
        return run_isolated(batch, self._run(batch.stage), self.fault_hook)

    def _run_paged(self, items: list[BatchItem], bs: int) -> dict[str, int]:
        slots = self._slots
        for it in items:
            for src, dst in it.block_copies:
                slots[dst] = list(slots.get(src) or [None] * bs)
        out: dict[str, int] = {}
        for it in items:
            table = it.block_table
            for k, tok in enumerate(it.token_ids):
                pos = it.num_cached_tokens + k
                slots.setdefault(table[pos // bs], [None] * bs)[pos % bs] = tok
            n = it.num_cached_tokens + len(it.token_ids)
            seq = [slots.get(table[p // bs], [None] * bs)[p % bs] for p in range(n)]
            if any(t is None for t in seq):
                raise RuntimeError(f"{it.request_id}: reads a slot nothing was written to")
            if it.sample:
                tok = next_token([t for t in seq if t is not None], self.vocab_size)
                out[it.request_id] = tok
                for fid in it.fork_ids:
                    out[fid] = tok
        return out

    def _run(self, stage: Stage):
        def run(items: list[BatchItem]) -> dict[str, int]:
            if stage is Stage.VISION:
                return {}
            if self.block_size is not None:
                with self._lock:
                    return self._run_paged(items, self.block_size)
            out = {}
            with self._lock:
                for it in items:
                    seq = self._seqs[it.request_id]
                    if len(seq) < it.num_cached_tokens:
                        raise RuntimeError(
                            f"{it.request_id}: cache holds {len(seq)} tokens, "
                            f"batch says {it.num_cached_tokens}"
                        )
                    del seq[it.num_cached_tokens :]
                    seq.extend(it.token_ids)
                    if it.sample:
                        out[it.request_id] = next_token(seq, self.vocab_size)
                        for fid in it.fork_ids:  # forks share the prefilled sequence
                            self._seqs[fid] = list(seq)
                            out[fid] = next_token(seq, self.vocab_size)
            return out

        return run
