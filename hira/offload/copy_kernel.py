"""Triton kernels moving whole KV blocks between the host tier and the block cache: the copy of fetched blocks into
their slots, and the read of key blocks from wherever they are.

One program per (batch·KV head, list entry); entries past the head's count return at once, so a launch of fixed
size moves only the blocks a step fetches, and it reads host memory through its device address (``host.py``): no
host sync, capturable in a CUDA graph. Registered through ``hira.offload.block_cache.copy_blocks`` (an opaque custom
operator), imported on CUDA only; the tests run it in triton's interpreter on the CPU against the tensor program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CHUNK = 2048  # elements per load: 4 KB of bfloat16


@triton.jit
def _copy_blocks_kernel(
    src_k, src_v, dst_k, dst_v, src_block, dst_slot, count,
    K, SRC_HEAD, DST_HEAD,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    bh = tl.program_id(0)
    j = tl.program_id(1)
    if j < tl.load(count + bh):
        s = tl.load(src_block + bh * K + j).to(tl.int64)
        d = tl.load(dst_slot + bh * K + j).to(tl.int64)
        src = bh.to(tl.int64) * SRC_HEAD + s * BLOCK
        dst = bh.to(tl.int64) * DST_HEAD + d * BLOCK
        for i in tl.static_range(0, BLOCK, CHUNK):
            offs = i + tl.arange(0, CHUNK)
            inside = offs < BLOCK
            tl.store(dst_k + dst + offs, tl.load(src_k + src + offs, mask=inside), mask=inside)
            tl.store(dst_v + dst + offs, tl.load(src_v + src + offs, mask=inside), mask=inside)


def copy_blocks_kernel(
    src_keys: torch.Tensor, src_values: torch.Tensor, dst_keys: torch.Tensor, dst_values: torch.Tensor,
    src_block: torch.Tensor, dst_slot: torch.Tensor, count: torch.Tensor, block_size: int,
) -> None:
    """``hira.offload.block_cache.copy_blocks`` on CUDA: the same arguments (K and V contiguous; the lists may be
    slices)."""
    B, H, C, D = src_keys.shape
    K = src_block.shape[-1]
    block = block_size * D
    _copy_blocks_kernel[(B * H, K)](
        src_keys, src_values, dst_keys, dst_values, src_block.contiguous(), dst_slot.contiguous(), count.contiguous(),
        K, C * D, dst_keys.shape[2] * D,
        BLOCK=block, CHUNK=min(_CHUNK, triton.next_power_of_2(block)), num_warps=4,
    )


@triton.jit
def _read_key_blocks_kernel(
    storage, slots, block_slot, blocks, out,
    N, NB, SRC_HEAD, SLOT_HEAD,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    bh = tl.program_id(0)
    j = tl.program_id(1)
    block = tl.load(blocks + bh * N + j).to(tl.int64)
    slot = tl.load(block_slot + bh.to(tl.int64) * NB + block).to(tl.int64)
    resident = slot >= 0
    src = bh.to(tl.int64) * SRC_HEAD + block * BLOCK
    cached = bh.to(tl.int64) * SLOT_HEAD + tl.maximum(slot, 0) * BLOCK
    dst = (bh.to(tl.int64) * N + j) * BLOCK
    for i in tl.static_range(0, BLOCK, CHUNK):
        offs = i + tl.arange(0, CHUNK)
        inside = offs < BLOCK
        from_slot = tl.load(slots + cached + offs, mask=inside & resident)
        from_storage = tl.load(storage + src + offs, mask=inside & ~resident)
        tl.store(out + dst + offs, tl.where(resident, from_slot, from_storage), mask=inside)


def read_key_blocks_kernel(
    storage: torch.Tensor, slots: torch.Tensor, block_slot: torch.Tensor, blocks: torch.Tensor, block_size: int
) -> torch.Tensor:
    """``hira.offload.block_cache.read_key_blocks`` on CUDA: the same arguments (storage and slots contiguous)."""
    B, H, C, D = storage.shape
    N = blocks.shape[-1]
    out = storage.new_empty(B, H, N, block_size, D)
    block = block_size * D
    _read_key_blocks_kernel[(B * H, N)](
        storage, slots, block_slot.contiguous(), blocks.contiguous(), out,
        N, block_slot.shape[-1], C * D, slots.shape[2] * D,
        BLOCK=block, CHUNK=min(_CHUNK, triton.next_power_of_2(block)), num_warps=4,
    )
    return out
