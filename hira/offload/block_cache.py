"""The block cache: the GPU slots that hold the KV blocks a decode step reads when K and V live in the host tier.

With ``HiraConfig(offload=...)`` a layer's K and V storage is in host memory (``hira.offload.host``) and the rest of
the index (bounds, ranks, validity, the sketch) stays on the GPU, so the search is unchanged. Each decode step then
``fetch``-es its selection:

1. the kept blocks that are not resident are the misses;
2. each miss takes a free slot (one whose block this step does not keep), least recently read first, and is copied
   in from the host tier by one launch (``copy_blocks``);
3. the attention reads the kept blocks from their slots and, when the misses outnumber the free slots, the rest
   straight from the host tier (``host_keep``; ``hira.api.attend_rows`` merges both exactly): every selected
   block is read, only more slowly, whatever the cache's size.

Sinks and the recent window are kept at every step, so they stay resident. A decode step writes its new token to the
host tier (``append``) and, where its block is resident, to that slot (``write_newest``); the step's other reads of
whole blocks (the touched leaf's bounds, the top leaves' exact score) go through the cache too
(``cached_key_blocks``). Everything here has fixed shapes and no host sync: it runs inside the compiled,
graph-replayed decode step.

Shapes: B batch, H KV heads, NB storage blocks, M slots, BS block size, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hira.flex.mask import block_lists
from hira.index.index import HiraIndex, KeyBlocks, gather_blocks
from hira.kernels import cuda_kernels


@dataclass
class BlockCache:
    """One layer's block cache.

    Attributes:
        keys, values: [B, H, M·BS, D] the slots, in the storage's dtype, on its device.
        slot_block: [B, H, M] int32 the storage block each slot holds (-1: empty).
        block_slot: [B, H, NB] int32 the slot holding each storage block (-1: not resident).
        last_read: [B, H, M] int64 the step that last read each slot (-1: never).
        clock: [] int64 steps fetched so far.
        kept: [B, H] int32 blocks the last step kept.
        fetched: [B, H] int32 blocks the last step copied in from the host tier.
        from_host: [B, H] int32 kept blocks the last step read from the host tier directly (no free slot left).
    """

    keys: torch.Tensor
    values: torch.Tensor
    slot_block: torch.Tensor
    block_slot: torch.Tensor
    last_read: torch.Tensor
    clock: torch.Tensor
    kept: torch.Tensor
    fetched: torch.Tensor
    from_host: torch.Tensor

    @property
    def slots(self) -> int:
        return self.slot_block.shape[-1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.keys, self.values, self.slot_block, self.block_slot, self.last_read, self.clock, self.kept,
                self.fetched, self.from_host)

    def clear(self) -> None:
        """Empty every slot (after the storage changed under the cache, e.g. a prefill)."""
        for t in (self.slot_block, self.block_slot, self.last_read):
            t.fill_(-1)
        for t in (self.clock, self.kept, self.fetched, self.from_host):
            t.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def new_block_cache(index: HiraIndex, slots: int) -> BlockCache:
    """An empty cache of ``slots`` blocks per batch row and KV head for ``index``, on its storage's device."""
    B, H, _, D = index.keys.shape
    BS = index.block_size
    dev = index.keys.device
    kv = torch.zeros(B, H, slots * BS, D, dtype=index.keys.dtype, device=dev)
    cache = BlockCache(
        keys=kv,
        values=torch.zeros_like(kv),
        slot_block=torch.empty(B, H, slots, dtype=torch.int32, device=dev),
        block_slot=torch.empty(B, H, index.num_leaves, dtype=torch.int32, device=dev),
        last_read=torch.empty(B, H, slots, dtype=torch.int64, device=dev),
        clock=torch.zeros((), dtype=torch.int64, device=dev),
        kept=torch.zeros(B, H, dtype=torch.int32, device=dev),
        fetched=torch.zeros(B, H, dtype=torch.int32, device=dev),
        from_host=torch.zeros(B, H, dtype=torch.int32, device=dev),
    )
    cache.clear()
    return cache


@torch.library.custom_op("hira::copy_blocks", mutates_args=("dst_keys", "dst_values"))
def copy_blocks(
    src_keys: torch.Tensor, src_values: torch.Tensor, dst_keys: torch.Tensor, dst_values: torch.Tensor,
    src_block: torch.Tensor, dst_slot: torch.Tensor, count: torch.Tensor, block_size: int,
) -> None:
    """Copy, per batch row and KV head, the first ``count`` blocks of the list: storage block ``src_block[j]`` of
    src into slot ``dst_slot[j]`` of dst, K and V.

    Args:
        src_keys, src_values: [B, H, C, D] the storage; dst_keys, dst_values: [B, H, M·BS, D] the slots.
        src_block, dst_slot: [B, H, L] int32; count: [B, H] int32 (≤ L).
    """
    if dst_keys.is_cuda and _KERNELS is not None:
        kernel = _KERNELS.copy_blocks_kernel
        kernel(src_keys, src_values, dst_keys, dst_values, src_block, dst_slot, count, block_size)
        return
    copy_blocks_reference(src_keys, src_values, dst_keys, dst_values, src_block, dst_slot, count, block_size)


@copy_blocks.register_fake
def _(src_keys, src_values, dst_keys, dst_values, src_block, dst_slot, count, block_size):
    return None


def copy_blocks_reference(src_keys, src_values, dst_keys, dst_values, src_block, dst_slot, count, block_size) -> None:
    """``copy_blocks`` as a tensor program (the CPU path, and the kernel's reference)."""
    L = src_block.shape[-1]
    b, h, j = (torch.arange(L, device=count.device) < count[..., None]).nonzero(as_tuple=True)
    within = torch.arange(block_size, device=count.device)
    src = src_block[b, h, j].long()[:, None] * block_size + within  # [n, BS]
    dst = dst_slot[b, h, j].long()[:, None] * block_size + within
    b, h = b[:, None], h[:, None]
    dst_keys[b, h, dst] = src_keys[b, h, src]
    dst_values[b, h, dst] = src_values[b, h, src]


def write_newest(index: HiraIndex, cache: BlockCache, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write the token about to be appended (at storage slot ``next_slot``; k, v [B, H, 1, D]) into its block's
    slot where that block is resident, so that the cache stays equal to the storage once ``append`` has written it
    there too. Where it is not, the slots are left unchanged. Before the append, so that the append's read of the
    touched leaf (``cached_key_blocks``) finds the token in the cache."""
    _write_newest(cache.keys, cache.values, cache.block_slot, index.next_slot, k, v, index.block_size)


@torch.library.custom_op("hira::write_newest", mutates_args=("keys", "values"))
def _write_newest(keys: torch.Tensor, values: torch.Tensor, block_slot: torch.Tensor, next_slot: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, block_size: int) -> None:
    """``write_newest`` as an opaque operator: traced as plain ops, its in-place scatter became a copy of the whole
    slots (K and V) and a copy back, at every step (~0.75 ms per layer at 128K, batch 32; benchmarks/NOTES.md §20).
    Inside, the scatter writes B·H rows in place."""
    B, H, _, D = k.shape
    slot = block_slot.index_select(2, (next_slot // block_size).view(1))  # [B, H, 1]
    at = (slot.clamp_min(0).long() * block_size + next_slot % block_size)[..., None].expand(B, H, 1, D)
    resident = (slot >= 0)[..., None]  # [B, H, 1, 1]
    for new, dst in ((k, keys), (v, values)):
        dst.scatter_(2, at, torch.where(resident, new.to(dst.dtype), dst.gather(2, at)))


@_write_newest.register_fake
def _(keys, values, block_slot, next_slot, k, v, block_size):
    return None


def cached_key_blocks(index: HiraIndex, cache: BlockCache) -> KeyBlocks:
    """The ``KeyBlocks`` of an index whose K and V are in the host tier: resident blocks read from ``cache``'s
    slots, the others from the host tier (the decode step's reads of whole leaves outside the attention: the top
    leaves' exact score and the touched leaf's bounds, which would otherwise cross PCIe at every step)."""
    return lambda blocks: read_key_blocks(index.keys, cache.keys, cache.block_slot, blocks, index.block_size)


@torch.library.custom_op("hira::read_key_blocks", mutates_args=())
def read_key_blocks(
    storage: torch.Tensor, slots: torch.Tensor, block_slot: torch.Tensor, blocks: torch.Tensor, block_size: int
) -> torch.Tensor:
    """The keys of storage blocks [B, H, n] (int32 or int64): [B, H, n, BS, D], each read from its slot in the cache
    where resident (``block_slot`` ≥ 0), else from ``storage`` [B, H, C, D]. On CUDA one Triton launch whose loads
    are masked, so a resident block reads no host memory."""
    if slots.is_cuda and _KERNELS is not None:
        return _KERNELS.read_key_blocks_kernel(storage, slots, block_slot, blocks, block_size)
    return read_key_blocks_reference(storage, slots, block_slot, blocks, block_size)


@read_key_blocks.register_fake
def _(storage, slots, block_slot, blocks, block_size):
    B, H, n = blocks.shape
    return storage.new_empty(B, H, n, block_size, storage.shape[-1])


def read_key_blocks_reference(storage, slots, block_slot, blocks, block_size) -> torch.Tensor:
    """``read_key_blocks`` as a tensor program (the CPU path, and the kernel's reference)."""
    slot = block_slot.gather(2, blocks.long())  # [B, H, n]
    return torch.where((slot >= 0)[..., None, None], gather_blocks(slots, slot.clamp_min(0), block_size),
                       gather_blocks(storage, blocks, block_size))


def fetch(cache: BlockCache, keep: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_size: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring the kept blocks into the cache (in place) and say where each is read.

    Args:
        keep: [B, H, NB] bool the step's selection.
        keys, values: [B, H, C, D] the storage (the host tier), in blocks of ``block_size`` slots.
    Returns:
        slot_keep [B, H, M] bool: slots holding a kept block (read from the cache);
        host_keep [B, H, NB] bool: kept blocks left without a slot (read from the host tier).
    """
    NB = keep.shape[-1]
    M = cache.slots
    wanted = _slots_kept(cache, keep)  # [B, H, M] slots this step reads
    miss = keep & (cache.block_slot < 0)  # [B, H, NB]
    # Free slots, least recently read first (empty slots read at -1, first); slots still wanted sort last.
    age = cache.last_read.masked_fill(wanted, torch.iinfo(torch.int64).max)
    lru = age.argsort(dim=-1, stable=True).to(torch.int32)  # [B, H, M]
    L = min(M, NB)
    n_miss, missing = block_lists(miss)  # [B, H], [B, H, NB] missing blocks first, ascending
    count = torch.minimum(n_miss, (~wanted).sum(-1, dtype=torch.int32))  # [B, H] blocks placed
    src, dst = missing[..., :L], lru[..., :L]  # [B, H, L] the j-th placed block and its slot
    placed = torch.arange(L, device=keep.device) < count[..., None]
    # Residency tables, with one spare entry at the end that the unplaced entries write to.
    evicted = cache.slot_block.gather(2, dst.long())  # [B, H, L] blocks losing their slot
    block_slot = F.pad(cache.block_slot, (0, 1), value=-1)
    block_slot.scatter_(2, torch.where(placed & (evicted >= 0), evicted, NB).long(), -1)
    block_slot.scatter_(2, torch.where(placed, src, NB).long(), dst)
    slot_block = F.pad(cache.slot_block, (0, 1), value=-1)
    slot_block.scatter_(2, torch.where(placed, dst, M).long(), src)
    cache.block_slot.copy_(block_slot[..., :NB])
    cache.slot_block.copy_(slot_block[..., :M])
    copy_blocks(keys, values, cache.keys, cache.values, src, dst, count, block_size)

    slot_keep = _slots_kept(cache, keep)
    host_keep = keep & (cache.block_slot < 0)
    cache.last_read.copy_(torch.where(slot_keep, cache.clock, cache.last_read))
    cache.clock.add_(1)
    cache.kept.copy_(keep.sum(-1, dtype=torch.int32))
    cache.fetched.copy_(count)
    cache.from_host.copy_(host_keep.sum(-1, dtype=torch.int32))
    return slot_keep, host_keep


def _slots_kept(cache: BlockCache, keep: torch.Tensor) -> torch.Tensor:
    """[B, H, M] bool: the slots holding a block of the selection ``keep`` [B, H, NB]."""
    return keep.gather(2, cache.slot_block.clamp_min(0).long()) & (cache.slot_block >= 0)


_KERNELS = cuda_kernels("hira.offload.copy_kernel")
