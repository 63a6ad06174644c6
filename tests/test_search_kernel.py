"""The search's Triton kernels (``hira.selection.search_kernel``) make the tensor program's choice.

On CUDA the compiled kernels are compared with ``search_rows``'s tensor program; on the CPU, where triton is
installed, the same kernels run in triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py). Ties are the
one freedom: the tensor program's ``topk`` leaves the choice among equal shares unspecified, and its ``TopP`` sort
the order of equal estimates; the kernels break the first by index and keep every tied estimate. So does float32
rounding where a leaf's mass-above is p itself.
"""

import dataclasses
import functools
import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import Q_KINDS, index_cases, make_queries

import hira
from hira import Fixed, TopK, TopP
from hira.selection.search import Selection, leaf_bounds, search_rows


def _kernel_search(index, rows, threshold, ways=None, scale=None, kth=None, split=8) -> Selection:
    """The kernels' selection: through ``search_rows`` on CUDA, straight from the module in the interpreter; with
    ``ways`` pivots a pass in the selection's searches (default the launch's own), ``TopK``'s k-th share found as
    ``kth`` says (``select_launch``; "shares": from the shares kernel's programs of ``split`` leaves), the rows
    multiplied by ``scale`` in the kernels (None: none)."""
    if rows.is_cuda and ways is None and kth is None:
        return search_rows(index, rows, threshold, scale=scale)
    if not rows.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not 1 (conftest.py sets it where CUDA is absent): no CPU run of the kernels")
    try:
        from hira.selection import search_kernel
    except ImportError:
        pytest.skip("triton is not installed: the kernels cannot run in its interpreter")
    assert search_kernel.applies(index, rows, threshold)
    launch = functools.partial(search_kernel.select_launch, ways=ways, kth=kth, split=split)
    with mock.patch.object(search_kernel, "select_launch", launch):
        return Selection(*search_kernel.ball_search(index, rows, threshold, 1.0 if scale is None else scale))


def _thresholds():
    return st.one_of(
        st.integers(1, 40).map(TopK),
        st.sampled_from([0.5, 0.9, 0.99, 1.0]).map(TopP),
        st.one_of(st.floats(-20, 40), st.just(-math.inf)).map(Fixed),
    )


@settings(max_examples=40)
@given(case=index_cases(), G=st.sampled_from([1, 3, 4]), q_kind=st.sampled_from(Q_KINDS), threshold=_thresholds(),
       ways=st.sampled_from([None, 2, 4, 16]), kth=st.sampled_from([None, "topk", "search", "shares"]),
       scale=st.sampled_from([None, 0.125, 0.3]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_choose_as_the_tensor_program(device, case, G, q_kind, threshold, ways, kth, scale, dtype, seed):
    """Same kept leaves, block lists, τ, certificate and fractions as ``search_rows``'s tensor program, up to ties,
    whatever the searches' pivots per pass and however ``TopK`` finds its k-th share, for keys (and so leaf
    centres) in float32 or bfloat16; given a scale, the kernels take bfloat16 rows unscaled and scale them as the
    tensor program does."""
    _check_same_choice(device, case, G, q_kind, threshold, ways, seed, scale, dtype, kth)


@settings(max_examples=15, deadline=None)
@given(case=index_cases(max_n=3000, block_sizes=(16,)), G=st.sampled_from([1, 4]), q_kind=st.sampled_from(Q_KINDS),
       threshold=st.one_of(st.integers(1, 40).map(TopK), st.sampled_from([0.5, 0.9, 0.99]).map(TopP)),
       ways=st.sampled_from([2, 4, 16]), kth=st.sampled_from([None, "topk", "search", "shares"]),
       split=st.sampled_from([4, 16, 64]), seed=st.integers(0, 2**31 - 1))
def test_kernels_choose_as_the_tensor_program_among_many_leaves(device, case, G, q_kind, threshold, ways, kth, split,
                                                                seed):
    """As above where the budgeted modes skip most leaves (up to ~190 leaves per head), so that the searches for
    the k-th share and the p cut have many candidates, and the shares kernel's splits (of 4, 16 or 64 leaves) keep
    fewer candidates than they hold."""
    _check_same_choice(device, dataclasses.replace(case, window_tokens=0), G, q_kind, threshold, ways, seed,
                       kth=kth, split=split)


@settings(max_examples=10, deadline=None)
@given(NB=st.integers(2, 40), k=st.integers(1, 12), kth=st.sampled_from([None, "topk", "search", "shares"]),
       seed=st.integers(0, 2**31 - 1))
def test_kernels_keep_the_first_of_tied_leaves(device, NB, k, kth, seed):
    """Where every leaf ties (identical blocks: identical bounds and shares), ``TopK(k)`` keeps exactly the first k
    leaves by index, no more: the tie-break at the k-th share (the tensor program's ``topk`` may keep other tied
    leaves, which the comparisons above accept)."""
    BS, D = 16, 32
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(BS, D, generator=gen).repeat(NB, 1)[None, None].to(device)  # [1, 1, NB·BS, D]
    cfg = hira.HiraConfig(block_size=BS, clustering="none", sink_tokens=0, window_tokens=0)
    index = hira.build_index(keys, keys, cfg)
    rows = torch.randn(1, 1, 4, D, generator=gen).to(device)
    got = _kernel_search(index, rows, TopK(k), kth=kth)
    assert torch.equal(got.keep[0, 0].cpu(), torch.arange(NB) < k)


@settings(max_examples=10, deadline=None)
@given(NB=st.integers(2, 40), k=st.integers(1, 24), split=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**31 - 1))
def test_the_shares_kernel_keeps_the_k_largest_where_they_crowd_one_split(device, NB, k, split, seed):
    """Where the shares fall with the leaf's index (block i's keys all u·(NB − i)/2 for rows u), the k largest are
    the first k leaves, crowded into the first splits of the shares kernel: ``TopK(k)`` keeps exactly those."""
    BS, D = 16, 32
    gen = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(D, generator=gen), dim=0)
    height = (NB - torch.arange(NB).float()) / 2
    keys = (height[:, None, None] * u).expand(NB, BS, D).reshape(1, 1, NB * BS, D).to(device)
    cfg = hira.HiraConfig(block_size=BS, clustering="none", sink_tokens=0, window_tokens=0)
    index = hira.build_index(keys, keys, cfg)
    rows = u.expand(1, 1, 4, D).to(device)
    got = _kernel_search(index, rows, TopK(k), kth="shares", split=split)
    assert torch.equal(got.keep[0, 0].cpu(), torch.arange(NB) < k)


@settings(max_examples=10, deadline=None)
@given(NB=st.integers(3, 40), k=st.integers(1, 2), kth=st.sampled_from([None, "topk", "search", "shares"]),
       split=st.sampled_from([2, 4]), seed=st.integers(0, 2**31 - 1))
def test_the_kept_mass_bound_is_minus_inf_where_the_top_leaf_is_skipped(device, NB, k, kth, split, seed):
    """One leaf has the largest bound of every row and a small share (its keys are long and orthogonal to the
    rows), the first k leaves the largest shares: ``TopK(k)`` skips the top leaf, so the kept-mass bound is -inf,
    whichever program decides that leaf's fate (the one that scores it exactly never knows)."""
    BS, D = 16, 32
    gen = torch.Generator().manual_seed(seed)
    keys = 0.1 * torch.randn(NB, BS, D, generator=gen)
    keys[:, :, 0] = 0.0
    keys[:k, :, 0] = 4.0  # the k largest shares: the first k leaves
    top = int(torch.randint(k, NB, (1,), generator=gen))
    keys[top, :, 1:] = 6 * torch.nn.functional.normalize(torch.randn(BS, D - 1, generator=gen), dim=-1)
    keys = keys.reshape(1, 1, NB * BS, D).to(device)
    cfg = hira.HiraConfig(block_size=BS, clustering="none", sink_tokens=0, window_tokens=0)
    index = hira.build_index(keys, keys, cfg)
    rows = torch.zeros(1, 1, 4, D)
    rows[..., 0] = 1.0 + 0.5 * torch.rand(4, generator=gen)
    rows = rows.to(device)
    want = search_rows(index, rows, TopK(k), kernel=False)
    assert torch.equal(want.keep[0, 0].cpu(), torch.arange(NB) < k)
    assert (want.log_kept_lb == -math.inf).all()  # the case is what it claims: the top leaf is skipped
    got = _kernel_search(index, rows, TopK(k), kth=kth, split=split)
    assert torch.equal(got.keep.cpu(), want.keep.cpu())
    assert (got.log_kept_lb == -math.inf).all()


def _check_same_choice(device, case, G, q_kind, threshold, ways, seed, scale=None, dtype=torch.float32, kth=None,
                       split=8):
    case = dataclasses.replace(case, key_sketch=False)
    keys, values, key_mask = case.tensors(device, dtype)
    index = hira.build_index(keys, values, case.config(), key_mask=key_mask, capacity=case.N + case.slack)
    gen = torch.Generator().manual_seed(seed)
    rows = make_queries(q_kind, keys.float(), case.H * G, 1, gen).to(device).view(case.B, case.H, G, case.D)
    raw = rows
    if scale is not None:  # the kernels get bfloat16 rows and the scale; the tensor program the rows scaled
        raw = (rows / scale).bfloat16()
        rows = raw.float() * scale
    want = search_rows(index, rows, threshold, kernel=False)
    got = _kernel_search(index, raw, threshold, ways, scale, kth, split)
    differ = got.keep != want.keep
    est = leaf_bounds(index, rows).est  # [B, H, R, NB]
    if isinstance(threshold, TopK):
        # Where the choices differ, the leaves kept by one side alone tie at the k-th largest share (the forced
        # leaves make the counts differ then too).
        share = est.softmax(-1).nan_to_num(nan=0.0).sum(dim=2)
        live = index.levels[0].count > 0
        for b, h in differ.any(-1).nonzero().tolist():
            tied = share[b, h][differ[b, h]]
            live_share = share[b, h][live[b, h]]
            kth = live_share.topk(min(threshold.k, live_share.numel())).values[-1]
            torch.testing.assert_close(tied, kth.expand_as(tied), rtol=1e-5, atol=1e-7)
    elif isinstance(threshold, TopP):
        # Each leaf kept by one side alone is at the cut in some row: its estimate ties another's (the kernels keep
        # every tied leaf), or the mass of the leaves ranked above it is p up to float32 rounding.
        frac = est.double().softmax(-1).nan_to_num(nan=0.0)  # [B, H, R, NB]
        forced = index.forced_leaves()
        for b, h, n in differ.nonzero().tolist():
            e, f = est[b, h], frac[b, h]
            above = f[:, forced[b, h]].sum(-1) + (f * ((e > e[:, n : n + 1]) & ~forced[b, h])).sum(-1)  # [R]
            others = e.clone()
            others[:, n] = math.nan
            tie = torch.isclose(others, e[:, n : n + 1], rtol=1e-6, atol=0.0).any(-1)
            assert (tie | ((above - threshold.p).abs() <= 1e-5)).any(), f"leaf {n} of head ({b}, {h}): no cut there"
    else:
        assert not differ.any()
    same = ~differ.any(-1)  # [B, H] heads with the same choice: every other output equal too
    assert torch.equal(got.kv_num_blocks[same], want.kv_num_blocks[same])
    assert torch.equal(got.kv_indices[same], want.kv_indices[same])
    for name in ("tau", "log_skip_ub", "log_kept_lb"):
        a, b = getattr(got, name)[same], getattr(want, name)[same]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * (1 + rows.abs().amax().item()), msg=name)
    torch.testing.assert_close(got.kept_fraction[same], want.kept_fraction[same])
    torch.testing.assert_close(got.read_fraction[same], want.read_fraction[same])
