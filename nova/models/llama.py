"""Our LLM decoder for the Llama/Qwen2 family over a paged KV cache.

Parameter names equal those of ``transformers``' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``
(``model.layers.N.self_attn.q_proj.weight`` ...), so their checkpoints load unchanged.
Differences between the family members are fields of the decoder's config, the ``TextShape`` of
the one parse of the model's config (``nova.shapes``, which writes each family's rules out): Qwen2
has biases on q/k/v, Llama-3.1 uses ``llama3`` RoPE scaling (inverse frequencies come from
``transformers``' own RoPE init functions, so every rope type they know is supported). The
Qwen2-VL / Qwen2.5-VL text models are Qwen2 with M-RoPE: given ``[3, T]`` positions (temporal,
height, width) the rotary frequencies are split by ``mrope_section`` and section i uses row i
(docs/models.md).

The forward works on packed tokens ``[num_tokens, hidden]`` of several sequences at once; see
``nova.runtime.forward_batch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from nova.models.mrope import mrope_frequency_rows
from nova.runtime.attention_backend import AttentionBackend
from nova.runtime.attention_sdpa import SdpaPagedAttention
from nova.runtime.cpu_fused import kernels_for
from nova.runtime.cpu_linear import PackedLinear
from nova.runtime.forward_batch import ForwardBatch
from nova.runtime.kv_cache import PagedKVCache
from nova.shapes import TextShape


def rope_inverse_frequencies(hf_config: Any, text: TextShape) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32, attention scaling) of the decoder: the default rope from
    the parsed shape's theta and head_dim, other rope types from transformers' RoPE init table.

    Always computed on the CPU with real data, even inside a ``torch.device("meta")`` context.
    """
    with torch.device("cpu"):
        return _rope_inverse_frequencies(hf_config, text)


def _rope_inverse_frequencies(hf_config: Any, text: TextShape) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type, dim = text.rope.rope_type, text.head_dim
    if rope_type == "default":
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        inv_freq = 1.0 / (text.rope.theta**exponents)
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RMSNorm(nn.Module):
    """``transformers``' Llama RMSNorm: normalized in fp32, rounded to the input's dtype, times
    the weight. On a CPU one fused kernel pass (``nova.runtime.cpu_fused``) when it applies."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def _kernels(self, x: torch.Tensor) -> Any:
        fits = x.dim() == 2 and x.stride(-1) == 1 and self.weight.dtype == x.dtype
        return kernels_for(x) if fits else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = self._kernels(x)
        if kernels is not None:
            return kernels.rms_norm(x, self.weight, self.eps)
        in_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(in_dtype)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + x, this norm of it): the residual add and the next norm in one pass."""
        kernels = self._kernels(x)
        if kernels is not None and residual.shape == x.shape and residual.stride(-1) == 1:
            total, normed = kernels.add_rms_norm(x, residual, self.weight, self.eps)
            return total, normed
        total = residual + x
        return total, self(total)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim]. One kernel pass on a CPU when it
    applies (``nova.runtime.cpu_fused``)."""
    fits = x.stride(-1) == 1 and cos.dtype == sin.dtype == x.dtype
    kernels = kernels_for(x) if fits and cos.is_contiguous() and sin.is_contiguous() else None
    if kernels is not None:
        return kernels.rope(x, cos, sin)
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


class _Fused:
    """One weight (and bias) made of several ``nn.Linear`` modules' rows, so one GEMM computes
    them all; the modules' parameters become views into it.

    Invariant: while the views hold, writing a module's parameter (the loader's ``copy_``)
    writes the fused tensor. Anything that replaces a parameter's storage (``Module.to``,
    ``to_empty``, ``load_state_dict(assign=True)``) breaks the views; ``get`` notices by the
    data pointer of the first weight and rebuilds from the current parameters.
    """

    def __init__(self, *linears: nn.Linear) -> None:
        self.linears = linears
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        first = self.linears[0].weight
        if self.weight is None or first.data_ptr() != self.weight.data_ptr():
            self._fuse()
        assert self.weight is not None
        return self.weight, self.bias

    @torch.inference_mode(False)
    @torch.no_grad()
    def _fuse(self) -> None:
        # (normal tensors even when the first forward runs under inference mode: the loader
        # may still write the parameters, and a packed copy tracks their version counter)
        weights = [lin.weight for lin in self.linears]
        self.weight = torch.cat([w.detach() for w in weights])
        _make_views(weights, self.weight)
        biases = [lin.bias for lin in self.linears]
        if all(b is None for b in biases):
            self.bias = None
            return
        if any(b is None for b in biases):
            raise ValueError("fused projections need a bias on all of them or none")
        present = [b for b in biases if b is not None]
        self.bias = torch.cat([b.detach() for b in present])
        _make_views(present, self.bias)


def _make_views(params: Sequence[torch.Tensor], fused: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.shape[0]
        p.data = fused[offset : offset + n]
        offset += n


class Attention(nn.Module):
    """q/k/v are one GEMM (``_Fused``; the checkpoint's separate q/k/v weights load into views
    of it) and the rotary embedding is applied to the queries and keys in one pass."""

    def __init__(self, cfg: TextShape, layer: int, attn: AttentionBackend) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = cfg.head_dim**-0.5
        self._attn = attn
        self._qkv = _Fused(self.q_proj, self.k_proj, self.v_proj)
        self._qkv_linear, self._o_linear = PackedLinear(), PackedLinear()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: PagedKVCache,
    ) -> torch.Tensor:
        t = x.shape[0]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self._qkv_linear(x, *self._qkv.get())
        qk = apply_rope(qkv[:, : (h + kvh) * d].view(t, h + kvh, d), cos, sin)
        v = qkv[:, (h + kvh) * d :].view(t, kvh, d)
        out = self._attn(
            qk[:, :h], qk[:, h:], v, self.layer, batch.attn_metadata, kv_cache, self.scale
        )
        return self._o_linear(out, self.o_proj.weight, self.o_proj.bias)


class MLP(nn.Module):
    """gate and up are one GEMM (``_Fused``), loaded from the checkpoint's separate weights."""

    def __init__(self, cfg: TextShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} (only silu)")
        self._gate_up = _Fused(self.gate_proj, self.up_proj)
        self._inter = cfg.intermediate_size
        self._gate_up_linear, self._down_linear = PackedLinear(), PackedLinear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self._gate_up_linear(x, *self._gate_up.get())
        kernels = kernels_for(gate_up) if gate_up.stride(-1) == 1 else None
        if kernels is not None:
            act = kernels.silu_mul(gate_up)
        else:
            act = F.silu(gate_up[:, : self._inter]) * gate_up[:, self._inter :]
        return self._down_linear(act, self.down_proj.weight, self.down_proj.bias)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextShape, layer: int, attn: AttentionBackend) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer, attn)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        normed: torch.Tensor,
        residual: torch.Tensor,
        next_norm: RMSNorm,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: PagedKVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-norm layer ``h += attn(norm1(h)); h += mlp(norm2(h))`` with each residual
        add fused into the norm after it. ``residual`` is h, ``normed`` is
        ``input_layernorm(h)``; returns (the new h, ``next_norm`` of it): the next layer's
        input norm, or the final norm after the last layer."""
        attn = self.self_attn(normed, cos, sin, batch, kv_cache)
        residual, normed = self.post_attention_layernorm.add_forward(attn, residual)
        return next_norm.add_forward(self.mlp(normed), residual)


class _Backbone(nn.Module):
    def __init__(self, cfg: TextShape, attn: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, attn) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaDecoder(nn.Module):
    """Llama / Qwen2 / Mistral-style decoder-only LM; HF-compatible parameter names."""

    def __init__(
        self,
        cfg: TextShape,
        inv_freq: torch.Tensor,
        rope_scaling: float = 1.0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_backend: AttentionBackend = SdpaPagedAttention()
        self.model = _Backbone(cfg, self.attn_backend)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._lm_head_linear = PackedLinear()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not a registered buffer: it is derived from the config, never loaded, and must survive
        # construction on the meta device.
        self._inv_freq = inv_freq.float()
        self._rope_scaling = rope_scaling
        # (device, dtype) -> (cos, sin) [positions, head_dim]: see ``_rope_table``.
        self._rope_tables: dict[
            tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]
        ] = {}
        # M-RoPE (Qwen-VL): which position row (t, h, w) each rotary frequency uses; None = 1-D.
        mrope_section = cfg.rope.mrope_section
        self.mrope_section = tuple(int(s) for s in mrope_section) if mrope_section else None
        self._mrope_rows = (
            mrope_frequency_rows(self.mrope_section, self._inv_freq.numel())
            if self.mrope_section
            else None
        )

    @property
    def uses_mrope(self) -> bool:
        return self.mrope_section is not None

    def rope_angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotary angles [T, head_dim/2] (float32) of positions [T], or [3, T] with M-RoPE."""
        inv_freq = self._inv_freq.to(positions.device)
        if positions.dim() == 1:
            return positions.float()[:, None] * inv_freq[None, :]
        if self._mrope_rows is None or positions.shape[0] != 3:
            raise ValueError(
                f"positions of shape {tuple(positions.shape)} need an M-RoPE model ([3, T]); "
                f"this decoder takes [T]"
            )
        angles = positions.float()[:, :, None] * inv_freq[None, None, :]  # [3, T, half]
        rows = self._mrope_rows.to(positions.device)
        return angles.gather(0, rows.view(1, 1, -1).expand(1, positions.shape[1], -1))[0]

    def rope_cos_sin(
        self, batch: ForwardBatch, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] in ``dtype`` for the batch's rotary positions: rows of a
        table of every position below the batch's longest context (1-D positions), computed
        as ``transformers`` does (float32 angles, scaled, then cast), or from the angles of
        M-RoPE positions."""
        positions = batch.positions.to(device)
        if positions.dim() == 1 and self._mrope_rows is None:
            cos_table, sin_table = self._rope_table(batch.paged.max_seq_len, device, dtype)
            return cos_table.index_select(0, positions), sin_table.index_select(0, positions)
        freqs = self.rope_angles(positions)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self._rope_scaling).to(dtype)
        sin = (emb.sin() * self._rope_scaling).to(dtype)
        return cos, sin

    def _rope_table(
        self, num_positions: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions ``0..n-1`` (n >= num_positions, grown by doubling), per device
        and dtype."""
        key = (device, dtype)
        table = self._rope_tables.get(key)
        if table is None or table[0].shape[0] < num_positions:
            have = 0 if table is None else table[0].shape[0]
            n = max(num_positions, 2 * have, 256)
            freqs = self.rope_angles(torch.arange(n, device=device))
            emb = torch.cat((freqs, freqs), dim=-1)
            table = (
                (emb.cos() * self._rope_scaling).to(dtype),
                (emb.sin() * self._rope_scaling).to(dtype),
            )
            self._rope_tables[key] = table
        return table

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self, hidden: torch.Tensor, batch: ForwardBatch, kv_cache: PagedKVCache
    ) -> torch.Tensor:
        """hidden: embedded new tokens [T, hidden] -> final-norm hidden states [T, hidden]."""
        cos, sin = self.rope_cos_sin(batch, hidden.device, hidden.dtype)
        layers = [cast(DecoderLayer, layer) for layer in self.model.layers]
        if not layers:
            return self.model.norm(hidden)
        norms = [layer.input_layernorm for layer in layers[1:]] + [self.model.norm]
        residual, normed = hidden, layers[0].input_layernorm(hidden)
        for layer, next_norm in zip(layers, norms):
            residual, normed = layer(normed, residual, next_norm, cos, sin, batch, kv_cache)
        return normed

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        """Swap the paged-attention backend every layer calls; forwards then carry its
        metadata (``build_forward_batch(..., attention=backend)``)."""
        self.attn_backend = backend
        for layer in self.model.layers:
            cast(DecoderLayer, layer).self_attn._attn = backend

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head_linear(hidden, self.lm_head.weight).float()
