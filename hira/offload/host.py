"""The host tier: a layer's K and V in pinned host memory, which CUDA kernels read and write in place.

Pinned host memory has one address for the CPU and every GPU (unified virtual addressing), so a CUDA tensor can
stand for it: kernels given that tensor read host memory over PCIe with no copy issued by the host (zero-copy), and a
CUDA graph can replay them. Measured on an H200 (benchmarks/NOTES.md §18): a kernel streams such memory at 55 GB/s,
a gather of scattered 32 KB blocks at 44 GB/s, the same inside a CUDA graph, and compiled flex_attention over it
returns exactly what it returns over a GPU copy.

Elsewhere (the CPU) the tier is emulated: the storage stays where it is, so the block cache's code runs and is
tested unchanged, but nothing is saved.
"""

from __future__ import annotations

import torch


class _HostMemory:
    """Pinned host memory described as CUDA memory (``__cuda_array_interface__``), as bytes: the interface has no
    bfloat16. ``torch.as_tensor`` keeps this object, and so the host tensor, alive as long as its view."""

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.__cuda_array_interface__ = {
            "shape": tuple(host.shape[:-1]) + (host.shape[-1] * host.element_size(),),
            "typestr": "|u1",
            "data": (host.data_ptr(), False),
            "version": 3,
            "strides": None,
        }


def to_host_tier(t: torch.Tensor) -> torch.Tensor:
    """A copy of the contiguous tensor ``t`` in the host tier: on CUDA, pinned host memory seen as a CUDA tensor of
    t's device, shape and dtype; elsewhere ``t`` itself (the emulated tier)."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    with torch.cuda.device(t.device):
        view = torch.as_tensor(_HostMemory(host), device=t.device).view(t.dtype)
    view.copy_(t)  # one kernel writing host memory through its device address
    return view


def staged(t: torch.Tensor, extent: int) -> torch.Tensor:
    """A device-memory copy of the host-tier storage ``t`` [B, H, C, D] whose slots from ``extent`` on are zeros (never
    written, never read): one read of the written part over PCIe. For a prefill chunk's attention, whose kernel
    reads every key block once per tile of query rows: straight from the host tier, a chunk of 8K queries at 256K
    tokens read the earlier K and V ~256 times over PCIe (benchmarks/NOTES.md §21). The same on the CPU (the
    emulated tier), where it only costs a copy."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out[:, :, :extent].copy_(t[:, :, :extent])
    out[:, :, extent:].zero_()  # the written part is not cleared first: one write of each slot
    return out
