"""Start-up memory accounting: the report's figures, its text, and the Prometheus gauges."""

from __future__ import annotations

import types

import torch

from nova.engine.client import EngineSnapshot
from nova.gpu.memory import MemoryReport, module_bytes
from nova.models.loader import load_model
from nova.runtime.runner import CacheConfig, ModelRunner
from nova.types import Stage


def test_report_counts_weights_and_kv(tiny_dirs):
    loaded = load_model(tiny_dirs["llava-clip"])
    runner = ModelRunner(loaded, CacheConfig(block_size=8, num_blocks=40))
    m = runner.memory
    params = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in loaded.model.buffers())
    assert params <= m.weights_resident_bytes <= params + buffers
    assert m.weights_streamed_bytes == m.offload_saved_bytes == m.offload_slot_bytes == 0
    assert (m.kv_cache_blocks, m.kv_block_size_tokens) == (40, 8)
    assert m.kv_cache_bytes == runner.kv_cache.num_bytes > 0
    assert m.activation_reserve_bytes == 0 and m.device_total_bytes is None  # CPU, size given
    assert m.device_planned_bytes == m.weights_resident_bytes + m.kv_cache_bytes
    text = str(m)
    assert "KV cache" in text and "40 blocks x 8 tokens" in text and "streamed" not in text


def test_report_with_streaming_mentions_host_memory():
    m = MemoryReport(
        "cuda:0",
        3 << 30,
        1 << 30,
        64 << 20,
        (1 << 30) - (64 << 20),
        10 << 30,
        5000,
        16,
        2 << 30,
        80 << 30,
    )
    text = "\n".join(m.lines())
    assert "weights streamed" in text and "1,024.0 MiB in host memory" in text
    assert "planned 15,360.0 MiB of 81,920.0 MiB" in text
    assert m.as_dict()["device_planned_bytes"] == (3 << 30) + (10 << 30) + (2 << 30)


def test_module_bytes_counts_shared_tensors_once():
    lin = torch.nn.Linear(4, 4)
    mod = torch.nn.ModuleDict({"a": lin, "b": lin})
    assert module_bytes(mod, "cpu") == (16 + 4) * 4
    assert module_bytes(mod, "cuda") == 0


def test_metrics_export_memory_and_granted_sms(tiny_dirs):
    from nova.server.metrics import ServerMetrics

    runner = ModelRunner(
        load_model(tiny_dirs["llava-clip"]), CacheConfig(block_size=8, num_blocks=40)
    )
    memory = {k: v for k, v in runner.memory.as_dict().items() if isinstance(v, int)}
    snap = EngineSnapshot(
        dict.fromkeys(Stage, 0),
        0.0,
        40,
        dict.fromkeys(Stage, 1.0),
        0,
        memory_bytes=memory,
        granted_sms={Stage.DECODE: 24, Stage.PREFILL: 104},
    )
    client = types.SimpleNamespace(snapshot=lambda: snap)
    metrics = ServerMetrics(client, types.SimpleNamespace(num_unfinished=0))
    text = metrics.render().decode()
    assert f"nova_memory_kv_cache_bytes {float(runner.kv_cache.num_bytes)}" in text
    assert "nova_memory_kv_cache_blocks 40.0" in text
    assert (
        f"nova_memory_weights_resident_bytes {float(runner.memory.weights_resident_bytes)}" in text
    )
    assert 'nova_sm_granted{stage="decode"} 24.0' in text
    assert 'nova_sm_granted{stage="prefill"} 104.0' in text
    assert "nova_memory_device_total_bytes" not in text  # CPU: no device total
