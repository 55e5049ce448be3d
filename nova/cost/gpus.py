"""Published figures of the GPUs the cost models know, and how an SM share maps to SMs.

Torch-free. Figures are vendor datasheet numbers (dense, i.e. without 2:4 sparsity); the
roofline model applies its own efficiency factors on top (see ``nova.cost.roofline``).

SM granularity (the step in which SMs can be handed to a partition):

- Ampere/Ada (A6000, RTX 4090, A100): the Nova paper masks SMs per stream at TPC granularity
  (libsmctrl-style masks; one TPC = 2 SMs), so partitions are multiples of 2. CUDA green
  contexts on compute capability 8.x agree: "minimum count is 4 SMs and must be a multiple
  of 2" (CUDA driver API, Green Contexts, guideline per architecture).
- Hopper (H100, H200), compute capability 9.0: green contexts need "a minimum of 8 SMs and a
  multiple of 8" (same source). The driver *rounds the requested count up* to the alignment;
  ``GpuSpec.granted_sms`` mirrors that (capped at the GPU's SM count).
  The real granted count should still be read back from the driver by the executor
  (``sm.smCount``) -- these numbers are the documented guideline, not a guarantee.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from nova.registry import Registry

_SHARE_EPS = 1e-9  # so that e.g. 0.5 * 84 = 42.000000001 is not rounded up to 44


class UnknownGpuError(ValueError):
    """An unknown GPU name (a ``ValueError`` so CLIs report it like other bad input)."""


@dataclass(slots=True, frozen=True)
class GpuSpec:
    """One GPU as the cost model sees it.

    ``bf16_dense_tflops``: peak dense bf16/fp16 tensor-core TFLOP/s (fp32 accumulate).
    ``hbm_gbps``: peak device-memory bandwidth, GB/s (1e9 bytes/s).
    ``pcie_gbps``: host<->device bandwidth per direction, GB/s (for weight streaming).
    ``sm_granularity``: SMs are assigned in multiples of this; ``min_partition_sms``: the
    smallest partition the GPU's partitioning mechanism grants.
    """

    name: str
    num_sms: int
    sm_granularity: int
    bf16_dense_tflops: float
    hbm_gbps: float
    pcie_gbps: float
    memory_gib: float
    min_partition_sms: int = 1
    description: str = ""

    def __post_init__(self) -> None:
        if self.num_sms < 1 or self.sm_granularity < 1 or self.min_partition_sms < 1:
            raise ValueError(f"GPU {self.name!r}: SM counts must be >= 1")
        if min(self.bf16_dense_tflops, self.hbm_gbps, self.pcie_gbps, self.memory_gib) <= 0:
            raise ValueError(f"GPU {self.name!r}: throughput and memory figures must be > 0")

    def granted_sms(self, sm_share: float) -> int:
        """SMs a partition asking for ``sm_share`` of the GPU gets: rounded *up* to the
        granularity and the minimum partition size, capped at ``num_sms``. Share in (0, 1]."""
        check_share(sm_share)
        if sm_share >= 1.0 - _SHARE_EPS:
            return self.num_sms
        wanted = sm_share * self.num_sms - _SHARE_EPS
        steps = max(1, math.ceil(wanted / self.sm_granularity))
        return min(self.num_sms, max(self.min_partition_sms, steps * self.sm_granularity))

    def granted_share(self, sm_share: float) -> float:
        """``granted_sms(sm_share) / num_sms``: the share the stage really runs with."""
        return self.granted_sms(sm_share) / self.num_sms

    @property
    def peak_flops(self) -> float:
        """Peak dense bf16 FLOP/s."""
        return self.bf16_dense_tflops * 1e12

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gbps * 1e9

    @property
    def pcie_bytes_per_s(self) -> float:
        return self.pcie_gbps * 1e9


def check_share(sm_share: float) -> None:
    if not 0.0 < sm_share <= 1.0:
        raise ValueError(f"SM share must be in (0, 1], got {sm_share!r}")


GPUS: Registry[GpuSpec] = Registry("GPU", UnknownGpuError)


def register_gpu(spec: GpuSpec) -> GpuSpec:
    """Register ``spec`` under its (lower-case) name, once."""
    return GPUS.add(spec.name, spec)


def get_gpu(name: str | GpuSpec) -> GpuSpec:
    """The registered GPU called ``name`` (case-insensitive); a ``GpuSpec`` passes through."""
    if isinstance(name, GpuSpec):
        return name
    spec = GPUS.get(str(name).strip().lower())
    if spec is None:
        raise GPUS.unknown(name)
    return spec


def available_gpus() -> list[str]:
    return GPUS.names()


# PCIe per direction: 4.0 x16 = 16 GT/s x 16 lanes x 128/130 ~ 31.5 GB/s; 5.0 x16 ~ 63 GB/s.
PCIE4_X16_GBPS = 32.0
PCIE5_X16_GBPS = 64.0

register_gpu(
    GpuSpec(
        "a6000",
        num_sms=84,
        sm_granularity=2,
        min_partition_sms=4,
        bf16_dense_tflops=154.8,
        hbm_gbps=768.0,
        pcie_gbps=PCIE4_X16_GBPS,
        memory_gib=48.0,
        description="NVIDIA RTX A6000 (GA102, 48 GB GDDR6); the Nova paper's main GPU",
    )
)
register_gpu(
    GpuSpec(
        "rtx4090",
        num_sms=128,
        sm_granularity=2,
        min_partition_sms=4,
        # 165.2 dense with fp32 accumulate (330 with 2:4 sparsity; fp16-accumulate rate is 2x).
        bf16_dense_tflops=165.2,
        hbm_gbps=1008.0,
        pcie_gbps=PCIE4_X16_GBPS,
        memory_gib=24.0,
        description="NVIDIA GeForce RTX 4090 (AD102, 24 GB GDDR6X); the paper's trace GPU",
    )
)
register_gpu(
    GpuSpec(
        "a100-80g",
        num_sms=108,
        sm_granularity=2,
        min_partition_sms=4,
        bf16_dense_tflops=312.0,
        hbm_gbps=2039.0,
        pcie_gbps=PCIE4_X16_GBPS,
        memory_gib=80.0,
        description="NVIDIA A100 80GB SXM4 (HBM2e)",
    )
)
register_gpu(
    GpuSpec(
        "h100-sxm",
        num_sms=132,
        sm_granularity=8,
        min_partition_sms=8,
        bf16_dense_tflops=989.4,
        hbm_gbps=3350.0,
        pcie_gbps=PCIE5_X16_GBPS,
        memory_gib=80.0,
        description="NVIDIA H100 SXM5 80GB (HBM3)",
    )
)
register_gpu(
    GpuSpec(
        "h200",
        num_sms=132,
        sm_granularity=8,
        min_partition_sms=8,
        bf16_dense_tflops=989.4,
        hbm_gbps=4800.0,
        pcie_gbps=PCIE5_X16_GBPS,
        memory_gib=141.0,
        description="NVIDIA H200 SXM 141GB (HBM3e; 141 GB as marketed)",
    )
)


def _usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


register_gpu(
    GpuSpec(
        "cpu",
        # CPU partitions hand out whole cores (nova.gpu.cpu_cores): one "SM" per usable core.
        num_sms=_usable_cores(),
        sm_granularity=1,
        min_partition_sms=1,
        # Rough figures for a 2-core AVX2 machine (fp32). CPU profiles use this entry; the nova
        # policy's roofline fallback for a model without a CPU profile uses these throughputs.
        bf16_dense_tflops=0.1,
        hbm_gbps=20.0,
        pcie_gbps=20.0,
        memory_gib=8.0,
        description="the CPU: one 'SM' per usable core, partitions of whole cores",
    )
)


# Substrings of CUDA device names (``torch.cuda.get_device_name``) -> registered spec names,
# most specific first ("H100" must not match an "H200").
_DEVICE_NAME_KEYS: tuple[tuple[str, str], ...] = (
    ("h200", "h200"),
    ("h100", "h100-sxm"),
    ("a100", "a100-80g"),
    ("a6000", "a6000"),
    ("4090", "rtx4090"),
)


def gpu_spec_name_for_device(device_name: str) -> str | None:
    """The registered GPU spec a CUDA device name is (``"NVIDIA H100 80GB HBM3"`` ->
    ``"h100-sxm"``), or None when no registered spec matches. The one place device names are
    mapped to specs."""
    lowered = device_name.lower()
    for key, spec_name in _DEVICE_NAME_KEYS:
        if key in lowered:
            return spec_name
    return None
