"""From a search result to a FlexAttention BlockMask over the index storage.

The G query heads of a KV group are folded into the query axis (q as [B, Hkv, G·S, D]) and the mask has one head
per KV head: FlexAttention's decode kernel needs that layout to split the KV axis (DESIGN.md §1). Selected blocks
are passed as partial blocks (the decode kernel balances its work over ``kv_num_blocks`` only then) with a mask_mod
that drops padding slots and restates the selection, so that eager flex_attention is exact too.

Shapes: B batch, H KV heads, R query rows (G·S), NB leaves, C capacity.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

# FlexAttention's GPU kernels need a query block of 128 with GQA folded into the query axis (DESIGN.md §3).
Q_BLOCK_SIZE = 128


def selected_slots_mask(valid: torch.Tensor, keep: torch.Tensor, block_size: int):
    """mask_mod reading a slot iff it holds a real token and its block was kept.

    The block lists already restrict compiled flex_attention to the kept blocks; stating them in the mask_mod too
    keeps eager flex_attention (which ignores block lists, DESIGN.md §3) exact, e.g. past a recompile limit.

    valid: [B, C] bool; keep: [B, H, NB] bool. Both are read at call time, not copied.
    """

    def hira_selected_slots(b, h, q_idx, kv_idx):
        return valid[b, kv_idx] & keep[b, h, kv_idx // block_size]

    return hira_selected_slots


def selection_block_mask(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    keep: torch.Tensor,
    valid: torch.Tensor,
    block_size: int,
    num_rows: int,
) -> BlockMask:
    """BlockMask reading the selected blocks for every query row.

    Args:
        kv_num_blocks: [B, H, 1] int32 blocks kept per KV head.
        kv_indices: [B, H, 1, NB] int32 their indices first.
        keep: [B, H, NB] bool the same selection as a table.
        valid: [B, C] bool real-token slots.
        block_size: KV block size BS (C = NB·BS).
        num_rows: R query rows per KV head.
    """
    q_blocks = -(-num_rows // Q_BLOCK_SIZE)
    B, H, _, NB = kv_indices.shape
    num = kv_num_blocks.expand(B, H, q_blocks).contiguous()
    idx = kv_indices.expand(B, H, q_blocks, NB).contiguous()
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
        mask_mod=selected_slots_mask(valid, keep, block_size),
        seq_lengths=(num_rows, valid.shape[-1]),
        compute_q_blocks=False,
    )
