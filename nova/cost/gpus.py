"""Published figures of the GPUs the cost models know, and how an SM share maps to SMs.

Torch-free. Figures are vendor datasheet numbers (dense, i.e. without 2:4 sparsity); the
roofline model applies its own efficiency factors on top (see ``nova.cost.roofline``).

SM granularity (the step in which SMs can be handed to a partition):

- Ampere/Ada (A6000, RTX 4090, A100): the Nova paper masks SMs per stream at TPC granularity
  (libsmctrl-style masks; one TPC = 2 SMs), so partitions are multiples of 2. CUDA green
  contexts on compute capability 8.x agree: "minimum count is 4 SMs and must be a multiple
  of 2" (CUDA driver API, Green Contexts, guideline per architecture).
- Hopper (H100, H200), compute capability 9.0: green contexts need "a minimum of 8 SMs and a
  multiple of 8" (same source).
  ``GpuSpec.grid`` (``nova.cost.sm_grid.SmGrid``) holds the grid; ``GpuSpec.granted_sms``
  maps a share to the SMs it runs on (aligned counts and exact remainders as they are, other
  shares to the nearest aligned count; see ``nova.cost.sm_grid``). The real granted count is
  still read back from the driver by the executor (``sm.smCount``) -- these numbers are the
  documented guideline, not a guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass

from nova.cost.sm_grid import SmGrid, guideline_min_and_step
from nova.registry import Registry


class UnknownGpuError(ValueError):
    """An unknown GPU name (a ``ValueError`` so CLIs report it like other bad input)."""


@dataclass(slots=True, frozen=True)
class GpuSpec:
    """One GPU as the cost model sees it.

    ``bf16_dense_tflops``: peak dense bf16/fp16 tensor-core TFLOP/s (fp32 accumulate).
    ``hbm_gbps``: peak device-memory bandwidth, GB/s (1e9 bytes/s).
    ``pcie_gbps``: host<->device bandwidth per direction, GB/s (for weight streaming).
    ``sm_granularity``: SMs are assigned in multiples of this; ``min_partition_sms``: the
    smallest partition the GPU's partitioning mechanism grants (``grid``: both as an
    ``SmGrid``). ``compute_capability``: "major.minor" ("" for the cpu pseudo-GPU).
    For the ``cpu`` pseudo-GPU, CPU cores play the role of SMs.
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
    compute_capability: str = ""

    def __post_init__(self) -> None:
        if self.num_sms < 1 or self.sm_granularity < 1 or self.min_partition_sms < 1:
            raise ValueError(f"GPU {self.name!r}: SM counts must be >= 1")
        if min(self.bf16_dense_tflops, self.hbm_gbps, self.pcie_gbps, self.memory_gib) <= 0:
            raise ValueError(f"GPU {self.name!r}: throughput and memory figures must be > 0")

    @property
    def grid(self) -> SmGrid:
        """The SM counts this GPU's partitions come in (``nova.cost.sm_grid``)."""
        return SmGrid(self.num_sms, self.sm_granularity, min(self.min_partition_sms, self.num_sms))

    def granted_sms(self, sm_share: float) -> int:
        """SMs a stage whose partition is ``sm_share`` of the GPU runs on (``SmGrid.granted``:
        aligned counts and exact remainders as they are, other shares to the nearest aligned
        count, at least the minimum partition). Share in (0, 1]."""
        check_share(sm_share)
        return self.grid.granted(sm_share)

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


def _green_context_grid(cc_major: int) -> dict[str, int]:
    """``sm_granularity`` and ``min_partition_sms`` from the green-context guideline."""
    min_sms, step = guideline_min_and_step(cc_major)
    return {"sm_granularity": step, "min_partition_sms": min_sms}


# PCIe per direction: 4.0 x16 = 16 GT/s x 16 lanes x 128/130 ~ 31.5 GB/s; 5.0 x16 ~ 63 GB/s.
PCIE4_X16_GBPS = 32.0
PCIE5_X16_GBPS = 64.0

register_gpu(
    GpuSpec(
        "a6000",
        num_sms=84,
        **_green_context_grid(8),
        bf16_dense_tflops=154.8,
        hbm_gbps=768.0,
        pcie_gbps=PCIE4_X16_GBPS,
        memory_gib=48.0,
        description="NVIDIA RTX A6000 (GA102, 48 GB GDDR6); the Nova paper's main GPU",
        compute_capability="8.6",
    )
)
register_gpu(
    GpuSpec(
        "rtx4090",
        num_sms=128,
        **_green_context_grid(8),
        # 165.2 dense with fp32 accumulate (330 with 2:4 sparsity; fp16-accumulate rate is 2x).
        bf16_dense_tflops=165.2,
        hbm_gbps=1008.0,
        pcie_gbps=PCIE4_X16_GBPS,
        memory_gib=24.0,
        description="NVIDIA GeForce RTX 4090 (AD102, 24 GB GDDR6X); the paper's trace GPU",
        compute_capability="8.9",
    )
)
register_gpu(
    GpuSpec(
        "a100-80g",
        num_sms=108,
        **_green_context_grid(8),
        bf16_dense_tflops=312.0,
        hbm_gbps=2039.0,
        pcie_gbps=PCIE4_X16_GBPS,
        memory_gib=80.0,
        description="NVIDIA A100 80GB SXM4 (HBM2e)",
        compute_capability="8.0",
    )
)
register_gpu(
    GpuSpec(
        "h100-sxm",
        num_sms=132,
        **_green_context_grid(9),
        bf16_dense_tflops=989.4,
        hbm_gbps=3350.0,
        pcie_gbps=PCIE5_X16_GBPS,
        memory_gib=80.0,
        description="NVIDIA H100 SXM5 80GB (HBM3)",
        compute_capability="9.0",
    )
)
register_gpu(
    GpuSpec(
        "h200",
        num_sms=132,
        **_green_context_grid(9),
        bf16_dense_tflops=989.4,
        hbm_gbps=4800.0,
        pcie_gbps=PCIE5_X16_GBPS,
        memory_gib=141.0,
        description="NVIDIA H200 SXM 141GB (HBM3e; 141 GB as marketed)",
        compute_capability="9.0",
    )
)
_CPU_NOMINAL_CORES = 2  # the machine the cpu entry's figures (and its evidence) describe
register_gpu(
    GpuSpec(
        "cpu",
        num_sms=1,
        sm_granularity=1,
        min_partition_sms=1,
        # Nominal figures of the 2-core dev machine the shipped CPU profile was measured on
        # (fp32): 2 cores x 2.6 GHz (/proc/cpuinfo) x 64 FLOP/cycle (an AMD EPYC of CPU family
        # 26, Zen 5: two FMA pipes with a full 512-bit AVX-512 datapath, AMD's Zen 5
        # documentation) = 0.333 TFLOP/s; 48.9 GB/s of memory read bandwidth (our measurement:
        # benchmarks/cpu_bandwidth.py, benchmarks/results/cpu_bandwidth.md). The cpu
        # evidence file's efficiencies are fitted to that profile, so only their products
        # matter. CPU profiles use this entry; the nova policy's roofline fallback for a model
        # without a CPU profile uses these throughputs.
        bf16_dense_tflops=0.333,
        hbm_gbps=48.9,
        pcie_gbps=20.0,
        memory_gib=8.0,
        description="pseudo-GPU for CPU profiles: one 'SM', no partitioning",
    )
)


def cpu_spec(num_cores: int) -> GpuSpec:
    """The ``cpu`` pseudo-GPU with ``num_cores`` cores as its SMs (partitions of whole cores,
    for CPU core partitions). Throughputs scale with the cores from the registered 2-core
    figures; the ``cpu`` evidence (``nova/cost/data/gpus/cpu.json``) applies to it."""
    if num_cores < 1:
        raise ValueError(f"a CPU needs >= 1 core, got {num_cores}")
    base = GPUS["cpu"]
    per_core = 1 / _CPU_NOMINAL_CORES
    return GpuSpec(
        "cpu",
        num_sms=num_cores,
        sm_granularity=1,
        min_partition_sms=1,
        bf16_dense_tflops=base.bf16_dense_tflops * num_cores * per_core,
        hbm_gbps=base.hbm_gbps,  # memory bandwidth does not grow with the cores used
        pcie_gbps=base.pcie_gbps,
        memory_gib=base.memory_gib,
        description=f"pseudo-GPU for a CPU: {num_cores} cores as SMs",
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
