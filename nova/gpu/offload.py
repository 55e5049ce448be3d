"""Vision-encoder weight streaming: the encoder's layer weights live in (pinned) host memory and
only ``K`` layer *slots* live on the device; layers are copied into slots ahead of use on a copy
stream, overlapped with compute.

Schedule (step ``s`` = the ``s``-th layer computation since start-up; layer ``s mod L`` of the
``L`` layers, slot ``s mod K``; the steps run on across forwards, so while the last layers of
one image batch compute, the first layers of the next are already loading):

- start-up: copy steps ``0..K-1`` into slots ``0..K-1``;
- before computing step ``s`` (a forward pre-hook on the layer): the compute stream waits for
  the copy event of slot ``s mod K``; the layer's parameters are pointed at that slot;
- after computing step ``s`` (a forward hook): record a compute-done event on the compute
  stream, point the layer's parameters back at their host copy, and enqueue on the copy stream
  "wait for that event, then copy step ``s + K``'s layer into the slot".

Invariants (checked on a CPU by ``tests/test_offload.py`` with an instrumented fake stream):
a layer never computes before its copy into the slot has completed, and a slot is never
overwritten while a computation that reads it may still run. With ``K`` slots, layers
``s+1 .. s+K-1`` copy while layer ``s`` computes (``K = 1``: no overlap).

Stream and event operations sit behind ``StreamOps`` (CUDA: a copy stream and CUDA events;
CPU: synchronous host copies between host "slots"), so the same code path runs everywhere.
The layers are any ``nn.ModuleList`` of identically shaped layers called in order (the CLIP /
SigLIP encoder's ``layers``, Qwen2-VL's ``blocks``); one caller at a time (the vision worker).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

log = logging.getLogger(__name__)

# An event a StreamOps hands out and takes back (a CUDA event; None where copies are
# synchronous); the streamer never looks inside.
CopyEvent = object


class StreamOps(Protocol):
    def copy(
        self,
        slot: int,
        layer: int,
        dst: Sequence[torch.Tensor],
        src: Sequence[torch.Tensor],
        after: CopyEvent | None,
    ) -> CopyEvent:
        """On the copy stream: wait for ``after`` (a compute event, or None), copy ``src`` into
        ``dst``; return an event that completes when the copy has."""

    def wait(self, event: CopyEvent) -> None:
        """Make the current compute stream wait for ``event``."""

    def record(self) -> CopyEvent:
        """An event on the current compute stream (completes when the work so far has)."""

    def synchronize(self) -> None:
        """Wait for all copies and the current compute stream."""


class HostStreamOps:
    """CPU: copies run at once (host "slots"), events are complete when created."""

    def copy(
        self,
        slot: int,
        layer: int,
        dst: Sequence[torch.Tensor],
        src: Sequence[torch.Tensor],
        after: CopyEvent | None,
    ) -> CopyEvent:
        for d, s in zip(dst, src):
            d.copy_(s)
        return None

    def wait(self, event: CopyEvent) -> None:
        pass

    def record(self) -> CopyEvent:
        return None

    def synchronize(self) -> None:
        pass


def _cuda_event(event: CopyEvent) -> torch.cuda.Event:
    if not isinstance(event, torch.cuda.Event):
        raise TypeError(f"CudaStreamOps waits for CUDA events, got {type(event).__name__}")
    return event


class CudaStreamOps:
    """CUDA: copies on a dedicated copy stream (pinned host -> device, asynchronous), ordered
    against the compute stream (whatever stream is current when a layer runs, e.g. the vision
    stage's green-context stream) with CUDA events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy_stream = torch.cuda.Stream(device=device)

    def copy(
        self,
        slot: int,
        layer: int,
        dst: Sequence[torch.Tensor],
        src: Sequence[torch.Tensor],
        after: CopyEvent | None,
    ) -> CopyEvent:
        with torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(_cuda_event(after))
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return done

    def wait(self, event: CopyEvent) -> None:
        torch.cuda.current_stream(self.device).wait_event(_cuda_event(event))

    def record(self) -> CopyEvent:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def synchronize(self) -> None:
        self.copy_stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()


def _signature(layer: nn.Module) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    return tuple((name, tuple(p.shape), p.dtype) for name, p in layer.named_parameters())


def find_layer_stack(module: nn.Module) -> nn.ModuleList | None:
    """The largest ``nn.ModuleList`` under ``module`` whose (>= 2) layers all have the same
    parameter names, shapes and dtypes (a transformer tower's layers or blocks)."""
    best: nn.ModuleList | None = None
    for sub in module.modules():
        if not isinstance(sub, nn.ModuleList) or len(sub) < 2:
            continue
        sig = _signature(sub[0])
        if not sig or any(_signature(layer) != sig for layer in sub):
            continue
        if best is None or len(sub) * len(sig) > len(best) * len(_signature(best[0])):
            best = sub
    return best


def layer_bytes(layer: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters())


@dataclass(slots=True, frozen=True)
class OffloadStats:
    num_layers: int
    num_slots: int
    layer_bytes: int  # one layer's parameters
    streamed_bytes: int  # all layers' parameters, now in host memory
    slot_bytes: int  # the K device slots

    @property
    def saved_bytes(self) -> int:
        """Device memory freed: the layers' weights minus the slots that replace them."""
        return self.streamed_bytes - self.slot_bytes


class LayerStreamer:
    """Streams the parameters of ``layers`` through ``num_slots`` device slots (see module doc)."""

    def __init__(
        self,
        layers: nn.ModuleList,
        num_slots: int,
        device: torch.device,
        ops: StreamOps | None = None,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if len(layers) <= num_slots:
            raise ValueError(
                f"{num_slots} slots for {len(layers)} layers: nothing to stream "
                "(keep the encoder resident)"
            )
        sig = _signature(layers[0])
        for i, layer in enumerate(layers):
            if _signature(layer) != sig:
                raise ValueError(
                    f"layer {i} differs in parameter shapes from layer 0; "
                    "only identically shaped layers can share slots"
                )
        self.layers = layers
        self.num_layers = len(layers)
        self.num_slots = num_slots
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.ops: StreamOps = ops or (CudaStreamOps(self.device) if on_cuda else HostStreamOps())
        self.params: list[list[nn.Parameter]] = [list(layer.parameters()) for layer in layers]
        # Host masters (pinned on CUDA so copies are asynchronous DMA); the device copies of the
        # layers are dropped once the parameters point at their masters.
        with torch.no_grad():
            self.host: list[list[torch.Tensor]] = [
                [self._to_host(p.detach(), on_cuda) for p in ps] for ps in self.params
            ]
            self.slots: list[list[torch.Tensor]] = [
                [torch.empty_like(p, device=self.device) for p in self.params[0]]
                for _ in range(num_slots)
            ]
            for ps, hs in zip(self.params, self.host):
                for p, h in zip(ps, hs):
                    p.data = h
        one = layer_bytes(layers[0])
        self.stats = OffloadStats(
            self.num_layers, num_slots, one, one * self.num_layers, one * num_slots
        )
        self._step = 0  # the next step to compute
        self._slot_step = [-1] * num_slots  # the step whose layer each slot holds / is loading
        self._copy_done: list[CopyEvent] = [None] * num_slots
        self._hooks: list[RemovableHandle] = []
        for i, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(self._make_pre_hook(i)))
            self._hooks.append(layer.register_forward_hook(self._make_post_hook(i)))
        for s in range(num_slots):
            self._load(s, after=None)

    @staticmethod
    def _to_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
        host = t.to("cpu", copy=True)
        return host.pin_memory() if pin else host

    # -- the schedule ----------------------------------------------------------------------------
    def _load(self, step: int, after: CopyEvent | None) -> None:
        """Enqueue the copy of ``step``'s layer into its slot, after ``after`` (a compute event)."""
        slot, layer = step % self.num_slots, step % self.num_layers
        self._slot_step[slot] = step
        self._copy_done[slot] = self.ops.copy(
            slot, layer, self.slots[slot], self.host[layer], after
        )

    def _restart(self, layer: int) -> None:
        """Layers ran out of order (an aborted forward, or a caller that skips layers): let
        everything in flight finish, then load the schedule again from ``layer``."""
        log.debug("weight streaming: restarting the schedule at layer %d", layer)
        self.ops.synchronize()
        base = self._step + (layer - self._step) % self.num_layers
        self._step = base
        for s in range(base, base + self.num_slots):
            self._load(s, after=None)
        self.ops.synchronize()

    def _wait_for_copy(self, slot: int) -> None:
        self.ops.wait(self._copy_done[slot])

    def _before(self, layer: int) -> None:
        if self._step % self.num_layers != layer:
            self._restart(layer)
        slot = self._step % self.num_slots
        assert self._slot_step[slot] == self._step, "slot does not hold the layer about to run"
        self._wait_for_copy(slot)
        for p, buf in zip(self.params[layer], self.slots[slot]):
            p.data = buf

    def _after(self, layer: int) -> None:
        computed = self.ops.record()
        for p, h in zip(self.params[layer], self.host[layer]):
            p.data = h
        self._load(self._step + self.num_slots, after=computed)
        self._step += 1

    def _make_pre_hook(self, layer: int) -> Callable[[nn.Module, tuple[object, ...]], None]:
        def hook(module: nn.Module, args: tuple[object, ...]) -> None:
            self._before(layer)

        return hook

    def _make_post_hook(
        self, layer: int
    ) -> Callable[[nn.Module, tuple[object, ...], object], None]:
        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            self._after(layer)

        return hook

    def remove(self) -> None:
        """Stop streaming: wait for copies, put every layer back on the device (resident)."""
        self.ops.synchronize()
        for handle in self._hooks:
            handle.remove()
        with torch.no_grad():
            for ps, hs in zip(self.params, self.host):
                for p, h in zip(ps, hs):
                    p.data = h.to(self.device, copy=True)
        self.slots = []


def stream_vision_layers(
    vision: nn.Module, num_slots: int, device: torch.device, ops: StreamOps | None = None
) -> LayerStreamer | None:
    """Stream ``vision``'s encoder layers through ``num_slots`` slots; ``None`` (with a log line)
    when there is nothing to stream (``num_slots >= `` layers: the encoder stays resident)."""
    layers = getattr(vision, "streamable_layers", None)
    stack = layers() if callable(layers) else find_layer_stack(vision)
    if stack is None:
        raise ValueError(
            "vision weight streaming: found no stack of identically shaped layers "
            "in the vision tower"
        )
    if num_slots >= len(stack):
        log.warning(
            "vision offload: K=%d >= the encoder's %d layers, so the encoder stays "
            "resident (nothing to stream)",
            num_slots,
            len(stack),
        )
        return None
    streamer = LayerStreamer(stack, num_slots, device, ops)
    st = streamer.stats
    log.info(
        "vision offload: %d layers of %.1f MiB in host memory, %d slots on %s; saves %.1f MiB",
        st.num_layers,
        st.layer_bytes / 2**20,
        st.num_slots,
        device,
        st.saved_bytes / 2**20,
    )
    return streamer
