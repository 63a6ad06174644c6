"""The functional API: build an index, search it, attend through it. No model needed.

    index = hira.build_index(k, v, config)          # k, v: [B, Hkv, N, D]
    sel = hira.search(index, q)                     # q: [B, Hq, S, D], threshold from config or given
    out, stats = hira.attend(q, index, sel)         # out: [B, Hq, S, D]
    out, stats = hira.decode_attention(q, k, v, config)   # all three in one call

These functions validate their inputs (shapes, dtypes, NaN/inf: a host sync each) and then call the tensor
programs in ``hira.index``, ``hira.selection`` and ``hira.flex``, which do not validate and never sync: call those
directly inside a compiled or graph-captured decode step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hira.config import HiraConfig
from hira.flex.attention import dense_attention_lse, fold_gqa, merge_partials, selected_attention, unfold_gqa
from hira.index.index import HiraIndex
from hira.index.index import build_index as _build_index
from hira.offload.attend import attend_offloaded
from hira.offload.block_cache import BlockCache
from hira.selection.search import Selection, search_rows
from hira.selection.threshold import Threshold, TopP

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class AttentionStats:
    """What one attention step read and what it may have missed.

    Attributes:
        kept_fraction: [B, Hkv] blocks read over non-empty blocks.
        read_fraction: [B, Hkv] real keys in the blocks read over all real keys.
        skip_bound: [B, Hq, S] certified bound on the softmax mass of the keys not read, from the exact LSE of
            what was read (posterior): never below the true skipped mass.
        prior_skip_bound: [B, Hq, S] the same bound known before attention (from one exact block score).
    """

    kept_fraction: torch.Tensor
    read_fraction: torch.Tensor
    skip_bound: torch.Tensor
    prior_skip_bound: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.kept_fraction, self.read_fraction, self.skip_bound, self.prior_skip_bound)


def _fail(msg: str):
    raise ValueError(msg)


def _check_tensor(name: str, t, ndim: int):
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        _fail(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        _fail(f"{name} must be float32, bfloat16 or float16, got {t.dtype}; cast it with .to(torch.bfloat16)")


def _check_finite(name: str, t: torch.Tensor):
    if not bool(torch.isfinite(t).all()):
        _fail(f"{name} holds NaN or inf values; Hira's bounds need finite keys and queries: check the model's outputs")


def build_index(
    keys: torch.Tensor,
    values: torch.Tensor,
    config: HiraConfig | None = None,
    *,
    key_mask: torch.Tensor | None = None,
    capacity: int | None = None,
) -> HiraIndex:
    """Index one layer's keys.

    Args:
        keys, values: [B, Hkv, N, D] post-RoPE keys and values, float32/bfloat16/float16, same dtype and device.
        config: block size, branching, clustering, sinks and window (defaults: ``HiraConfig()``).
        key_mask: [B, N] bool, True for real tokens, False for padding (e.g. left padding). None: all real.
        capacity: slots to reserve, for tokens appended later with ``hira.index.index.append``; default: just N.
            Appended tokens start at the next whole block, so T appends need ceil(N / BS)·BS + T slots.
    Returns:
        A ``HiraIndex`` whose storage holds K and V in cluster order.
    """
    cfg = config or HiraConfig()
    _check_tensor("keys", keys, 4)
    _check_tensor("values", values, 4)
    if keys.shape != values.shape:
        _fail(f"keys and values must have the same shape, got {tuple(keys.shape)} and {tuple(values.shape)}")
    if keys.dtype != values.dtype or keys.device != values.device:
        _fail(f"keys and values must share dtype and device, got {keys.dtype}/{keys.device} and "
              f"{values.dtype}/{values.device}")
    B, H, N, D = keys.shape
    if N == 0 or B == 0 or H == 0:
        _fail(f"cannot index an empty cache (keys shape {tuple(keys.shape)}): attend densely until there are tokens")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool or key_mask.shape != (B, N):
            _fail(f"key_mask must be a bool tensor of shape {(B, N)}, got "
                  f"{getattr(key_mask, 'dtype', type(key_mask))} {tuple(getattr(key_mask, 'shape', ()))}")
        empty = (~key_mask.any(1)).nonzero().flatten().tolist()
        if empty:
            _fail(f"key_mask rows {empty} have no real token: drop those rows from the batch")
    if capacity is not None and capacity < N:
        _fail(f"capacity must be at least the number of keys N={N}, got {capacity}")
    _check_finite("keys", keys)
    _check_finite("values", values)
    return build_index_unchecked(keys, values, key_mask, cfg, capacity)


def build_index_unchecked(
    keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor | None, config: HiraConfig, capacity: int | None
) -> HiraIndex:
    """``build_index`` without validation: the tensor program, with the index settings taken from ``config``."""
    return _build_index(
        keys,
        values,
        key_mask,
        block_size=config.block_size,
        branching=config.branching,
        clustering=config.clustering,
        kmeans_iters=config.kmeans_iters,
        sink_tokens=config.sink_tokens,
        window_tokens=config.window_tokens,
        capacity=capacity,
        key_sketch=config.key_sketch,
    )


def _check_query(q, index: HiraIndex):
    _check_tensor("q", q, 4)
    B, H, _, D = index.keys.shape
    if q.shape[0] != B or q.shape[-1] != D:
        _fail(f"q must be [B={B}, Hq, S, D={D}] to match the index, got {tuple(q.shape)}")
    if q.shape[1] % H:
        _fail(f"q has {q.shape[1]} heads, not a multiple of the index's {H} KV heads (GQA needs Hq = G·Hkv)")
    if q.shape[2] == 0:
        _fail("q has no query positions (S=0)")
    if q.device != index.keys.device:
        _fail(f"q is on {q.device} but the index is on {index.keys.device}")
    _check_finite("q", q)


def _scale(q, scale):
    if scale is None:
        return q.shape[-1] ** -0.5
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        _fail(f"scale must be a finite number > 0 (the softmax scale, default 1/sqrt(D)), got {scale!r}")
    return value


def search(
    index: HiraIndex, q: torch.Tensor, threshold: Threshold | None = None, *, scale: float | None = None
) -> Selection:
    """Find the blocks the queries must read.

    Args:
        index: from ``build_index``.
        q: [B, Hq, S, D] post-RoPE queries, Hq a multiple of the index's KV heads.
        threshold: a ``hira.Threshold``; default ``TopP(0.99)``.
        scale: softmax scale; default 1/sqrt(D). Thresholds are in scaled-score units.
    Returns:
        A ``Selection`` per (batch, KV head), the union over the G·S query rows of the group.
    """
    _check_query(q, index)
    threshold = TopP(0.99) if threshold is None else threshold
    if not isinstance(threshold, Threshold):
        _fail(f"threshold must be a hira.Threshold, got {threshold!r}")
    return search_rows(index, fold_gqa(q, index.keys.shape[1]), threshold, scale=_scale(q, scale))


def attend_rows(
    rows: torch.Tensor, index: HiraIndex, selection: Selection, scale: float, cache: BlockCache | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compiled flex attention of folded query rows [B, H, R, D] (the index's dtype) over the selected blocks:
    (out [B, H, R, D], lse [B, H, R] float32).

    With a block ``cache`` (K and V in the host tier, ``hira.offload``) the selection is fetched into it first; the
    blocks in slots are read from the cache, any left without a slot from the host tier, and the two parts merged.
    """
    if cache is None:
        return selected_attention(rows, index.keys, index.values, selection.kv_num_blocks, selection.kv_indices,
                                  selection.keep, index.valid, index.block_size, scale, uneven=selection.uneven)
    return attend_offloaded(rows, index.keys, index.values, index.valid, cache, selection.keep, scale,
                            index.block_size)


def attend_selection(
    q: torch.Tensor,
    index: HiraIndex,
    selection: Selection,
    scale: float,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    cache: BlockCache | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """``attend`` without validation: the tensor program a compiled decode step calls (through the block ``cache``
    when K and V are in the host tier)."""
    B, Hq, S, D = q.shape
    rows = fold_gqa(q, index.keys.shape[1]).to(index.keys.dtype)  # [B, H, G*S, D]
    out, lse = attend_rows(rows, index, selection, scale, cache)
    if extra is not None:
        k_x, v_x, m_x = extra
        out_x, lse_x = dense_attention_lse(rows, k_x.to(rows.dtype), v_x.to(rows.dtype), m_x, scale)
        out, lse = merge_partials(out, lse, out_x, lse_x)
    skip = torch.sigmoid(selection.log_skip_ub - lse).nan_to_num(nan=0.0)  # U / (U + read mass)
    stats = AttentionStats(
        kept_fraction=selection.kept_fraction,
        read_fraction=selection.read_fraction,
        skip_bound=unfold_gqa(skip, Hq),
        prior_skip_bound=unfold_gqa(selection.skip_bound, Hq),
    )
    return unfold_gqa(out, Hq).to(q.dtype), stats


def attend(
    q: torch.Tensor,
    index: HiraIndex,
    selection: Selection,
    *,
    scale: float | None = None,
    extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    extra_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Attention of q over the selected blocks (sinks and the recent window included), FlexAttention compiled.

    Args:
        q: [B, Hq, S, D], the same queries the selection was searched with.
        index, selection: from ``build_index`` and ``search``.
        scale: softmax scale; default 1/sqrt(D).
        extra_kv: optional (k, v), each [B, Hkv, T, D]: keys not in the index (e.g. the newest tokens), attended
            densely and merged exactly through the log-sum-exp.
        extra_mask: [B, T] bool real tokens of ``extra_kv``; default all real.
    Returns:
        out [B, Hq, S, D] in q's dtype, and ``AttentionStats``.
    """
    _check_query(q, index)
    B, Hq, S, D = q.shape
    H = index.keys.shape[1]
    if selection.tau.shape != (B, H, (Hq // H) * S):
        _fail(f"the selection was made for {tuple(selection.tau.shape)} query rows, q gives "
              f"{(B, H, (Hq // H) * S)}: search with the same q")
    if selection.keep.shape != (B, H, index.num_leaves):
        _fail(f"the selection covers {selection.keep.shape[-1]} blocks but the index has {index.num_leaves}: "
              "search the index you attend through")
    extra = None
    if extra_kv is not None:
        k_x, v_x = extra_kv
        _check_tensor("extra_kv[0]", k_x, 4)
        _check_tensor("extra_kv[1]", v_x, 4)
        if k_x.shape != v_x.shape or k_x.shape[:2] != (B, H) or k_x.shape[-1] != D:
            _fail(f"extra_kv must be two [B={B}, Hkv={H}, T, D={D}] tensors, got {tuple(k_x.shape)} and "
                  f"{tuple(v_x.shape)}")
        m_x = extra_mask if extra_mask is not None else torch.ones(B, k_x.shape[2], dtype=torch.bool, device=q.device)
        if m_x.shape != (B, k_x.shape[2]) or m_x.dtype != torch.bool:
            _fail(f"extra_mask must be a bool tensor of shape {(B, k_x.shape[2])}, got {m_x.dtype} {tuple(m_x.shape)}")
        _check_finite("extra_kv keys", k_x)
        _check_finite("extra_kv values", v_x)
        extra = (k_x, v_x, m_x)
    return attend_selection(q, index, selection, _scale(q, scale), extra)


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    config: HiraConfig | None = None,
    *,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """One call: index the cache, search with ``config.threshold`` and attend. For repeated steps over one cache,
    build once and call ``search`` + ``attend`` per step instead.

    Args:
        q: [B, Hq, S, D]; keys, values: [B, Hkv, N, D]; key_mask: [B, N] bool or None.
    Returns:
        out [B, Hq, S, D] and ``AttentionStats``.
    """
    cfg = config or HiraConfig()
    index = build_index(keys, values, cfg, key_mask=key_mask)
    sel = search(index, q, cfg.threshold, scale=scale)
    return attend(q, index, sel, scale=scale)
