"""The search: no false negatives for exact thresholds, a skip bound that holds in every mode, budgets respected.

Eager tensor code only (no flex_attention), so hypothesis draws shapes as well as contents. True scores and
softmax masses are computed in float64 from the inputs, in token order; the index's rank maps them to leaves.
"""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    Q_KINDS,
    index_cases,
    kept_tokens,
    make_queries,
    per_query_head,
    real_mask,
    scores64,
    skipped_mass,
)

import hira
from hira import Certified, Dense, Fixed, Threshold, TopK, TopP
from hira.flex.attention import unfold_gqa
from hira.index.bounds import upper_bound
from hira.selection.search import effective_bounds, leaf_bounds, search_rows
from hira.selection.threshold import THRESHOLDS, from_name, name_and_value

# Slack for comparing a float32-computed skip bound with the float64 mass it bounds.
MASS_RTOL, MASS_ATOL = 1e-4, 1e-7


@dataclasses.dataclass
class Searched:
    """An index, queries and (optionally) their selection, with what the float64 checks need."""

    keys: torch.Tensor  # [B, H, N, D] in token order
    index: hira.HiraIndex
    q: torch.Tensor  # [B, G·H, S, D]
    real: torch.Tensor  # [B, N] real tokens
    scale: float
    sel: hira.Selection | None


def searched(case, device, G, S, q_kind, seed, threshold, scale) -> Searched:
    """Build the case's index, draw queries [B, G·H, S, D] and search them (unless threshold is None)."""
    keys, values, key_mask = case.tensors(device)
    index = hira.build_index(keys, values, case.config(), key_mask=key_mask, capacity=case.N + case.slack)
    q = make_queries(q_kind, keys, G * case.H, S, torch.Generator().manual_seed(seed))
    real = real_mask(key_mask, case.B, case.N, device)  # [B, N]
    scale = case.D**-0.5 if scale is None else scale
    sel = hira.search(index, q, threshold, scale=scale) if threshold is not None else None
    return Searched(keys, index, q, real, scale, sel)


def folded_rows(q, H, scale):
    """q [B, Hq, S, D] -> the scaled float32 rows [B, H, G·S, D] that the tensor-level search takes."""
    return q.float().reshape(q.shape[0], H, -1, q.shape[-1]) * scale


def leaves_in_use(index):
    """[B, H, NB] bool: the leaves up to the first free slot, which the dense mode reads (empty ones included)."""
    B, H, NB = index.levels[0].count.shape
    used = -(-int(index.next_slot) // index.block_size)
    return (torch.arange(NB, device=index.keys.device) < used).expand(B, H, NB)


def assert_selection_consistent(sel, index, dense=False):
    """keep, kv_num_blocks, kv_indices and kept_fraction say the same thing; empty leaves are never kept (the
    dense mode keeps every leaf in use, its kept fraction 1)."""
    B, H, NB = sel.keep.shape
    live = leaves_in_use(index) if dense else index.levels[0].count > 0
    assert not bool((sel.keep & ~live).any()), "an empty leaf was kept"
    assert bool((sel.keep >= index.forced_leaves()).all()), "a sink or window leaf was dropped"
    n = sel.keep.sum(-1)
    assert torch.equal(sel.kv_num_blocks[..., 0].long(), n)
    idx = sel.kv_indices[:, :, 0, :].long()  # [B, H, NB]
    assert torch.equal(idx.sort(-1).values, torch.arange(NB, device=idx.device).expand(B, H, NB))
    listed = torch.arange(NB, device=idx.device) < n[..., None]
    assert torch.equal(torch.zeros_like(sel.keep).scatter_(2, idx, listed), sel.keep), "listed blocks != kept"
    assert bool((idx.masked_fill(~listed, NB).diff(dim=-1) >= 0).all()), "kept blocks not listed ascending"
    torch.testing.assert_close(sel.kept_fraction, n / live.sum(-1).clamp_min(1), rtol=1e-6, atol=0)


def assert_no_false_negatives(d, tau):
    """Every real key with float64 score ≥ tau ([B, Hq, S] or a float) lies in a kept leaf."""
    s = scores64(d.q, d.keys, d.scale)  # [B, Hq, S, N]
    tau = torch.as_tensor(tau, dtype=torch.float64, device=s.device)
    hit = (s >= (tau[..., None] if tau.ndim else tau)) & per_query_head(d.real, s.shape[1])
    kept = per_query_head(kept_tokens(d.index, d.sel.keep, d.real), s.shape[1])
    missed = hit & ~kept
    assert not bool(missed.any()), f"{int(missed.sum())} keys at or above tau were skipped"


def assert_skip_bounds_hold(d, eps=None):
    """True skipped softmax mass (float64) ≤ the selection's prior bound (and ≤ eps when given)."""
    sel, q = d.sel, d.q
    kept = kept_tokens(d.index, sel.keep, d.real)
    mass = skipped_mass(q, d.keys, d.real, kept, d.scale)  # [B, Hq, S]
    bound = unfold_gqa(sel.skip_bound, q.shape[1]).double()
    assert bool((mass <= bound * (1 + MASS_RTOL) + MASS_ATOL).all()), f"mass {mass.max()} above bound"
    # log_kept_lb is a lower bound on the log of the kept keys' unnormalised mass
    s = scores64(q, d.keys, d.scale).masked_fill(~per_query_head(kept, q.shape[1]), -math.inf)  # [B, Hq, S, N]
    log_kept = s.logsumexp(-1)
    lb = unfold_gqa(sel.log_kept_lb, q.shape[1]).double()
    tol = 1e-4 * (1 + log_kept.abs().nan_to_num(posinf=0.0))
    assert bool(((lb <= log_kept + tol) | torch.isneginf(lb)).all()), "log_kept_lb above the kept mass"
    if eps is not None:
        assert bool((mass <= eps * (1 + MASS_RTOL)).all()), f"certified: skipped mass {mass.max()} > eps {eps}"


common = dict(
    case=index_cases(),
    G=st.sampled_from([1, 2, 3]),
    S=st.integers(1, 3),
    q_kind=st.sampled_from(Q_KINDS),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([None, 0.05, 1.0]),
)


@settings(max_examples=60)
@given(**common, tau_at=st.floats(0.0, 1.0), exactly_a_score=st.booleans())
def test_fixed_threshold_has_no_false_negatives(case, G, S, q_kind, seed, scale, tau_at, exactly_a_score, device):
    d = searched(case, device, G, S, q_kind, seed, None, scale)
    s = scores64(d.q, d.keys, d.scale)[per_query_head(d.real, G * case.H).expand(-1, -1, S, -1)]
    # τ: a quantile of the true scores, or exactly one real key's score (the boundary case of "≥").
    tau = float(s[int(tau_at * (s.numel() - 1))]) if exactly_a_score else float(torch.quantile(s, tau_at))
    d.sel = hira.search(d.index, d.q, Fixed(tau), scale=d.scale)
    assert_no_false_negatives(d, tau)
    assert_selection_consistent(d.sel, d.index)
    assert bool((d.sel.tau == torch.tensor(tau, dtype=torch.float32)).all())


thresholds = st.one_of(
    st.just(Dense()),
    st.just(Fixed(-math.inf)),
    st.floats(-40, 5).map(Fixed),
    st.sampled_from([0.5, 1e-2, 1e-4, 1e-6]).map(Certified),
    st.integers(1, 6).map(TopK),
    st.sampled_from([0.01, 0.5, 0.9, 0.99, 1.0]).map(TopP),
)


@given(threshold=thresholds)
def test_every_mode_crosses_the_operator_boundary(threshold):
    """A custom operator takes primitives: a mode goes through it as its name and a float, and comes back equal."""
    name, value = name_and_value(threshold)
    assert isinstance(name, str) and type(value) is float
    back = from_name(name, value)
    assert type(back) is type(threshold) and back == threshold and str(back) == str(threshold)


def test_the_registry_holds_every_mode_under_its_name():
    assert set(THRESHOLDS.values()) == set(Threshold.__subclasses__()) == {Dense, Fixed, Certified, TopK, TopP}
    assert all(THRESHOLDS[cls.name] is cls for cls in THRESHOLDS.values())


@settings(max_examples=60)
@given(**common, threshold=thresholds)
def test_skip_bound_holds_in_every_mode(case, G, S, q_kind, seed, scale, threshold, device):
    """Prior skip bound ≥ true skipped mass for every mode; the exact modes also miss no key above their τ."""
    d = searched(case, device, G, S, q_kind, seed, threshold, scale)
    sel = d.sel
    assert_selection_consistent(sel, d.index, dense=isinstance(threshold, Dense))
    assert_skip_bounds_hold(d, eps=threshold.eps if isinstance(threshold, Certified) else None)
    if threshold.exact:
        assert_no_false_negatives(d, unfold_gqa(sel.tau, G * case.H))
    if isinstance(threshold, Dense):
        assert torch.equal(sel.keep, leaves_in_use(d.index))
    if threshold == Fixed(-math.inf):
        assert torch.equal(sel.keep, d.index.levels[0].count > 0)
    if threshold in (Dense(), Fixed(-math.inf)):
        assert bool(torch.isneginf(sel.log_skip_ub).all())
        assert bool((sel.skip_bound == 0).all())


@settings(max_examples=25)
@given(
    case=index_cases().map(
        lambda c: dataclasses.replace(
            c,
            N=max(c.N, 8 * c.block_size),
            window_tokens=min(c.window_tokens, c.block_size),  # at most 2 blocks forced: some are left to prune
            clustering="pca" if c.clustering == "none" else c.clustering,  # position order mixes the levels
            key_kind="levels",
            mask_kind="none",
        )
    ),
    G=st.sampled_from([1, 2]),
    S=st.integers(1, 2),
    eps=st.sampled_from([0.3, 1e-2, 1e-3, 1e-5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_certified_prunes_yet_skips_at_most_eps(case, G, S, eps, seed, device):
    """Keys on score levels spread over 30 nats: many blocks are dropped, the skipped mass stays ≤ ε, and no key
    above the reported τ (just above the largest bound of a skipped block) is skipped."""
    d = searched(case, device, G, S, "axis", seed, Certified(eps), None)
    assert_skip_bounds_hold(d, eps=eps)
    sel, Hq = d.sel, G * case.H
    assert_no_false_negatives(d, unfold_gqa(sel.tau, Hq))
    # (The forced leaves alone may already hold all but ε of the mass: only pruning is asserted.)
    assert bool(sel.keep.sum() < (d.index.levels[0].count > 0).sum()), "no pruning"


@pytest.mark.parametrize("key_sketch, kept", [(False, 4), (True, 3)])
def test_certified_search_drops_far_blocks(key_sketch, kept, device):
    """A case where the answer is known: 16 blocks of 16 keys on score levels 0, -2, ..., -30, ε = 1e-2.

    Without a sketch the kept mass is known from one exact score, e^0, and each block's mass bound is 16·e^level:
    the rest after levels 0..-6 is 16·e^-8/(1 − e^-2) = 6.2e-3 ≤ 0.0101 (after 0..-4 it is 4.6e-2), so 4 blocks.
    With a sketch the top block's 16 keys are known (within the sketch's tiny error) from below: 16·e^0, and the
    rest after 0..-4 (0.046) is enough: 3 blocks."""
    B, H, BS, D = 1, 1, 16, 8
    k = torch.zeros(B, H, 16 * BS, D)
    k[..., 0] = torch.arange(16).repeat_interleave(BS) * -2.0
    k[..., 1:] = 0.01 * torch.randn(B, H, 16 * BS, D - 1)
    cfg = hira.HiraConfig(block_size=BS, branching=2, sink_tokens=0, window_tokens=0, key_sketch=key_sketch)
    index = hira.build_index(k.to(device), k.to(device), cfg)
    q = torch.zeros(B, H, 1, D, device=device)
    q[..., 0] = D**0.5  # scaled score of a key = its first coordinate
    sel = hira.search(index, q, Certified(1e-2))
    assert int(sel.kv_num_blocks) == kept
    assert 0 < float(sel.skip_bound) < 1e-2


@settings(max_examples=40)
@given(
    case=index_cases().map(lambda c: dataclasses.replace(c, sink_tokens=0, window_tokens=0)),
    G=st.sampled_from([1, 2]),
    q_kind=st.sampled_from(Q_KINDS),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_keeps_the_k_blocks_of_largest_estimated_mass(case, G, q_kind, k, seed, device):
    """k blocks (or all live ones), ranked by the group's estimated share of mass: Σ over the rows of
    softmax(the leaves' mass estimate)."""
    d = searched(case, device, G, 2, q_kind, seed, TopK(k), None)
    sel, index = d.sel, d.index
    live = index.levels[0].count > 0
    assert torch.equal(sel.keep.sum(-1), live.sum(-1).clamp_max(k))
    rows = folded_rows(d.q, case.H, d.scale)
    share = leaf_bounds(index, rows).est.softmax(-1).nan_to_num(nan=0.0).sum(dim=2)  # [B, H, NB]
    worst_kept = share.masked_fill(~sel.keep, math.inf).amin(-1)
    best_dropped = share.masked_fill(sel.keep | ~live, -math.inf).amax(-1)
    assert bool((worst_kept >= best_dropped).all())


@settings(max_examples=40)
@given(**common, p=st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)).map(sorted))
def test_topp_grows_with_p(case, G, S, q_kind, seed, scale, p, device):
    d = searched(case, device, G, S, q_kind, seed, None, scale)
    small = hira.search(d.index, d.q, TopP(p[0]), scale=d.scale)
    large = hira.search(d.index, d.q, TopP(p[1]), scale=d.scale)
    assert bool((small.keep <= large.keep).all()), "topp kept fewer blocks for a larger p"
    assert bool((small.keep.sum(-1) >= 1).all())


@settings(max_examples=40)
@given(case=index_cases(), q_kind=st.sampled_from(Q_KINDS), seed=st.integers(0, 2**31 - 1), p=st.floats(0.01, 1.0))
def test_topp_keeps_the_fewest_blocks_reaching_p(case, q_kind, seed, p, device):
    """One query row: the kept blocks (forced ones included) hold estimated mass ≥ p, and dropping the weakest
    kept block that is not forced would fall below p. Estimated mass: softmax over blocks of the leaves' estimate."""
    d = searched(case, device, 1, 1, q_kind, seed, TopP(p), None)
    index, keep = d.index, d.sel.keep  # keep [B, H, NB]
    log_est = leaf_bounds(index, folded_rows(d.q, case.H, d.scale)).est[:, :, 0]  # [B, H, NB]
    est = log_est.double().softmax(-1).nan_to_num(nan=0.0)
    kept_mass = (est * keep).sum(-1)
    assert bool((kept_mass >= p - 1e-5).all()), "the kept blocks do not reach p"
    optional = keep & ~index.forced_leaves()
    weakest = est.masked_fill(~optional, math.inf).amin(-1)
    assert bool(((kept_mass - weakest < p + 1e-5) | ~optional.any(-1)).all()), "topp kept a block it did not need"


@settings(max_examples=30)
@given(**common, sink=st.sampled_from([0, 2]), window=st.sampled_from([1, 2, 17]))
def test_forced_leaves_are_kept_and_dense_keeps_all(case, G, S, q_kind, seed, scale, sink, window, device):
    case = dataclasses.replace(case, sink_tokens=sink, window_tokens=window)
    d = searched(case, device, G, S, q_kind, seed, None, scale)
    index, q = d.index, d.q
    nothing = hira.search(index, q, Fixed(1e30), scale=d.scale)
    assert torch.equal(nothing.keep, index.forced_leaves())
    # Tokens of the sinks and the recent window (by rank among real tokens) are in kept leaves.
    rank = d.real.long().cumsum(1) - 1  # [B, N]
    n = d.real.sum(1, keepdim=True)
    forced_tok = d.real & ((rank < case.sink_tokens) | (rank >= n - case.window_tokens))
    kept = kept_tokens(index, nothing.keep, d.real)
    assert bool((kept >= forced_tok[:, None, :]).all())

    # dense: every leaf in use (every non-empty one among them), listed first in ascending order, nothing skipped.
    dense = search_rows(index, folded_rows(q, case.H, d.scale), Dense())
    used = leaves_in_use(index)
    assert torch.equal(dense.keep, used)
    assert bool((used >= (index.levels[0].count > 0)).all())
    n = used.sum(-1)  # [B, H]
    assert torch.equal(dense.kv_num_blocks[..., 0], n.to(torch.int32))
    for b in range(used.shape[0]):
        for h in range(used.shape[1]):
            listed = dense.kv_indices[b, h, 0, : int(n[b, h])].long()
            assert torch.equal(listed, used[b, h].nonzero()[:, 0])
    assert bool((dense.skip_bound == 0).all())


@settings(max_examples=25)
@given(**common)
def test_upper_levels_never_tighten_the_leaf_bounds(case, G, S, q_kind, seed, scale, device):
    """A parent contains its children, so walking the tree top-down (effective_bounds) keeps exactly what the leaf
    bounds alone keep: search evaluates the leaf level only."""
    d = searched(case, device, G, S, q_kind, seed, None, scale)
    rows = folded_rows(d.q, case.H, d.scale)
    leaf = upper_bound(rows, d.index.levels[0])
    scale_ = d.index.levels[0].scale[:, :, None, :] * rows.norm(dim=-1, keepdim=True)  # [B, H, R, NB]
    torch.testing.assert_close(effective_bounds(d.index, rows), leaf, rtol=0, atol=1e-6 * float(scale_.max() + 1))


def test_prior_bound_is_one_when_a_rows_best_block_is_dropped(device):
    """Two query heads of one KV head disagree: topk(1) keeps the block the second head prefers, so the first head's
    best block (its exact score m) is skipped and nearly all of its mass with it. The prior bound cannot lean on m
    then: it must say 1."""
    BS, D = 16, 4
    k = torch.zeros(1, 1, 2 * BS, D)
    k[0, 0, :BS, 0] = 1.0  # block A (exact duplicates: its bound is tight)
    k[0, 0, BS:, 1] = 1.0  # block B
    cfg = hira.HiraConfig(block_size=BS, clustering="none", sink_tokens=0, window_tokens=0)
    index = hira.build_index(k.to(device), k.to(device), cfg)
    q = torch.zeros(1, 2, 1, D, device=device)
    q[0, 0, 0, 0] = 10.0  # head 0: A scores 10, B scores 0
    q[0, 1, 0, 1] = 20.0  # head 1: B scores 20 (the best bound over the group)
    sel = hira.search(index, q, TopK(1), scale=1.0)
    assert sel.keep.tolist() == [[[False, True]]]
    d = Searched(k.to(device), index, q, real_mask(None, 1, 2 * BS, device), 1.0, sel)
    assert_skip_bounds_hold(d)  # head 0 skipped mass = 1 / (1 + e^-10)
    assert sel.skip_bound[0, 0, 0] == 1.0


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
)
def test_selections_past_the_scan_limit_compile(device):
    """Past ``MAX_SCAN_BLOCKS`` leaves the block lists are a stable sort and the ``TopP`` rule runs as an opaque
    operator (inductor failed to compile their prefix sums there on CUDA); the ``Certified`` rule, which has no
    prefix sum, compiles as it is: the same results eager and compiled."""
    from hira.flex.mask import MAX_SCAN_BLOCKS, block_lists
    from hira.selection import threshold as modes

    gen = torch.Generator().manual_seed(0)
    NB = MAX_SCAN_BLOCKS + 9
    est = (torch.randn(1, 2, 4, NB, generator=gen) * 3).to(device)
    forced = (torch.rand(1, 2, NB, generator=gen) < 0.01).to(device)
    first = (torch.rand(1, 2, 4, NB, generator=gen) < 0.01).to(device)
    keep = modes._topp_keep_program(est, forced, 0.9)
    certified = modes._certified_keep(est, est - 1.0, first, 0.01)
    assert 0 < int(certified.sum()) < 2 * NB
    for run in (lambda f: f, lambda f: torch.compile(f, fullgraph=True, dynamic=False)):
        assert torch.equal(run(modes._topp_keep)(est, forced, 0.9), keep)
        assert torch.equal(run(modes._certified_keep)(est, est - 1.0, first, 0.01), certified)
        num, idx = run(block_lists)(keep)
        assert torch.equal(num, keep.sum(-1, dtype=torch.int32))
        assert torch.equal(idx, torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).int())


def shortest_certified_lists(ub: torch.Tensor, lb: torch.Tensor, first: torch.Tensor, eps: float) -> torch.Tensor:
    """The certified rule by a sort, in float64: per row [..., NB], the ``first`` leaves, then the others by mass
    bound, up to the shortest such list after which the rest's bound is ≤ ε of the total. -> [..., NB] bool."""
    ub, lb = ub.double(), lb.double()
    order = ub.masked_fill(first, math.inf).argsort(dim=-1, descending=True, stable=True)
    u, kept = ub.gather(-1, order), lb.gather(-1, order).logcumsumexp(-1)
    rest = u.flip(-1).logcumsumexp(-1).flip(-1)
    rest = torch.cat([rest[..., 1:], torch.full_like(u[..., :1], -math.inf)], -1)  # bound of the leaves after t
    ok = torch.isneginf(rest) | (rest - kept <= math.log(eps / (1 - eps)))
    ok &= torch.arange(u.shape[-1]) >= first.sum(-1, keepdim=True) - 1  # every first leaf listed
    listed = torch.arange(u.shape[-1]) <= ok.int().argmax(-1, keepdim=True)
    return torch.zeros_like(listed).scatter_(-1, order, listed)


@settings(max_examples=60)
@given(
    NB=st.integers(1, 3000),
    spread=st.floats(0.0, 30.0),
    width=st.floats(0.0, 8.0),
    unknown=st.sampled_from([0.0, 0.5, 1.0]),
    empty=st.sampled_from([0.0, 0.1, 1.0]),
    eps=st.sampled_from([0.3, 1e-2, 1e-3, 1e-5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_certified_cut_keeps_the_shortest_list_up_to_its_resolution(device, NB, spread, width, unknown, empty, eps,
                                                                      seed):
    """Per row, the certified rule's cut keeps every leaf of the shortest sorted list (float64), its kept set's bound
    on the rest is ≤ ε of the total, and the leaves it keeps beyond that list have bounds within the search's
    resolution of the list's last one: rows of mass bounds spread over up to 30 nats, lower bounds up to 8 nats below
    them or unknown, empty leaves."""
    from hira.selection import threshold as modes

    gen = torch.Generator().manual_seed(seed)
    R = 3
    ub = torch.randn(1, 1, R, NB, generator=gen) * spread
    lb = torch.where(torch.rand(1, 1, R, NB, generator=gen) < unknown, -math.inf,
                     ub - torch.rand(1, 1, R, NB, generator=gen) * width)
    gone = torch.rand(1, 1, R, NB, generator=gen) < empty
    ub, lb = ub.masked_fill(gone, -math.inf), lb.masked_fill(gone, -math.inf)
    first = (torch.rand(1, 1, R, NB, generator=gen) < 0.01) | (torch.arange(NB) == ub.argmax(-1, keepdim=True))
    cut = modes._certified_cut(ub.to(device), lb.to(device), first.to(device), eps).cpu()
    others = ub.masked_fill(first, -math.inf)
    kept = (first | (others >= cut))[0, 0]  # [R, NB] per row
    ub, lb, first = ub[0, 0], lb[0, 0], first[0, 0]
    shortest = shortest_certified_lists(ub, lb, first, eps)
    live = ub > -math.inf
    assert not bool((shortest & live & ~kept).any()), "a leaf of the shortest list was left out"
    rest = ub.double().masked_fill(kept | ~live, -math.inf).logsumexp(-1)
    kept_mass = lb.double().masked_fill(~kept, -math.inf).logsumexp(-1)
    assert bool((torch.isneginf(rest) | (torch.sigmoid(rest - kept_mass) <= eps * (1 + 1e-4))).all())
    extra = kept & live & ~shortest & ~first
    if extra.any():
        other = ub.masked_fill(first | ~live, math.nan)  # [R, NB]
        last = other.masked_fill(~shortest, math.nan).nan_to_num(math.inf).amin(-1, keepdim=True)  # list's last bound
        span = other.nan_to_num(-math.inf).amax(-1, keepdim=True) - other.nan_to_num(math.inf).amin(-1, keepdim=True)
        resolution = span / modes.CUT_WAYS**modes.CUT_PASSES
        assert bool((ub >= last - resolution * (1 + 1e-3) - 1e-5)[extra].all())


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), NB=st.sampled_from([1, 7, 64, 130, 8193]),
       density=st.sampled_from([0, 0.05, 0.5, 1]))
def test_block_lists_kernel_equals_the_tensor_program(seed, NB, density):
    """The Triton block lists (on CUDA, else in triton's interpreter on the CPU) equal the tensor program's: the
    count and the kept blocks first in ascending order, then the others, past the scan limit too."""
    import os

    from hira.flex.mask import block_lists

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not 1 (conftest.py sets it where CUDA is absent): no CPU run of the kernel")
    try:
        from hira.flex.lists_kernel import block_lists_kernel
    except ImportError:
        pytest.skip("triton is not installed")
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, 3, NB, generator=gen) < density
    want = block_lists(keep)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    got = block_lists_kernel(keep.to(dev))
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
