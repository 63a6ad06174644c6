"""Attention through the index (compiled FlexAttention): exact over what was selected, bounded in what it skips.

Every FlexAttention compile on CPU costs ~5-15 s and is keyed by (dtype, B, Hkv, R = G·S, C, BS, D), so the
tests share a few LAYOUTS (one compiled graph each) and vary what does not key a compile: the GQA split of R,
clustering, branching, sinks/window, padding, contents and thresholds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    dense_reference,
    kept_tokens,
    make_key_mask,
    make_keys,
    make_queries,
    real_mask,
    scores64,
    skipped_mass,
)

import hira
from hira import Certified, Dense, Fixed, HiraConfig, TopK, TopP
from hira.flex.attention import unfold_gqa

TOL = {  # (rtol, atol) of hira.attend against the float64 reference, per dtype
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


@dataclass(frozen=True)
class Layout:
    """One compiled flex_attention graph: q rows [B, Hkv, R, D] over storage [B, Hkv, C, D] in blocks of BS."""

    dtype: torch.dtype
    B: int
    Hkv: int
    R: int
    N: int
    C: int
    BS: int
    D: int


LAYOUTS = {
    "f32_r8": Layout(torch.float32, B=2, Hkv=2, R=8, N=200, C=224, BS=32, D=32),
    "f32_r21": Layout(torch.float32, B=2, Hkv=1, R=21, N=150, C=160, BS=16, D=32),
    "f32_decode": Layout(torch.float32, B=1, Hkv=2, R=1, N=600, C=640, BS=64, D=64),  # Q=1, KV ≥ 512 (DESIGN §3)
    "bf16_r4": Layout(torch.bfloat16, B=2, Hkv=2, R=4, N=300, C=320, BS=64, D=32),
    "f16_r2": Layout(torch.float16, B=3, Hkv=1, R=2, N=300, C=384, BS=128, D=32),
    "bf16_decode": Layout(torch.bfloat16, B=2, Hkv=2, R=1, N=100, C=112, BS=16, D=32),
}


@dataclass(frozen=True)
class Case:
    """A layout and what varies inside it."""

    layout: str
    G: int
    S: int
    clustering: str
    branching: int
    sink_tokens: int
    window_tokens: int
    mask_kind: str

    @property
    def lay(self) -> Layout:
        return LAYOUTS[self.layout]

    def __str__(self):
        return f"{self.layout}-G{self.G}S{self.S}-{self.clustering}-b{self.branching}-{self.mask_kind}"

    def config(self) -> HiraConfig:
        return HiraConfig(
            block_size=self.lay.BS,
            branching=self.branching,
            clustering=self.clustering,
            sink_tokens=self.sink_tokens,
            window_tokens=self.window_tokens,
        )


CASES = [
    Case("f32_r8", 8, 1, "pca", 2, 4, 16, "left"),
    Case("f32_r8", 4, 2, "kmeans", 3, 0, 0, "holes"),
    Case("f32_r8", 2, 4, "none", 8, 1, 32, "right"),
    Case("f32_r8", 1, 8, "pca", 4, 0, 0, "none"),
    Case("f32_r21", 3, 7, "pca", 2, 2, 8, "left"),
    Case("f32_r21", 7, 3, "kmeans", 5, 0, 0, "holes"),
    Case("f32_decode", 1, 1, "pca", 8, 4, 64, "none"),
    Case("bf16_r4", 4, 1, "pca", 2, 0, 0, "left"),
    Case("bf16_r4", 2, 2, "kmeans", 6, 4, 16, "holes"),
    Case("f16_r2", 2, 1, "pca", 3, 0, 0, "right"),
    Case("f16_r2", 1, 2, "none", 2, 2, 0, "holes"),
    Case("bf16_decode", 1, 1, "kmeans", 7, 0, 0, "left"),
]
F32_CASES = [c for c in CASES if c.lay.dtype == torch.float32]
UNFORCED_CASES = [c for c in CASES if c.sink_tokens == 0 and c.window_tokens == 0]
ids = str


def make_inputs(case: Case, device, seed: int, key_kind: str = "normal", q_kind: str = "normal"):
    """q [B, G·Hkv, S, D], keys and values [B, Hkv, N, D], key_mask [B, N] and the index, in the layout's dtype."""
    L = case.lay
    gen = torch.Generator().manual_seed(seed)
    k = make_keys(key_kind, (L.B, L.Hkv, L.N, L.D), gen)
    v = torch.randn(L.B, L.Hkv, L.N, L.D, generator=gen)
    lengths = [L.N - 37 * b for b in range(L.B)]  # a different length per row
    mask = real_mask(make_key_mask(case.mask_kind, lengths, L.N, gen), L.B, L.N)
    q = make_queries(q_kind, k, case.G * L.Hkv, case.S, gen)
    q, k, v = (t.to(device, L.dtype) for t in (q, k, v))
    mask = mask.to(device)
    index = hira.build_index(k, v, case.config(), key_mask=mask, capacity=L.C)
    assert index.capacity == L.C and (q.shape[1] // L.Hkv) * q.shape[2] == L.R, "the case left its layout"
    return q, k, v, mask, index


def tolerance(q, k, v, scale) -> tuple[float, float]:
    """(rtol, atol) per output element: the dtype's, plus float32 rounding of the scores (it grows with |s|)."""
    rtol, atol = TOL[q.dtype]
    return rtol, atol + 4 * 2**-24 * float(scores64(q, k, scale).abs().max()) * float(v.abs().max())


def assert_attends(out, q, k, v, mask, scale, msg=""):
    """out equals float64 attention over the keys mask allows ([B, N] or [B, Hkv, N])."""
    rtol, atol = tolerance(q, k, v, scale)
    ref = dense_reference(q, k, v, mask, scale)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


def assert_skip_bounds(q, k, mask, index, sel, stats, scale, eps=None):
    """True skipped mass (float64) ≤ the posterior and the prior bound (and ε for certified)."""
    mass = skipped_mass(q, k, mask, kept_tokens(index, sel.keep, mask), scale)  # [B, Hq, S]
    for name, bound in (("posterior", stats.skip_bound), ("prior", stats.prior_skip_bound)):
        assert bound.shape == mass.shape
        slack = bound.double() * 1e-4 + 1e-7
        assert bool((mass <= bound.double() + slack).all()), f"{name} skip bound below the true mass"
    torch.testing.assert_close(stats.prior_skip_bound, unfold_gqa(sel.skip_bound, q.shape[1]))
    # The posterior divides by the exact read mass, which includes the key whose score gave the prior's e^m.
    assert bool((stats.skip_bound <= stats.prior_skip_bound * (1 + 1e-4) + 1e-7).all()), "posterior above prior"
    if eps is not None:
        assert bool((mass <= eps * (1 + 1e-4)).all()), f"certified: skipped mass {mass.max()} > eps {eps}"
    return mass


@pytest.mark.parametrize("case", CASES, ids=ids)
@pytest.mark.parametrize("threshold", [Dense(), Fixed(-math.inf)], ids=["dense", "fixed-inf"])
def test_dense_threshold_equals_dense_attention(case, threshold, device):
    q, k, v, mask, index = make_inputs(case, device, seed=0)
    scale = case.lay.D**-0.5
    sel = hira.search(index, q, threshold)
    out, stats = hira.attend(q, index, sel)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_attends(out, q, k, v, mask, scale)
    if case.lay.dtype == torch.float32:  # the reference against torch's own attention
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=True
        )
        torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)
    assert bool((stats.skip_bound == 0).all()) and bool((stats.prior_skip_bound == 0).all())
    assert bool((stats.read_fraction == 1).all()) and bool((stats.kept_fraction == 1).all())


thresholds = st.one_of(
    st.floats(-3, 3).map(Fixed),
    st.sampled_from([0.5, 1e-2, 1e-4]).map(Certified),
    st.integers(1, 3).map(TopK),
    st.sampled_from([0.1, 0.5, 0.9]).map(TopP),
)
attention_keys = st.sampled_from(["normal", "clustered", "duplicates", "zeros", "mixed_norms", "levels"])


@pytest.mark.parametrize("case", CASES, ids=ids)
@settings(max_examples=6)
@given(seed=st.integers(0, 2**31 - 1), key_kind=attention_keys, threshold=thresholds)
def test_output_is_attention_over_exactly_the_selected_keys(case, seed, key_kind, threshold, device):
    q_kind = "axis" if key_kind == "levels" else "normal"
    q, k, v, mask, index = make_inputs(case, device, seed, key_kind, q_kind)
    scale = case.lay.D**-0.5
    sel = hira.search(index, q, threshold)
    out, stats = hira.attend(q, index, sel)

    kept = kept_tokens(index, sel.keep, mask)  # [B, Hkv, N]
    assert_attends(out, q, k, v, kept, scale, f"{threshold}")
    assert_skip_bounds(q, k, mask, index, sel, stats, scale)
    torch.testing.assert_close(stats.kept_fraction, sel.kept_fraction)
    torch.testing.assert_close(stats.read_fraction, kept.sum(-1) / mask.sum(-1, keepdim=True).float())
    if isinstance(threshold, TopK) and not bool(index.forced_leaves().any()):
        live = index.levels[0].count > 0
        assert torch.equal(sel.keep.sum(-1), live.sum(-1).clamp_max(threshold.k)), "topk kept too many"


@pytest.mark.parametrize("case", CASES, ids=ids)
@settings(max_examples=5)
@given(
    seed=st.integers(0, 2**31 - 1),
    eps=st.sampled_from([0.2, 1e-2, 1e-3]),
    key_kind=st.sampled_from(["levels", "clustered"]),
)
def test_certified_error_is_bounded(case, seed, eps, key_kind, device):
    """Skipped mass ≤ both skip bounds and ≤ ε; ‖o − ô‖ ≤ 2ε·max‖v‖ per row against full attention. On the
    "levels" keys certified prunes (so the bound is not met by reading everything): somewhere, not in every head —
    a k-means leaf can mix levels so that each of a head's few leaves holds more than ε of its mass (seen: 4 live
    leaves, all needed at ε = 0.001)."""
    q_kind = "axis" if key_kind == "levels" else "aligned"
    q, k, v, mask, index = make_inputs(case, device, seed, key_kind, q_kind)
    scale = case.lay.D**-0.5
    sel = hira.search(index, q, Certified(eps))
    out, stats = hira.attend(q, index, sel)
    assert_skip_bounds(q, k, mask, index, sel, stats, scale, eps=eps)
    if key_kind == "levels" and not bool(index.forced_leaves().any()):
        assert int(sel.keep.sum()) < int((index.levels[0].count > 0).sum()), "certified did not prune"

    full = dense_reference(q, k, v, mask, scale)  # [B, Hq, S, D]
    v_max = (v.double().norm(dim=-1) * mask[:, None, :]).amax(-1)  # [B, Hkv]
    limit = 2 * eps * v_max.repeat_interleave(case.G, dim=1)[..., None]  # [B, Hq, 1]
    rtol, atol = tolerance(q, k, v, scale)
    err = (out.double() - full).norm(dim=-1)  # [B, Hq, S]
    assert bool((err <= limit + atol * case.lay.D**0.5 + rtol * full.norm(dim=-1)).all())


@pytest.mark.parametrize("case", CASES[::2], ids=ids)
@settings(max_examples=5)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 20), threshold=thresholds)
def test_extra_kv_merges_exactly(case, seed, T, threshold, device):
    """attend(..., extra_kv) equals dense attention over the selected keys plus the extra keys."""
    q, k, v, mask, index = make_inputs(case, device, seed)
    L = case.lay
    gen = torch.Generator().manual_seed(seed + 1)
    k_x = torch.randn(L.B, L.Hkv, T, L.D, generator=gen).to(device, L.dtype)
    v_x = torch.randn(L.B, L.Hkv, T, L.D, generator=gen).to(device, L.dtype)
    m_x = (torch.rand(L.B, T, generator=gen) < 0.7).to(device)  # a row may have no extra key
    sel = hira.search(index, q, threshold)
    out, stats = hira.attend(q, index, sel, extra_kv=(k_x, v_x), extra_mask=m_x)

    kept = kept_tokens(index, sel.keep, mask)  # [B, Hkv, N]
    both = torch.cat([kept, m_x[:, None, :].expand(L.B, L.Hkv, T)], dim=-1)
    assert_attends(out, q, torch.cat([k, k_x], 2), torch.cat([v, v_x], 2), both, L.D**-0.5)
    # Extra keys only add read mass: the posterior bound holds over index keys ∪ extra keys.
    all_real = torch.cat([mask, m_x], dim=-1)
    mass = skipped_mass(q, torch.cat([k, k_x], 2), all_real, both, L.D**-0.5)
    assert bool((mass <= stats.skip_bound.double() * (1 + 1e-4) + 1e-7).all())


@pytest.mark.parametrize("case", UNFORCED_CASES[:3], ids=ids)
def test_empty_selection_reads_nothing(case, device):
    """No block above τ and no sinks/window: the output is 0 and both bounds say everything was skipped; with
    extra keys the output is attention over those alone."""
    q, k, v, mask, index = make_inputs(case, device, seed=1)
    L = case.lay
    sel = hira.search(index, q, Fixed(1e30))
    assert int(sel.kv_num_blocks.sum()) == 0
    out, stats = hira.attend(q, index, sel)
    assert bool((out == 0).all())
    assert bool((stats.skip_bound == 1).all()) and bool((stats.prior_skip_bound == 1).all())
    assert bool((stats.read_fraction == 0).all())

    k_x = torch.randn(L.B, L.Hkv, 5, L.D).to(device, L.dtype)
    v_x = torch.randn(L.B, L.Hkv, 5, L.D).to(device, L.dtype)
    out, _ = hira.attend(q, index, sel, extra_kv=(k_x, v_x))
    assert_attends(out, q, k_x, v_x, torch.ones(L.B, 5, dtype=torch.bool), L.D**-0.5)


@pytest.mark.parametrize("case", [c for c in CASES if c.lay.C == -(-c.lay.N // c.lay.BS) * c.lay.BS], ids=ids)
def test_decode_attention_is_build_search_attend(case, device):
    q, k, v, mask, _ = make_inputs(case, device, seed=2)
    cfg = dataclasses.replace(case.config(), threshold=TopK(2))
    out, stats = hira.decode_attention(q, k, v, cfg, key_mask=mask)
    index = hira.build_index(k, v, cfg, key_mask=mask)
    sel = hira.search(index, q, TopK(2))
    out2, stats2 = hira.attend(q, index, sel)
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    torch.testing.assert_close(stats.skip_bound, stats2.skip_bound, rtol=0, atol=0)
    assert_attends(out, q, k, v, kept_tokens(index, sel.keep, mask), case.lay.D**-0.5)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 24 * 2**30,
    reason="needs CUDA with 24 GB: K and V of 2^31 elements each",
)
def test_attention_past_int32_indexing():
    """K/V of 2^31 elements (1M tokens at batch 2, 128K at batch 16, Llama-3-8B shapes): compiled flex_attention
    failed to compile there (int64 indexing); read one batch row at a time, the output is attention over the listed
    blocks, the storage's last block among them."""
    from hira.flex.attention import selected_attention
    from hira.flex.mask import block_lists

    B, H, G, D, BS = 2, 8, 4, 128, 128
    C = 2**31 // (B * H * D)
    NB = C // BS
    gen = torch.Generator(device="cuda").manual_seed(0)
    keys = torch.zeros(B, H, C, D, device="cuda", dtype=torch.bfloat16)
    values = torch.zeros_like(keys)
    rows = torch.randn(B, H, G, D, device="cuda", generator=gen).bfloat16()
    picked = torch.tensor([0, 7, NB // 2, NB - 1], device="cuda")
    keep = torch.zeros(B, H, NB, dtype=torch.bool, device="cuda")
    keep[:, :, picked] = True
    for t in (keys, values):
        t.view(B, H, NB, BS, D)[:, :, picked] = torch.randn(B, H, len(picked), BS, D, device="cuda",
                                                            generator=gen).bfloat16()
    valid = torch.ones(B, C, dtype=torch.bool, device="cuda")
    num, idx = block_lists(keep)
    out, lse = selected_attention(rows, keys, values, num[..., None], idx[:, :, None], keep, valid, BS, D**-0.5)
    k_sel, v_sel = (t.view(B, H, NB, BS, D)[:, :, picked].flatten(2, 3).float() for t in (keys, values))
    s = rows.float() @ k_sel.transpose(-1, -2) * D**-0.5
    torch.testing.assert_close(out.float(), s.softmax(-1) @ v_sel, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, s.logsumexp(-1), atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("threshold, uneven", [(Certified(1e-2), True), (TopK(2), False), (TopP(0.9), False),
                                               (Fixed(0.0), False), (Dense(), False)])
def test_certified_selections_ask_the_attention_for_more_kv_splits(threshold, uneven, monkeypatch, device):
    """A certified selection's heads may keep very different numbers of blocks (``Threshold.uneven``): its
    ``Selection`` says so and the attention passes it to ``kernel_options``, which on sm_90 then splits each head's
    list over about four programs per SM; the other modes keep inductor's split."""
    import hira.flex.attention as attention

    seen = []
    real = attention.kernel_options
    monkeypatch.setattr(attention, "kernel_options", lambda q_rows, uneven=False: seen.append(uneven)
                        or real(q_rows, uneven))
    B, H, G, N, D = 1, 2, 2, 256, 16
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(B, H, N, D, generator=gen).to(device) for _ in range(2))
    q = torch.randn(B, H * G, 1, D, generator=gen).to(device)
    index = hira.build_index(k, v, HiraConfig(block_size=16, sink_tokens=0, window_tokens=16))
    selection = hira.search(index, q, threshold)
    assert selection.uneven is uneven
    hira.attend(q, index, selection)
    assert seen and set(seen) == {uneven}


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs sm_90")
def test_uneven_lists_take_four_decode_programs_per_sm():
    from hira.flex.attention import kernel_options

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = torch.zeros(1, 8, 4, 128, device="cuda")
    split = kernel_options(rows, uneven=True)["SPLIT_KV"]
    assert split & (split - 1) == 0 and split <= 4 * sms // 8 < 2 * split
    assert kernel_options(rows) == {"num_stages": 3}
    assert kernel_options(torch.zeros(1, 8, 128, 128, device="cuda"), uneven=True) == {"num_stages": 3}
