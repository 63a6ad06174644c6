"""The index of one layer's keys: storage in cluster order, and a tree of bounds over fixed-size blocks.

Storage layout per (batch row, KV head), in slots of a fixed capacity C (a multiple of the block size BS):

    [ clustered middle tokens | sink tokens | recent-window tokens | invalid ] [ appended tokens ... ] [ free ]
    '------------------- built by build_index (ceil(N / BS) blocks) ---------' '-- append(), position order --'

The clustered tokens come first so that the clustering's leaves (runs of BS tokens) are exactly the storage blocks;
the sinks and the window (always read) share the last of those blocks.

Every run of BS slots is a block, a leaf of the index, with exact bounds over its real members. Upper levels group
``branching`` consecutive nodes. Attention is permutation-invariant over keys once RoPE is applied, so storing keys
permuted changes nothing but which keys share a block.

Every tensor has a fixed shape set by the capacity: appending a token changes contents, never shapes, so a decode
step can be compiled once and replayed from a CUDA graph.

Shapes: B batch, H KV heads, N keys given to build, C capacity in slots, NB = C / BS leaves, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hira.index.bounds import NodeBounds, members_bounds, parent_bounds
from hira.index.cluster import kmeans_rank, pca_tree_rank, position_rank
from hira.index.sketch import KeySketch, build_sketch, quantize_blocks, write_blocks


@dataclass
class HiraIndex:
    """A layer's KV storage and its bound tree. Build it with ``build_index``; grow it with ``append``.

    Attributes:
        keys, values: [B, H, C, D] storage in index order (model dtype).
        valid: [B, C] bool, True where a slot holds a real token (the same slots in every head).
        rank: [B, H, C] int32, the token's position among its row's real tokens (-1 in invalid slots).
        levels: bounds per level; ``levels[0]`` are the NB leaves, the last level has at most ``branching`` nodes.
        leaf_first, leaf_last: [B, H, NB] int32 min and max rank of each leaf's members (-1 for empty leaves).
        n_valid: [B] int64 real tokens per row.
        next_slot: [] int64 first free slot (the same for all rows).
        spread_weight: [B, H] float32 weight of the leaves' spread in the budgeted modes' mass estimate
            (``hira.index.bounds.bound_and_estimate``): 1 when built, chosen per head at prefill by
            ``hira.selection.calibrate``.
        block_size, branching, sink_tokens, window_tokens: static settings.
        sketch: the int4 key sketch (per-key score intervals, ``hira.index.sketch``), or None.
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    rank: torch.Tensor
    levels: list[NodeBounds]
    leaf_first: torch.Tensor
    leaf_last: torch.Tensor
    n_valid: torch.Tensor
    next_slot: torch.Tensor
    spread_weight: torch.Tensor
    block_size: int
    branching: int
    sink_tokens: int
    window_tokens: int
    sketch: KeySketch | None = None

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def num_leaves(self) -> int:
        return self.keys.shape[2] // self.block_size

    def forced_leaves(self) -> torch.Tensor:
        """[B, H, NB] bool: leaves always read, holding an attention sink or a token of the recent window."""
        live = self.levels[0].count > 0
        sink = self.leaf_first < self.sink_tokens
        recent = self.leaf_last >= (self.n_valid - self.window_tokens)[:, None, None]
        return live & (sink | recent)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor of the index, in a fixed order; ``append`` mutates them in place."""
        levels = tuple(t for lv in self.levels for t in lv.tensors())
        sketch = self.sketch.tensors() if self.sketch is not None else ()
        head = (self.keys, self.values, self.valid, self.rank)
        rest = (self.leaf_first, self.leaf_last, self.n_valid, self.next_slot, self.spread_weight)
        return head + levels + rest + sketch

    def index_nbytes(self) -> int:
        """Bytes of the index beyond K and V themselves (bounds, ranks, validity, the sketch)."""
        extra = (self.valid, self.rank, self.leaf_first, self.leaf_last)
        sketch = self.sketch.nbytes() if self.sketch is not None else 0
        return sum(lv.nbytes() for lv in self.levels) + sum(t.numel() * t.element_size() for t in extra) + sketch

    def kv_nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


def _cluster_rank(keys, eligible, block_size, clustering, kmeans_iters) -> torch.Tensor:
    if clustering == "pca":
        return pca_tree_rank(keys, eligible, block_size)
    if clustering == "kmeans":
        return kmeans_rank(keys, eligible, block_size, kmeans_iters)
    return position_rank(eligible)


def _storage_bounds(keys: torch.Tensor, valid: torch.Tensor, block_size: int, branching: int, key_sketch: bool):
    """Every level's bounds (and the key sketch, or None) of a storage: keys [B, H, C, D] in block order, valid
    [B, C] real slots."""
    B, H, C, D = keys.shape
    NB = C // block_size
    leaves = members_bounds(keys.view(B, H, NB, block_size, D), valid.view(B, 1, NB, block_size))
    sketch = build_sketch(keys, valid, block_size) if key_sketch else None
    return _build_levels(leaves, branching), sketch


def _build_levels(leaves: NodeBounds, branching: int) -> list[NodeBounds]:
    levels = [leaves]
    while levels[-1].count.shape[-1] > branching:
        levels.append(parent_bounds(levels[-1], branching))
    return levels


def _leaf_rank_range(rank: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rank: [B, H, L*BS] -> min and max valid rank per leaf, [B, H, L] int32 each (-1 where empty)."""
    r = rank.view(*rank.shape[:2], -1, block_size)
    big = torch.iinfo(torch.int32).max
    first = r.masked_fill(r < 0, big).amin(-1)
    last = r.amax(-1)
    return first.masked_fill(first == big, -1), last


def build_index(
    keys: torch.Tensor,
    values: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    block_size: int = 128,
    branching: int = 8,
    clustering: str = "pca",
    kmeans_iters: int = 4,
    sink_tokens: int = 4,
    window_tokens: int = 256,
    capacity: int | None = None,
    key_sketch: bool = False,
) -> HiraIndex:
    """Cluster a layer's keys into blocks, store K and V in that order, and compute the bound tree.

    No input validation here (``hira.build_index`` validates): this is the tensor program, compile-able with
    ``fullgraph=True``.

    Args:
        keys, values: [B, H, N, D] post-RoPE keys and their values.
        key_mask: [B, N] bool, True for real tokens (False: padding). None: all real.
        capacity: slots to allocate (rounded up to whole blocks); at least the ceil(N / BS) blocks the build
            fills. Slots after them take appended tokens.
        key_sketch: also keep the int4 key sketch (``hira.index.sketch``).
    """
    B, H, N, D = keys.shape
    BS = block_size
    built = -(-N // BS) * BS
    C = max(built, -(-(capacity or 0) // BS) * BS)
    dev = keys.device
    valid = torch.ones(B, N, dtype=torch.bool, device=dev) if key_mask is None else key_mask.to(torch.bool)

    # Sections: 0 middle (clustered, starts at slot 0 so its leaves are blocks), 1 sink, 2 recent window, 3 padding.
    # Ranks count real tokens only.
    rank = valid.cumsum(1) - 1  # [B, N]
    n_valid = valid.sum(1)  # [B]
    section = torch.zeros(B, N, dtype=torch.int64, device=dev)
    section = torch.where(rank >= n_valid[:, None] - window_tokens, 2, section)
    section = torch.where(rank < sink_tokens, 1, section)
    section = torch.where(valid, section, 3)
    middle = (section == 0)[:, None, :].expand(B, H, N)  # [B, H, N]
    crank = _cluster_rank(keys, middle, BS, clustering, kmeans_iters)  # [B, H, N]
    pos = torch.arange(N, device=dev)
    within = torch.where(middle, crank, pos.expand(B, H, N))
    order = (section[:, None, :] * N + within).argsort(dim=-1)  # [B, H, N] storage slot -> token

    gather = order[..., None].expand(B, H, N, D)
    k_store = keys.new_zeros(B, H, C, D)
    v_store = values.new_zeros(B, H, C, D)
    k_store[:, :, :N] = torch.gather(keys, 2, gather)
    v_store[:, :, :N] = torch.gather(values, 2, gather)
    slot_valid = torch.zeros(B, C, dtype=torch.bool, device=dev)
    slot_valid[:, :N] = torch.arange(N, device=dev) < n_valid[:, None]  # padding sorts last in every head
    slot_rank = torch.full((B, H, C), -1, dtype=torch.int32, device=dev)
    slot_rank[:, :, :N] = torch.gather(rank[:, None, :].expand(B, H, N), 2, order).to(torch.int32)
    slot_rank = slot_rank.masked_fill(~slot_valid[:, None, :], -1)

    levels, sketch = _storage_bounds(k_store, slot_valid, BS, branching, key_sketch)
    first, last = _leaf_rank_range(slot_rank, BS)
    return HiraIndex(
        keys=k_store,
        values=v_store,
        valid=slot_valid,
        rank=slot_rank,
        levels=levels,
        leaf_first=first,
        leaf_last=last,
        n_valid=n_valid,
        next_slot=torch.tensor(built, dtype=torch.int64, device=dev),
        spread_weight=torch.ones(B, H, device=dev),
        block_size=BS,
        branching=branching,
        sink_tokens=sink_tokens,
        window_tokens=window_tokens,
        sketch=sketch,
    )


def _select_nodes(nodes: NodeBounds, idx: torch.Tensor) -> NodeBounds:
    """Nodes at positions idx [n] (out-of-range positions read as empty nodes)."""
    M = nodes.count.shape[-1]
    picked = NodeBounds(*(t.index_select(2, idx.clamp_max(M - 1)) for t in nodes.tensors()))
    picked.count = picked.count.masked_fill(~(idx < M), 0)
    return picked


def _write_nodes(nodes: NodeBounds, idx: torch.Tensor, new: NodeBounds) -> None:
    for dst, src in zip(nodes.tensors(), new.tensors()):
        dst.index_copy_(2, idx, src)


def check_room(index: HiraIndex, n: int) -> None:
    """Raise unless ``n`` more tokens fit the index (one host read: not for a compiled step)."""
    used = int(index.next_slot)
    if used + n > index.capacity:
        raise ValueError(
            f"the Hira index is full: capacity {index.capacity} slots, {used} used, {n} more asked; "
            "build it with a larger capacity (HiraConfig.max_cache_len for a model)"
        )


# Reads the keys of storage blocks [B, H, n] (one list per batch row and KV head): [B, H, n, BS, D]. The default
# reads the storage (``storage_key_blocks``); with K and V in the host tier, the block cache reads resident blocks
# from its slots instead (``hira.offload.block_cache.cached_key_blocks``).
KeyBlocks = Callable[[torch.Tensor], torch.Tensor]


def block_slots(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """The slots of blocks [..., n] (any integer dtype), each block's ``block_size`` slots in order: [..., n·BS]
    int64."""
    return (blocks.long()[..., None] * block_size + torch.arange(block_size, device=blocks.device)).flatten(-2)


def gather_blocks(t: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks [B, H, n] of ``t`` [B, H, C, D] (storage or block-cache slots): [B, H, n, BS, D]."""
    B, H, _, D = t.shape
    slots = block_slots(blocks, block_size)  # [B, H, n·BS]
    return torch.gather(t, 2, slots[..., None].expand(B, H, slots.shape[-1], D)).view(B, H, -1, block_size, D)


def storage_key_blocks(index: HiraIndex, blocks: torch.Tensor) -> torch.Tensor:
    """The keys of storage blocks [B, H, n] of ``index``: [B, H, n, BS, D] (a ``KeyBlocks`` with the index bound)."""
    return gather_blocks(index.keys, blocks, index.block_size)


def append(
    index: HiraIndex, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor | None = None,
    bounds: bool = True, key_blocks: KeyBlocks | None = None,
) -> None:
    """Append S new tokens (the same S for every row) in position order, updating the leaves they touch.

    In place, fixed shapes, no host sync under torch.compile. Outside compile it checks the capacity (one host read).

    Args:
        keys, values: [B, H, S, D].
        key_mask: [B, S] bool, None: all real.
        bounds: keep everything derived from the storage exact: the leaves' counts, rank ranges and bounds (and
            the sketch) where the new tokens land, and their ancestors. False, for a dense read that uses none of
            it, writes the storage, validity, ranks and ``n_valid`` alone (a few kernels per step): the
            derived tensors are stale until ``refresh_bounds``.
        key_blocks: reads the touched leaves' keys back (after the new ones are written); default the storage.
    """
    B, H, S, D = keys.shape
    if not torch.compiler.is_compiling():
        check_room(index, S)
    dev = keys.device
    valid = torch.ones(B, S, dtype=torch.bool, device=dev) if key_mask is None else key_mask.to(torch.bool)
    slots = index.next_slot + torch.arange(S, device=dev)  # [S]
    index.keys.index_copy_(2, slots, keys)
    index.values.index_copy_(2, slots, values)
    index.valid.index_copy_(1, slots, valid)
    rank = (index.n_valid[:, None] + valid.cumsum(1) - 1).to(torch.int32).masked_fill(~valid, -1)  # [B, S]
    index.rank.index_copy_(2, slots, rank[:, None, :].expand(B, H, S).contiguous())
    index.n_valid.add_(valid.sum(1))

    if bounds:
        _update_touched_leaves(index, S, key_blocks)
    index.next_slot.add_(S)


def _update_touched_leaves(index: HiraIndex, S: int, key_blocks: KeyBlocks | None = None) -> None:
    """Recompute the leaves the S tokens just written at ``next_slot`` fall in, from their members (count, rank
    range, bounds, sketch; the members' keys read by ``key_blocks``, default the storage), then their ancestors
    from their children."""
    B, H, C, D = index.keys.shape
    BS = index.block_size
    NB = index.num_leaves
    dev = index.keys.device
    n_touched = (S + BS - 1) // BS + 1
    leaves = (index.next_slot // BS + torch.arange(n_touched, device=dev)).clamp_max(NB - 1)  # [n]
    member_valid = index.valid.view(B, 1, NB, BS).index_select(2, leaves)
    first, last = _leaf_rank_range(index.rank.view(B, H, NB, BS).index_select(2, leaves).flatten(2), BS)
    index.leaf_first.index_copy_(2, leaves, first)
    index.leaf_last.index_copy_(2, leaves, last)
    read = key_blocks if key_blocks is not None else lambda blocks: storage_key_blocks(index, blocks)
    members = read(leaves.expand(B, H, n_touched))  # [B, H, n, BS, D]
    _write_nodes(index.levels[0], leaves, members_bounds(members, member_valid))
    if index.sketch is not None:
        write_blocks(index.sketch, leaves, quantize_blocks(members, member_valid), BS)
    b = index.branching
    nodes = leaves
    for lvl in range(1, len(index.levels)):
        nodes = nodes // b
        children = (nodes[:, None] * b + torch.arange(b, device=dev)).flatten()  # [n * b]
        fresh = parent_bounds(_select_nodes(index.levels[lvl - 1], children), b)  # [B, H, n]
        _write_nodes(index.levels[lvl], nodes, fresh)


def refresh_bounds(index: HiraIndex) -> None:
    """Recompute everything derived from the storage, in place: every level's bounds (the leaves' counts
    included), the leaves' rank ranges and the sketch (after appends with ``bounds=False``)."""
    levels, sketch = _storage_bounds(index.keys, index.valid, index.block_size, index.branching,
                                     index.sketch is not None)
    for level, fresh in zip(index.levels, levels):
        for dst, src in zip(level.tensors(), fresh.tensors()):
            dst.copy_(src)
    if sketch is not None:
        for dst, src in zip(index.sketch.tensors(), sketch.tensors()):
            dst.copy_(src)
    first, last = _leaf_rank_range(index.rank, index.block_size)
    index.leaf_first.copy_(first)
    index.leaf_last.copy_(last)
