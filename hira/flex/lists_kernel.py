"""A Triton kernel for FlexAttention's block lists (``hira.flex.mask.block_lists``) on CUDA.

The tensor program compacts a keep table through two prefix sums and a scatter: four or more kernels per call, each
a short scan over the leaves of B·H rows, and past 8,192 leaves a stable sort instead (inductor fails to compile the
scan there). Here one program per row loads the row once, computes both prefix sums in registers and writes the
list: one launch at any size. Imported on CUDA only; the tests run it in triton's interpreter on the CPU against the
tensor program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_lists_kernel(keep_ptr, num_ptr, idx_ptr, NB, NB_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, NB_PAD)
    inside = n < NB
    k = tl.load(keep_ptr + row * NB + n, mask=inside, other=0).to(tl.int32)
    rest = tl.where(inside, 1 - k, 0)
    num = tl.sum(k, axis=0)
    dest = tl.where(k != 0, tl.cumsum(k, axis=0) - 1, num + tl.cumsum(rest, axis=0) - 1)
    tl.store(idx_ptr + row * NB + dest, n, mask=inside)
    tl.store(num_ptr + row, num)


@torch.library.custom_op("hira::block_lists", mutates_args=())
def block_lists_kernel(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``hira.flex.mask.block_lists`` of a keep table [..., NB] bool: (count [...] int32, indices [..., NB] int32)."""
    NB = keep.shape[-1]
    rows = keep.numel() // NB
    flat = keep.reshape(rows, NB).contiguous().view(torch.uint8)
    num = torch.empty(rows, device=keep.device, dtype=torch.int32)
    idx = torch.empty(rows, NB, device=keep.device, dtype=torch.int32)
    nb_pad = triton.next_power_of_2(NB)
    _block_lists_kernel[(rows,)](flat, num, idx, NB, NB_PAD=nb_pad, num_warps=min(16, max(4, nb_pad // 1024)))
    return num.view(keep.shape[:-1]), idx.view(keep.shape)


@block_lists_kernel.register_fake
def _(keep):
    return keep.new_empty(keep.shape[:-1], dtype=torch.int32), keep.new_empty(keep.shape, dtype=torch.int32)
