"""Halfspace range search over the index: which blocks may hold a key with scaled score s = scale·q·k ≥ τ.

Top-down, a node's effective bound is the minimum of its own upper bound and its parent's effective bound (both hold
for every member), so a node below τ is dropped with its whole subtree (``effective_bounds``). A parent contains
its children (its box is the union of theirs; its ball reaches every child ball), so its bound is never below
theirs and the walk keeps exactly the leaves whose own bound reaches τ. On fixed shapes, where every node would be
evaluated anyway, ``search`` therefore evaluates the leaf level alone: one pass instead of one per level, with the
same result (the tests check it against ``effective_bounds``).

Query rows: the G query heads of a KV group and the S query positions are folded into R = G·S rows per KV head,
and a block is kept for the KV head if any of its rows keeps it (the union over the group).

Shapes: B batch, H KV heads, R query rows, NB leaves, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hira.index.bounds import bound_and_estimate, upper_bound
from hira.index.index import HiraIndex
from hira.search.threshold import Threshold


@dataclass
class Selection:
    """What a search keeps, in fixed shapes, plus what is known about what it skips.

    Attributes:
        keep: [B, H, NB] bool, the kept leaves.
        kv_num_blocks: [B, H, 1] int32 number of kept leaves.
        kv_indices: [B, H, 1, NB] int32 kept leaf indices first, ascending; the rest is filler.
        tau: [B, H, R] float32 the threshold each row used (-inf in the budgeted modes).
        log_skip_ub: [B, H, R] float32 log of an upper bound on the unnormalised softmax mass Σ exp(s) of the
            keys in skipped leaves (-inf if nothing real was skipped).
        max_lb: [B, H, R] float32 an exact score of a kept key (a lower bound on the row's max score), or -inf.
        kept_fraction: [B, H] float32 kept leaves over non-empty leaves.
    """

    keep: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    tau: torch.Tensor
    log_skip_ub: torch.Tensor
    max_lb: torch.Tensor
    kept_fraction: torch.Tensor

    @property
    def skip_bound(self) -> torch.Tensor:
        """[B, H, R] bound, before attention, on the fraction of softmax mass skipped: U / (U + exp(max_lb))."""
        return torch.sigmoid(self.log_skip_ub - self.max_lb).nan_to_num(nan=0.0)


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


def _exact_leaf_score(index: HiraIndex, q: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Exact max score of each row over one leaf per row, top: [B, H, R] -> [B, H, R] (-inf if no real key)."""
    B, H, R, D = q.shape
    BS = index.block_size
    slots = (top[..., None] * BS + torch.arange(BS, device=q.device)).view(B, H, R * BS)  # [B, H, R*BS]
    k = torch.gather(index.keys, 2, slots[..., None].expand(B, H, R * BS, D)).view(B, H, R, BS, D)
    # float64: an exact score of a real key, whatever the float32 matmul precision (TF32 on CUDA).
    s = torch.einsum("bhrd,bhrsd->bhrs", q.double(), k.double()).float()  # [B, H, R, BS]
    real = torch.gather(index.valid, 1, slots.view(B, H * R * BS)).view(B, H, R, BS)
    return s.masked_fill(~real, -math.inf).amax(-1)


def _topp_keep(est: torch.Tensor, forced: torch.Tensor, p: float) -> torch.Tensor:
    """Per row, the fewest leaves (forced first, then by estimated mass) whose estimated mass reaches p; union
    over the rows of a KV head. est: [B, H, R, NB] log-mass estimates; forced: [B, H, NB]."""
    frac = est.softmax(-1).nan_to_num(nan=0.0)  # [B, H, R, NB] estimated share of each leaf
    order = est.masked_fill(forced[:, :, None, :], math.inf).argsort(dim=-1, descending=True)
    sorted_frac = torch.gather(frac, -1, order)
    before = sorted_frac.cumsum(-1) - sorted_frac  # share of the leaves ranked above
    keep_rows = torch.zeros_like(before, dtype=torch.bool).scatter_(-1, order, before < p)
    return keep_rows.any(dim=2)


def search(index: HiraIndex, q: torch.Tensor, threshold: Threshold, dense: torch.Tensor | None = None) -> Selection:
    """Select the leaves to read for the given query rows.

    Tensor program (no validation, no host sync): compile-able with ``fullgraph=True``.

    Args:
        index: the layer's index.
        q: [B, H, R, D] float32 query rows, already multiplied by the softmax scale.
        threshold: the mode.
        dense: optional [] bool tensor; where True every non-empty leaf is kept (e.g. below ``min_context``).
    """
    B, H, R, D = q.shape
    leaves = index.levels[0]
    live = leaves.count > 0  # [B, H, NB]
    forced = index.forced_leaves()
    ub, est = bound_and_estimate(q, leaves)  # [B, H, R, NB]; ub equals effective_bounds(index, q) (docstring)
    top_leaf = ub.argmax(-1)  # [B, H, R] the leaf with the largest bound per row
    m = _exact_leaf_score(index, q, top_leaf)  # [B, H, R]
    mode, value = threshold.mode, threshold.value
    tau = torch.full_like(m, -math.inf)
    if mode == "dense":
        keep = live
    elif mode in ("fixed", "certified"):
        if mode == "fixed":
            tau = torch.full_like(m, value)
        else:
            n = index.n_valid.clamp_min(1).to(torch.float32)[:, None, None]  # [B, 1, 1]
            tau = m - torch.log(n / value)
        keep = (ub >= tau[..., None]).any(dim=2) & live
    elif mode == "topk":
        # Rank by the group's estimated share of mass: Σ over rows of each row's estimated fraction.
        k = min(int(value), ub.shape[-1])
        share = est.softmax(-1).nan_to_num(nan=0.0).sum(dim=2)  # [B, H, NB]
        top = share.masked_fill(~live, -1.0).topk(k, dim=-1).indices
        keep = torch.zeros_like(live).scatter_(-1, top, True) & live
    else:  # topp
        keep = _topp_keep(est, forced, value) & live
    keep = keep | forced
    if dense is not None:
        keep = torch.where(dense, live, keep)

    skipped = live & ~keep
    log_count = leaves.count.clamp_min(1).float().log()[:, :, None, :]
    log_skip_ub = (ub + log_count).masked_fill(~skipped[:, :, None, :], -math.inf).logsumexp(-1)  # [B, H, R]
    top_kept = torch.gather(keep, 2, top_leaf)  # [B, H, R]: is the leaf that gave m read?
    max_lb = m.masked_fill(~top_kept, -math.inf)

    kv_num = keep.sum(-1, dtype=torch.int32)  # [B, H]
    # Kept leaves first in ascending order, then the others: a stable compaction by prefix sums (no sort).
    kept_pos = keep.cumsum(-1) - 1
    rest_pos = kv_num[..., None] + (~keep).cumsum(-1) - 1
    slot = torch.where(keep, kept_pos, rest_pos)  # [B, H, NB] destination of each leaf
    leaf_ids = torch.arange(keep.shape[-1], device=q.device, dtype=torch.int32).expand_as(slot)
    order = torch.empty_like(leaf_ids).scatter_(-1, slot, leaf_ids)
    kept_fraction = kv_num.float() / live.sum(-1).clamp_min(1).float()
    return Selection(
        keep=keep,
        kv_num_blocks=kv_num[..., None],
        kv_indices=order[:, :, None, :],
        tau=tau,
        log_skip_ub=log_skip_ub,
        max_lb=max_lb,
        kept_fraction=kept_fraction,
    )
