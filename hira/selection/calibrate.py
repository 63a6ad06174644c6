"""Per-head calibration of the budgeted modes' mass estimate, on a prefill's own last queries.

The budgeted modes (``TopK``, ``TopP``) rank blocks by log n + q·c + ½‖q‖²·var·w (``bound_and_estimate``): the
log-MGF of an isotropic Gaussian around each block's centre, its spread weighted by w. Keys are not isotropic, and
how much the spread term helps depends on the head: on SmolLM2 it ranks blocks near the oracle, on Gemma 3 270M's
layer 5 it made ``topp(0.99)`` read 93% of the mass on average and 53% at worst (benchmarks/NOTES.md §13), where the
centres alone (w = 0) read 99.6%.

At prefill the true attention of the prompt's last W queries costs W rows of attention. For each weight of
``WEIGHTS`` this module runs the threshold's own selection for each of those query positions (over the G query heads
of the group, as a decode step does), measures the true share of the softmax mass it reads (its recall), and keeps,
per batch row and KV head, a weight that delivers the mass asked for: for ``TopP(p)`` the plain estimate (w = 1)
where its mean recall reaches p, else the fewest blocks among the weights whose recall does (else the best recall);
for ``TopK`` the best recall at its fixed budget. The decode steps then search with that weight
(``HiraIndex.spread_weight``). A first rule, the fewest blocks within 0.002 of the best recall, read 3% fewer keys
of SmolLM2 at 8K than the plain estimate and doubled its KL from dense (benchmarks/NOTES.md §15): the calibration
only widens.

Shapes: B batch, H KV heads, G query heads per KV head, W calibration positions, R = G·W rows, NB leaves, C slots.
"""

from __future__ import annotations

import math

import torch

from hira.index.index import HiraIndex
from hira.selection.search import LeafBounds, ball_leaf_bounds, select_leaves
from hira.selection.threshold import Threshold, TopP

WEIGHTS = (1.0, 0.5, 0.25, 0.0)  # the plain estimate first


def true_leaf_mass(index: HiraIndex, rows: torch.Tensor, q_rank: torch.Tensor) -> torch.Tensor:
    """The share of each row's softmax mass in each leaf: [B, H, R, NB] float32 (rows of padding positions: 0).

    Args:
        rows: [B, H, R, D] float32 scaled query rows, row g·W + w for query head g of the group at position w.
        q_rank: [B, W] rank of each position's token among its row's real tokens (-1: a padding position): a
            row sees the real keys of rank ≤ its own.
    """
    B, H, C, D = index.keys.shape
    R, W = rows.shape[2], q_rank.shape[1]
    row_rank = q_rank.repeat(1, R // W)  # [B, R]
    shares = []
    for h in range(H):  # one KV head at a time: [B, R, C] scores
        rank = index.rank[:, h, None, :]  # [B, 1, C]
        seen = (rank >= 0) & (rank <= row_rank[:, :, None])
        s = (rows[:, h] @ index.keys[:, h].float().transpose(-1, -2)).masked_fill(~seen, -math.inf)
        p = s.softmax(-1).nan_to_num(nan=0.0)  # [B, R, C]
        shares.append(p.view(B, R, index.num_leaves, index.block_size).sum(-1))
    return torch.stack(shares, 1)


def weight_scores(
    index: HiraIndex, rows: torch.Tensor, q_rank: torch.Tensor, threshold: Threshold
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each weight of ``WEIGHTS``, the threshold's selection per query position (``select_leaves`` over the
    position's G rows, as a decode step searches): its mean recall over the rows of real positions and its number of
    leaves summed over them, each [K, B, H] float32 (K weights). Arguments as ``true_leaf_mass``'s; ``index`` holds
    ball estimates (no key sketch)."""
    B, H, R, D = rows.shape
    W = q_rank.shape[1]
    G = R // W
    NB = index.num_leaves
    mass = true_leaf_mass(index, rows, q_rank).view(B, H, G, W, NB)
    real = (q_rank >= 0)[:, None, :].float()  # [B, 1, W] positions that count
    leaves = index.levels[0]
    live = (leaves.count > 0)[:, :, None, :].expand(B, H, W, NB).reshape(B, H * W, NB)
    forced = index.forced_leaves()[:, :, None, :].expand(B, H, W, NB).reshape(B, H * W, NB)

    def by_position(x: torch.Tensor) -> torch.Tensor:  # [B, H, R, NB] -> [B, H·W, G, NB]: a position's rows
        return x.view(B, H, G, W, NB).transpose(2, 3).reshape(B, H * W, G, NB)

    recalls, blocks = [], []
    for w in WEIGHTS:
        ball = ball_leaf_bounds(rows, leaves, torch.full((B, H), w, device=rows.device))
        bounds = LeafBounds(*(by_position(t) for t in (ball.ub, ball.log_mass_ub, ball.log_mass_lb, ball.est)))
        keep, _ = select_leaves(bounds, bounds.ub.argmax(-1, keepdim=True), forced, live, threshold)
        keep = keep.view(B, H, 1, W, NB)
        read = (mass * keep).sum(-1).mean(2)  # [B, H, W] recall per position
        recalls.append((read * real).sum(-1) / real.sum(-1).clamp_min(1))
        blocks.append((keep.sum(-1)[:, :, 0].float() * real).sum(-1))
    return torch.stack(recalls), torch.stack(blocks)


def calibrate_spread(index: HiraIndex, rows: torch.Tensor, q_rank: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """The spread weight per batch row and KV head, [B, H] float32, from each weight's mean recall and leaves
    (``weight_scores``). For ``TopP(p)``: 1 (the plain estimate) where its recall reaches p; else the weight reading
    the fewest leaves among those whose recall does; else the best recall. For ``TopK`` (a fixed number of leaves):
    the best recall, 1 on a tie. The calibration only widens what the plain estimate reads short of p."""
    recall, count = weight_scores(index, rows, q_rank, threshold)  # [K, B, H], WEIGHTS[0] = 1
    best = recall >= recall.amax(0, keepdim=True)
    if isinstance(threshold, TopP):
        reach = recall >= threshold.p
        good = torch.where(reach[:1], torch.arange(len(WEIGHTS), device=rows.device)[:, None, None] == 0, reach)
        good = torch.where(good.any(0, keepdim=True), good, best)
    else:
        good = best
    choice = count.masked_fill(~good, math.inf).argmin(0)  # the fewest leaves among the good (the first on a tie)
    return torch.tensor(WEIGHTS, device=rows.device)[choice]
