"""The per-head calibration of the budgeted estimate's spread weight (``hira.selection.calibrate``).

Against a reference that searches each calibration position on its own through the public search path and scores
its recall in float64 from the inputs in token order; and on a case built so that the spread term misranks.
"""

import dataclasses

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
    storage_in_token_order,
)

import hira
from hira import TopK, TopP
from hira.flex.attention import fold_gqa
from hira.selection.calibrate import WEIGHTS, calibrate_spread, weight_scores
from hira.selection.search import search_rows


def reference_scores(index, q, real, W, threshold, scale):
    """(recall, leaves) per weight, [K, B, H] float64, by searching each of the last W positions of q [B, Hq, W, D]
    on its own, with true masses from float64 scores over the real tokens up to the position's own (its query is
    the token at position N − W + j)."""
    B, Hq, _, D = q.shape
    H = index.keys.shape[1]
    G = Hq // H
    N = real.shape[1]
    rank = real.long().cumsum(1) - 1  # [B, N]
    keys = storage_in_token_order(index, real)[0]  # [B, H, N, D]
    recalls, counts = [], []
    for w in WEIGHTS:
        index.spread_weight.fill_(w)
        recall = torch.zeros(B, H, dtype=torch.float64)
        count = torch.zeros(B, H, dtype=torch.float64)
        positions = torch.zeros(B)
        for j in range(W):
            t = N - W + j
            q_real = real[:, t]  # [B] a padding position does not count
            rows = fold_gqa(q[:, :, j : j + 1].float(), H) * scale
            keep = search_rows(index, rows, threshold).keep  # [B, H, NB]
            s = scores64(q[:, :, j : j + 1], keys, scale)[:, :, 0]  # [B, Hq, N]
            seen = real & (rank <= rank[:, t : t + 1])
            p = s.masked_fill(~seen[:, None, :], float("-inf")).softmax(-1).nan_to_num(nan=0.0)
            kept = per_query_head(kept_tokens(index, keep, real), Hq)[:, :, 0]  # [B, Hq, N]
            read = (p * kept).sum(-1).view(B, H, G).mean(-1)  # [B, H]
            recall += read * q_real[:, None]
            count += keep.sum(-1) * q_real[:, None]
            positions += q_real
        recalls.append(recall / positions.clamp_min(1)[:, None])
        counts.append(count)
    return torch.stack(recalls), torch.stack(counts)


@settings(max_examples=30, deadline=None)
@given(
    case=index_cases(max_n=200, block_sizes=(16, 32)).map(
        lambda c: dataclasses.replace(
            c, N=max(c.N, 8 * c.block_size), window_tokens=min(c.window_tokens, c.block_size), key_sketch=False
        )
    ),  # at least 8 leaves, at most 2 of them forced: the selections differ between positions and weights
    G=st.sampled_from([1, 2, 3]),
    W=st.integers(1, 4),
    q_kind=st.sampled_from(Q_KINDS),
    threshold=st.one_of(st.integers(1, 4).map(TopK), st.sampled_from([0.5, 0.9, 0.99]).map(TopP)),
)
def test_weight_scores_match_a_search_per_position(case, G, W, q_kind, threshold):
    keys, values, key_mask = case.tensors("cpu")
    index = hira.build_index(keys, values, case.config(), key_mask=key_mask)
    real = real_mask(key_mask, case.B, case.N)
    W = min(W, case.N)
    q = make_queries(q_kind, keys, G * case.H, W, torch.Generator().manual_seed(case.seed))
    scale = case.D**-0.5
    rank = real.long().cumsum(1) - 1
    q_rank = rank.masked_fill(~real, -1)[:, -W:]
    recall, count = weight_scores(index, fold_gqa(q.float(), case.H) * scale, q_rank, threshold)
    want_recall, want_count = reference_scores(index, q, real, W, threshold, scale)
    torch.testing.assert_close(count.double(), want_count)
    # weight_scores' masses are float32 softmaxes: scores of size S carry rounding of ~S·2^-24 a term, which moves
    # the shares by as much (S up to ~10^4 for the "huge" queries).
    s_bound = q.norm(dim=-1).amax().double() * keys.norm(dim=-1).amax().double() * scale
    torch.testing.assert_close(recall.double(), want_recall, atol=1e-4 + 2**-20 * float(s_bound), rtol=0)


def spread_case():
    """Block A's keys spread widely orthogonally to the query (their true scores all 0), block B's sit tightly at
    score 1: the isotropic spread term ranks A above B, the centres alone B above A. Returns (index, rows, q_rank)
    with two query positions after every key."""
    BS, D = 16, 8
    gen = torch.Generator().manual_seed(0)
    a = torch.zeros(BS, D)
    a[:, 1:] = 3.0 * torch.randn(BS, D - 1, generator=gen)  # spread along dimensions the query does not see
    b = torch.zeros(BS, D)
    b[:, 0] = 1.0
    b[:, 1:] = 0.01 * torch.randn(BS, D - 1, generator=gen)
    keys = torch.cat([a, b])[None, None]  # [1, 1, 32, D]: block 0 = A, block 1 = B
    cfg = hira.HiraConfig(block_size=BS, clustering="none", sink_tokens=0, window_tokens=0)
    index = hira.build_index(keys, keys, cfg)
    q = torch.zeros(1, 1, 2, D)
    q[..., 0] = 1.0  # unscaled rows: score of a key = its first coordinate
    return index, q, torch.tensor([[40, 41]])


def test_calibration_drops_a_spread_that_misranks():
    """TopK(1) reads B, the heavier block, only after the calibration sets the weight to 0."""
    index, rows, q_rank = spread_case()
    assert search_rows(index, rows[:, :, :1], TopK(1)).keep[0, 0].tolist() == [True, False]  # w = 1 misranks
    weight = calibrate_spread(index, rows, q_rank, TopK(1))
    assert weight.tolist() == [[0.0]]
    index.spread_weight.copy_(weight)
    assert search_rows(index, rows[:, :, :1], TopK(1)).keep[0, 0].tolist() == [False, True]


def test_calibration_only_widens_topp():
    """TopP(0.999) with the plain estimate keeps A, then B (A's estimated share is 0.95): every key, recall 1, so
    the weight stays 1. TopP(0.6) keeps A alone (true recall 0.27): the calibration picks 0, which keeps B alone
    (recall 0.73), over 0.25, which keeps both."""
    index, rows, q_rank = spread_case()
    assert calibrate_spread(index, rows, q_rank, TopP(0.999)).tolist() == [[1.0]]
    assert calibrate_spread(index, rows, q_rank, TopP(0.6)).tolist() == [[0.0]]


@torch.no_grad()
def test_a_prefill_calibrates_only_budgeted_modes_without_a_sketch(monkeypatch):
    from test_model import _ids, _tiny

    model = _tiny("llama")
    ids = _ids(length=120)
    for threshold, sketch, calibrated in [(TopK(2), False, True), (TopP(0.9), False, True),
                                          (hira.Certified(0.01), False, False), (TopK(2), True, False)]:
        config = hira.HiraConfig(block_size=16, threshold=threshold, min_context=0, window_tokens=16,
                                 key_sketch=sketch)
        hira.convert(model, config)
        cache = hira.HiraCache(model.config, config)
        seen = []
        monkeypatch.setattr(hira.cache, "calibrate_spread", lambda *a: seen.append(a[3]) or calibrate_spread(*a))
        model(ids, **{hira.CACHE_ARG: cache})
        hira.revert(model)
        assert len(seen) == (len(cache.layers) if calibrated else 0), (threshold, sketch)
        weights = torch.stack([layer.index.spread_weight for layer in cache.layers])
        assert set(weights.flatten().tolist()) <= set(WEIGHTS) if calibrated else bool((weights == 1).all())
