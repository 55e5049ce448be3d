"""Experiments for ``nova eval``: what to simulate (GPU, model, workload, loads, seeds) and
which policies to compare (``nova``, the baselines' tuned variants, nova's static modes for the
hindsight oracle). Plain data and the registry; ``nova.sim.eval`` runs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from nova.core.nova_model import Mode
from nova.core.policy import parse_policy_name
from nova.cost.gpus import GpuSpec
from nova.registry import Registry

# Every baseline at the settings a tuned deployment might pick; the best of them at a load
# point is "the best tuned baseline" (by max latency, ties by mean).
CHUNKED_BUDGETS = (128, 256, 512, 2048)
PF_LIMITS = (2, 4, 8)
# (vision, prefill, decode) shares; snapped to the GPU's SM grid when built
STATIC_SPLITS = ((0.4, 0.4, 0.2), (0.5, 0.3, 0.2), (0.35, 0.35, 0.3), (0.45, 0.25, 0.3))
BASELINE_VARIANTS: tuple[str, ...] = (
    *(f"chunked_prefill[budget={b}]" for b in CHUNKED_BUDGETS),
    *(f"pf_limit[limit={n}]" for n in PF_LIMITS),
    "multi_stream",
    *(f"static_partition[vision={v},prefill={p},decode={d}]" for v, p, d in STATIC_SPLITS),
    "sequential",
)
# The paper's single settings of its baselines (for the plots' reference lines).
PAPER_SETTINGS = ("chunked_prefill[budget=128]", "pf_limit[limit=4]", "multi_stream")
NOVA = "nova"
ORACLE = "oracle"


def expand_policies(names: tuple[str, ...] | list[str]) -> list[str]:
    """Policy names as given, with a baseline's plain name (``chunked_prefill``) standing for
    all its tuned variants; duplicates dropped, order kept."""
    out: dict[str, None] = {}
    for name in names:
        base, params = parse_policy_name(name)
        variants = [v for v in BASELINE_VARIANTS if parse_policy_name(v)[0] == base]
        if not params and variants and base != NOVA:
            out.update(dict.fromkeys(variants))
        else:
            out[name] = None
    return list(out)


@dataclass(slots=True, frozen=True)
class Series:
    """One line of load points: workload parameters and the loads (``Experiment.load_param``
    values: arrival rates, or numbers of closed-loop sessions)."""

    label: str
    workload_kwargs: dict[str, Any]
    loads: tuple[float, ...]


@dataclass(slots=True, frozen=True)
class Experiment:
    """What ``nova eval`` simulates. Every policy runs every load point of every series for
    every seed on the same requests. ``policies``: the policies compared with the best tuned
    baseline (``baselines``, names with variant parameters); ``oracle_modes``: nova's static
    modes (``Mode`` labels) the hindsight oracle may pick besides the baselines (``None``: a
    default set on the GPU's grid, ``static_modes``). ``image_size``: the screenshot (width,
    height) for every request (``None``: the workload's default, 1120x1120).
    ``offload_vision``: vision weights stream from host memory (the cost model and the KV
    sizing know it)."""

    name: str
    description: str
    gpu: str
    model: str
    rates_rps: tuple[float, ...]
    num_requests: int
    policies: tuple[str, ...] = (NOVA,)
    cost_kind: str = "roofline"
    workload: str = "poisson"
    workload_kwargs: dict[str, Any] = field(default_factory=dict)
    min_decode_sms: int | None = None  # the paper's minimum decode share on its GPU
    max_num_seqs: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    baselines: tuple[str, ...] = BASELINE_VARIANTS
    oracle_modes: tuple[str, ...] | None = None
    series: tuple[Series, ...] = ()
    load_param: str = "rate_rps"
    image_size: tuple[int, int] | None = None
    offload_vision: bool = False
    cost_kwargs: dict[str, Any] = field(default_factory=dict)
    # Caches across requests, modelled with the engine's own code (nova.core): the prefix
    # cache over each request's content (``request_segments``) and an encoder cache of
    # ``encoder_cache_gib`` (embeddings of ``text_hidden`` values of the model's dtype per
    # image token). Off: every request computes everything (the paper's setup).
    caches: bool = False
    encoder_cache_gib: float = 4.0

    def __post_init__(self) -> None:
        if len(self.seeds) < 1:
            raise ValueError(f"experiment {self.name!r}: needs at least one seed")
        for label in self.oracle_modes or ():
            Mode.parse(label)

    def all_series(self) -> tuple[Series, ...]:
        return self.series or (Series("", dict(self.workload_kwargs), self.rates_rps),)

    @property
    def closed_loop(self) -> bool:
        return self.load_param == "num_sessions"


EXPERIMENTS: Registry[Experiment] = Registry("experiment")


def register_experiment(exp: Experiment) -> Experiment:
    """Register ``exp`` under its name (once)."""
    return EXPERIMENTS.add(exp.name, exp)


def static_modes(exp: Experiment, gpu: GpuSpec) -> list[str]:
    """nova's static modes the oracle may pick: decode slices of about 10-40% of the SMs beside
    both compute stages, the paper's A6000 operating point (24 beside vision, 30 beside
    prefill) scaled to the GPU, one-image vision batches. (The time-sliced modes are the
    baselines' own disciplines: the oracle has them as baseline variants.)"""
    if exp.oracle_modes is not None:
        return list(exp.oracle_modes)
    n, g = gpu.num_sms, gpu.sm_granularity
    low = max(g, gpu.min_partition_sms, exp.min_decode_sms or 0)
    high = n - gpu.min_partition_sms

    def snap(x: float) -> int:
        return min(high, max(low, math.floor(x / g + 0.5) * g))

    slices = sorted({snap(low), *(snap(f * n) for f in (0.15, 0.2, 0.3, 0.4))})
    modes = [Mode.spatial(d, d, 1) for d in slices]
    modes.append(Mode.spatial(snap(24 / 84 * n), snap(30 / 84 * n), 1))
    return list(dict.fromkeys(m.label for m in modes))


# -- the named experiments --------------------------------------------------------------------
# 800 requests per point (open loop): near saturation a run of 200 ends long before its queue
# reaches steady state, which rewards the mode with the least capacity that still drains in
# time (paper-a6000 at 0.8 req/s: chunked_prefill[budget=128] beat [256] by 8% in max latency
# over 200 requests and lost by 44% over 800; benchmarks/results/eval/paper-a6000/results.json,
# the 200-request run as committed in d379047).
A6000_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)

register_experiment(
    Experiment(
        "paper-a6000",
        "The Nova paper's setup: CogAgent-9B-shaped VLM on an RTX A6000 (cost model calibrated to "
        "the paper's stage times), GUI-agent requests (one 1120x1120 screenshot, 30-80 output "
        "tokens), Poisson arrivals up to 0.8 req/s.",
        gpu="a6000",
        model="cogagent-9b",
        rates_rps=A6000_RATES,
        num_requests=800,
        min_decode_sms=12,
    )
)
register_experiment(
    Experiment(
        "paper-h100",
        "The same workload on an H100 SXM; loads scaled to the H100's capacity.",
        gpu="h100-sxm",
        model="cogagent-9b",
        rates_rps=(0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0),
        num_requests=800,
        min_decode_sms=16,
    )
)
register_experiment(
    Experiment(
        "rtx4090-cogagent-offload",
        "CogAgent-9B on a 24 GB RTX 4090 with the vision weights streamed from host memory "
        "(the paper's offloading: 18 GB of LLM weights stay, the 9 GB encoder does not; the KV "
        "cache gets what the LLM leaves), Poisson GUI-agent requests.",
        gpu="rtx4090",
        model="cogagent-9b",
        rates_rps=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
        num_requests=800,
        min_decode_sms=12,
        offload_vision=True,
    )
)
register_experiment(
    Experiment(
        "rtx4090-qwen2.5-vl-7b",
        "Qwen2.5-VL-7B on an RTX 4090, one 1120x1120 screenshot (1600 image tokens) per "
        "request, Poisson arrivals.",
        gpu="rtx4090",
        model="qwen2.5-vl-7b",
        rates_rps=(0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
        num_requests=800,
    )
)
register_experiment(
    Experiment(
        "h100-qwen2.5-vl-7b-1080p",
        "Qwen2.5-VL-7B on an H100 SXM, one 1920x1080 screenshot (2691 image tokens) per "
        "request, Poisson arrivals.",
        gpu="h100-sxm",
        model="qwen2.5-vl-7b",
        rates_rps=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0),
        num_requests=800,
        image_size=(1920, 1080),
    )
)
register_experiment(
    Experiment(
        "bursty-a6000",
        "paper-a6000's requests with bursty arrivals: gamma-distributed gaps with a coefficient "
        "of variation of 2, 3 and 4 (gamma shape 1/CV^2).",
        gpu="a6000",
        model="cogagent-9b",
        rates_rps=(),
        num_requests=800,
        workload="bursty",
        min_decode_sms=12,
        series=tuple(
            Series(f"cv{cv}", {"burstiness": 1.0 / cv**2}, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6))
            for cv in (2, 3, 4)
        ),
    )
)
register_experiment(
    Experiment(
        "sessions-a6000",
        "Closed-loop GUI-agent sessions on the A6000 (paper-a6000's model): each session sends "
        "its next step (screenshot + growing action history) an exponential think time (mean "
        "2 s) after the previous answer; 10-30 steps per session; 16 and 32 sessions.",
        gpu="a6000",
        model="cogagent-9b",
        rates_rps=(),
        num_requests=0,
        workload="gui_sessions",
        min_decode_sms=12,
        load_param="num_sessions",
        series=(
            Series(
                "",
                {"min_steps": 10, "max_steps": 30, "think_time_s": 2.0},
                (16, 32),
            ),
        ),
    )
)
register_experiment(
    Experiment(
        "agent-sessions-h100",
        "UI-TARS-style agent sessions (10 steps; each step resends the system prompt, the "
        "history and the last 5 screenshots of 1120x1120) on a Qwen2.5-VL-7B-shaped VLM on an "
        "H100 SXM, with the prefix cache and a 4 GiB encoder cache modelled; session starts "
        "Poisson, loads in requests/s.",
        gpu="h100-sxm",
        model="qwen2.5-vl-7b",
        rates_rps=(0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
        num_requests=400,  # 40 sessions of 10 steps (the caches make each step dearer to simulate)
        workload="agent_sessions",
        workload_kwargs={"image_width": 1120, "image_height": 1120, "think_time_s": 1.0},
        min_decode_sms=16,
        caches=True,
    )
)
register_experiment(
    Experiment(
        "quick-a6000",
        "A small version of paper-a6000 for smoke tests and CI (2 loads, 60 requests, 3 seeds, "
        "the paper's baseline settings plus a few tuned variants).",
        gpu="a6000",
        model="cogagent-9b",
        rates_rps=(0.2, 0.5),
        num_requests=60,
        min_decode_sms=12,
        baselines=(
            "chunked_prefill[budget=128]",
            "chunked_prefill[budget=512]",
            "pf_limit[limit=4]",
            "multi_stream",
        ),
        oracle_modes=("spatial:12:12:1", "spatial:24:30:1"),
    )
)
