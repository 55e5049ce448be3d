"""Which tensors Nova's fused CPU kernels take (``nova.runtime.cpu_kernels``).

The decoder (``nova.models.llama``) asks ``kernels_for(x)`` before its RMSNorm, SiLU-and-mul
and rotary embedding: the compiled module when ``x`` is a CPU tensor of a dtype the kernels
take, outside autograd, and the kernels built; otherwise None, and the decoder runs its eager
PyTorch ops (on a GPU, under ``NOVA_CPU_KERNELS=0``, or when the build failed).
"""

from __future__ import annotations

from types import ModuleType

import torch

from nova.runtime import cpu_kernels

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernels_for(x: torch.Tensor) -> ModuleType | None:
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        return None
    if x.requires_grad and torch.is_grad_enabled():
        return None
    return cpu_kernels.load()
