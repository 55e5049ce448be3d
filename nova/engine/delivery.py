"""Handing engine events from the stage-worker threads to asyncio queues on one event loop.

A decode step finishes with one event per running request. Waking the event loop once per
event (``call_soon_threadsafe`` per request: a write to the loop's self-pipe and one loop
callback each) makes the server's thread take the interpreter lock once per request per step,
while the next step's Python dispatch on the worker thread wants it too. ``LoopDelivery``
wakes the loop once per burst: items posted while a wake-up is pending ride along with it.

Torch-free and clock-free.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class LoopDelivery:
    """Puts items on asyncio queues of one event loop, from any thread, one loop wake-up per
    burst.

    Invariants: every posted item is put on its queue exactly once, in posting order (per
    queue and overall), and by the loop's own thread (``asyncio.Queue`` is not thread-safe).
    At most one drain is scheduled at a time: a drain is scheduled by the post that finds the
    pending list empty, and takes everything pending when it runs.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Any], Any]] = []
        self.num_wakeups = 0  # drains scheduled so far (for tests and profiles)

    def post(self, queue: asyncio.Queue[Any], item: Any) -> None:
        """Deliver ``item`` to ``queue`` on the loop (callable from any thread)."""
        with self._lock:
            self._pending.append((queue, item))
            if len(self._pending) > 1:
                return  # a drain is already scheduled and will take this one too
            self.num_wakeups += 1
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is left to read the queues
            with self._lock:
                self._pending.clear()

    def _drain(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for queue, item in items:
            queue.put_nowait(item)
