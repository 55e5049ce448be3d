"""Start-up memory accounting: where the device memory went (weights resident vs streamed, KV
cache, activation reserve). Logged by the engine, printed by ``nova serve``/``nova demo``,
exported as Prometheus gauges (``nova_memory_*``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(slots=True, frozen=True)
class MemoryReport:
    """Bytes, at start-up. ``weights_resident_bytes``: parameters and buffers on the device
    (the weight-streaming slots included); ``weights_streamed_bytes``: vision-encoder layer
    weights held in host memory (pinned on CUDA) and streamed through the slots;
    ``offload_saved_bytes``: device memory streaming freed (streamed minus slots), which the KV
    cache received; ``activation_reserve_bytes``: kept free for activations when sizing the KV
    cache from device memory (0 when the size was given or on a CPU); ``device_total_bytes``:
    the GPU's memory (None on a CPU). ``encoder_cache_bytes``: the encoder cache's capacity
    (image embeddings kept on the device; 0: off); ``prefix_caching``: KV blocks are reused
    across requests (the KV cache's size is unchanged)."""

    device: str
    weights_resident_bytes: int
    weights_streamed_bytes: int
    offload_slot_bytes: int
    offload_saved_bytes: int
    kv_cache_bytes: int
    kv_cache_blocks: int
    kv_block_size_tokens: int
    activation_reserve_bytes: int
    device_total_bytes: int | None = None
    encoder_cache_bytes: int = 0
    prefix_caching: bool = False
    # a CPU's linear weights packed for oneDNN (nova.runtime.cpu_linear): a second copy in
    # host memory beside the weights, made by the start-up warm-up (0 before it, or off)
    weights_packed_bytes: int = 0

    @property
    def device_planned_bytes(self) -> int:
        return (
            self.weights_resident_bytes
            + self.kv_cache_bytes
            + self.activation_reserve_bytes
            + self.encoder_cache_bytes
        )

    def as_dict(self) -> dict[str, str | int | None]:
        return asdict(self) | {"device_planned_bytes": self.device_planned_bytes}

    def lines(self) -> list[str]:
        def mib(n: int) -> str:
            return f"{n / 2**20:,.1f} MiB"

        out = [
            f"memory on {self.device}:",
            f"  weights resident   {mib(self.weights_resident_bytes)}",
        ]
        if self.weights_packed_bytes:
            out.append(
                f"  weights packed     {mib(self.weights_packed_bytes)} (a copy of the linear "
                "weights in oneDNN's layout)"
            )
        if self.weights_streamed_bytes:
            out.append(
                f"  weights streamed   {mib(self.weights_streamed_bytes)} in host memory "
                f"({mib(self.offload_slot_bytes)} of slots on the device; "
                f"{mib(self.offload_saved_bytes)} freed for the KV cache)"
            )
        out.append(
            f"  KV cache           {mib(self.kv_cache_bytes)} = {self.kv_cache_blocks} "
            f"blocks x {self.kv_block_size_tokens} tokens, prefix caching "
            f"{'on' if self.prefix_caching else 'off'}"
        )
        out.append(
            f"  encoder cache      {mib(self.encoder_cache_bytes)}"
            + ("" if self.encoder_cache_bytes else " (off)")
        )
        out.append(f"  activation reserve {mib(self.activation_reserve_bytes)}")
        if self.device_total_bytes:
            out.append(
                f"  planned {mib(self.device_planned_bytes)} of {mib(self.device_total_bytes)}"
            )
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def module_bytes(module: nn.Module, device_type: str) -> int:
    """Bytes of ``module``'s parameters and buffers stored on a device of ``device_type``
    (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != device_type or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
