"""Attention over the paged KV cache.

``SdpaPagedAttention`` is the reference path (CPU and GPU): write the new K/V into their slots,
gather each sequence's context from the cache into a padded ``[B, max_kv]`` view and call
``torch.nn.functional.scaled_dot_product_attention`` with a causal+padding mask.

Faster GPU paths read the cache in place behind the same ``__call__`` signature:
``TritonPagedAttention`` (``nova.runtime.attention_triton``, our Triton kernel) and
``FlexPagedAttention`` (``nova.runtime.attention_flex``, ``flex_attention`` with a BlockMask).
``make_attention_backend`` picks one from ``EngineConfig.attention_backend``; ``auto`` follows a
measurement written by ``benchmarks/attention_decode.py`` (see docs/attention.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nova.runtime.forward_batch import ForwardBatch
from nova.runtime.kv_cache import PagedKVCache

log = logging.getLogger(__name__)

BACKEND_NAMES = ("sdpa", "triton", "flex")
# Where ``auto`` looks for a measured choice: $NOVA_ATTENTION_TABLE, else this file of the
# source checkout, written by benchmarks/attention_decode.py on that GPU.
RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


class SdpaPagedAttention:
    name = "sdpa"
    static_shapes = False  # gathers to [B, max_kv]: shapes follow the batch's longest context
    needs_gather_views = True  # reads ForwardBatch.kv_gather_index / attn_mask

    def __call__(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        layer: int,
        batch: ForwardBatch,
        kv_cache: PagedKVCache,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        if batch.kv_gather_index is None or batch.attn_mask is None:
            raise ValueError(
                "the sdpa attention backend needs a ForwardBatch built with gather_views=True"
            )
        kv_cache.write(layer, batch.slot_mapping, k, v)
        _num_tokens, num_heads, head_dim = q.shape
        b, max_q = batch.num_seqs, batch.max_query_len
        q_pad = q.new_zeros(b * max_q, num_heads, head_dim)
        q_pad[batch.query_pad_index] = q
        q_pad = q_pad.view(b, max_q, num_heads, head_dim).transpose(1, 2)
        k_ctx = kv_cache.k[layer][batch.kv_gather_index].to(q.dtype).transpose(1, 2)
        v_ctx = kv_cache.v[layer][batch.kv_gather_index].to(q.dtype).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q_pad,
            k_ctx,
            v_ctx,
            attn_mask=batch.attn_mask,
            scale=scale,
            enable_gqa=num_heads != k_ctx.shape[1],
        )
        out = out.transpose(1, 2).reshape(b * max_q, num_heads * head_dim)
        return out[batch.query_pad_index]


def needs_gather_views(backend: Any) -> bool:
    """Whether ``backend`` reads the SDPA gather views of a ForwardBatch (unknown: assume so)."""
    return bool(getattr(backend, "needs_gather_views", True))


class PhaseSplitAttention:
    """One backend for decode-only forwards (every sequence has one new token), another for
    the rest (prefill, chunked prefill, mixed batches)."""

    def __init__(self, decode: Any, prefill: Any) -> None:
        self.decode, self.prefill = decode, prefill
        self.name = decode.name if decode.name == prefill.name else f"{prefill.name}+{decode.name}"

    @property
    def static_shapes(self) -> bool:  # what matters for CUDA graphs: the decode path
        return bool(getattr(self.decode, "static_shapes", False))

    @property
    def needs_gather_views(self) -> bool:
        return needs_gather_views(self.decode) or needs_gather_views(self.prefill)

    def __call__(self, q, k, v, layer, batch: ForwardBatch, kv_cache: PagedKVCache, scale: float):
        backend = self.decode if batch.max_query_len == 1 else self.prefill
        return backend(q, k, v, layer, batch, kv_cache, scale)


@dataclass(slots=True, frozen=True)
class AttentionChoice:
    decode: str
    prefill: str
    reason: str


def gpu_slug(gpu_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results folder name)."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")


def selection_table_path(gpu_name: str) -> Path:
    env = os.environ.get("NOVA_ATTENTION_TABLE")
    return Path(env) if env else RESULTS_DIR / gpu_slug(gpu_name) / "attention.json"


def load_selection_table(gpu_name: str) -> dict | None:
    """The measured choice for this GPU (``{"decode": name, "prefill": name, ...}``) or None."""
    path = selection_table_path(gpu_name)
    if not path.is_file():
        return None
    table = json.loads(path.read_text())
    for phase in ("decode", "prefill"):
        if table.get(phase) not in BACKEND_NAMES:
            raise ValueError(
                f"{path}: {phase!r} must be one of {BACKEND_NAMES}, got {table.get(phase)!r}"
            )
    return table


def choose_attention(
    requested: str, device_type: str, table: dict | None = None, cuda_graphs: bool = False
) -> AttentionChoice:
    """Which backend runs decode and which runs prefill (plain logic; no imports of kernels).

    - an explicit name is used for both phases;
    - ``auto`` on a CPU: ``sdpa`` (the Triton kernel needs a GPU; flex is a dense reference);
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
        return AttentionChoice("sdpa", "sdpa", "auto on CPU")
    if table is None:
        return AttentionChoice("triton", "triton", "auto on CUDA, no measurement for this GPU")
    decode, reason = table["decode"], "auto: measured table"
    if cuda_graphs and decode != "triton":
        decode, reason = "triton", "auto: measured table; decode triton for CUDA graphs"
    return AttentionChoice(decode, table["prefill"], reason)


def _build_backend(name: str, device: torch.device) -> Any:
    if name == "sdpa":
        return SdpaPagedAttention()
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
) -> Any:
    """The attention object the decoder calls, for ``EngineConfig.attention_backend``."""
    device = torch.device(device)
    table = None
    if requested == "auto" and device.type == "cuda":
        table = load_selection_table(torch.cuda.get_device_name(device))
    choice = choose_attention(requested, device.type, table, cuda_graphs)
    decode = _build_backend(choice.decode, device)
    prefill = decode if choice.prefill == choice.decode else _build_backend(choice.prefill, device)
    backend = decode if prefill is decode else PhaseSplitAttention(decode, prefill)
    log.info(
        "attention backend: prefill %s, decode %s (%s)",
        choice.prefill,
        choice.decode,
        choice.reason,
    )
    return backend
