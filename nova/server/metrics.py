"""Prometheus metrics of one server app (its own ``CollectorRegistry``).

Per-request latencies come from ``nova.metrics.RequestMetrics`` of the request's final delta
(engine clock: from the engine's arrival, i.e. after the server has parsed the request, decoded
its images and tokenised it, to the last token). Engine state (requests per stage, KV usage, SM
partition) is read at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nova.engine.client import EngineClient, EngineSnapshot
from nova.metrics import RequestMetrics
from nova.types import STAGES, Stage

OUTCOMES = ("finished", "aborted", "failed", "rejected")

TTFT_BUCKETS_S = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS_S = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
STAGE_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class UnfinishedCount(Protocol):
    @property
    def num_unfinished(self) -> int:
        """Requests the server accepted that have not finished yet."""


class _EngineStateCollector(Collector):
    """Gauges read from the engine's snapshot (a consistent read) at scrape time."""

    def __init__(self, client: EngineClient, server_state: UnfinishedCount) -> None:
        self.client = client
        self.server_state = server_state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snap = self.client.snapshot()
        in_stage, usage, shares = snap.requests_in_stage, snap.kv_cache_usage, snap.sm_shares
        num_free, num_preemptions = snap.num_free_blocks, snap.num_preemptions
        yield _stage_gauge(
            "nova_requests_in_stage", "Requests waiting for or running in each stage", in_stage
        )
        yield GaugeMetricFamily(
            "nova_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", value=usage
        )
        yield GaugeMetricFamily("nova_kv_cache_free_blocks", "Free KV-cache blocks", value=num_free)
        yield _stage_gauge(
            "nova_sm_share", "SM share of each stage in the current partition", shares
        )
        yield CounterMetricFamily(
            "nova_preemptions", "Preemptions (recomputes) so far", value=num_preemptions
        )
        yield from _cache_metrics(snap)
        yield from _gpu_gauges(snap)
        yield GaugeMetricFamily(
            "nova_server_unfinished_requests",
            "Requests accepted by the server and not yet finished",
            value=self.server_state.num_unfinished,
        )


MEMORY_GAUGES = (  # EngineSnapshot.memory_bytes key (MemoryReport field) -> (metric, help)
    (
        "weights_resident_bytes",
        "nova_memory_weights_resident_bytes",
        "Model weights on the device (weight-streaming slots included)",
    ),
    (
        "weights_streamed_bytes",
        "nova_memory_weights_streamed_bytes",
        "Vision-encoder weights kept in host memory and streamed to the device",
    ),
    (
        "offload_saved_bytes",
        "nova_memory_offload_saved_bytes",
        "Device memory freed by vision weight streaming (given to the KV cache)",
    ),
    (
        "weights_packed_bytes",
        "nova_memory_weights_packed_bytes",
        "A CPU's linear weights packed for oneDNN: a second copy beside the weights",
    ),
    ("kv_cache_bytes", "nova_memory_kv_cache_bytes", "KV-cache tensors on the device"),
    ("kv_cache_blocks", "nova_memory_kv_cache_blocks", "KV-cache blocks"),
    (
        "activation_reserve_bytes",
        "nova_memory_activation_reserve_bytes",
        "Device memory kept free for activations when the KV cache was sized",
    ),
    ("device_total_bytes", "nova_memory_device_total_bytes", "Device memory in all (GPU only)"),
    (
        "encoder_cache_bytes",
        "nova_memory_encoder_cache_bytes",
        "Capacity of the encoder cache (image embeddings kept on the device)",
    ),
)


def _cache_metrics(snap: EngineSnapshot) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The prefix cache and the encoder cache: lookups and hits since start, and what they
    hold now."""
    yield CounterMetricFamily(
        "nova_prefix_cache_queried_tokens",
        "Prompt tokens looked up in the prefix cache (once per prefill admitted from scratch)",
        value=snap.prefix_cache_queried_tokens,
    )
    yield CounterMetricFamily(
        "nova_prefix_cache_hit_tokens",
        "Prompt tokens whose KV blocks were found in the prefix cache",
        value=snap.prefix_cache_hit_tokens,
    )
    yield CounterMetricFamily(
        "nova_encoder_cache_queried_images",
        "Images looked up in the encoder cache",
        value=snap.encoder_cache_queried_images,
    )
    yield CounterMetricFamily(
        "nova_encoder_cache_hit_images",
        "Images whose embeddings were found in the encoder cache",
        value=snap.encoder_cache_hit_images,
    )
    yield GaugeMetricFamily(
        "nova_encoder_cache_used_bytes",
        "Bytes of image embeddings the encoder cache holds",
        value=snap.encoder_cache_used_bytes,
    )
    yield GaugeMetricFamily(
        "nova_kv_cache_cached_blocks",
        "KV blocks no request uses, kept for their content (evicted when blocks run out)",
        value=snap.kv_cache_cached_blocks,
    )


def _gpu_gauges(snap: EngineSnapshot) -> Iterator[GaugeMetricFamily]:
    """Start-up memory accounting (nova.gpu.memory) and the SMs each stage last ran on."""
    for field, name, doc in MEMORY_GAUGES:
        value = snap.memory_bytes.get(field)
        if value is not None:
            yield GaugeMetricFamily(name, doc, value=value)
    yield _stage_gauge(
        "nova_sm_granted",
        "SMs the stage's last batch ran on (read back from the driver; the whole device when "
        "unpartitioned; CPU cores on a CPU)",
        snap.granted_sms,  # a stage is absent before its first batch
    )


def _stage_gauge(name: str, doc: str, values: Mapping[Stage, float]) -> GaugeMetricFamily:
    """A gauge labelled by stage, in ``STAGES`` order, for the stages ``values`` holds."""
    g = GaugeMetricFamily(name, doc, labels=["stage"])
    for s in STAGES:
        if s in values:
            g.add_metric([s.value], values[s])
    return g


class ServerMetrics:
    def __init__(self, client: EngineClient, server_state: UnfinishedCount) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nova_requests", "Requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.ttft = Histogram(
            "nova_ttft_seconds",
            "Time to first token (finished requests)",
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.tpot = Histogram(
            "nova_tpot_seconds",
            "Time per output token after the first (finished requests with >= 2 tokens)",
            buckets=TPOT_BUCKETS_S,
            registry=r,
        )
        self.e2e = Histogram(
            "nova_e2e_seconds",
            "Arrival to last token (finished requests)",
            buckets=E2E_BUCKETS_S,
            registry=r,
        )
        self.queue = Histogram(
            "nova_queue_seconds",
            "Time waiting before a stage",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=r,
        )
        self.stage = Histogram(
            "nova_stage_seconds",
            "Time in a stage (decode: first to last token)",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=r,
        )
        self.prepare = Histogram(
            "nova_prepare_seconds",
            "Turning an accepted request into a prompt before the engine "
            "sees it: image fetch/decode, preprocessing, chat template, tokenisation (incl. "
            "waiting "
            "for a preprocess worker)",
            buckets=STAGE_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "nova_prompt_tokens",
            "Prompt tokens of requests accepted by the engine (image tokens included)",
            registry=r,
        )
        self.generation_tokens = Counter("nova_generation_tokens", "Generated tokens", registry=r)
        r.register(_EngineStateCollector(client, server_state))

    def rejected(self) -> None:
        self.requests.labels("rejected").inc()

    def observe_final(self, outcome: str, m: RequestMetrics | None) -> None:
        self.requests.labels(outcome).inc()
        if m is None or outcome != "finished":
            return
        for hist, value in ((self.ttft, m.ttft_s), (self.tpot, m.tpot_s), (self.e2e, m.e2e_s)):
            if value is not None:
                hist.observe(value)
        for stage, value in (("vision", m.vision_queue_s), ("prefill", m.prefill_queue_s)):
            if value is not None:
                self.queue.labels(stage).observe(value)
        for stage, value in (
            ("vision", m.vision_s),
            ("prefill", m.prefill_s),
            ("decode", m.decode_s),
        ):
            if value is not None:
                self.stage.labels(stage).observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
