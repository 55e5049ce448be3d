"""Linear layers on a CPU with weights prepacked for oneDNN (bf16 and fp32).

``F.linear`` on a CPU in bf16 reaches oneDNN with the weight in its plain ``[out, in]`` layout,
which oneDNN reorders into its blocked GEMM layout inside every call. Reordering once
(``torch.ops.mkldnn._reorder_linear_weight``, what Inductor's CPU weight prepacking uses) and
calling ``torch.ops.mkldnn._linear_pointwise`` with the packed weight gives the same results
(bit for bit on the shapes tested in ``tests/test_cpu_linear.py``) faster: one forward's GEMMs
of SmolLM2-135M on one thread cost 0.63x (8 tokens), 0.89x (64 tokens, a 64-sequence decode
step) and 0.97x (1024 tokens) of ``F.linear``'s thread CPU time, interleaved
(``benchmarks/cpu_linear.py``, benchmarks/results/cpu_linear.md).

In fp32, ``F.linear`` goes to MKL's sgemm; oneDNN with the packed weight sums in another order
(float32 rounding apart; its error against the float64 product within 4x F.linear's: the
tests) and in the engine it is
about twice as fast: the demo model's decode step of 1-16 sequences 16-34 ms against 37-80 ms,
a prefill of 224-3590 tokens 0.50-0.54x the time
(``benchmarks/cpu_prepack_engine.py``, benchmarks/results/cpu_prepack_engine_float32.md).

The packed copy is rebuilt whenever the weight changes (its storage or version counter: a
loader's ``copy_`` bumps it) and costs a second copy of each packed weight in memory (the CPU's
KV cache has a fixed size, so it does not shrink it). ``NOVA_CPU_PREPACK=0`` turns it off;
other devices and dtypes always use ``F.linear``.
"""

from __future__ import annotations

import os
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

# The batch size oneDNN picks the packed layout for (decode batches; prefill reuses it).
PACK_BATCH_HINT = 64


def cpu_bf16_supported() -> bool:
    """oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 / AMX, or AVX512 core)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def prepack_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """oneDNN linear with packed weights is usable here for ``dtype`` (and not turned off):
    float32 wherever oneDNN is, bfloat16 where oneDNN supports it on this CPU."""
    if os.environ.get("NOVA_CPU_PREPACK") == "0":
        return False
    try:
        if dtype == torch.float32:
            return bool(torch.backends.mkldnn.is_available())
        if dtype == torch.bfloat16:
            return cpu_bf16_supported()
    except (AttributeError, RuntimeError):
        pass
    return False


_AVAILABLE: dict[torch.dtype, bool] = {}  # ``prepack_available`` per dtype, asked once


def _available(dtype: torch.dtype) -> bool:
    usable = _AVAILABLE.get(dtype)
    if usable is None:
        usable = _AVAILABLE[dtype] = prepack_available(dtype)
    return usable


class PackedLinear:
    """``F.linear(x, weight, bias)``, with ``weight`` prepacked on a CPU (bf16 or fp32).

    One instance per weight it is called with (a layer's projection); holds the packed copy
    and the key of the weight it was made from."""

    __slots__ = ("_key", "_packed")

    def __init__(self) -> None:
        self._key: tuple[int, int, tuple[int, ...]] | None = None
        self._packed: torch.Tensor | None = None

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (
            weight.device.type != "cpu"
            or x.dtype != weight.dtype
            or weight.is_inference()
            or torch.is_grad_enabled()
            or not _available(weight.dtype)
        ):
            return F.linear(x, weight, bias)
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        if key != self._key or self._packed is None:
            with torch.inference_mode(False), torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(
                    weight.detach(), PACK_BATCH_HINT
                )
            self._key = key
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")


class PackedLinearModule(nn.Linear):
    """An ``nn.Linear`` whose forward goes through ``PackedLinear`` (prepacked on a CPU, plain
    ``F.linear`` elsewhere). Made by ``pack_linear_modules`` from a module's own linears."""

    _packed_call: PackedLinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._packed_call(x, self.weight, self.bias)


def pack_linear_modules(module: nn.Module) -> int:
    """Every plain ``nn.Linear`` under ``module`` (a ``transformers`` vision tower's) calls
    ``PackedLinear`` from now on: the class is swapped in place, so parameters, their names and
    the module tree stay as they are. Returns how many."""
    count = 0
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = PackedLinearModule
            cast(PackedLinearModule, sub)._packed_call = PackedLinear()
            count += 1
    return count


def packed_weight_bytes(module: nn.Module) -> int:
    """Bytes of the packed copies ``PackedLinear`` holds under ``module`` (each once): the
    memory the packing adds beside the weights (0 before the first forward or with packing
    off)."""
    seen: set[int] = set()
    total = 0
    for sub in module.modules():
        for value in vars(sub).values():
            packed = value._packed if isinstance(value, PackedLinear) else None
            if packed is None or id(packed) in seen:
                continue
            seen.add(id(packed))
            total += packed.numel() * packed.element_size()
    return total
