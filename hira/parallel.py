"""Context parallelism: the KV cache and its index sharded along the sequence over the ranks of a process group.

Each rank indexes one contiguous slice of the prompt: the attention sinks live on the first rank, the recent
window and every decoded token on the last rank, so the union of the local indexes is the single-process index
(with ``clustering="none"`` and block-aligned slices, block for block). A decode step then runs, on every rank:

1. the search: ``Dense`` (no search: every local block) and ``Fixed`` decide leaf by leaf (``Threshold.per_leaf``),
   so each rank searches alone; ``Certified``, ``TopK`` and ``TopP`` rank leaves against each other, so the ranks
   first all-gather their per-leaf bounds (certified: score bound, mass bounds and the exact score of the top-bound
   leaf) or mass estimates (topk, topp), every rank makes single-process ``search_rows``'s choice over all leaves,
   identically, and keeps its own;
2. block attention over the kept local blocks, with its log-sum-exp;
3. one all-gather of (output, LSE, skipped-mass bound, counts), merged exactly and identically on every rank: the
   model's hidden states stay replicated.

Communication goes through ``torch.distributed`` (NCCL on GPUs, gloo on CPU). Per decode step and layer: the
search's agreement (certified: [B, H, 4R + 2, NB] floats; topk/topp: [B, H, R + 2, NB]; none for dense and
fixed) and the merge ([B, H, R, D + 7] floats).

``ShardedHiraLayer`` is the ``HiraCache`` layer that runs this step (``SequenceShard.cache_layer`` makes it: the
single-process cache does not depend on this module). With ``HiraConfig.offload`` each rank keeps its slice's K and V
in host memory behind its own block cache (``hira.offload``), as a single process does.

Shapes: B batch, Hq query heads, H KV heads, R = G·S query rows, N tokens, NB local leaves, D head dim,
W world size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hira.api import AttentionStats, attend_rows, build_index_unchecked
from hira.cache import HiraLayer
from hira.config import HiraConfig
from hira.flex.attention import dense_attention_lse, fold_gqa, merge_partials, unfold_gqa
from hira.index.index import HiraIndex, KeyBlocks, append
from hira.offload.block_cache import BlockCache, cached_key_blocks, new_block_cache, write_newest
from hira.offload.host import to_host_tier
from hira.selection.search import LeafBounds, Selection, fold_exact_score, local_select, search_rows, select_leaves
from hira.selection.threshold import Threshold


@dataclass
class SequenceShard:
    """The sequence-sharding plan of one rank: which slice of the prompt it indexes, in which process group.

    The prompt's blocks are split into ``world_size`` contiguous runs as evenly as possible (earlier ranks take
    the extra blocks: the last rank also stores every decoded token). Slice boundaries are block multiples.

    Args:
        group: the process group the ranks share (None: the default group). ``torch.distributed`` must be
            initialised (``init_process_group``, NCCL on GPUs, gloo on CPU).
    Attributes:
        rank, world_size: this rank's position in the group, and the group's size.
    """

    group: dist.ProcessGroup | None = None
    rank: int = field(init=False)
    world_size: int = field(init=False)

    def __post_init__(self):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "SequenceShard needs torch.distributed initialised: call torch.distributed.init_process_group "
                "(backend 'nccl' on GPUs, 'gloo' on CPU) first, e.g. under torchrun"
            )
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the SequenceShard's process group")
        self.world_size = dist.get_world_size(self.group)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def cache_layer(self, layer_idx: int, capacity: int, config: HiraConfig) -> "ShardedHiraLayer":
        """The ``HiraCache`` layer of this rank's slice (``HiraCache`` calls it for a sharded cache)."""
        return ShardedHiraLayer(layer_idx, capacity, config, self)

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    def slices(self, n_tokens: int, block_size: int) -> list[tuple[int, int]]:
        """[start, end) token range of every rank for a prompt of ``n_tokens``; boundaries on block multiples."""
        blocks = -(-n_tokens // block_size)
        if blocks < self.world_size:
            raise ValueError(
                f"a prompt of {n_tokens} tokens has {blocks} blocks of {block_size} tokens, fewer than the "
                f"{self.world_size} ranks of the SequenceShard: every rank needs at least one block"
            )
        base, extra = divmod(blocks, self.world_size)
        ends = [0]
        for r in range(self.world_size):
            ends.append(ends[-1] + base + (r < extra))
        return [(a * block_size, min(b * block_size, n_tokens)) for a, b in zip(ends[:-1], ends[1:])]

    def capacities(self, n_tokens: int, block_size: int, capacity: int) -> list[int]:
        """Storage slots of every rank's index, in whole blocks: its slice; the last rank also the room for
        ``capacity - n_tokens`` decoded tokens (``capacity``: the whole cache's tokens, as single-process)."""
        if capacity < n_tokens:
            raise ValueError(
                f"prompt of {n_tokens} tokens exceeds the cache capacity of {capacity}: raise HiraConfig.max_cache_len"
            )
        slots = [-(-(b - a) // block_size) * block_size for a, b in self.slices(n_tokens, block_size)]
        slots[-1] += -(-(capacity - n_tokens) // block_size) * block_size
        return slots


@dataclass
class ShardIndex:
    """One rank's part of a sharded layer: the local ``HiraIndex`` and what every rank knows of the whole.

    Attributes:
        index: the local index over this rank's slice (and, on the last rank, the decoded tokens).
        shard: the plan.
        total_valid: [B] int64 real tokens per row over all ranks (the N of the certified threshold).
        leaves_per_rank: NB of every rank's index (static: the all-gathers pad to the largest).
    """

    index: HiraIndex
    shard: SequenceShard
    total_valid: torch.Tensor
    leaves_per_rank: tuple[int, ...]


def build_shard_index(
    keys: torch.Tensor,
    values: torch.Tensor,
    key_mask: torch.Tensor | None,
    config: HiraConfig,
    shard: SequenceShard,
    capacity: int,
) -> ShardIndex:
    """Index this rank's slice of the prompt. Every rank gets the whole prompt (inputs are replicated).

    Checks (a host sync: prefill only) that the sinks fall in the first rank's slice and the recent window in the
    last rank's, in every row, so that each rank's always-read blocks are the single-process ones.

    Args:
        keys, values: [B, H, N, D] post-RoPE keys and values of the whole prompt.
        key_mask: [B, N] bool real tokens (False: padding), or None.
        config: the layer's ``HiraConfig`` (block size, clustering, sinks, window).
        capacity: tokens the whole sharded cache holds (prompt plus decoded tokens), as single-process.
    """
    B, H, N, D = keys.shape
    bs = config.block_size
    slices = shard.slices(N, bs)
    slots = shard.capacities(N, bs, capacity)
    real = torch.ones(B, N, dtype=torch.bool, device=keys.device) if key_mask is None else key_mask
    first_real = real[:, slice(*slices[0])].sum(1)
    last_real = real[:, slice(*slices[-1])].sum(1)
    if bool((first_real < config.sink_tokens).any()) or bool((last_real < config.window_tokens).any()):
        raise ValueError(
            f"with {shard.world_size} ranks the first rank's slice holds {int(first_real.min())} real tokens "
            f"(sink_tokens={config.sink_tokens}) and the last rank's {int(last_real.min())} "
            f"(window_tokens={config.window_tokens}): both must fit in one rank; use a longer prompt, fewer ranks, "
            "or fewer sink/window tokens"
        )
    start, end = slices[shard.rank]
    local_config = dataclasses.replace(
        config,
        sink_tokens=config.sink_tokens if shard.is_first else 0,
        window_tokens=config.window_tokens if shard.is_last else 0,
    )
    local_mask = None if key_mask is None else key_mask[:, start:end]
    index = build_index_unchecked(keys[:, :, start:end], values[:, :, start:end], local_mask, local_config,
                                  slots[shard.rank])
    return ShardIndex(index, shard, real.sum(1), tuple(s // bs for s in slots))


def shard_append(local: ShardIndex, keys: torch.Tensor, values: torch.Tensor, cache: BlockCache | None = None
                 ) -> None:
    """Append S decoded tokens: stored on the last rank, counted on every rank. keys, values: [B, H, S, D]. With
    the last rank's block ``cache`` (K and V in the host tier) one token (S = 1) is also written to its resident slot,
    and the append reads whole leaves through the cache (as ``hira.step.plan``)."""
    if local.shard.is_last:
        key_blocks = None
        if cache is not None:
            write_newest(local.index, cache, keys, values)
            key_blocks = cached_key_blocks(local.index, cache)
        append(local.index, keys, values, key_blocks=key_blocks)
    local.total_valid.add_(keys.shape[2])


def _all_gather(t: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """[...] on every rank -> [W, ...], the same on every rank, in rank order."""
    if shard.world_size == 1:
        return t[None]
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(shard.world_size)]
    dist.all_gather(parts, t, group=shard.group)
    return torch.stack(parts)


def _gather_leaves(
    local: ShardIndex, planes: list[torch.Tensor], flags: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Every rank's per-leaf quantities, concatenated in rank order, each rank padded to the largest NB.

    Padding leaves read -inf in the planes and False in the flags (like empty leaves: not live, not forced).

    Args:
        planes: [B, H, R, NB] float32 tensors (bounds, estimates); flags: [B, H, NB] bool tensors.
    Returns:
        planes [B, H, R, W·NBmax] and flags [B, H, W·NBmax] over all ranks' leaves, and the offset of this
        rank's leaves among them.
    """
    B, H, R, NB = planes[0].shape
    nb_max = max(local.leaves_per_rank)
    n_rows = len(planes) * R
    packed = planes[0].new_full((B, H, n_rows + len(flags), nb_max), -math.inf)
    packed[:, :, n_rows:] = 0.0
    packed[..., :NB] = torch.cat(planes + [f[:, :, None].float() for f in flags], 2)
    W = local.shard.world_size
    every = _all_gather(packed, local.shard).permute(1, 2, 3, 0, 4).reshape(B, H, -1, W * nb_max)
    all_planes = list(every[:, :, :n_rows].split(R, dim=2))
    all_flags = [f > 0 for f in every[:, :, n_rows:].unbind(2)]
    return all_planes, all_flags, local.shard.rank * nb_max


def _global_keep(local: ShardIndex, bounds: LeafBounds, m_plane, threshold: Threshold, forced, live):
    """Single-process ``search_rows``'s choice over every rank's leaves, made identically on every rank.

    For ``Certified``, ``TopK`` and ``TopP``. bounds: this rank's ``LeafBounds`` before the exact score is folded
    in; m_plane: [B, H, R, NB] the exact score at this rank's top-bound leaf, -inf elsewhere; forced, live:
    [B, H, NB]. Returns this rank's keep [B, H, NB] and the rows' τ [B, H, R].
    """
    planes, (forced_all, live_all), offset = _gather_leaves(
        local, [bounds.ub, bounds.log_mass_ub, bounds.log_mass_lb, bounds.est, m_plane], [forced, live]
    )
    ub, mass_ub, mass_lb, est, m_all = planes
    top = ub.argmax(-1, keepdim=True)  # [B, H, R, 1] the global top-bound leaf, some rank's local top leaf
    every = fold_exact_score(LeafBounds(ub, mass_ub, mass_lb, est), top, m_all.gather(-1, top))
    keep, tau = select_leaves(every, top, forced_all, live_all, threshold)
    return keep[:, :, offset : offset + live.shape[-1]], tau


def sharded_search(local: ShardIndex, q: torch.Tensor, threshold: Threshold, key_blocks: KeyBlocks | None = None
                   ) -> Selection:
    """The local leaves of the global selection: what single-process ``search_rows`` keeps over all ranks' leaves.

    A collective in the ``Certified``, ``TopK`` and ``TopP`` modes (one all-gather of per-leaf bounds and
    estimates): every rank of the group calls it with the same threshold. No host sync.

    Args:
        local: this rank's ``ShardIndex``.
        q: [B, H, R, D] float32 query rows, already multiplied by the softmax scale (the same on every rank).
        threshold: the mode.
        key_blocks: reads the top leaves' keys (``search_rows``'s; a block cache's with offload).
    Returns:
        A ``Selection`` over the local index; ``log_skip_ub`` and ``log_kept_lb`` cover the local leaves
        (``sharded_attend`` sums them over the ranks).
    """

    def agree(bounds, top_leaf, m, forced, live, threshold):
        if threshold.per_leaf:  # nothing to agree on (``Dense`` never gets here: it does not search)
            return local_select(bounds, top_leaf, m, forced, live, threshold)
        m_plane = torch.full_like(bounds.ub, -math.inf).scatter(-1, top_leaf, m)
        return _global_keep(local, bounds, m_plane, threshold, forced, live)

    return search_rows(local.index, q, threshold, select=agree, key_blocks=key_blocks)


def sharded_attend(
    q: torch.Tensor, local: ShardIndex, selection: Selection, scale: float, cache: BlockCache | None = None
) -> tuple[torch.Tensor, AttentionStats]:
    """Attention over the selected blocks of every rank, merged exactly through the log-sum-exp.

    A collective (one all-gather); every rank returns the same output and stats. No host sync.

    Args:
        q: [B, Hq, S, D] post-RoPE queries (the same on every rank).
        local, selection: this rank's ``ShardIndex`` and its ``sharded_search`` result.
        scale: softmax scale.
        cache: this rank's block cache when its K and V are in the host tier (``hira.offload``), else None.
    Returns:
        out [B, Hq, S, D] in q's dtype and ``AttentionStats`` over the whole sequence.
    """
    index = local.index
    Hq, D = q.shape[1], q.shape[-1]
    H = index.keys.shape[1]
    rows = fold_gqa(q, H).to(index.keys.dtype)  # [B, H, R, D]
    B, _, R, _ = rows.shape
    out, lse = attend_rows(rows, index, selection, scale, cache)
    counts = index.levels[0].count.float()  # [B, H, NB]
    kept = selection.keep.float()
    tallies = torch.stack(  # [B, H, 4]: tokens read, tokens, leaves kept, leaves live
        [(counts * kept).sum(-1), counts.sum(-1), kept.sum(-1), (counts > 0).sum(-1).float()], -1
    )
    packed = torch.cat(
        [out.float(), lse[..., None], selection.log_skip_ub[..., None], selection.log_kept_lb[..., None],
         tallies[:, :, None, :].expand(B, H, R, 4)],
        -1,
    )  # [B, H, R, D + 7]
    every = _all_gather(packed, local.shard)  # [W, B, H, R, D + 7]
    out, lse = _merge_ranks(every, D)
    log_skip_ub = every[..., D + 1].logsumexp(0)  # [B, H, R]
    log_kept_lb = every[..., D + 2].logsumexp(0)
    tokens_read, tokens, kept, live = every[:, :, :, 0, D + 3 :].sum(0).unbind(-1)  # [B, H] each
    stats = AttentionStats(
        kept_fraction=kept / live.clamp_min(1.0),
        read_fraction=tokens_read / tokens.clamp_min(1.0),
        skip_bound=unfold_gqa(torch.sigmoid(log_skip_ub - lse).nan_to_num(nan=0.0), Hq),
        prior_skip_bound=unfold_gqa(torch.sigmoid(log_skip_ub - log_kept_lb).nan_to_num(nan=0.0), Hq),
    )
    return unfold_gqa(out, Hq).to(q.dtype), stats


def _merge_ranks(every: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact merge of every rank's partial attention, ``every`` [W, ..., ≥ D + 1] holding each rank's output in
    [..., :D] and its LSE in [..., D]: (out [..., D] float32, lse [...])."""
    out, lse = every[0, ..., :D], every[0, ..., D]
    for part in every[1:]:
        out, lse = merge_partials(out, lse, part[..., :D], part[..., D])
    return out, lse


def dense_sharded_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, shard: SequenceShard, scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense context-parallel decode attention, the baseline Hira's sharded step is measured against: every rank
    attends densely over its own slice of the sequence, then one all-gather of (output, LSE) merges the partials
    exactly (ring-attention-style decode, what several GPUs do without Hira). A collective.

    On CUDA, for 16-bit K and V without a key mask, each rank's part is SDPA's flash kernel (GQA folded into the
    query rows, so K and V are read once per KV head); otherwise plain attention in float32.

    Args:
        q: [B, Hq, S, D] post-RoPE queries (the same on every rank); keys, values: [B, H, n, D] this rank's slice;
            key_mask: [B, n] bool real tokens of the slice (None: all real).
        shard: the process group.
        scale: softmax scale; default 1/sqrt(D).
    Returns:
        [B, Hq, S, D] in q's dtype, the same on every rank.
    """
    H, D = keys.shape[1], keys.shape[-1]
    if q.ndim != 4 or q.shape[1] % H or q.shape[-1] != D or values.shape != keys.shape:
        raise ValueError(f"q must be [B, Hq, S, {D}] with Hq a multiple of {H} KV heads and values shaped as keys "
                         f"{tuple(keys.shape)}, got q {tuple(q.shape)} and values {tuple(values.shape)}")
    scale = D**-0.5 if scale is None else scale
    rows = fold_gqa(q, H).to(keys.dtype)  # [B, H, R, D]
    if rows.is_cuda and key_mask is None and keys.shape[2] > 0 and keys.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(rows, keys, values, scale=scale)[:2]
    else:
        mask = key_mask if key_mask is not None else keys.new_ones(keys.shape[0], keys.shape[2], dtype=torch.bool)
        out, lse = dense_attention_lse(rows, keys, values, mask, scale)
    every = _all_gather(torch.cat([out.float(), lse.float()[..., None]], -1), shard)  # [W, B, H, R, D + 1]
    return unfold_gqa(_merge_ranks(every, D)[0], q.shape[1]).to(q.dtype)


def sharded_decode_attention(
    q: torch.Tensor, local: ShardIndex, threshold: Threshold, scale: float | None = None,
    cache: BlockCache | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """One sharded decode step over the cached tokens: ``sharded_search`` then ``sharded_attend``.

    A collective: every rank calls it with its own ``local`` and the same q and threshold. Append new tokens
    first with ``shard_append``.

    Args:
        q: [B, Hq, S, D] post-RoPE queries, Hq a multiple of the KV heads.
        local: this rank's ``ShardIndex`` (from ``build_shard_index``).
        threshold: the search mode.
        scale: softmax scale; default 1/sqrt(D).
        cache: this rank's block cache when its K and V are in the host tier (``hira.offload``), else None.
    Returns:
        out [B, Hq, S, D] in q's dtype, the same on every rank, and ``AttentionStats`` over the whole sequence.
    """
    H = local.index.keys.shape[1]
    if q.ndim != 4 or q.shape[1] % H or q.shape[-1] != local.index.keys.shape[-1]:
        raise ValueError(
            f"q must be [B, Hq, S, D={local.index.keys.shape[-1]}] with Hq a multiple of {H} KV heads, "
            f"got {tuple(q.shape)}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows = fold_gqa(q.float(), H) * scale  # [B, H, G*S, D]
    sel = sharded_search(local, rows, threshold, cached_key_blocks(local.index, cache) if cache is not None else None)
    return sharded_attend(q, local, sel, scale, cache)


class ShardedHiraLayer(HiraLayer):
    """A ``HiraLayer`` holding one rank's slice of the sequence (``hira.parallel``): prefill is exact on every rank
    and indexes the rank's slice; decode tokens are stored on the last rank; every decode step searches and attends
    on every rank and merges exactly, so every rank returns the same output.

    Args:
        layer_idx, capacity, config: as ``HiraLayer`` (capacity counts the tokens of the whole sequence).
        shard: the ``SequenceShard`` plan of this rank.
    """

    # Its decode step runs collectives and is not made for generate's CUDA-graph replay.
    is_compileable = False

    def __init__(self, layer_idx: int, capacity: int, config: HiraConfig, shard: SequenceShard):
        # Not calibrated (``hira.selection.calibrate``): each rank would weigh its own slice's estimates, and the
        # ranks rank their leaves against each other.
        super().__init__(layer_idx, capacity, dataclasses.replace(config, calibration_queries=0))
        self.shard = shard
        self.local: ShardIndex | None = None

    def _install(self, index: HiraIndex, B: int, Hq: int) -> None:
        if self.config.offload is not None:
            index.keys, index.values = to_host_tier(index.keys), to_host_tier(index.values)
            self.block_cache = new_block_cache(index, self._cache_slots(index))
        self.index = index
        self.length = self.length.to(index.keys.device)
        self.last_stats = None

    def _build(self, k, v, key_mask) -> HiraIndex:
        self.local = build_shard_index(k, v, key_mask, self.config, self.shard, self.capacity)
        return self.local.index

    def _continue_prefill(self, q, k, v, scale):
        raise ValueError(
            "a sequence-sharded HiraCache takes the whole prompt in one call (query length > 1 after the first "
            "call is not supported): prefill the prompt at once, then decode one token per call"
        )

    def _decode(self, q, k, v, scale):
        shard_append(self.local, k, v, self.block_cache)
        out, self.last_stats = sharded_decode_attention(q, self.local, self.threshold, scale, self.block_cache)
        return out
