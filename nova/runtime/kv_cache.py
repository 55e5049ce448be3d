"""The paged KV cache tensors: one K and one V tensor per layer, addressed by slot.

Layout per layer: ``[num_blocks * block_size, num_kv_heads, head_dim]``. Slot ``s`` lives in
block ``s // block_size`` at offset ``s % block_size``; which blocks a sequence owns is decided
by ``nova.core.block_manager.BlockManager`` (torch-free), and its block table maps the
sequence's token positions to slots.
"""

from __future__ import annotations

import torch

from nova.runtime.cpu_fused import kernels_for


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # A slot no sequence ever owns (in a block the runner keeps out of the block manager),
        # read by backends that pad gathered contexts; None when the cache has no such block.
        self.pad_slot: int | None = None
        num_slots = num_blocks * block_size
        shape = (num_slots, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        elem_bytes = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem_bytes

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(
        self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store new keys/values ``[num_tokens, num_kv_heads, head_dim]`` at their slots
        (on a CPU through Nova's row-copy kernel where it takes them: ``index_copy_`` moved a
        prefill's rows at a few GB/s, docs/cpu.md "KV cache writes")."""
        kc, vc = self.k[layer], self.v[layer]
        kernels = kernels_for(kc)
        if (
            kernels is not None
            and k.dtype == v.dtype == kc.dtype
            and slot_mapping.dtype == torch.int64
            and k.dim() == v.dim() == 3
            and k.stride(2) == v.stride(2) == 1
            and k.stride(1) == v.stride(1) == self.head_dim
        ):
            kernels.kv_write(kc, vc, slot_mapping.contiguous(), k, v)
            return
        kc.index_copy_(0, slot_mapping, k.to(kc.dtype))
        vc.index_copy_(0, slot_mapping, v.to(vc.dtype))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks ``src -> dst`` in every layer (copy-on-write of a block shared by
        forks). All sources are read before any destination is written."""
        if not pairs:
            return
        bs = self.block_size
        device = self.k[0].device
        offsets = torch.arange(bs, device=device)
        src = (torch.tensor([a for a, _ in pairs], device=device)[:, None] * bs + offsets).flatten()
        dst = (torch.tensor([b for _, b in pairs], device=device)[:, None] * bs + offsets).flatten()
        for layer in range(self.num_layers):
            self.k[layer].index_copy_(0, dst, self.k[layer].index_select(0, src))
            self.v[layer].index_copy_(0, dst, self.v[layer].index_select(0, src))
