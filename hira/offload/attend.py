"""A decode step's attention through the block cache, as one opaque operator: fetch the selection, attend over the
kept blocks in their slots and over those left in host memory, merge the two exactly.

Opaque (``torch.library.custom_op``) so that inductor compiles the step around it, not into it: compiled into the
step, this code met two inductor lowering errors on CUDA (torch 2.11; benchmarks/NOTES.md §18). Inside, on CUDA,
the body is compiled as a region of its own (1.32× dense at 1M against 1.10× run eagerly, NOTES §19); on the CPU it
runs as it is, its flex_attention calls the process-wide compiled one. All device work without a host sync, so the
step stays capturable in a CUDA graph.
"""

from __future__ import annotations

import torch

from hira.flex.attention import merge_partials, selected_attention
from hira.flex.mask import block_lists
from hira.index.index import block_slots
from hira.offload.block_cache import BlockCache, fetch


def attend_offloaded(
    rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, cache: BlockCache,
    keep: torch.Tensor, scale: float, block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query rows [B, H, R, D] over the kept blocks [B, H, NB] of the storage ``keys``/``values``
    [B, H, C, D] (in the host tier, real slots ``valid`` [B, C]) through ``cache``: (out [B, H, R, D], lse
    [B, H, R] float32). The cache is updated in place (``fetch``)."""
    return _attend_offloaded(rows, keys, values, valid, list(cache.tensors()), keep, scale, block_size)


@torch.library.custom_op("hira::attend_offloaded", mutates_args=("cache",))
def _attend_offloaded(
    rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, cache: list[torch.Tensor],
    keep: torch.Tensor, scale: float, block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    body = _COMPILED_BODY if rows.is_cuda else _body
    return body(rows, keys, values, valid, cache, keep, scale, block_size)


def _body(rows, keys, values, valid, cache, keep, scale, block_size):
    slots = BlockCache(*cache)
    slot_keep, host_keep = fetch(slots, keep, keys, values, block_size)
    BS = block_size
    num, idx = block_lists(slot_keep)
    # Only the CPU path reads the slots' validity (for the LSE): gathered there alone.
    slot_valid = None if rows.is_cuda else valid[:, None, :].expand(*slots.slot_block.shape[:2], -1).gather(
        2, block_slots(slots.slot_block.clamp_min(0), BS))
    out, lse = selected_attention(rows, slots.keys, slots.values, num[..., None], idx[:, :, None], slot_keep, valid,
                                  BS, scale, slots.slot_block, slot_valid)
    num, idx = block_lists(host_keep)
    out_h, lse_h = selected_attention(rows, keys, values, num[..., None], idx[:, :, None], host_keep, valid, BS, scale)
    return merge_partials(out, lse, out_h, lse_h)


@_attend_offloaded.register_fake
def _(rows, keys, values, valid, cache, keep, scale, block_size):
    return torch.empty_like(rows), rows.new_empty(rows.shape[:3], dtype=torch.float32)


# On CUDA the operator's body is compiled as a region of its own (its pieces compiled alone on the H200; inside the
# step they did not). On the CPU compiled flex_attention in one graph with the BlockMask's construction returns wrong
# values (hira.step), so the body runs as it is there.
_COMPILED_BODY = torch.compile(_body, fullgraph=True, dynamic=False)
