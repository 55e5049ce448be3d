"""The server's front end in the simulator: preparing a request before the engine sees it.

``nova serve`` turns each request into a prompt on a pool of ``preprocess_workers`` threads
(image decode, resize/normalise, chat template, tokenisation) before it reaches the scheduler.
For a screenshot that is tens to a hundred-odd milliseconds of CPU per image, part of every
request's end-to-end latency that the engine's cost model does not see. ``FrontendModel``
describes that cost (``per_request_s + per_image_s * images``, measured on the serving machine)
and ``through_frontend`` puts arrivals through a FIFO queue of ``workers`` servers, giving the
time each request reaches the engine. Torch-free and clock-free, like the rest of the simulator.

Assumption: preparation times do not depend on load (the pool's threads do not slow each other
down; true while ``workers`` is below the machine's free cores).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from nova.sim.simulator import SimArrival


@dataclass(slots=True, frozen=True)
class FrontendModel:
    per_request_s: float = 0.0
    per_image_s: float = 0.0
    workers: int = 1

    def __post_init__(self) -> None:
        if self.per_request_s < 0 or self.per_image_s < 0:
            raise ValueError("front-end times must be >= 0")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    def service_s(self, num_images: int) -> float:
        return self.per_request_s + self.per_image_s * num_images


def through_frontend(arrivals: Sequence[SimArrival], model: FrontendModel) -> list[SimArrival]:
    """Open-loop arrivals (all with ``arrival_s``) -> the same requests arriving at the engine
    when the front end has prepared them (FIFO in client arrival order, ``model.workers``
    servers). Order of the result = order of ``arrivals``."""
    arrival_s = [a.arrival_s for a in arrivals]
    if any(t is None for t in arrival_s):
        raise ValueError("through_frontend needs open-loop arrivals (every arrival_s set)")
    client_s = [t for t in arrival_s if t is not None]  # = arrival_s, all set
    order = sorted(range(len(arrivals)), key=lambda i: (client_s[i], i))
    free_at = [0.0] * model.workers  # min-heap of the times each worker is next free
    ready: dict[int, float] = {}
    for i in order:
        start = max(client_s[i], heapq.heappop(free_at))
        done = start + model.service_s(arrivals[i].num_images)
        heapq.heappush(free_at, done)
        ready[i] = done
    return [dataclasses.replace(a, arrival_s=ready[i]) for i, a in enumerate(arrivals)]
