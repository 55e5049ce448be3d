"""Choosing the attention backend: ``make_attention_backend`` for
``EngineConfig.attention_backend``.

The backends (``nova.runtime.attention_backend.AttentionBackend`` subclasses, one call shape):
``sdpa`` (``nova.runtime.attention_sdpa``, the reference: gather to a padded view + SDPA),
``cpu`` (``nova.runtime.attention_cpu``, grouped-query batched matmuls, decode through Nova's
C++ kernel reading the cache in place (``nova.runtime.cpu_kernels``); ``auto`` on a CPU),
``cpu_eager`` (the same without the kernel: decode gathers the context and runs two ``bmm``s),
``triton`` (``nova.runtime.attention_triton``, our kernel reading blocks in place) and ``flex``
(``nova.runtime.attention_flex``, ``flex_attention`` with a BlockMask). ``auto`` follows the
measured selection table of this GPU (package data written by ``benchmarks/attention_decode.py``;
see docs/attention.md).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TypedDict

import torch

from nova.cost.profiled import device_slug
from nova.runtime.attention_backend import AttentionBackend, PhaseSplitAttention
from nova.runtime.attention_cpu import CpuPagedAttention
from nova.runtime.attention_sdpa import SdpaPagedAttention

log = logging.getLogger(__name__)

BACKEND_NAMES = ("cpu", "cpu_eager", "sdpa", "triton", "flex")
# The measured selection tables shipped with the package: <gpu-slug>.json per GPU.
# $NOVA_ATTENTION_TABLE names a table file to use instead.
TABLES_DIR: Traversable = resources.files("nova.runtime").joinpath("attention_tables")
TABLE_ENV = "NOVA_ATTENTION_TABLE"


class SelectionTable(TypedDict):
    """A GPU's measured choice per phase (the file may hold more: gpu, source, rule)."""

    decode: str
    prefill: str


@dataclass(slots=True, frozen=True)
class AttentionChoice:
    decode: str
    prefill: str
    reason: str


def gpu_slug(gpu_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (table and results file names; the
    profiles' device slug)."""
    return device_slug(gpu_name)


def selection_table_path(gpu_name: str) -> Traversable:
    """``$NOVA_ATTENTION_TABLE`` if set, else this GPU's table in the package data."""
    env = os.environ.get(TABLE_ENV)
    return Path(env) if env else TABLES_DIR.joinpath(f"{gpu_slug(gpu_name)}.json")


def load_selection_table(gpu_name: str) -> SelectionTable | None:
    """The measured choice for this GPU, or None when there is no table for it."""
    path = selection_table_path(gpu_name)
    if not path.is_file():
        return None
    table = json.loads(path.read_text())
    for phase in ("decode", "prefill"):
        if table.get(phase) not in BACKEND_NAMES:
            raise ValueError(
                f"{path}: {phase!r} must be one of {BACKEND_NAMES}, got {table.get(phase)!r}"
            )
    return SelectionTable(decode=table["decode"], prefill=table["prefill"])


def choose_attention(
    requested: str,
    device_type: str,
    table: SelectionTable | None = None,
    cuda_graphs: bool = False,
) -> AttentionChoice:
    """Which backend runs decode and which runs prefill (plain logic; no imports of kernels).

    - an explicit name is used for both phases;
    - ``auto`` on a CPU: ``cpu`` (grouped-query batched matmuls; the Triton kernel needs a GPU,
      flex is a dense reference);
    - ``auto`` on CUDA: the measured table's choice per phase, ``triton`` where there is none;
      with CUDA graphs on, decode uses ``triton``, the one backend with static launch shapes.
    """
    if requested != "auto":
        if requested not in BACKEND_NAMES:
            raise ValueError(
                f"unknown attention backend {requested!r}; choose auto, {', '.join(BACKEND_NAMES)}"
            )
        return AttentionChoice(requested, requested, "requested")
    if device_type != "cuda":
        return AttentionChoice("cpu", "cpu", "auto on CPU")
    if table is None:
        return AttentionChoice("triton", "triton", "auto on CUDA, no measurement for this GPU")
    decode, reason = table["decode"], "auto: measured table"
    if cuda_graphs and decode != "triton":
        decode, reason = "triton", "auto: measured table; decode triton for CUDA graphs"
    return AttentionChoice(decode, table["prefill"], reason)


def build_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend called ``name`` for a model on ``device`` (a clear error where it cannot
    run)."""
    if name == "sdpa":
        return SdpaPagedAttention()
    if name == "cpu":  # (the C++ decode kernel is built for CPU tensors only)
        return CpuPagedAttention(kernels=device.type == "cpu")
    if name == "cpu_eager":
        return CpuPagedAttention(kernels=False)
    if name == "triton":
        from nova.runtime.attention_triton import TritonPagedAttention, triton_interpreter_on

        if device.type != "cuda" and not triton_interpreter_on():
            raise RuntimeError(
                f"attention backend 'triton' needs a CUDA device (this model is on "
                f"{device.type}); set TRITON_INTERPRET=1 before starting to run the kernel in "
                f"Triton's (slow) CPU interpreter, or use --attention-backend sdpa"
            )
        return TritonPagedAttention()
    if name == "flex":
        from nova.runtime.attention_flex import FlexPagedAttention

        return FlexPagedAttention(use_compile=device.type == "cuda")
    raise ValueError(f"unknown attention backend {name!r}")


def make_attention_backend(
    requested: str, device: torch.device | str, cuda_graphs: bool = False
) -> AttentionBackend:
    """The attention backend the decoder calls, for ``EngineConfig.attention_backend``."""
    device = torch.device(device)
    table = None
    if requested == "auto" and device.type == "cuda":
        table = load_selection_table(torch.cuda.get_device_name(device))
    choice = choose_attention(requested, device.type, table, cuda_graphs)
    decode = build_backend(choice.decode, device)
    prefill = decode if choice.prefill == choice.decode else build_backend(choice.prefill, device)
    backend = decode if prefill is decode else PhaseSplitAttention(decode, prefill)
    log.info(
        "attention backend: prefill %s, decode %s (%s)",
        choice.prefill,
        choice.decode,
        choice.reason,
    )
    return backend
