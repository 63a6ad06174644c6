"""Halfspace range search over the index: which blocks may hold a key with scaled score s = scale·q·k ≥ τ.

Top-down, a node's effective bound is the minimum of its own upper bound and its parent's effective bound (both hold
for every member), so a node below τ is dropped with its whole subtree (``effective_bounds``). A parent contains
its children (its ball reaches every child ball), so its bound is never below theirs and the walk keeps exactly
the leaves whose own bound reaches τ. On fixed shapes, where every node would be evaluated anyway, ``search_rows``
therefore evaluates the leaf level alone: one pass instead of one per level, with the same result (the tests check
it against ``effective_bounds``).

The ``Certified`` mode works on mass rather than on one τ: each row lists leaves (sinks, window and the leaf of
its best bound first, then by mass bound) until the mass bound of the rest is at most ε of the total, with the
kept mass known from below by one exact key score, or, with a key sketch, by the sketch's per-key intervals.

Query rows: the G query heads of a KV group and the S query positions are folded into R = G·S rows per KV head,
and a block is kept for the KV head if any of its rows keeps it (the union over the group).

Shapes: B batch, H KV heads, R query rows, NB leaves, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hira.flex.mask import block_lists
from hira.index.bounds import NodeBounds, bound_and_estimate, upper_bound
from hira.index.index import HiraIndex, KeyBlocks, block_slots, storage_key_blocks
from hira.index.sketch import block_score_stats
from hira.kernels import cuda_kernels
from hira.selection.threshold import Dense, Threshold


@dataclass
class Selection:
    """What a search keeps, in fixed shapes, plus what is known about what it skips.

    Attributes:
        keep: [B, H, NB] bool, the kept leaves.
        kv_num_blocks: [B, H, 1] int32 number of kept leaves.
        kv_indices: [B, H, 1, NB] int32 kept leaf indices first, ascending; the rest is filler.
        tau: [B, H, R] float32 every real key with scaled score ≥ tau was kept: the given τ (``Fixed``), just above
            the largest bound of a skipped leaf (``Certified``), -inf otherwise.
        log_skip_ub: [B, H, R] float32 log of an upper bound on the unnormalised softmax mass Σ exp(s) of the
            keys in skipped leaves (-inf if nothing real was skipped).
        log_kept_lb: [B, H, R] float32 log of a lower bound on the unnormalised mass of the kept keys: the exact
            score of one kept key, or the sketch's bound on the kept leaves' mass where that is larger (-inf if
            neither is known).
        kept_fraction: [B, H] float32 kept leaves over non-empty leaves.
        read_fraction: [B, H] float32 real keys in the kept leaves over all real keys.
        uneven: the mode's ``Threshold.uneven`` (static): the attention splits each head's list over more programs.
    """

    keep: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    tau: torch.Tensor
    log_skip_ub: torch.Tensor
    log_kept_lb: torch.Tensor
    kept_fraction: torch.Tensor
    read_fraction: torch.Tensor
    uneven: bool = False

    @property
    def skip_bound(self) -> torch.Tensor:
        """[B, H, R] bound, before attention, on the fraction of softmax mass skipped: U / (U + L)."""
        return torch.sigmoid(self.log_skip_ub - self.log_kept_lb).nan_to_num(nan=0.0)


@dataclass
class LeafBounds:
    """What the search knows about each leaf for each query row: [B, H, R, NB] float32 each, -inf for empty leaves.

    Attributes:
        ub: upper bound on the leaf's max scaled score.
        log_mass_ub: log of an upper bound on the leaf's unnormalised mass Σ exp(s).
        log_mass_lb: log of a lower bound on that mass (-inf where nothing is known).
        est: log of an estimate of that mass, the budgeted modes' ranking.
    """

    ub: torch.Tensor
    log_mass_ub: torch.Tensor
    log_mass_lb: torch.Tensor
    est: torch.Tensor


def leaf_bounds(index: HiraIndex, q: torch.Tensor) -> LeafBounds:
    """Bounds and estimates of every leaf for scaled query rows q [B, H, R, D] float32.

    From the leaf balls and spreads, or, where the index keeps a key sketch, from the sketch's per-key intervals
    instead (a step then reads the sketch, not the leaf centres): the max-score bound is the largest interval top,
    the mass bound the sum of exp(interval top), the mass known from below the sum of exp(interval bottom), and the
    estimate the sketch's own Σ exp(q·k̃).
    """
    if index.sketch is None:
        return ball_leaf_bounds(q, index.levels[0], index.spread_weight)  # ub = effective_bounds(index, q)
    top, lse, half_width = block_score_stats(q, index.sketch, index.valid)  # [B, H, R, NB] each
    return LeafBounds(ub=top + half_width, log_mass_ub=lse + half_width, log_mass_lb=lse - half_width, est=lse)


def ball_leaf_bounds(q: torch.Tensor, leaves: NodeBounds, spread_weight: torch.Tensor) -> LeafBounds:
    """``leaf_bounds`` from the leaf balls alone, the estimate's spread weighted by ``spread_weight`` [B, H]: the
    mass bound is count·exp(ub), nothing is known from below."""
    ub, est = bound_and_estimate(q, leaves, spread_weight)
    log_count = leaves.count.clamp_min(1).float().log()[:, :, None, :]
    return LeafBounds(ub, ub + log_count, torch.full_like(ub, -math.inf), est)


def effective_bounds(index: HiraIndex, q: torch.Tensor) -> torch.Tensor:
    """Leaf bounds tightened by every ancestor's bound: [B, H, R, NB] float32 (-inf for empty leaves).

    Args:
        q: [B, H, R, D] float32 scaled query rows.
    """
    b = index.branching
    eff = None
    for nodes in reversed(index.levels):
        ub = upper_bound(q, nodes)  # [B, H, R, M]
        if eff is not None:
            parent = eff.repeat_interleave(b, dim=-1)[..., : ub.shape[-1]]
            ub = torch.minimum(ub, parent)
        eff = ub
    return eff


def exact_leaf_score(index: HiraIndex, q: torch.Tensor, top: torch.Tensor, key_blocks: KeyBlocks | None = None
                     ) -> torch.Tensor:
    """Exact max score of each row over one leaf per row, top: [B, H, R] -> [B, H, R] (-inf if no real key); the
    leaves' keys read by ``key_blocks`` (default the storage)."""
    B, H, R, D = q.shape
    BS = index.block_size
    slots = block_slots(top, BS)  # [B, H, R·BS]
    k = key_blocks(top) if key_blocks is not None else storage_key_blocks(index, top)  # [B, H, R, BS, D]
    # float64: an exact score of a real key, whatever the float32 matmul precision (TF32 on CUDA). A product and a
    # sum, not a matmul: compiled, one reduction reading the keys in their dtype; as an einsum, a float64 copy of the
    # keys and a GEMV (by the profile, 40 + 44 µs per layer at 128K, batch 32: benchmarks/NOTES.md §21).
    s = (q.double()[:, :, :, None, :] * k.double()).sum(-1).float()  # [B, H, R, BS]
    real = torch.gather(index.valid, 1, slots.view(B, H * R * BS)).view(B, H, R, BS)
    return s.masked_fill(~real, -math.inf).amax(-1)


def fold_exact_score(bounds: LeafBounds, top_leaf: torch.Tensor, m: torch.Tensor) -> LeafBounds:
    """The bounds with the exact score m of a key of leaf ``top_leaf`` ([B, H, R, 1] each) taken into that leaf's
    mass lower bound: exp(m) is part of its mass."""
    lb = bounds.log_mass_lb
    lb = lb.scatter(-1, top_leaf, torch.maximum(lb.gather(-1, top_leaf), m))
    return LeafBounds(bounds.ub, bounds.log_mass_ub, lb, bounds.est)


def select_leaves(
    bounds: LeafBounds,
    top_leaf: torch.Tensor,
    forced: torch.Tensor,
    live: torch.Tensor,
    threshold: Threshold,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The threshold's choice of leaves from their bounds (``Threshold.keep``), live ones only, plus the forced ones:
    (keep [B, H, NB] bool, tau [B, H, R]).

    Args:
        bounds: [B, H, R, NB] per leaf, the exact score of ``top_leaf`` folded in (``fold_exact_score``).
        top_leaf: [B, H, R, 1] each row's leaf of largest bound (listed first by ``Certified``).
        forced: [B, H, NB] leaves always kept (sinks, window); live: [B, H, NB] non-empty leaves.
        threshold: the mode.
    """
    keep, tau = threshold.keep(bounds, top_leaf, forced, live)
    return (keep & live) | forced, tau


def selection_from_keep(keep: torch.Tensor, count: torch.Tensor, bounds: LeafBounds, tau: torch.Tensor,
                        uneven: bool = False) -> Selection:
    """The ``Selection`` of a keep table [B, H, NB] over leaves of ``count`` [B, H, NB] real keys: block lists, the
    fractions kept and read, and the skipped and kept mass bounds from ``bounds`` (the exact score folded in);
    ``uneven`` as ``Threshold.uneven``."""
    live = count > 0
    counts = count.float()
    skipped = (live & ~keep)[:, :, None, :]  # [B, H, 1, NB]
    log_skip_ub = bounds.log_mass_ub.masked_fill(~skipped, -math.inf).logsumexp(-1)  # [B, H, R]
    log_kept_lb = bounds.log_mass_lb.masked_fill(~keep[:, :, None, :], -math.inf).logsumexp(-1)
    kv_num, kv_indices = block_lists(keep)  # [B, H], [B, H, NB]
    return Selection(
        keep=keep,
        kv_num_blocks=kv_num[..., None],
        kv_indices=kv_indices[:, :, None, :],
        tau=tau,
        log_skip_ub=log_skip_ub,
        log_kept_lb=log_kept_lb,
        kept_fraction=kv_num.float() / live.sum(-1).clamp_min(1).float(),
        read_fraction=(counts * keep).sum(-1) / counts.sum(-1).clamp_min(1.0),
        uneven=uneven,
    )


def every_leaf(index: HiraIndex, q: torch.Tensor) -> Selection:
    """The ``Dense`` mode's selection for query rows q [B, H, R, D]: every leaf up to the first free slot, in
    order, with no bound computed (nothing real is skipped, so the skip bounds are 0 and no τ is needed). It reads
    ``next_slot`` alone, not the leaves' counts, which the dense mode's appends leave stale; padding is the mask's
    business (``valid``)."""
    B, H = index.keys.shape[:2]
    NB = index.num_leaves
    used = (index.next_slot + index.block_size - 1) // index.block_size  # [] leaves holding a slot
    ids = torch.arange(NB, device=q.device, dtype=torch.int32)
    keep = (ids < used).expand(B, H, NB)
    kv_num = used.to(torch.int32).expand(B, H, 1)
    none = torch.full(q.shape[:3], -math.inf, device=q.device)  # [B, H, R]
    kept = torch.ones(B, H, device=q.device)
    return Selection(keep, kv_num, ids.expand(B, H, 1, NB), none, none, none, kept, kept)


def local_select(
    bounds: LeafBounds, top_leaf: torch.Tensor, m: torch.Tensor, forced: torch.Tensor, live: torch.Tensor,
    threshold: Threshold,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``search_rows``'s default choice of leaves: ``select_leaves`` over this index's own leaves, the exact score m
    [B, H, R, 1] of a key of ``top_leaf`` folded into its bounds. The sharded search (``hira.parallel``) passes a
    choice that agrees across ranks instead."""
    return select_leaves(fold_exact_score(bounds, top_leaf, m), top_leaf, forced, live, threshold)


def search_rows(
    index: HiraIndex,
    q: torch.Tensor,
    threshold: Threshold,
    select=local_select,
    kernel: bool = True,
    key_blocks: KeyBlocks | None = None,
    scale: float | None = None,
) -> Selection:
    """Select the leaves to read for the given query rows.

    Tensor program (no validation, no host sync): compile-able with ``fullgraph=True``. On CUDA the ball path of
    ``Fixed``, ``TopK`` and ``TopP`` runs as two or three Triton kernels instead, where they are faster
    (``hira.selection.search_kernel``): the same choice up to ties.

    Args:
        index: the layer's index.
        q: [B, H, R, D] query rows: float32 and already multiplied by the softmax scale, or, given ``scale``, in any
            float dtype, multiplied by it here in float32 (inside the kernels where they apply: no scaled copy is
            written).
        threshold: the mode.
        select: ``(bounds, top_leaf, m, forced, live, threshold) -> (keep, tau)``, the choice of leaves
            from their bounds (before the exact score m is folded in); default ``local_select``.
        kernel: use the Triton kernels where they apply (False: the tensor program, the kernels' reference).
        key_blocks: reads the top leaves' keys for their exact score (default the storage; the kernels read the
            storage).
    """
    if isinstance(threshold, Dense):
        return every_leaf(index, q)
    kernels = _KERNELS if kernel and select is local_select and q.is_cuda else None
    if kernels is not None and kernels.applies(index, q, threshold):
        return Selection(*kernels.ball_search(index, q, threshold, 1.0 if scale is None else scale))
    if scale is not None:
        q = q.float() * scale
    count = index.levels[0].count  # [B, H, NB]
    bounds = leaf_bounds(index, q)  # [B, H, R, NB] each
    top_leaf = bounds.ub.argmax(-1, keepdim=True)  # [B, H, R, 1] the leaf with the largest bound per row
    # [B, H, R, 1] the exact score of one of its keys
    m = exact_leaf_score(index, q, top_leaf[..., 0], key_blocks)[..., None]
    keep, tau = select(bounds, top_leaf, m, index.forced_leaves(), count > 0, threshold)
    return selection_from_keep(keep, count, fold_exact_score(bounds, top_leaf, m), tau, threshold.uneven)


_KERNELS = cuda_kernels("hira.selection.search_kernel")
