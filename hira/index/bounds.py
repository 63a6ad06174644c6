"""Bounds on q·k over the members of an index node: a ball (centre, radius), and the members' spread.

For a node with members k: max q·k ≤ q·c + ‖q‖·r. Computed in float32 and padded by a margin that covers float32
rounding of the dot products (and TF32 rounding of their inputs where CUDA matmuls allow it), so that a bound is
never below the true maximum (tests check it against float64 scores).

A per-dimension box [lo, hi] was measured beside the ball: on real keys it tightens the bound by 1–2 of the 12–18
score units both overshoot (benchmarks/bounds_results_8k.md), so neither prunes, while the box tripled the bytes a
search reads per leaf. Tight bounds come from the key sketch (``hira.index.sketch``) instead.

Shapes: B batch, H KV heads, M nodes of a level, S members per node, R query rows, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Relative float32 rounding allowance per dimension of a dot product (a few ulps per accumulated term).
_REL_EPS_PER_DIM = 8 * 2.0**-24


@torch._dynamo.assume_constant_result
def _cuda_matmul_input_rounding() -> float:
    """Relative rounding of the inputs of a float32 matmul on CUDA: 2^-10 where TF32 is allowed (10 mantissa bits,
    e.g. after ``torch.set_float32_matmul_precision("high")``), else 0. A constant when compiled."""
    try:
        tf32 = torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # the legacy and the new precision APIs were mixed: assume TF32
        tf32 = True
    return 2.0**-10 if tf32 else 0.0


def rounding_margin(qn: torch.Tensor, magnitude: torch.Tensor, D: int, is_cuda: bool) -> torch.Tensor:
    """A bound on the float32 rounding error of a D-term dot product q·x computed by matmul: generous ulps per
    term times ‖q‖·magnitude (magnitude ≥ ‖x‖ and each term's size), plus TF32 input rounding where CUDA allows it.
    Each product term carries up to 2× its inputs' rounding: TF32 inputs add 4·2^-10 of ‖q‖·magnitude (with slack).
    """
    return margin_factor(D, is_cuda) * qn * magnitude


def margin_factor(D: int, is_cuda: bool) -> float:
    """``rounding_margin`` per unit of ‖q‖·magnitude."""
    input_rounding = _cuda_matmul_input_rounding() if is_cuda else 0.0
    return _REL_EPS_PER_DIM * (D + 2) + 4 * input_rounding


@dataclass
class NodeBounds:
    """Bounds of every node of one index level. All float32 except ``count`` and ``center``.

    Attributes:
        center: [B, H, M, D] mean of the members, rounded to the keys' dtype (half the bytes a search reads, for
            bfloat16 keys): one matrix product against the query rows gives the bound and the mass estimate (one
            read of the leaf data per step). Any point is a valid centre: the radius and spread are measured from
            the rounded one.
        radius: [B, H, M] max ‖k − center‖ over members.
        count: [B, H, M] int32 number of real members (0: empty node, never selected).
        var: [B, H, M] mean over members and dimensions of (k − center)², the spread that the budgeted modes'
            mass estimate uses.
        scale: [B, H, M] ‖center‖ + radius (≥ every member's norm), the magnitude that sizes the rounding margin.
    """

    center: torch.Tensor
    radius: torch.Tensor
    count: torch.Tensor
    var: torch.Tensor
    scale: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.center, self.radius, self.count, self.var, self.scale)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _finish(center, radius, count, var) -> NodeBounds:
    return NodeBounds(center, radius, count, var, center.float().norm(dim=-1) + radius)


def members_bounds(keys: torch.Tensor, valid: torch.Tensor) -> NodeBounds:
    """Exact bounds of nodes from their members.

    Args:
        keys: [B, H, M, S, D] members of each node (any float dtype).
        valid: [B, H or 1, M, S] bool; invalid members are ignored. A node with none is empty.
    """
    x = keys.float()
    valid = valid.expand(x.shape[:-1])
    w = valid.to(x.dtype)[..., None]  # [B, H, M, S, 1]
    count = valid.sum(-1, dtype=torch.int32)  # [B, H, M]
    center = ((x * w).sum(-2) / count.clamp_min(1)[..., None].to(x.dtype)).to(keys.dtype)  # [B, H, M, D]
    dist = (x - center.float()[..., None, :]).norm(dim=-1).masked_fill(~valid, 0.0)  # [B, H, M, S]
    radius = dist.amax(-1)
    var = (dist * dist).sum(-1) / (count.clamp_min(1).to(x.dtype) * x.shape[-1])  # [B, H, M]
    return _finish(center, radius, count, var)


def parent_bounds(child: NodeBounds, branching: int) -> NodeBounds:
    """Bounds of the next level up, each parent covering ``branching`` consecutive children.

    The ball is centred on the members' mean with radius max_j(‖c_j − c‖ + r_j), which holds for every member.
    """
    B, H, M, D = child.center.shape
    P = -(-M // branching)
    pad = P * branching - M

    def grouped(t: torch.Tensor, fill: float) -> torch.Tensor:
        if pad:
            t = torch.cat([t, t.new_full((*t.shape[:2], pad, *t.shape[3:]), fill)], dim=2)
        return t.view(B, H, P, branching, *t.shape[3:])

    count = grouped(child.count, 0)  # [B, H, P, b]
    live = count > 0
    w = count.to(torch.float32)
    center_c = grouped(child.center.float(), 0.0)  # [B, H, P, b, D]
    total = count.sum(-1, dtype=torch.int32)  # [B, H, P]
    mean = (center_c * w[..., None]).sum(-2) / total.clamp_min(1)[..., None].to(torch.float32)
    center = mean.to(child.center.dtype)  # rounded as the children's, the offsets measured from it
    offset = (center_c - center.float()[..., None, :]).norm(dim=-1)  # [B, H, P, b]
    reach = offset + grouped(child.radius, 0.0)
    # Pooled spread: children's own spread plus their centres' offsets from the parent's centre.
    var = (w * (grouped(child.var, 0.0) + offset * offset / D)).sum(-1) / total.clamp_min(1).to(torch.float32)
    radius = reach.masked_fill(~live, 0.0).amax(-1)
    return _finish(center, radius, total, var)


def bound_and_estimate(
    q: torch.Tensor, nodes: NodeBounds, spread_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper bound on q·k over each node's members, and an estimate of log Σ_members exp(q·k).

    The bound is the ball's, q·c + ‖q‖·r, plus a rounding margin. The estimate, log n + q·c + ½‖q‖²·var·w (log-MGF of
    an isotropic Gaussian, its spread weighted by w), is not a bound: the budgeted modes rank and sum with it. On real
    keys (SmolLM2, pca order) it picks blocks within ~1.1× of the oracle's output error at the same budget, where
    ranking by the upper bound was 1.5–3× (benchmarks/bounds_results.md). Keys are not isotropic, and on some heads
    the spread term misranks (Gemma 3, benchmarks/NOTES.md §13): w is chosen per head at prefill
    (``hira.selection.calibrate``). Both come from one product of the rows with the centres.

    Args:
        q: [B, H, R, D] float32 query rows (already scaled, if scores are scaled).
        nodes: bounds of M nodes.
        spread_weight: [B, H] float32 w per batch row and KV head; None: 1.
    Returns:
        (bound, estimate), each [B, H, R, M] float32, -inf for empty nodes.
    """
    D = q.shape[-1]
    qc = q @ nodes.center.float().transpose(-1, -2)  # [B, H, R, M]
    q2 = (q * q).sum(-1, keepdim=True)  # [B, H, R, 1]
    qn = q2.sqrt()
    margin = rounding_margin(qn, nodes.scale[:, :, None, :], D, q.is_cuda)
    empty = (nodes.count == 0)[:, :, None, :]
    ub = (qc + qn * nodes.radius[:, :, None, :] + margin).masked_fill(empty, -math.inf)
    log_n = nodes.count.clamp_min(1).float().log()[:, :, None, :]
    spread = 0.5 * q2 * nodes.var[:, :, None, :]
    if spread_weight is not None:
        spread = spread * spread_weight[:, :, None, None]
    est = (log_n + qc + spread).masked_fill(empty, -math.inf)
    return ub, est


def upper_bound(q: torch.Tensor, nodes: NodeBounds) -> torch.Tensor:
    """The bound of ``bound_and_estimate`` alone: [B, H, R, M] float32."""
    return bound_and_estimate(q, nodes)[0]
