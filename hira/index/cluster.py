"""Orderings that put similar keys next to each other, so that each block of the storage order is tight.

Each function returns, per (batch, KV head), a rank for every key: keys sort by it into cluster order. Only
``eligible`` keys are clustered; the others get ranks after all eligible ones. All of it is batched tensor code
with a static number of steps (no Python loop over tokens or clusters).

Shapes: B batch, H KV heads, N keys, D head dim.
"""

from __future__ import annotations

import math

import torch


def _power_direction(xc: torch.Tensor, iters: int) -> torch.Tensor:
    """Top principal direction of each group of centred rows. xc: [..., m, D] -> [..., D] (unit norm)."""
    # Start from the row farthest from the mean: deterministic, and never orthogonal to the top direction
    # unless the group is degenerate (then any direction serves).
    far = xc.norm(dim=-1).argmax(dim=-1, keepdim=True)  # [..., 1]
    v = torch.gather(xc, -2, far[..., None].expand(*far.shape, xc.shape[-1])).squeeze(-2)  # [..., D]
    for _ in range(iters):
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        v = torch.einsum("...md,...m->...d", xc, torch.einsum("...md,...d->...m", xc, v))
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def pca_tree_rank(keys: torch.Tensor, eligible: torch.Tensor, leaf_size: int, power_iters: int = 3) -> torch.Tensor:
    """Balanced principal-axis tree: split every group at the median of its projection on its top principal axis.

    After log2(N / leaf_size) splits every run of ``leaf_size`` consecutive ranks is one leaf of the tree.

    Args:
        keys: [B, H, N, D] float.
        eligible: [B, H, N] bool; ineligible keys are ranked last.
        leaf_size: tokens per leaf (the block size).
    Returns:
        [B, H, N] int64 rank of every key in cluster order.
    """
    B, H, N, D = keys.shape
    n_leaves = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(N / leaf_size)))))
    Np = n_leaves * leaf_size
    x = keys.float()
    e = eligible
    if Np > N:
        x = torch.cat([x, x.new_zeros(B, H, Np - N, D)], dim=2)  # [B, H, Np, D]
        e = torch.cat([e, e.new_zeros(B, H, Np - N)], dim=2)  # [B, H, Np]
    perm = torch.arange(Np, device=keys.device).expand(B, H, Np)  # [B, H, Np]
    groups = 1
    while True:  # at least one pass: with a single leaf it still puts the eligible keys first
        m = Np // groups
        xs = x.view(B, H, groups, m, D)
        es = e.view(B, H, groups, m)
        w = es.to(x.dtype)[..., None]  # [B, H, g, m, 1]
        mean = (xs * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True).clamp_min(1.0)  # [B, H, g, 1, D]
        xc = (xs - mean) * w  # [B, H, g, m, D]
        v = _power_direction(xc, power_iters)  # [B, H, g, D]
        proj = torch.einsum("bhgmd,bhgd->bhgm", xc, v).masked_fill(~es, math.inf)  # ineligible go right
        idx = proj.argsort(dim=-1, stable=True)  # [B, H, g, m]
        x = torch.gather(xs, 3, idx[..., None].expand(B, H, groups, m, D)).view(B, H, Np, D)
        e = torch.gather(es, 3, idx).view(B, H, Np)
        perm = torch.gather(perm.reshape(B, H, groups, m), 3, idx).view(B, H, Np)
        groups *= 2
        if groups >= n_leaves:
            break
    # perm[r] = key at rank r; invert it. Padding entries (>= N) sort last and are cut off.
    rank = torch.empty_like(perm)
    rank.scatter_(2, perm, torch.arange(Np, device=keys.device).expand(B, H, Np))
    return rank[:, :, :N]


def kmeans_rank(
    keys: torch.Tensor, eligible: torch.Tensor, leaf_size: int, iters: int, power_iters: int = 3
) -> torch.Tensor:
    """k-means with k = ceil(n_eligible / leaf_size), seeded by the means of the pca tree's leaves.

    Keys are ranked by cluster id (clusters in pca-tree order of their seeds), then by pca-tree rank inside a
    cluster. Unequal cluster sizes mean a block may straddle two clusters; bounds stay exact either way.

    Args and return as for ``pca_tree_rank``; ``iters`` Lloyd iterations.
    """
    B, H, N, D = keys.shape
    x = keys.float()
    base = pca_tree_rank(keys, eligible, leaf_size, power_iters)  # [B, H, N]
    k = max(1, math.ceil(N / leaf_size))
    seed_id = (base // leaf_size).clamp_max(k - 1)  # [B, H, N] leaf of the pca tree
    w = eligible.to(x.dtype)  # [B, H, N]

    def centroids(assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sums = x.new_zeros(B, H, k, D).scatter_add_(2, assign[..., None].expand(B, H, N, D), x * w[..., None])
        counts = x.new_zeros(B, H, k).scatter_add_(2, assign, w)  # [B, H, k]
        return sums / counts.clamp_min(1.0)[..., None], counts > 0

    assign = seed_id
    for _ in range(iters):
        c, live = centroids(assign)  # [B, H, k, D], [B, H, k]
        # argmin ||x - c||^2 = argmax 2 x·c - ||c||^2; empty clusters never win.
        score = 2 * torch.einsum("bhnd,bhkd->bhnk", x, c) - (c * c).sum(-1)[:, :, None, :]
        assign = score.masked_fill(~live[:, :, None, :], -math.inf).argmax(-1)  # [B, H, N]
    key = torch.where(eligible, assign * N + base, k * N + base)  # cluster first, pca rank inside it
    return key.argsort(dim=-1, stable=True).argsort(dim=-1)


def position_rank(eligible: torch.Tensor) -> torch.Tensor:
    """Position order: the rank of a key is its position (eligible keys first). eligible: [B, H, N] -> [B, H, N]."""
    N = eligible.shape[-1]
    pos = torch.arange(N, device=eligible.device).expand_as(eligible)
    key = torch.where(eligible, pos, pos + N)
    return key.argsort(dim=-1, stable=True).argsort(dim=-1)
