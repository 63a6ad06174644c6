"""From a search result (or a prefill chunk's causality) to a FlexAttention BlockMask over the index storage.

The G query heads of a KV group are folded into the query axis (q as [B, Hkv, G·S, D]) and the mask has one head
per KV head: FlexAttention's decode kernel needs that layout to split the KV axis (DESIGN.md §1). Selected blocks
are passed as partial blocks (the decode kernel balances its work over ``kv_num_blocks`` only then) with a mask_mod
that drops padding slots and restates the selection, so that eager flex_attention is exact too.

Shapes: B batch, H KV heads, R query rows (G·S), NB leaves, C capacity.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from hira.kernels import cuda_kernels

# FlexAttention's GPU kernels need a query block of 128 with GQA folded into the query axis (DESIGN.md §3).
Q_BLOCK_SIZE = 128


# Past this many blocks, inductor (torch 2.11, CUDA) failed to compile a prefix sum along the blocks that feeds a
# scatter (8,193 to 16,384 measured, benchmarks/NOTES.md §18): code with that pattern takes another form there.
MAX_SCAN_BLOCKS = 8192


def block_lists(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's block lists of a keep table [..., NB] bool: (count [...] int32, indices [..., NB] int32:
    the kept blocks first in ascending order, then the others), by a stable compaction through prefix sums (no
    sort), or a stable sort past ``MAX_SCAN_BLOCKS``. On CUDA one Triton launch (``hira.flex.lists_kernel``)."""
    if keep.is_cuda and _KERNELS is not None:
        return _KERNELS.block_lists_kernel(keep)
    num = keep.sum(-1, dtype=torch.int32)
    if keep.shape[-1] > MAX_SCAN_BLOCKS:
        return num, torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    kept_pos = keep.cumsum(-1) - 1
    rest_pos = num[..., None] + (~keep).cumsum(-1) - 1
    slot = torch.where(keep, kept_pos, rest_pos)  # destination of each block
    ids = torch.arange(keep.shape[-1], device=keep.device, dtype=torch.int32).expand_as(slot)
    return num, torch.empty_like(ids).scatter_(-1, slot, ids)


def selected_slots_mask(
    valid: torch.Tensor, keep: torch.Tensor, block_size: int, slot_block: torch.Tensor | None = None
):
    """mask_mod reading a slot iff it holds a real token and its block was kept.

    The block lists already restrict compiled flex_attention to the kept blocks; stating them in the mask_mod too
    keeps eager flex_attention (which ignores block lists, DESIGN.md §3) exact, e.g. past a recompile limit.

    valid: [B, C] bool real-token slots of the storage; keep: [B, H, M] bool kept blocks of the tensor read. That
    tensor is the storage itself (M = NB), or, given ``slot_block`` [B, H, M] int32 (the storage block each of its
    M blocks holds, -1: none), a block cache (``hira.offload.block_cache``) whose tokens' validity is read through
    it. All are read at call time, not copied.
    """
    if slot_block is None:

        def hira_selected_slots(b, h, q_idx, kv_idx):
            return valid[b, kv_idx] & keep[b, h, kv_idx // block_size]

        return hira_selected_slots

    def hira_cached_slots(b, h, q_idx, kv_idx):
        block = slot_block[b, h, kv_idx // block_size].clamp_min(0)
        return valid[b, block * block_size + kv_idx % block_size] & keep[b, h, kv_idx // block_size]

    return hira_cached_slots


def selection_block_mask(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    keep: torch.Tensor,
    valid: torch.Tensor,
    block_size: int,
    num_rows: int,
    slot_block: torch.Tensor | None = None,
) -> BlockMask:
    """BlockMask reading the selected blocks for every query row.

    Args:
        kv_num_blocks: [B, H, 1] int32 blocks kept per KV head.
        kv_indices: [B, H, 1, M] int32 their indices first.
        keep: [B, H, M] bool the same selection as a table.
        valid: [B, C] bool real-token slots of the storage.
        block_size: KV block size BS (the tensor read holds M·BS slots).
        num_rows: R query rows per KV head.
        slot_block: None when the tensor read is the storage (M = NB, C = NB·BS); for a block cache, [B, H, M]
            int32 the storage block each cache block holds (``selected_slots_mask``).
    """
    q_blocks = -(-num_rows // Q_BLOCK_SIZE)
    B, H, _, M = kv_indices.shape
    num = kv_num_blocks.expand(B, H, q_blocks).contiguous()
    idx = kv_indices.expand(B, H, q_blocks, M).contiguous()
    # Empty full-block lists: the CPU decode template needs them present (DESIGN.md §3). On CUDA any full-block
    # list, even empty, makes the decode kernel size its KV splits by the context instead of the kept blocks
    # (measured 6.4x slower at 128K, 5% kept: benchmarks/NOTES.md), so there they are left out.
    full_num, full_idx = (None, None) if num.is_cuda else (torch.zeros_like(num), torch.zeros_like(idx))
    return BlockMask.from_kv_blocks(
        num,
        idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(Q_BLOCK_SIZE, block_size),
        mask_mod=selected_slots_mask(valid, keep, block_size, slot_block),
        seq_lengths=(num_rows, M * block_size),
        compute_q_blocks=False,
    )


def chunk_causal_mask(rank: torch.Tensor, q_rank: torch.Tensor):
    """mask_mod of query rows over the permuted storage, causal by position rank: a row reads the real slots whose
    token is not after its own.

    rank: [B, H, C] int32 each slot's position rank among its row's real tokens (-1: empty slot);
    q_rank: [B, R] int64 the rank of each query row's token.
    """

    def hira_chunk_causal(b, h, q_idx, kv_idx):
        r = rank[b, h, kv_idx]
        return (r >= 0) & (r <= q_rank[b, q_idx])

    return hira_chunk_causal


def chunk_block_mask(
    rank: torch.Tensor, leaf_first: torch.Tensor, leaf_last: torch.Tensor, count: torch.Tensor, q_rank: torch.Tensor,
    block_size: int,
) -> BlockMask:
    """BlockMask for a prefill chunk's query rows over the index storage, from block-level rank ranges: no
    [R, C] mask is materialised, only [B, H, R/128, NB] block lists.

    A leaf is full for a query block when all its slots hold tokens no later than the block's earliest row, partial
    (read through ``chunk_causal_mask``) when its earliest token is no later than the block's latest row.

    Args:
        rank: [B, H, C] int32 slot ranks (-1: empty); leaf_first, leaf_last: [B, H, NB] int32 min and max rank of
            each leaf (-1 for empty leaves); count: [B, H, NB] real tokens per leaf.
        q_rank: [B, R] int64 query rows' ranks (R = G·S folded rows).
        block_size: KV block size BS (C = NB·BS).
    """
    B, R = q_rank.shape
    q_blocks = -(-R // Q_BLOCK_SIZE)
    pad = q_blocks * Q_BLOCK_SIZE - R
    by_block = torch.nn.functional.pad(q_rank, (0, pad), value=-1).view(B, q_blocks, Q_BLOCK_SIZE)
    q_max = by_block.amax(-1)  # [B, QB]
    q_min = torch.nn.functional.pad(q_rank, (0, pad), value=torch.iinfo(torch.int64).max).view(B, q_blocks, -1).amin(-1)
    first, last = leaf_first[:, :, None, :], leaf_last[:, :, None, :]  # [B, H, 1, NB]
    live = last >= 0
    full = live & (count[:, :, None, :] == block_size) & (last <= q_min[:, None, :, None])  # [B, H, QB, NB]
    partial = live & (first <= q_max[:, None, :, None]) & ~full
    num, idx = block_lists(partial)
    full_num, full_idx = block_lists(full)
    return BlockMask.from_kv_blocks(
        num, idx, full_num, full_idx,
        BLOCK_SIZE=(Q_BLOCK_SIZE, block_size),
        mask_mod=chunk_causal_mask(rank, q_rank),
        seq_lengths=(R, rank.shape[-1]),
    )


_KERNELS = cuda_kernels("hira.flex.lists_kernel")
