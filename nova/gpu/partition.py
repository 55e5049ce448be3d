"""Choosing the SM-partition backend for ``--partition`` on a device.

``auto`` takes ``green_context`` (``nova.gpu.green_context``) when the device is CUDA and
PyTorch, its build and the driver support green contexts, else ``none`` (one stream per stage,
``nova.gpu.backend.StreamBackend``) on CUDA and ``cpu`` on a CPU, logging why. An explicit
``green_context`` that cannot be had is an error naming the reason, never a silent fallback.

The pieces: ``nova.gpu.sm_plan`` (torch-free planning), ``nova.gpu.backend`` (the interface and
the backends without limits), ``nova.gpu.green_api`` (PyTorch's green-context API shapes),
``nova.gpu.driver_probe`` (the ctypes driver probe), ``nova.gpu.streams`` (CUDA streams).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from nova.gpu.backend import CpuBackend, PartitionBackend, PartitionUnavailable, StreamBackend
from nova.gpu.cpu_cores import MIN_SPLIT_CORES
from nova.gpu.driver_probe import DriverProbe
from nova.gpu.green_api import detect_green_api, import_green_module
from nova.gpu.green_context import GreenContextBackend
from nova.gpu.sm_plan import SMGrid, guideline_grid
from nova.gpu.streams import TorchCuda

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "green_context", "none", "cpu")


def make_backend(
    requested: str,
    device: torch.device | str,
    cpu_adapt_threads: bool = True,
    cpu_min_split_cores: int = MIN_SPLIT_CORES,
) -> PartitionBackend:
    """The backend for ``--partition requested`` on ``device`` (a ``torch.device`` or string).

    ``auto``: green contexts when available, else ``none`` on CUDA / ``cpu`` on a CPU (logged).
    ``green_context`` that cannot be had raises ``PartitionUnavailable`` with the reason.
    ``cpu_adapt_threads``: the CPU backend runs batches on fewer cores while other processes
    use them (``nova.gpu.cpu_contention``). ``cpu_min_split_cores``: below this many cores
    per stage, stages take turns instead of splitting the cores (``nova.gpu.cpu_cores``).
    """
    import torch

    if requested not in BACKEND_CHOICES:
        raise PartitionUnavailable(
            f"unknown partition backend {requested!r}; choose auto, green_context, none or cpu"
        )
    device = torch.device(device)
    if device.type != "cuda":
        if requested == "green_context":
            raise PartitionUnavailable(
                f"--partition green_context needs a CUDA device; the device is {device}"
            )
        if requested == "none":
            log.info("partition none on %s: no streams on a CPU, using the cpu backend", device)
        return CpuBackend(
            adapt_to_contention=cpu_adapt_threads, min_split_cores=cpu_min_split_cores
        )
    if requested == "cpu":
        raise PartitionUnavailable(
            "--partition cpu is for CPU devices; on CUDA use auto, green_context or none"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    cuda = TorchCuda(torch.device("cuda", index))
    props = torch.cuda.get_device_properties(index)
    fallback_grid = guideline_grid(props.multi_processor_count, props.major)
    if requested == "none":
        return StreamBackend(fallback_grid, cuda)
    try:
        backend = green_backend(index, cuda, fallback_grid)
    except PartitionUnavailable as exc:
        if requested == "green_context":
            raise
        log.warning(
            "partition auto: green contexts unavailable (%s); using none (streams "
            "without SM limits)",
            exc,
        )
        return StreamBackend(fallback_grid, cuda)
    log.info("partition backend: %s", backend.describe())
    return backend


def green_backend(index: int, cuda: TorchCuda, fallback_grid: SMGrid) -> GreenContextBackend:
    """The green-context backend on CUDA device ``index``, or ``PartitionUnavailable``."""
    import torch

    api = detect_green_api(import_green_module(), torch.__version__, torch.version.cuda)
    probe = DriverProbe(index)
    grid = probe.grid(fallback_grid) if probe.available else fallback_grid
    try:  # the driver must really create one: CUDA 12.4+ driver, a supported GPU
        trial = api.create(grid.min_sms, index)
        del trial
    except Exception as exc:
        raise PartitionUnavailable(
            f"creating a green context of {grid.min_sms} SMs failed ({type(exc).__name__}: {exc}); "
            "green contexts need a CUDA 12.4+ driver and PyTorch built with CUDA >= 12.8"
        ) from exc
    return GreenContextBackend(grid, api, index, cuda, probe if probe.available else None)


def backend_share_context(
    requested: str, device: torch.device | str
) -> Callable[[float], AbstractContextManager[object]] | None:
    """``share_context`` for ``nova profile``: ``None`` when the backend cannot limit SMs."""
    backend = make_backend(requested, device)
    return backend.share_context if backend.enforces_limits else None
