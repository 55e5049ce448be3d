"""Open-loop GUI-agent workloads: Poisson and bursty (gamma) arrivals.

Arrivals form a renewal process from t=0: request i arrives at the sum of the first i+1
inter-arrival gaps, so over a long run the mean rate is ``rate_rps`` (requests / s).
The seed fixes everything; arrival times and request content come from separate random
streams derived from it, so e.g. changing ``rate_rps`` keeps the same requests, re-timed.
"""

from __future__ import annotations

import random

from nova.workload.gui_agent import GuiContentConfig, gui_agent_request
from nova.workload.registry import check_int, check_positive, check_seed, register_workload
from nova.workload.types import Workload


def split_rng(seed: int) -> tuple[random.Random, random.Random]:
    """Two independent streams from one seed: (timing, content)."""
    root = random.Random(seed)
    return random.Random(root.getrandbits(64)), random.Random(root.getrandbits(64))


def gamma_gaps_s(rng: random.Random, rate_rps: float, burstiness: float, num: int) -> list[float]:
    """``num`` inter-arrival gaps (s) with mean ``1/rate_rps``: gamma with shape
    ``burstiness`` (k) and scale ``1/(rate_rps*k)``, as vLLM's ``--burstiness``. k=1 is
    exponential (Poisson arrivals); k<1 is burstier (CV = 1/sqrt(k)), k>1 more regular."""
    if burstiness == 1.0:
        return [rng.expovariate(rate_rps) for _ in range(num)]
    scale = 1.0 / (rate_rps * burstiness)
    return [rng.gammavariate(burstiness, scale) for _ in range(num)]


def _open_loop(
    name: str,
    rate_rps: float,
    num_requests: int,
    seed: int,
    burstiness: float,
    content: GuiContentConfig,
) -> Workload:
    rate_rps = check_positive("rate_rps", rate_rps)
    num_requests = check_int("num_requests", num_requests, 1)
    seed = check_seed(seed)
    burstiness = check_positive("burstiness", burstiness)
    if not isinstance(content, GuiContentConfig):
        raise ValueError(f"content must be a GuiContentConfig, got {type(content).__name__}")
    time_rng, content_rng = split_rng(seed)
    arrival_s = 0.0
    requests = []
    for i, gap_s in enumerate(gamma_gaps_s(time_rng, rate_rps, burstiness, num_requests)):
        arrival_s += gap_s
        requests.append(gui_agent_request(content_rng, f"req-{i:06d}", arrival_s, content))
    return Workload(name=name, requests=tuple(requests))


@register_workload("poisson")
def poisson(
    *,
    rate_rps: float = 1.0,
    num_requests: int = 100,
    seed: int = 0,
    content: GuiContentConfig = GuiContentConfig(),
) -> Workload:
    """GUI-agent requests with Poisson arrivals (exponential gaps, mean ``1/rate_rps`` s)."""
    return _open_loop("poisson", rate_rps, num_requests, seed, 1.0, content)


@register_workload("bursty")
def bursty(
    *,
    rate_rps: float = 1.0,
    num_requests: int = 100,
    seed: int = 0,
    burstiness: float = 0.5,
    content: GuiContentConfig = GuiContentConfig(),
) -> Workload:
    """GUI-agent requests with gamma-distributed gaps: shape ``burstiness`` (k), mean gap
    ``1/rate_rps`` s (scale ``1/(rate_rps*k)``), vLLM's ``--burstiness``. k=1 gives exactly
    :func:`poisson`'s requests; k=0.25 has a gap CV of about 2."""
    return _open_loop("bursty", rate_rps, num_requests, seed, burstiness, content)
