"""PyTorch's green-context API, detected by feature (not by version), behind one shape.

==================  =====================================================================
``context-stack``   2.10-2.11: ``GreenContext.create(num_sms, device_id)``, work runs between
                    ``set_context()`` and ``pop_context()`` (the context's default stream).
``stream``          2.12-2.14: keyword-only ``create(num_sms=..., device_id=...)`` (2.14: also
                    the constructor) and ``ctx.Stream()``; work runs on that stream.
``sm-partition``    2.15+: ``SMPartition.from_device().split(num_sms=[...])`` gives *disjoint*
                    SM sets and ``GreenContext(sm_partition=...)`` a context on one of them.
==================  =====================================================================

``detect_green_api`` reads the installed ``torch.cuda.green_contexts`` and returns a
``GreenApi``; every context it creates comes back as a ``GreenContextHandle`` with one way in
(``enter``), whichever shape made it. This is the one module that touches PyTorch's
green-context objects; the backend (``nova.gpu.green_context``) sees only these types.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

from nova.gpu.backend import PartitionUnavailable
from nova.gpu.streams import CudaStream, CudaStreams

MIN_TORCH_FOR_GREEN = "2.10"
GreenApiKind = Literal["context-stack", "stream", "sm-partition"]


@dataclass(slots=True)
class GreenContextHandle:
    """One created green context, whatever API shape made it."""

    # PyTorch's GreenContext object (kept alive while the context is in use); its methods
    # depend on the API shape, so it is only called here.
    ctx: Any
    stream: CudaStream | None  # ctx.Stream() where the API has it; None: set/pop context
    sm_count: int | None  # SMs the API reports it granted; None where it does not say

    def enter(self, cuda: CudaStreams) -> AbstractContextManager[CudaStream]:
        """Run the enclosed work in this context; yields the stream the work runs on."""
        if self.stream is not None:
            return _on_stream(cuda, self.stream)
        return _context_stack(self.ctx, cuda)


@contextlib.contextmanager
def _on_stream(cuda: CudaStreams, stream: CudaStream) -> Iterator[CudaStream]:
    with cuda.stream_guard(stream):
        yield stream


@contextlib.contextmanager
def _context_stack(ctx: Any, cuda: CudaStreams) -> Iterator[CudaStream]:
    """The 2.10-2.11 shape: work between ``set_context()`` and ``pop_context()``, which are
    paired even when the work raises."""
    ctx.set_context()
    try:
        yield cuda.current_stream()
    finally:
        ctx.pop_context()


def _reported_sms(*sources: object) -> int | None:
    for source in sources:
        n = getattr(source, "sm_count", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


@dataclass(slots=True)
class GreenApi:
    """The installed ``torch.cuda.green_contexts`` of one shape (see the module docstring)."""

    module: Any  # torch.cuda.green_contexts (or a fake of one shape in tests)
    kind: GreenApiKind
    torch_version: str

    def _wrap(self, ctx: Any, part: object | None = None) -> GreenContextHandle:
        stream = ctx.Stream() if hasattr(ctx, "Stream") else None
        return GreenContextHandle(ctx, stream, _reported_sms(ctx, part))

    def create(self, num_sms: int, device_index: int) -> GreenContextHandle:
        """A context of ``num_sms`` split off the whole device on its own."""
        ctx = self.module.GreenContext.create(num_sms=num_sms, device_id=device_index)
        return self._wrap(ctx)

    def split(self, counts: Sequence[int], device_index: int) -> list[object]:
        """Disjoint SM partitions of the device, one per count (``sm-partition`` only)."""
        parts, _rest = self.module.SMPartition.from_device(device_index).split(num_sms=list(counts))
        if len(parts) != len(counts):
            raise RuntimeError(f"asked the driver for {len(counts)} SM groups, got {len(parts)}")
        return list(parts)

    def from_partition(self, part: object) -> GreenContextHandle:
        """A context on one of ``split``'s partitions."""
        return self._wrap(self.module.GreenContext(sm_partition=part), part)


def detect_green_api(
    module: object | None, torch_version: str, cuda_version: str | None
) -> GreenApi:
    """The green-context API of this PyTorch, or ``PartitionUnavailable`` saying what is missing.

    ``module``: ``torch.cuda.green_contexts`` (``None`` if it does not import)."""
    if cuda_version is None:
        raise PartitionUnavailable(
            f"green contexts need a CUDA build of PyTorch; this is torch {torch_version} (CPU only)"
        )
    gc = getattr(module, "GreenContext", None)
    if module is None or gc is None:
        raise PartitionUnavailable(
            f"green contexts need PyTorch >= {MIN_TORCH_FOR_GREEN} "
            f"(torch.cuda.green_contexts.GreenContext); this is torch {torch_version}"
        )
    if getattr(module, "SUPPORTED", True) is False:
        raise PartitionUnavailable(
            f"this PyTorch build (torch {torch_version}, CUDA {cuda_version}) was compiled without "
            "green-context support (it needs CUDA >= 12.8 at build time)"
        )
    kind: GreenApiKind
    if hasattr(getattr(module, "SMPartition", None), "split"):
        kind = "sm-partition"
    elif hasattr(gc, "Stream"):
        kind = "stream"
    elif hasattr(gc, "set_context") and hasattr(gc, "pop_context"):
        kind = "context-stack"
    else:
        raise PartitionUnavailable(
            f"torch {torch_version}: torch.cuda.green_contexts.GreenContext has neither Stream() "
            "nor set_context()/pop_context(); this API shape is not supported"
        )
    return GreenApi(module, kind, torch_version)


def import_green_module() -> object | None:
    """``torch.cuda.green_contexts``, or ``None`` where this PyTorch has none."""
    try:
        import torch.cuda.green_contexts as gc
    except ImportError:
        return None
    return gc
