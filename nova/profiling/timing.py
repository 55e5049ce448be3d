"""Timing stage batches on a device: one timer per device (CUDA work synchronised on the calling
thread's stream), one long-lived worker thread per stage, and the co-running measurement (a
batch timed alone and while another runs in a loop on a second thread)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from nova.types import Stage

Job = Callable[[], Any]


class DeviceTimer:
    """Wall-clock timing of jobs on one device: CUDA work is synchronised on the calling
    thread's stream before the clock is read, so a sample is the job's device time too."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.current_stream(self.device).synchronize()

    @contextlib.contextmanager
    def own_stream(self) -> Iterator[None]:
        """The body runs on a new CUDA stream of its own (nothing on a CPU)."""
        if not self.is_cuda:
            yield
            return
        with torch.cuda.stream(torch.cuda.Stream(self.device)):
            yield

    def time_s(self, job: Job, warmup: int, repeats: int) -> list[float]:
        """``repeats`` samples (seconds) of ``job`` after ``warmup`` untimed runs."""
        for _ in range(warmup):
            job()
        self.sync()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            job()
            self.sync()
            samples.append(time.perf_counter() - start)
        return samples


class StageThreads:
    """One long-lived worker thread per stage, like the engine's stage workers: timings taken
    on the main thread were up to ~1.3x faster than the same forward on a worker thread
    (measured on the 2-core CPU), and the engine only ever runs batches on its workers."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pools = {
            s: ThreadPoolExecutor(1, thread_name_prefix=f"nova-profile-{s.value}") for s in Stage
        }

    def run(self, stage: Stage, fn: Callable[[], Any]) -> Any:
        return self._pools[stage].submit(fn).result()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown()


def time_varied(
    timer: DeviceTimer,
    make: Callable[[int], AbstractContextManager[Job]],
    warmup: int,
    repeats: int,
    first_variant: int,
) -> list[float]:
    """``repeats`` timed runs (after ``warmup`` untimed ones), each of a new variant of the
    batch (``make(variant)``); only the run is timed, not the setup."""
    samples = []
    for i in range(warmup + repeats):
        with make(first_variant + i) as job:
            timer.sync()
            start = time.perf_counter()
            job()
            timer.sync()
            if i >= warmup:
                samples.append(time.perf_counter() - start)
    return samples


class Background:
    """A worker thread that runs ``job`` in a loop while switched on (CUDA: on its own stream).

    The thread lives across switches: starting and joining a thread per sample disturbed the
    samples right after it on CPU (the OpenMP pool of the dead thread), so ``on()`` only
    toggles an event."""

    def __init__(self, timer: DeviceTimer, job: Job) -> None:
        self._timer, self._job = timer, job
        self._on, self._idle, self._busy, self._quit = (threading.Event() for _ in range(4))
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._loop, name="nova-profile-corun", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            with self._timer.own_stream():
                while not self._quit.is_set():
                    if not self._on.is_set():
                        self._idle.set()
                        self._on.wait(0.01)
                        continue
                    self._idle.clear()
                    self._busy.set()
                    self._job()
                    self._timer.sync()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the measuring thread
            self._errors.append(exc)
        finally:
            self._idle.set()
            self._busy.set()

    def _check(self) -> None:
        if self._errors:
            raise RuntimeError(f"co-running job failed: {self._errors[0]!r}") from self._errors[0]

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        """The body runs while the job runs in a loop; on exit, waits for the job in flight."""
        self._busy.clear()
        self._on.set()
        self._busy.wait()
        try:
            yield
        finally:
            self._on.clear()
            self._idle.wait()
        self._check()

    def close(self) -> None:
        self._quit.set()
        self._thread.join()
        self._check()


def time_corun(
    timer: DeviceTimer,
    job: Job,
    background: Job,
    warmup: int,
    repeats: int,
    stat: Callable[[Sequence[float]], float],
) -> tuple[float, float]:
    """(latency alone, latency while ``background`` runs in a loop in another thread).

    Alone and co-running samples alternate, so slow drifts in the machine's load (other
    processes) hit both sides alike instead of skewing the ratio."""
    with timer.own_stream():
        timer.time_s(job, warmup, 0)
    alone: list[float] = []
    together: list[float] = []
    bg = Background(timer, background)
    try:
        for _ in range(max(3, repeats)):
            with timer.own_stream():
                alone += timer.time_s(job, 0, 1)
            with bg.on(), timer.own_stream():
                together += timer.time_s(job, 0, 1)
    finally:
        bg.close()
    return stat(alone), stat(together)
