"""The CUDA stream calls the partition backends make, behind a small interface.

``CudaStreams`` is what a backend needs of ``torch.cuda``: make a stream, make one current for
a block of work, read the current one. ``TorchCuda`` is the real thing (it imports torch when
first called); the CPU tests pass a fake that records which stream is current.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    import torch


class CudaStream(Protocol):
    """What callers do with the stream a stage ran on: wait for its work."""

    def synchronize(self) -> None: ...


class CudaStreams(Protocol):
    def new_stream(self) -> CudaStream: ...

    def stream_guard(self, stream: CudaStream) -> AbstractContextManager[object]: ...

    def current_stream(self) -> CudaStream: ...


class TorchCuda:
    """``CudaStreams`` on one CUDA device through ``torch.cuda``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def new_stream(self) -> CudaStream:
        import torch

        return torch.cuda.Stream(device=self.device)

    def stream_guard(self, stream: CudaStream) -> AbstractContextManager[object]:
        import torch

        return torch.cuda.stream(cast("torch.cuda.Stream", stream))

    def current_stream(self) -> CudaStream:
        import torch

        return torch.cuda.current_stream(self.device)
