"""What the device being profiled is: its name (CUDA device or CPU model) and its GPU spec.

Device names map to registered specs only through ``nova.cost.gpus.gpu_spec_name_for_device``.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch

from nova.cost.gpus import GPUS, GpuSpec, gpu_spec_name_for_device


def device_name(device: torch.device | str) -> str:
    """The CUDA device's name (``"NVIDIA H100 80GB HBM3"``), else the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_gpu_spec(device: torch.device | str) -> GpuSpec:
    """The registered GPU spec this device is (``cpu`` for any CPU), or, for a CUDA device no
    spec matches, an ad-hoc spec with the SM count and memory read from the device and
    placeholder throughput figures (the description says so)."""
    device = torch.device(device)
    if device.type != "cuda":
        return GPUS["cpu"]
    name = device_name(device)
    registered = gpu_spec_name_for_device(name)
    if registered is not None:
        return GPUS[registered]
    props = torch.cuda.get_device_properties(device)
    return GpuSpec(
        name=name.lower().replace(" ", "-"),
        num_sms=props.multi_processor_count,
        sm_granularity=8 if props.major >= 9 else 2,
        min_partition_sms=8 if props.major >= 9 else 4,
        bf16_dense_tflops=1.0,
        hbm_gbps=1.0,
        pcie_gbps=1.0,
        memory_gib=props.total_memory / 2**30,
        description=f"{name}: not in nova.cost.gpus; throughput figures are placeholders",
    )


def loadavg_1min() -> float | None:
    """The machine's 1-minute load average (None where the OS has none): well above the
    number of threads profiling uses means other processes competed for the cores."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
