"""The ball-path search in two or three Triton kernels (CUDA): ``search_rows``'s choice of leaves for ``Fixed``,
``TopK`` and ``TopP``, written straight into FlexAttention's block lists.

The compiled tensor program is about eighteen small kernels per step (a product, a row softmax, a top-k, a gather
of the top leaf's keys, two log-sum-exps, prefix sums, …); each costs a launch and a wait even inside a CUDA graph.
Here:

1. ``_leaf_bounds_kernel``, one program per (batch·KV head, chunk of leaves): reads the chunk's centres once for all
   query rows, writes every leaf's bound and estimate ([B, H, R, NB]) and per chunk and row the partial reductions
   the selection needs: the estimate's max and Σ exp(est − max), the bound's max and its first argmax.
2. For ``TopK`` past ``TOPK_LEAVES`` leaves and a small k, ``_shares_kernel``, one program per (batch·KV head,
   split of 512 leaves): each leaf's share of the group (from the partials and the estimates) and the split's k
   largest (padded) as candidates for the k-th largest, then ``_select_splits_kernel``, one program per (batch·KV
   head, split) and one for the exact score: each split's program takes the k-th largest share from the
   candidates and writes its own leaves' keep flags, list places and certificate part (benchmarks/NOTES.md §31–32:
   the step at 1% of 512K 0.0444 → 0.0428 ms, of 1M 0.0730 → 0.0711).
3. Otherwise ``_select_kernel``, two programs per (batch·KV head), both starting from each row's top leaf (from the
   partials). One scores the top leaf's keys exactly. The other combines the partials into each row's log-sum-exp,
   picks the leaves with the mode's rule in registers (``TopK``: the k-th largest share by triton's top-k of every
   leaf up to ``TOPK_LEAVES`` leaves, else by a search over the shares' float bits; ``TopP``: per row, the smallest
   estimate whose leaves ranked above it carry less than p, by a search over its bits; ``Fixed``: bound ≥ τ), adds
   the forced leaves, and writes the keep table, ``kv_num_blocks`` / ``kv_indices`` (kept leaves first, ascending,
   then the rest), τ and the certificate's skipped-mass bound.

Each row's kept-mass bound (the top leaf's exact score if that leaf is kept, else -inf) is written by the kernels
themselves, as an atomic minimum over the +inf that the bounds kernel writes: the exact-score program lowers it to
the score, the program that decides the top leaf's fate to -inf if it was not kept (no launch after the kernels:
search+mask at 128K 16.5 → 15.0–15.3 µs, NOTES §32). On sm90+ each kernel is launched while the one before it runs
(programmatic dependent launch): its programs read the index's own tensors, then wait for the earlier kernel's
outputs (−2 to −3 µs a step, benchmarks/NOTES.md §26).

The rules are the tensor program's (``hira.selection.threshold``) restated without a sort; ties are broken by
index (the tensor program's ``topk`` leaves them unspecified) and ``TopP`` keeps every leaf tied at its cut. The
tests compare the two on CUDA and, in triton's interpreter, on the CPU: the same selection up to ties. ``Certified``,
the key sketch and the sharded search keep the tensor program, and so do sizes past ``_MAX_SIZE``, where it is
faster.

The kernels are one opaque custom operator, ``hira::ball_search``: inductor does not analyse them (as a
``triton_op`` inside the compiled step, the attention read the block lists with wrong dependencies).

Shapes: B batch, H KV heads, R query rows, NB leaves, BS block size, D head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from hira.index.bounds import margin_factor
from hira.index.index import HiraIndex
from hira.selection.threshold import Fixed, Threshold, TopK, TopP, name_and_value

FIXED, TOPK, TOPP = 0, 1, 2  # the modes this search covers, as the kernels' MODE
MODES = {Fixed: FIXED, TopK: TOPK, TopP: TOPP}
MAX_ROWS = 16  # query rows per KV head the kernels take (a decode step: G·S ≤ 16)
_CHUNK = 32  # leaves per program of the bounds kernel
_SHARES_WARPS = 4  # warps per program of the shares kernel
_SPLITS_WARPS = 8  # warps per program of the selection by splits
# Where the kernels beat the compiled tensor program (H200), in batch · KV heads · rows · leaves (powers of two): at
# most 64K for TopP (its per-row search lost at 512K: 144 against 98 µs, NOTES.md §17 and §25), 256K for Fixed and
# TopK (the whole search 40 against 81 µs at 128K with batch 8, 67 against 125 at 1M, §25; larger sizes not measured).
_MAX_SIZE = {FIXED: 262144, TOPK: 262144, TOPP: 65536}


@triton.jit
def _leaf_bounds_kernel(
    q_ptr, center_ptr, radius_ptr, count_ptr, var_ptr, mag_ptr, weight_ptr,
    ub_ptr, est_ptr, est_max_ptr, est_sum_ptr, ub_max_ptr, ub_arg_ptr, kept_lb_ptr,
    NB, NCH, margin_coef, scale,
    R: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    """Bounds and estimates of one chunk of leaves for every row of one (batch, KV head), the rows multiplied by
    ``scale`` in float32, as ``hira.index.bounds.bound_and_estimate``, and the chunk's partial reductions. The
    chunk's centres are read once, as one [leaves, channels] tile, and each row's products are a float32 FMA
    reduction over it; the leaves' scalars are read first, with the centres. (Measured on the H200: a loop over
    channel slices of [rows, leaves, channels] tiles took 1.2–1.6× as long, a ``tl.dot`` of 16-row tiles 1.7×, two
    layouts with fewer barriers 1.1–3×; benchmarks/NOTES.md §17, §25 and §27.)"""
    if PDL:  # the selection kernel may start as soon as every program here has
        gdc_launch_dependents()
    bh = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    r = tl.arange(0, R_PAD)
    n = ch * CHUNK + tl.arange(0, CHUNK)
    d = tl.arange(0, D_PAD)
    rmask = r < R
    nmask = n < NB
    dmask = d < D
    leaf = bh * NB + n
    radius = tl.load(radius_ptr + leaf, mask=nmask, other=0.0)
    count = tl.load(count_ptr + leaf, mask=nmask, other=0)
    var = tl.load(var_ptr + leaf, mask=nmask, other=0.0)
    mag = tl.load(mag_ptr + leaf, mask=nmask, other=0.0)
    w = tl.load(weight_ptr + bh)
    c = tl.load(center_ptr + leaf[:, None] * D + d[None, :], mask=nmask[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)  # [CHUNK, D_PAD], from the keys' dtype (exact)
    qc = tl.zeros([R_PAD, CHUNK], dtype=tl.float32)
    q2 = tl.zeros([R_PAD], dtype=tl.float32)
    for i in tl.static_range(R):
        qi = tl.load(q_ptr + (bh * R + i) * D + d, mask=dmask, other=0.0).to(tl.float32) * scale
        qc = tl.where((r == i)[:, None], tl.sum(c * qi[None, :], axis=1)[None, :], qc)
        q2 = tl.where(r == i, tl.sum(qi * qi, axis=0), q2)
    qn = tl.sqrt(q2)
    empty = (count == 0)[None, :]
    margin = (margin_coef * qn)[:, None] * mag[None, :]
    ub = tl.where(empty, float("-inf"), qc + qn[:, None] * radius[None, :] + margin)
    log_n = tl.log(tl.maximum(count, 1).to(tl.float32))
    est = tl.where(empty, float("-inf"), log_n[None, :] + qc + (0.5 * q2)[:, None] * var[None, :] * w)
    out = (bh * R + r)[:, None] * NB + n[None, :]
    both = rmask[:, None] & nmask[None, :]
    tl.store(ub_ptr + out, ub, mask=both)
    tl.store(est_ptr + out, est, mask=both)
    e_max = tl.max(est, axis=1)  # [R_PAD]
    e_ref = tl.where(e_max == float("-inf"), 0.0, e_max)
    e_sum = tl.sum(tl.exp(est - e_ref[:, None]), axis=1)
    u_max = tl.max(ub, axis=1)
    u_arg = tl.argmax(ub, axis=1) + ch * CHUNK
    part = (bh * R + r) * NCH + ch
    tl.store(est_max_ptr + part, e_max, mask=rmask)
    tl.store(est_sum_ptr + part, e_sum, mask=rmask)
    tl.store(ub_max_ptr + part, u_max, mask=rmask)
    tl.store(ub_arg_ptr + part, u_arg, mask=rmask)
    if ch == 0:  # the kept-mass bound starts at +inf: the selection kernel's programs lower it (atomic min)
        tl.store(kept_lb_ptr + bh * R + r, tl.full([R_PAD], float("inf"), tl.float32), mask=rmask)


@triton.jit
def _ordered(x):
    """float32 -> int32 with the same order (-inf lowest)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _top_leaf(u_max, u_arg):
    """Each row's leaf of largest bound (the first by index) from the bounds kernel's per-chunk partials (the
    chunks' largest bounds and their leaves, [R_PAD, NCH_PAD])."""
    best = tl.max(u_max, axis=1)
    return tl.min(tl.where(u_max == best[:, None], u_arg, 2147483647), axis=1)


@triton.jit
def _row_lse(p_max, p_sum):
    """Each row's log-sum-exp from the bounds kernel's per-chunk partials ([R_PAD, NCH_PAD]: max, Σ exp(x − max))."""
    m_all = tl.max(p_max, axis=1)
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    return m_ref + tl.log(tl.sum(p_sum * tl.exp(p_max - m_ref[:, None]), axis=1))


@triton.jit
def _row_fractions(est, lse):
    """Each leaf's fraction of each row's estimated mass, exp(est − lse): [R_PAD, leaves], 0 in a row without mass."""
    return tl.where(lse[:, None] == float("-inf"), 0.0, tl.exp(est - lse[:, None]))


@triton.jit
def _share_bits(frac, live):
    """Each leaf's share of the group (its fractions summed over the rows) as float bits, -1 for a dead leaf: an
    int32 order of the shares (≥ 0) with every dead leaf below them."""
    return tl.where(live, tl.sum(frac, axis=0).to(tl.int32, bitcast=True), -1)


@triton.jit
def _forced_leaves(count, first, last, n_valid, sink_tokens, window_tokens):
    """The live leaves that hold a sink token or a token of the recent window: always read."""
    return (count > 0) & ((first < sink_tokens) | (last >= n_valid - window_tokens))


@triton.jit
def _first_by_share(bits, lo, room, tied_before):
    """``TopK``'s choice among leaves given the k-th largest share bits ``lo``: the shares above it and, of those
    equal to it, the first ``room`` by index, ``tied_before`` tied leaves ranking ahead of these."""
    tied = (bits == lo).to(tl.int32)
    return (bits > lo) | ((tied == 1) & (tied_before + tl.cumsum(tied, axis=0) <= room))


@triton.jit
def _logsumexp_rows(x):
    """Each row's log-sum-exp of x [R_PAD, N] (-inf for a row of -inf)."""
    m = tl.max(x, axis=1)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    return m_ref + tl.log(tl.sum(tl.exp(x - m_ref[:, None]), axis=1))


@triton.jit
def _store_fractions(frac_ptr, read_ptr, bh, num, n_live, count, keep_i):
    """A head's kept fraction (kept over live leaves) and read fraction (keys in kept leaves over all keys)."""
    tl.store(frac_ptr + bh, num.to(tl.float32) / tl.maximum(n_live, 1).to(tl.float32))
    tl.store(read_ptr + bh, tl.sum(count * keep_i, axis=0).to(tl.float32)
             / tl.maximum(tl.sum(count, axis=0), 1).to(tl.float32))


@triton.jit
def _shares_kernel(
    count_ptr, est_ptr, est_max_ptr, est_sum_ptr, bits_ptr, cand_ptr, NB, NCH, NSPLIT,
    R: tl.constexpr, R_PAD: tl.constexpr, NCH_PAD: tl.constexpr, SPLIT: tl.constexpr, LOCAL_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    """``TopK``'s shares over many programs, one per (batch·KV head, split of SPLIT leaves): each leaf's share of
    the group, Σ_r exp(est − lse_r), as its float bits (-1 for a dead leaf), and the split's LOCAL_PAD largest,
    from which the selection kernel takes the head's k-th largest (every leaf above it is among them)."""
    if PDL:  # the selection kernel may start as soon as every program here has
        gdc_launch_dependents()
    bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    r = tl.arange(0, R_PAD)
    rmask = r < R
    row = bh * R + r
    n = s * SPLIT + tl.arange(0, SPLIT)
    nmask = n < NB
    c = tl.arange(0, NCH_PAD)
    part = row[:, None] * NCH + c[None, :]
    pmask = rmask[:, None] & (c < NCH)[None, :]
    count = tl.load(count_ptr + bh * NB + n, mask=nmask, other=0)
    if PDL:  # everything below reads the bounds kernel's outputs
        gdc_wait()
    p_max = tl.load(est_max_ptr + part, mask=pmask, other=float("-inf"))
    p_sum = tl.load(est_sum_ptr + part, mask=pmask, other=0.0)
    est = tl.load(est_ptr + row[:, None] * NB + n[None, :], mask=rmask[:, None] & nmask[None, :],
                  other=float("-inf"))  # [R_PAD, SPLIT]
    bits = _share_bits(_row_fractions(est, _row_lse(p_max, p_sum)), count > 0)
    tl.store(bits_ptr + bh * NB + n, bits, mask=nmask)
    tl.store(cand_ptr + (bh * NSPLIT + s) * LOCAL_PAD + tl.arange(0, LOCAL_PAD), tl.topk(bits, LOCAL_PAD))


@triton.jit
def _exact_top_score(q_ptr, keys_ptr, valid_ptr, ub_max_ptr, ub_arg_ptr, kept_lb_ptr, bh, b, row, rmask, part, pmask,
                     C, scale, R_PAD: tl.constexpr, D: tl.constexpr, EXACT_D: tl.constexpr, BS: tl.constexpr):
    """The exact score of each row's top leaf's best real key, in float64 (as ``exact_leaf_score``), from the
    bounds kernel's partials ([R_PAD, NCH_PAD] at ``part``)."""
    u_max = tl.load(ub_max_ptr + part, mask=pmask, other=float("-inf"))  # [R_PAD, NCH_PAD]
    top = _top_leaf(u_max, tl.load(ub_arg_ptr + part, mask=pmask, other=0))
    s = tl.arange(0, BS)
    slot = top.to(tl.int64)[:, None] * BS + s[None, :]  # [R_PAD, BS]
    dot = tl.zeros([R_PAD, BS], dtype=tl.float64)
    for d0 in tl.static_range(0, D, EXACT_D):  # [rows, BS, EXACT_D] tiles of keys
        d = d0 + tl.arange(0, EXACT_D)
        dmask = d < D
        qd = tl.load(q_ptr + row[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        qd = qd.to(tl.float32) * scale
        kd = tl.load(keys_ptr + (bh * C + slot)[:, :, None] * D + d[None, None, :],
                     mask=rmask[:, None, None] & dmask[None, None, :], other=0.0)
        dot += tl.sum(kd.to(tl.float64) * qd.to(tl.float64)[:, None, :], axis=2)
    real = tl.load(valid_ptr + b * C + slot, mask=rmask[:, None], other=0) != 0
    exact = tl.max(tl.where(real, dot.to(tl.float32), float("-inf")), axis=1)  # [R_PAD]
    tl.atomic_min(kept_lb_ptr + row, exact, mask=rmask)  # the selection lowers it to -inf if not kept


@triton.jit
def _select_kernel(
    q_ptr, keys_ptr, valid_ptr, count_ptr, first_ptr, last_ptr, n_valid_ptr,
    ub_ptr, est_ptr, est_max_ptr, est_sum_ptr, ub_max_ptr, ub_arg_ptr,
    keep_ptr, num_ptr, idx_ptr, tau_ptr, skip_ptr, kept_lb_ptr, frac_ptr, read_ptr,
    H, NB, NCH, C, scale, value, k, sink_tokens, window_tokens,
    MODE: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr, EXACT_D: tl.constexpr,
    BS: tl.constexpr, NB_PAD: tl.constexpr, NCH_PAD: tl.constexpr, WAYS: tl.constexpr, TOPK_ITERS: tl.constexpr,
    TOPP_ITERS: tl.constexpr, TOPK_PAD: tl.constexpr, PDL: tl.constexpr,
):
    """For one (batch, KV head) (program axis 0) and every row at once ([rows, leaves] tiles: a block-wide reduction
    is the unit of latency here, not arithmetic), one of two jobs (axis 1): 0, the mode's choice of leaves, its block
    lists, its certificate's skipped-mass bound, and the kept-mass bound lowered to -inf where a row's top leaf was
    not kept; 1, the kept-mass bound lowered to the exact score of each row's top leaf. Two programs, so that the
    exact score's dependent read of the keys runs beside the selection rather than inside it.

    With ``PDL`` (programmatic dependent launch, CUDA) the kernel is launched while the bounds kernel still runs: it
    reads the index's own tensors first and the bounds kernel's outputs only past ``gdc_wait``."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    r = tl.arange(0, R_PAD)
    rmask = r < R
    row = bh * R + r  # [R_PAD]
    c = tl.arange(0, NCH_PAD)
    part = row[:, None] * NCH + c[None, :]
    pmask = rmask[:, None] & (c < NCH)[None, :]
    if tl.program_id(1) == 1:
        if PDL:
            gdc_wait()
        _exact_top_score(q_ptr, keys_ptr, valid_ptr, ub_max_ptr, ub_arg_ptr, kept_lb_ptr, bh, b, row, rmask, part,
                         pmask, C, scale, R_PAD, D, EXACT_D, BS)
        return
    n = tl.arange(0, NB_PAD)
    nmask = n < NB
    leaf = bh * NB + n
    tile = row[:, None] * NB + n[None, :]
    tmask = rmask[:, None] & nmask[None, :]
    # Every load before any reduction (a reduction's barrier would make a later load wait for the earlier ones):
    # the index's own tensors, then, past the wait, the bounds kernel's outputs.
    count = tl.load(count_ptr + leaf, mask=nmask, other=0)
    first = tl.load(first_ptr + leaf, mask=nmask, other=-1)
    last = tl.load(last_ptr + leaf, mask=nmask, other=-1)
    n_valid = tl.load(n_valid_ptr + b)
    if PDL:  # everything below reads the bounds kernel's outputs
        gdc_wait()
    u_max = tl.load(ub_max_ptr + part, mask=pmask, other=float("-inf"))  # [R_PAD, NCH_PAD]
    u_arg = tl.load(ub_arg_ptr + part, mask=pmask, other=0)
    if MODE != 0:
        p_max = tl.load(est_max_ptr + part, mask=pmask, other=float("-inf"))
        p_sum = tl.load(est_sum_ptr + part, mask=pmask, other=0.0)
    ub = tl.load(ub_ptr + tile, mask=tmask, other=float("-inf"))  # [R_PAD, NB_PAD]
    if MODE != 0:
        est = tl.load(est_ptr + tile, mask=tmask, other=float("-inf"))  # [R_PAD, NB_PAD]
    live = count > 0
    n_live = tl.sum(live.to(tl.int32), axis=0)
    forced = _forced_leaves(count, first, last, n_valid, sink_tokens, window_tokens)
    top = _top_leaf(u_max, u_arg)
    ways = tl.arange(0, WAYS)  # the searches' pivots: lo + j·step, j = 0 (lo itself, known) … WAYS − 1
    keep = forced
    if MODE == 0:  # Fixed: a bound reaching τ in any row
        keep = keep | (live & (tl.max((ub >= value).to(tl.int32), axis=0) > 0))
    else:
        frac = _row_fractions(est, _row_lse(p_max, p_sum))  # [R_PAD, NB_PAD]
        if MODE == 1:
            # TopK: the k largest shares of the group among live leaves. The k-th largest: with TOPK_PAD, from the
            # TOPK_PAD largest share bits (triton's bitonic top-k, which halves the tile as it goes); else by a
            # WAYS-ary search over the float bits (shares ≥ 0). Then the shares above it and, of those equal to it,
            # the first by index.
            bits = _share_bits(frac, live)
            kk = tl.minimum(k, n_live)
            if TOPK_PAD > 0:
                largest = tl.topk(bits, TOPK_PAD)  # [TOPK_PAD], descending
                lo = tl.sum(tl.where(tl.arange(0, TOPK_PAD) == kk - 1, largest, 0), axis=0)
            else:
                lo = tl.full([], 0, tl.int32)  # at least kk shares are ≥ lo
                hi = tl.full([], 0x7F800001, tl.int32)  # fewer than kk are ≥ hi
                for _ in range(TOPK_ITERS):  # WAYS − 1 pivots a pass, all counted in one [WAYS, leaves] reduction
                    step = (hi - lo + WAYS - 1) // WAYS
                    pivot = lo + ways * step  # [WAYS], ≤ hi + WAYS − 1: no int32 overflow
                    enough = tl.sum((bits[None, :] >= pivot[:, None]).to(tl.int32), axis=1) >= kk
                    lo = lo + tl.sum((enough & (ways > 0)).to(tl.int32), axis=0) * step  # counts fall with the pivot
                    hi = tl.minimum(hi, lo + step)
            chosen = _first_by_share(bits, lo, kk - tl.sum((bits > lo).to(tl.int32), axis=0), 0)
            keep = tl.where(kk > 0, keep | chosen, keep)
        else:
            # TopP: per row, keep a leaf if the leaves ranked above it (forced first) carry less than p: the
            # smallest estimate with that property, by a WAYS-ary search over the estimates' ordered bits, every row
            # at once.
            key = _ordered(est)
            rest = (live & ~forced)[None, :]  # [1, NB_PAD]
            mass_forced = tl.sum(tl.where(forced[None, :], frac, 0.0), axis=1)  # [R_PAD]
            lo = tl.full([R_PAD], -2147483649, tl.int64)  # the mass above lo is ≥ p (or lo is below every key)
            hi = tl.full([R_PAD], 2147483647, tl.int64)  # the mass above hi is < p, if the forced mass is
            for _ in range(TOPP_ITERS):  # WAYS − 1 pivots per row a pass, as TopK's
                step = (hi - lo + WAYS - 1) // WAYS  # [R_PAD]
                pivot = lo[:, None] + ways[None, :].to(tl.int64) * step[:, None]  # [R_PAD, WAYS]
                hit = rest[:, None, :] & (key[:, None, :] > pivot[:, :, None])  # [R_PAD, WAYS, NB_PAD]
                above = mass_forced[:, None] + tl.sum(tl.where(hit, frac[:, None, :], 0.0), axis=2)
                enough = (above >= value) & (ways > 0)[None, :]  # float sums of fewer terms: never larger
                lo = lo + tl.sum(enough.to(tl.int64), axis=1) * step
                hi = tl.minimum(hi, lo + step)
            rows_keep = rest & (key >= hi[:, None]) & ((mass_forced < value) & rmask)[:, None]
            keep = keep | (tl.max(rows_keep.to(tl.int32), axis=0) > 0)
    # Block lists: kept leaves first, ascending, then the others.
    keep_i = keep.to(tl.int32)
    num = tl.sum(keep_i, axis=0)
    dest = tl.where(keep, tl.cumsum(keep_i, axis=0) - 1, num + tl.cumsum(1 - keep_i, axis=0) - 1)
    tl.store(idx_ptr + bh * NB + dest, n.to(tl.int32), mask=nmask)
    tl.store(keep_ptr + leaf, keep_i.to(tl.int8), mask=nmask)
    tl.store(num_ptr + bh, num)
    _store_fractions(frac_ptr, read_ptr, bh, num, n_live, count, keep_i)
    # The certificate: an upper bound on the skipped leaves' mass (count·exp(bound)), the kept top leaf's score.
    skipped = (live & ~keep)[None, :]
    log_n = tl.log(tl.maximum(count, 1).to(tl.float32))
    mass = tl.where(skipped, ub + log_n[None, :], float("-inf"))
    tl.store(skip_ptr + row, _logsumexp_rows(mass), mask=rmask)
    top_kept = tl.max(((n[None, :] == top[:, None]) & keep[None, :]).to(tl.int32), axis=1)
    # The kept-mass bound: the top leaf's exact score (the other program's) if that leaf is kept, else -inf.
    tl.atomic_min(kept_lb_ptr + row, tl.full([R_PAD], float("-inf"), tl.float32), mask=rmask & (top_kept == 0))
    if MODE == 0:
        tl.store(tau_ptr + row, tl.full([R_PAD], value, tl.float32), mask=rmask)
    else:
        tl.store(tau_ptr + row, tl.full([R_PAD], float("-inf"), tl.float32), mask=rmask)


@triton.jit
def _select_splits_kernel(
    q_ptr, keys_ptr, valid_ptr, count_ptr, first_ptr, last_ptr, n_valid_ptr, ub_ptr, ub_max_ptr, ub_arg_ptr,
    bits_ptr, cand_ptr, keep_ptr, num_ptr, idx_ptr, tau_ptr, skip_ptr, kept_lb_ptr, frac_ptr, read_ptr,
    H, NB, NCH, NSPLIT, C, scale, k, sink_tokens, window_tokens,
    R: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr, EXACT_D: tl.constexpr, BS: tl.constexpr,
    NB_PAD: tl.constexpr, NCH_PAD: tl.constexpr, SPLIT: tl.constexpr, LOCAL_PAD: tl.constexpr,
    CAND_PAD: tl.constexpr, TOPK_PAD: tl.constexpr, PDL: tl.constexpr,
):
    """``TopK``'s selection over many programs, from the shares kernel's shares and candidates: one program per
    (batch·KV head, split of SPLIT leaves) and one more for the exact score (axis 1 = NSPLIT). Each split's program
    takes the k-th largest share from the candidates and counts, over every leaf of its head, the kept leaves and
    the ties before its split (one pass over [leaves] vectors, no [rows, leaves] tile), then writes its own leaves'
    keep flags and places in the block lists, the kept-mass bound of its rows whose top leaf it holds (-inf if
    skipped), and per row the log-sum-exp of its skipped leaves' mass bounds ([B, H, R, NSPLIT] at ``skip_ptr``;
    the caller's compiled code combines them)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    s = tl.program_id(1)
    r = tl.arange(0, R_PAD)
    rmask = r < R
    row = bh * R + r
    c = tl.arange(0, NCH_PAD)
    part = row[:, None] * NCH + c[None, :]
    pmask = rmask[:, None] & (c < NCH)[None, :]
    if s == NSPLIT:
        if PDL:
            gdc_wait()
        _exact_top_score(q_ptr, keys_ptr, valid_ptr, ub_max_ptr, ub_arg_ptr, kept_lb_ptr, bh, b, row, rmask, part,
                         pmask, C, scale, R_PAD, D, EXACT_D, BS)
        return
    n = tl.arange(0, NB_PAD)  # every leaf of the head
    nmask = n < NB
    leaf = bh * NB + n
    start = s * SPLIT
    m = start + tl.arange(0, SPLIT)  # this program's leaves
    mmask = m < NB
    own = bh * NB + m
    count = tl.load(count_ptr + leaf, mask=nmask, other=0)
    first = tl.load(first_ptr + leaf, mask=nmask, other=-1)
    last = tl.load(last_ptr + leaf, mask=nmask, other=-1)
    count_m = tl.load(count_ptr + own, mask=mmask, other=0)
    first_m = tl.load(first_ptr + own, mask=mmask, other=-1)
    last_m = tl.load(last_ptr + own, mask=mmask, other=-1)
    n_valid = tl.load(n_valid_ptr + b)
    if PDL:  # everything below reads the earlier kernels' outputs
        gdc_wait()
    bits = tl.load(bits_ptr + leaf, mask=nmask, other=-1)
    bits_m = tl.load(bits_ptr + own, mask=mmask, other=-1)
    cand = tl.load(cand_ptr + bh * NSPLIT * LOCAL_PAD + tl.arange(0, CAND_PAD),
                   mask=tl.arange(0, CAND_PAD) < NSPLIT * LOCAL_PAD, other=-1)
    u_max = tl.load(ub_max_ptr + part, mask=pmask, other=float("-inf"))  # [R_PAD, NCH_PAD]
    u_arg = tl.load(ub_arg_ptr + part, mask=pmask, other=0)
    ub = tl.load(ub_ptr + row[:, None] * NB + m[None, :], mask=rmask[:, None] & mmask[None, :],
                 other=float("-inf"))  # [R_PAD, SPLIT]
    # The head's k-th largest share, and its kept leaves counted (as ``_select_kernel``'s TopK).
    live = count > 0
    n_live = tl.sum(live.to(tl.int32), axis=0)
    kk = tl.minimum(k, n_live)
    largest = tl.topk(cand, TOPK_PAD)  # [TOPK_PAD], descending
    lo = tl.sum(tl.where(tl.arange(0, TOPK_PAD) == kk - 1, largest, 0), axis=0)
    room = kk - tl.sum((bits > lo).to(tl.int32), axis=0)
    chosen = _first_by_share(bits, lo, room, 0)
    forced = _forced_leaves(count, first, last, n_valid, sink_tokens, window_tokens)
    keep_i = (forced | (chosen & (kk > 0))).to(tl.int32)
    num = tl.sum(keep_i, axis=0)
    before = n < start
    kept_before = tl.sum(tl.where(before, keep_i, 0), axis=0)
    tied_before = tl.sum((before & (bits == lo)).to(tl.int32), axis=0)
    # This program's leaves: the same choice, their places in the lists, their rows' certificate part.
    live_m = count_m > 0
    chosen_m = _first_by_share(bits_m, lo, room, tied_before)
    forced_m = _forced_leaves(count_m, first_m, last_m, n_valid, sink_tokens, window_tokens)
    keep_m = forced_m | (chosen_m & (kk > 0))
    keep_mi = keep_m.to(tl.int32)
    dest = tl.where(keep_m, kept_before + tl.cumsum(keep_mi, axis=0) - 1,
                    num + (start - kept_before) + tl.cumsum(1 - keep_mi, axis=0) - 1)
    tl.store(idx_ptr + bh * NB + dest, m.to(tl.int32), mask=mmask)
    tl.store(keep_ptr + own, keep_mi.to(tl.int8), mask=mmask)
    if s == 0:
        tl.store(num_ptr + bh, num)
        _store_fractions(frac_ptr, read_ptr, bh, num, n_live, count, keep_i)
        tl.store(tau_ptr + row, tl.full([R_PAD], float("-inf"), tl.float32), mask=rmask)
    log_n = tl.log(tl.maximum(count_m, 1).to(tl.float32))
    mass = tl.where((live_m & ~keep_m)[None, :], ub + log_n[None, :], float("-inf"))
    tl.store(skip_ptr + row * NSPLIT + s, _logsumexp_rows(mass), mask=rmask)
    top = _top_leaf(u_max, u_arg)
    top_kept = tl.max(((m[None, :] == top[:, None]) & keep_m[None, :]).to(tl.int32), axis=1)
    tl.atomic_min(kept_lb_ptr + row, tl.full([R_PAD], float("-inf"), tl.float32),
                  mask=rmask & (top >= start) & (top < start + SPLIT) & (top_kept == 0))


def _passes(size: int, ways: int) -> int:
    """Passes of a ``ways``-ary search that narrow ``size`` candidates to one (each keeps ⌈size / ways⌉)."""
    n = 0
    while size > 1:
        size, n = -(-size // ways), n + 1
    return n


# The most leaves (padded) where ``TopK`` takes its k-th share from triton's top-k of every leaf in the selection
# kernel: its bitonic stages run on the whole tile before it shrinks; past this the shares kernel's splits are faster
# (``select_launch``), and below it slower (the whole search at 128K 15.1 against 17.8 µs, NOTES.md §31).
TOPK_LEAVES = 2048


# Past ``TOPK_LEAVES``, ``TopK`` takes the shares kernel where each split keeps at most 1/SHARES_PRUNE of its leaves
# as candidates, the search elsewhere: at 1% of 512K and 1M (64 and 128 of 512) the shares won, at 5% of 512K (256 of
# 512) they lost (the step 0.0814 against 0.0987 ms, NOTES.md §31).
SHARES_PRUNE = 4


def select_launch(mode: int, R: int, NB: int, D: int, BS: int, ways: int | None = None, k: int = 0,
                  kth: str | None = None, split: int = 512) -> dict:
    """The selection kernel's launch parameters: 8 warps, 16 from 8K leaves on (measured best at 128K and 1M,
    benchmarks/bench_search_kernel.py); key tiles of all channels for the exact score where ≤ 64K values; the
    searches' pivots per pass (``ways``, a power of two ≥ 2; default 4, or fewer where the search's tile would pass
    16K values: ``TopK``'s is [ways, leaves], ``TopP``'s [rows, ways, leaves]); and how ``TopK`` finds its k-th
    largest share (``kth``): "topk", from the k largest (padded to a power of two, ``TOPK_PAD``); "search", the
    ways-ary search (``TOPK_PAD`` 0); or "shares", from the shares kernel's candidates, the ``LOCAL_PAD`` largest
    of each ``split`` leaves (a power of two; ``SPLIT`` 0 where the selection kernel computes the shares itself),
    then the selection by splits (``_select_splits_kernel``); by default "topk" up to ``TOPK_LEAVES`` leaves, past
    them "shares" where k is small enough (``SHARES_PRUNE``), else "search".

    The selection alone at 8 warps (H200, benchmarks/NOTES.md §30), by top-k against the search at 2 / 4 / 8 / 16
    ways: 128K (1,024 leaves, k = 10) 11.0 against 16.3 / 14.7 / 15.6 / 16.9 µs; 256K (2,048, k = 20) 16.6 against
    21.0 / 18.8 / 20.3 / 22.4; 512K (4,096, k = 41) 34.4 against 26.3 / 24.6 / 26.9 / 30.4. ``TopP`` took 34.8 /
    37.4 / 42.9 / 52.0 µs at 128K. The whole search (both kernels, or all three) by the search against the shares
    kernel's splits of 256 / 512 / 1,024 leaves (§31): 512K 31.4 against 34.3 / 23.9 / 25.4 µs, 1M 59.7 against
    64.4 / 43.1 / —; at 128K the top-k took 15.3 against 26.1 / 17.8 / 18.0. With the selection by splits (§32):
    512K 22.3 µs (splits of 256 / 1,024 leaves: 37.6 / 24.0), 1M 39.1 (86.6 / 39.6)."""
    r_pad, nb_pad = triton.next_power_of_2(R), triton.next_power_of_2(NB)
    exact_d = max(1, min(triton.next_power_of_2(D), 65536 // (r_pad * BS)))
    if ways is None:
        width = nb_pad * (r_pad if mode == TOPP else 1)
        ways = max(2, min(4, 16384 // width))
    # triton's top-k takes k ≥ 2 (k = 1 reduces its tile to a scalar it cannot reshape)
    k_pad = max(2, triton.next_power_of_2(k))
    if kth is None:
        kth = "topk" if nb_pad <= TOPK_LEAVES else "shares" if k_pad * SHARES_PRUNE <= split else "search"
    by_shares = mode == TOPK and kth == "shares"
    split = min(max(2, split), nb_pad) if by_shares else 0
    local_pad = min(k_pad, split) if by_shares else 0  # every leaf above the k-th is among its split's largest
    cand_pad = triton.next_power_of_2(triton.cdiv(NB, split) * local_pad) if by_shares else 0
    if by_shares:
        topk_pad = min(k_pad, cand_pad)
    elif mode == TOPK and kth == "topk" and nb_pad >= 2:
        topk_pad = min(k_pad, nb_pad)
    else:
        topk_pad = 0
    return dict(EXACT_D=exact_d, num_warps=8 if r_pad * nb_pad <= 16384 else 16, WAYS=ways,
                TOPK_ITERS=_passes(0x7F800001, ways), TOPP_ITERS=_passes(2**32, ways), TOPK_PAD=topk_pad,
                SPLIT=split, LOCAL_PAD=local_pad, CAND_PAD=cand_pad)


@torch.library.custom_op("hira::ball_search", mutates_args=())
def ball_search_op(
    q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, center: torch.Tensor, radius: torch.Tensor,
    count: torch.Tensor, var: torch.Tensor, magnitude: torch.Tensor, spread_weight: torch.Tensor,
    leaf_first: torch.Tensor, leaf_last: torch.Tensor, n_valid: torch.Tensor, scale: float, mode: int, value: float,
    margin_coef: float, sink_tokens: int, window_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """``Selection``'s tensors (keep, kv_num_blocks, kv_indices, tau, log_skip_ub, log_kept_lb, kept_fraction,
    read_fraction) for query rows q [B, H, R, D] (any float dtype, multiplied by ``scale`` in float32) over the leaf
    balls (``search_rows`` on an index without a sketch), except that log_skip_ub comes in parts, [B, H, R, parts]:
    one per split of the selection by splits (``ball_search`` combines them, in the caller's compiled code), else one.

    ``mode`` is FIXED (``value`` τ), TOPK (``value`` k) or TOPP (``value`` p); ``margin_coef`` the rounding margin's
    factor (``hira.index.bounds.rounding_margin``).
    """
    B, H, R, D = q.shape
    NB = center.shape[2]
    C = keys.shape[2]
    nch = triton.cdiv(NB, _CHUNK)
    f32 = dict(device=q.device, dtype=torch.float32)
    ub = torch.empty(B, H, R, NB, **f32)
    est = torch.empty_like(ub)
    est_max = torch.empty(B, H, R, nch, **f32)
    est_sum = torch.empty_like(est_max)
    ub_max = torch.empty_like(est_max)
    ub_arg = torch.empty(B, H, R, nch, device=q.device, dtype=torch.int32)
    kept_lb = torch.empty(B, H, R, **f32)
    q = q.contiguous()
    # Programmatic dependent launch (NVIDIA sm90+): the selection kernel starts while the bounds kernel runs.
    pdl = q.is_cuda and torch.version.hip is None and torch.cuda.get_device_capability(q.device)[0] >= 9
    _leaf_bounds_kernel[(B * H, nch)](
        q, center.contiguous(), radius.contiguous(), count.contiguous(), var.contiguous(), magnitude.contiguous(),
        spread_weight.contiguous(), ub, est, est_max, est_sum, ub_max, ub_arg, kept_lb, NB, nch, margin_coef, scale,
        R=R, R_PAD=triton.next_power_of_2(R), D=D, D_PAD=triton.next_power_of_2(D), CHUNK=_CHUNK, PDL=pdl,
        num_warps=4,
    )
    keep = torch.empty(B, H, NB, device=q.device, dtype=torch.int8)
    num = torch.empty(B, H, 1, device=q.device, dtype=torch.int32)
    idx = torch.empty(B, H, 1, NB, device=q.device, dtype=torch.int32)
    tau = torch.empty(B, H, R, **f32)
    frac = torch.empty(B, H, **f32)
    read = torch.empty_like(frac)
    k = int(value) if mode == TOPK else 0
    value = torch.tensor(value, dtype=torch.float32).item()  # as the kernels take it on CUDA (the interpreter: as is)
    launch = select_launch(mode, R, NB, D, C // NB, k=k)
    pdl_launch = {"launch_pdl": True} if pdl else {}
    count = count.contiguous()
    split, nsplit = launch["SPLIT"], _skip_parts(launch, NB)
    skip = torch.empty(B, H, R, nsplit, **f32)
    index_args = (q, keys.contiguous(), valid.contiguous(), count, leaf_first.contiguous(), leaf_last.contiguous(),
                  n_valid.contiguous())
    shapes = dict(R=R, R_PAD=triton.next_power_of_2(R), D=D, BS=C // NB, NB_PAD=triton.next_power_of_2(NB),
                  NCH_PAD=triton.next_power_of_2(nch), PDL=pdl)
    outputs = (keep, num, idx, tau, skip, kept_lb, frac, read)
    if split:  # TopK over many programs: the shares kernel, then the selection by splits
        bits = torch.empty(B, H, NB, device=q.device, dtype=torch.int32)
        cand = torch.empty(B, H, nsplit, launch["LOCAL_PAD"], device=q.device, dtype=torch.int32)
        _shares_kernel[(B * H, nsplit)](
            count, est, est_max, est_sum, bits, cand, NB, nch, nsplit, R=R, R_PAD=triton.next_power_of_2(R),
            NCH_PAD=triton.next_power_of_2(nch), SPLIT=split, LOCAL_PAD=launch["LOCAL_PAD"], PDL=pdl,
            num_warps=_SHARES_WARPS, **pdl_launch,
        )
        _select_splits_kernel[(B * H, nsplit + 1)](
            *index_args, ub, ub_max, ub_arg, bits, cand, *outputs, H, NB, nch, nsplit, C, scale, k, sink_tokens,
            window_tokens, SPLIT=split, LOCAL_PAD=launch["LOCAL_PAD"], CAND_PAD=launch["CAND_PAD"],
            TOPK_PAD=launch["TOPK_PAD"], EXACT_D=launch["EXACT_D"], num_warps=_SPLITS_WARPS, **shapes, **pdl_launch,
        )
    else:
        _select_kernel[(B * H, 2)](
            *index_args, ub, est, est_max, est_sum, ub_max, ub_arg, *outputs, H, NB, nch, C, scale, value, k,
            sink_tokens, window_tokens, MODE=mode, **shapes, **_one_program(launch), **pdl_launch,
        )
    return keep.view(torch.bool), num, idx, tau, skip, kept_lb, frac, read


def _one_program(launch: dict) -> dict:
    """``select_launch``'s parameters of ``_select_kernel`` (without those of the selection by splits)."""
    return {key: v for key, v in launch.items() if key not in ("SPLIT", "LOCAL_PAD", "CAND_PAD")}


def _skip_parts(launch: dict, NB: int) -> int:
    """The parts of each row's certificate the selection writes: one per split of the selection by splits, else
    one."""
    return triton.cdiv(NB, launch["SPLIT"]) if launch["SPLIT"] else 1


@ball_search_op.register_fake
def _(q, keys, valid, center, radius, count, var, magnitude, spread_weight, leaf_first, leaf_last, n_valid, scale,
      mode, value, *rest):
    B, H, R, D = q.shape
    NB = center.shape[2]
    parts = _skip_parts(select_launch(mode, R, NB, D, keys.shape[2] // NB, k=int(value) if mode == TOPK else 0), NB)
    f32 = dict(device=q.device, dtype=torch.float32)
    return (q.new_empty(B, H, NB, dtype=torch.bool), q.new_empty(B, H, 1, dtype=torch.int32),
            q.new_empty(B, H, 1, NB, dtype=torch.int32), torch.empty(B, H, R, **f32),
            torch.empty(B, H, R, parts, **f32), torch.empty(B, H, R, **f32), torch.empty(B, H, **f32),
            torch.empty(B, H, **f32))


def applies(index: HiraIndex, q: torch.Tensor, threshold: Threshold) -> bool:
    """Whether these kernels take the search: no key sketch, a covered mode, a decode step's rows, leaves that fit
    the selection program."""
    B, H, R, _ = q.shape
    size = B * H * triton.next_power_of_2(R) * triton.next_power_of_2(index.num_leaves)
    mode = MODES.get(type(threshold))
    return index.sketch is None and mode is not None and R <= MAX_ROWS and size <= _MAX_SIZE[mode]


def ball_search(index: HiraIndex, q: torch.Tensor, threshold: Threshold, scale: float = 1.0
                ) -> tuple[torch.Tensor, ...]:
    """``Selection``'s tensors for query rows q [B, H, R, D] multiplied by ``scale`` in float32 (where
    ``applies``)."""
    leaves = index.levels[0]
    value = name_and_value(threshold)[1]  # τ, k or p
    keep, num, idx, tau, skip, kept_lb, frac, read = ball_search_op(
        q, index.keys, index.valid, leaves.center, leaves.radius, leaves.count, leaves.var, leaves.scale,
        index.spread_weight, index.leaf_first, index.leaf_last, index.n_valid, scale, MODES[type(threshold)], value,
        margin_factor(q.shape[-1], q.is_cuda), index.sink_tokens, index.window_tokens,
    )
    # the certificate's parts (one per split of the selection by splits) combined here, in the caller's compiled
    # code; one part is taken as it is (a view: no launch after the kernels)
    skip = skip.squeeze(-1) if skip.shape[-1] == 1 else skip.logsumexp(-1)
    return keep, num, idx, tau, skip, kept_lb, frac, read
