"""The index: storage is a permutation of the input, and every node's bounds hold for its real members.

Eager tensor code only (no flex_attention), so hypothesis draws shapes as well as contents.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    KEY_KINDS,
    Q_KINDS,
    index_cases,
    level_member_count,
    level_member_max,
    level_member_var,
    make_key_mask,
    make_keys,
    make_queries,
    real_mask,
    storage_in_token_order,
)

import hira
from hira.index.bounds import upper_bound
from hira.index.cluster import kmeans_rank, pca_tree_rank, position_rank
from hira.index.index import append, refresh_bounds
from hira.selection.search import effective_bounds


def assert_storage_matches(index, keys, values, key_mask):
    """The index storage holds exactly the real tokens of keys/values (token order [B, N]), once each."""
    B, H, C, _ = index.keys.shape
    real = real_mask(key_mask, B, keys.shape[2], keys.device)  # [B, N]
    n = real.sum(1)
    assert torch.equal(index.n_valid, n)
    assert torch.equal(index.valid.sum(1), n)
    # Valid slots hold ranks 0..n-1 exactly once in every head; invalid slots hold -1.
    for b in range(B):
        for h in range(H):
            ranks = index.rank[b, h][index.valid[b]].long().sort().values
            assert torch.equal(ranks, torch.arange(int(n[b]), device=ranks.device)), (b, h)
    assert bool((index.rank[~index.valid[:, None, :].expand(B, H, C)] == -1).all())
    # Read back in token order, the storage equals the input at real tokens (bit for bit).
    k_back, v_back = storage_in_token_order(index, real)
    m = real[:, None, :, None]
    assert torch.equal(k_back * m, keys * m)
    assert torch.equal(v_back * m, values * m)


def assert_leaf_metadata(index):
    """count, leaf_first and leaf_last of every leaf, recomputed from the slots."""
    B, H, C, _ = index.keys.shape
    BS, NB = index.block_size, index.num_leaves
    rank = index.rank.view(B, H, NB, BS).long()
    real = index.valid.view(B, 1, NB, BS).expand(B, H, NB, BS)
    count = real.sum(-1)
    first = torch.where(real, rank, C).amin(-1)
    last = torch.where(real, rank, -1).amax(-1)
    assert torch.equal(index.levels[0].count.long(), count)
    assert torch.equal(index.leaf_first.long(), torch.where(count > 0, first, -1))
    assert torch.equal(index.leaf_last.long(), last)
    forced = (count > 0) & ((first < index.sink_tokens) | (last >= index.n_valid[:, None, None] - index.window_tokens))
    assert torch.equal(index.forced_leaves(), forced)


def assert_bounds_hold(index, q_rows):
    """For every level and node: count and spread of the real members, and upper_bound ≥ the exact (float64) max
    of q·k."""
    for level, (nodes, exact, count, var) in enumerate(
        zip(index.levels, level_member_max(index, q_rows), level_member_count(index), level_member_var(index))
    ):
        assert torch.equal(nodes.count.long(), count), f"level {level}: wrong member counts"
        tol = 1e-5 * (nodes.scale.double() ** 2 + 1)  # float32 sums of squares, relative to the node's magnitude
        if level > 0 and index.keys.dtype != torch.float32:
            # pooled from the children's spreads, exact about their means, not about their centres rounded to 16 bits
            tol = tol + 2 * torch.finfo(index.keys.dtype).eps * nodes.scale.double() ** 2
        assert bool(((nodes.var.double() - var).abs() <= tol).all()), f"level {level}: wrong spread (var)"
        ub = upper_bound(q_rows, nodes)  # [B, H, R, M]
        empty = (count == 0)[:, :, None, :].expand_as(ub)
        assert bool(torch.isneginf(ub[empty]).all()), f"level {level}: an empty node has a finite bound"
        assert bool(torch.isfinite(ub[~empty]).all()), f"level {level}: a non-empty node has no finite bound"
        gap = ub.double() - exact  # ≥ 0 where the bound holds
        bad = (~empty) & (gap < 0)
        assert not bool(bad.any()), f"level {level}: bound below the true max by {(-gap[bad]).max().item():.3g}"
    leaf_exact = level_member_max(index, q_rows)[0]
    assert bool((effective_bounds(index, q_rows).double() >= leaf_exact).all()), "effective bound below the max"


@settings(max_examples=50)
@given(case=index_cases())
def test_storage_is_a_permutation_of_the_input(case, device):
    keys, values, key_mask = case.tensors(device)
    index = hira.build_index(keys, values, case.config(), key_mask=key_mask, capacity=case.N + case.slack)

    BS = case.block_size
    built = -(-case.N // BS) * BS
    assert index.capacity == max(built, -(-(case.N + case.slack) // BS) * BS)
    assert int(index.next_slot) == built
    assert_storage_matches(index, keys, values, key_mask)
    assert_leaf_metadata(index)
    # Layout: real tokens fill a prefix of each row: the clustered tokens, then the sinks, then the recent window
    # (those two in position order).
    n = index.n_valid
    assert torch.equal(index.valid, torch.arange(index.capacity, device=device) < n[:, None])
    for b in range(case.B):
        nb = int(n[b])
        s = min(case.sink_tokens, nb)
        w = min(case.window_tokens, nb - s)
        tail = index.rank[b, :, nb - s - w : nb].long()  # [H, s + w]
        expected = torch.cat([torch.arange(s), torch.arange(nb - w, nb)]).to(device)
        assert torch.equal(tail, expected.expand(case.H, s + w))


@settings(max_examples=50)
@given(case=index_cases(), q_kind=st.sampled_from(Q_KINDS), R=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_bounds_hold_for_every_node(case, q_kind, R, seed, dtype, device):
    """In every storage dtype: the nodes' centres are rounded to it, and the radii must be measured from the rounded
    centres."""
    keys, values, key_mask = case.tensors(device, dtype)
    index = hira.build_index(keys, values, case.config(), key_mask=key_mask, capacity=case.N + case.slack)
    q_rows = make_queries(q_kind, keys, case.H, R, torch.Generator().manual_seed(seed))  # [B, H, R, D]
    assert_bounds_hold(index, q_rows)


@settings(max_examples=30)
@given(
    case=index_cases(max_n=200),
    steps=st.lists(st.tuples(st.integers(1, 70), st.sampled_from(["none", "right", "holes"])), min_size=1, max_size=4),
    q_kind=st.sampled_from(Q_KINDS),
    bounds=st.booleans(),
)
def test_append_keeps_storage_and_bounds_exact(case, steps, q_kind, bounds, device):
    """Appends keep the storage and every bound exact; with bounds=False (the dense mode's append) the storage
    stays exact, and refresh_bounds restores the very counts, rank ranges and bounds exact appends keep."""
    keys, values, key_mask = case.tensors(device)
    total = sum(s for s, _ in steps)
    built = -(-case.N // case.block_size) * case.block_size  # appends start at the next whole block
    index = hira.build_index(keys, values, case.config(), key_mask=key_mask, capacity=built + total)
    twin = hira.build_index(keys, values, case.config(), key_mask=key_mask, capacity=built + total)
    gen = torch.Generator().manual_seed(case.seed + 1)
    all_k, all_v, all_m = [keys], [values], [real_mask(key_mask, case.B, case.N, device)]
    for S, mask_kind in steps:
        k = make_keys(case.key_kind, (case.B, case.H, S, case.D), gen).to(device)
        v = torch.randn(case.B, case.H, S, case.D, generator=gen).to(device)
        lengths = torch.randint(0, S + 1, (case.B,), generator=gen).tolist()  # a row may append only padding
        m = make_key_mask(mask_kind, lengths, S, gen)
        append(index, k, v, None if m is None else m.to(device), bounds=bounds)
        if not bounds:
            append(twin, k, v, None if m is None else m.to(device))
        all_k.append(k)
        all_v.append(v)
        all_m.append(real_mask(m, case.B, S, device))

    assert int(index.next_slot) == built + total
    assert_storage_matches(index, torch.cat(all_k, 2), torch.cat(all_v, 2), torch.cat(all_m, 1))
    if not bounds:
        refresh_bounds(index)
        for got, want in zip(index.tensors(), twin.tensors()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_leaf_metadata(index)
    q_rows = make_queries(q_kind, index.keys, case.H, 2, gen)
    assert_bounds_hold(index, q_rows)


@pytest.mark.parametrize("kind", KEY_KINDS)
def test_bounds_hold_for_adversarial_keys_and_queries_at_the_members(kind, device):
    """Queries equal to stored keys (the bound is then tightest) and their negatives, for every key kind."""
    gen = torch.Generator().manual_seed(7)
    keys = make_keys(kind, (2, 2, 333, 16), gen).to(device)
    mask = make_key_mask("holes", [333, 100], 333, gen).to(device)
    cfg = hira.HiraConfig(block_size=16, branching=3, sink_tokens=0, window_tokens=0)
    index = hira.build_index(keys, keys, cfg, key_mask=mask)
    q_rows = torch.cat([keys[:, :, ::37], -keys[:, :, 5::41]], dim=2)  # [B, H, R, D]
    assert_bounds_hold(index, q_rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parent_radii_are_measured_from_the_rounded_centres(dtype, device):
    """Leaves of one repeated key each (centre = the key, radius 0), so that a parent's ball is tight: queries
    along a member's offset from its ancestor's stored centre meet the bound, which fails unless the radius is
    measured from that rounded centre rather than from the unrounded mean."""
    gen = torch.Generator().manual_seed(3)
    distinct = (3 * torch.randn(1, 2, 8, 16, generator=gen)).to(dtype)
    keys = distinct.repeat_interleave(16, dim=2).to(device)  # [1, 2, 128, 16]: leaf i holds key i 16 times
    cfg = hira.HiraConfig(block_size=16, branching=2, clustering="none", sink_tokens=0, window_tokens=0)
    index = hira.build_index(keys, keys, cfg)
    rows = []
    for level in index.levels[1:]:
        span = 8 // level.center.shape[2]  # distinct keys under each node
        centre = level.center.float().repeat_interleave(span, dim=2)  # [1, 2, 8, 16]: each key's ancestor
        rows.append(distinct.float().to(device) - centre)
    assert_bounds_hold(index, torch.cat(rows, dim=2))


@pytest.mark.parametrize("kind", ["normal", "clustered", "huge", "levels"])
def test_bounds_hold_when_cuda_matmuls_use_tf32(kind, device):
    """torch.set_float32_matmul_precision("high") makes CUDA round matmul inputs to 10 mantissa bits: the margin
    must cover that too, eager and compiled (measured on an H100: bounds fell 7e-4 below the max without it)."""
    if device.type != "cuda":
        pytest.skip("TF32 is a CUDA matmul mode")
    gen = torch.Generator().manual_seed(5)
    keys = make_keys(kind, (2, 4, 2048, 128), gen).to(device)
    index = hira.build_index(keys, keys, hira.HiraConfig(block_size=64, sink_tokens=0, window_tokens=0))
    q_rows = torch.cat([keys[:, :, ::97][:, :, :8], torch.randn(2, 4, 8, 128, generator=gen).to(device)], 2) / 11.3
    exact = level_member_max(index, q_rows)[0]  # [B, H, R, NB]
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for bound in (upper_bound, torch.compile(upper_bound, fullgraph=True)):
            assert bool((bound(q_rows, index.levels[0]).double() >= exact).all()), bound
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@settings(max_examples=40)
@given(
    N=st.integers(1, 200),
    D=st.sampled_from([1, 3, 16]),
    leaf=st.sampled_from([1, 4, 16, 64]),
    p_eligible=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cluster_ranks_are_permutations_with_eligible_keys_first(N, D, leaf, p_eligible, seed, device):
    gen = torch.Generator().manual_seed(seed)
    keys = make_keys("clustered", (2, 2, N, D), gen).to(device)
    eligible = (torch.rand(2, 2, N, generator=gen) < p_eligible).to(device)
    n_eligible = eligible.sum(-1, keepdim=True)  # [B, H, 1]
    for rank in (pca_tree_rank(keys, eligible, leaf), kmeans_rank(keys, eligible, leaf, 3), position_rank(eligible)):
        assert torch.equal(rank.sort(-1).values, torch.arange(N, device=device).expand(2, 2, N))
        assert bool(((rank < n_eligible) == eligible).all())


@pytest.mark.parametrize("clustering", ["pca", "kmeans"])
def test_clustering_makes_blocks_tight(clustering, device):
    """4 sink tokens, then shuffled, well separated clusters of one block each: clustering recovers the clusters
    as blocks (the sinks must not shift the blocks off the clusters); position order does not."""
    gen = torch.Generator().manual_seed(3)
    B, H, NB, BS, D = 1, 2, 8, 16, 8
    centres = 10 * torch.randn(B, H, NB, 1, D, generator=gen)
    clusters = (centres + 0.01 * torch.randn(B, H, NB, BS, D, generator=gen)).view(B, H, NB * BS, D)
    sinks = 10 * torch.randn(B, H, 4, D, generator=gen)
    keys = torch.cat([sinks, clusters[:, :, torch.randperm(NB * BS, generator=gen)]], dim=2).to(device)

    def radii(c):
        cfg = hira.HiraConfig(block_size=BS, clustering=c, sink_tokens=4, window_tokens=0)
        index = hira.build_index(keys, keys, cfg)
        return index.levels[0].radius[~index.forced_leaves()]  # the blocks holding no sink

    assert radii(clustering).numel() == B * H * NB
    assert radii(clustering).max() < 0.1 < radii("none").mean()


def test_deep_tree_levels_cover_their_leaves(device):
    """With branching 2 and 64 leaves the tree has 6 levels; the top level has at most `branching` nodes."""
    keys = torch.randn(1, 1, 64 * 16, 4).to(device)
    index = hira.build_index(keys, keys, hira.HiraConfig(block_size=16, branching=2))
    assert [lv.count.shape[-1] for lv in index.levels] == [64, 32, 16, 8, 4, 2]
    assert int(index.levels[-1].count.sum()) == 64 * 16
    q = torch.randn(1, 1, 3, 4).to(device)
    assert_bounds_hold(index, q)
