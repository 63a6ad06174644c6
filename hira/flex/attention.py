"""The compiled flex_attention calls over the index storage (decode and prefill chunks), GQA folding, and the exact
log-sum-exp merge.

flex_attention is compiled once per process and shared (compile at the boundary): eager flex_attention would
materialise every score and is 17–23× slower than SDPA at decode on an H100 (DESIGN.md §2).

Shapes: B batch, Hq query heads, H KV heads, G = Hq / H, S query positions, R = G·S rows, C slots, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from hira.flex.mask import chunk_block_mask, selection_block_mask

# Created at import (compiling happens at the first call): a global first assigned inside a compiled decode step
# would fail dynamo's guard on it at the next step and cost one recompile.
_COMPILED_FLEX = torch.compile(flex_attention, fullgraph=True, dynamic=False)
# Prefill chunks: a separate instance, its query length padded to a power of two (``chunk_attention``) so that a
# few static shapes serve every chunk (dynamic shapes fail to build on the CPU backend, torch 2.13).
_COMPILED_FLEX_CHUNKS = torch.compile(flex_attention, fullgraph=True, dynamic=False)


def compiled_flex_attention():
    """The process-wide ``torch.compile(flex_attention, fullgraph=True, dynamic=False)``."""
    return _COMPILED_FLEX


@torch.compiler.assume_constant_result
def _capability_major(device_index: int | None) -> int:
    """The CUDA device's compute capability major, a constant of the compiled step (dynamo does not trace into
    ``torch.cuda.get_device_capability``)."""
    return torch.cuda.get_device_capability(device_index)[0]


@torch.compiler.assume_constant_result
def _sm_count(device_index: int | None) -> int:
    """The CUDA device's number of SMs, a constant of the compiled step."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def kernel_options(q_rows: torch.Tensor, uneven: bool = False) -> dict | None:
    """flex_attention's kernel options for Hira's calls on ``q_rows`` [B, H, R, D]: on sm_90, 3 pipeline stages,
    where inductor's decode heuristic gives it 1 (on the H200 the attention over every block −26%, over 5% of 512K
    −17%; benchmarks/NOTES.md §31); elsewhere inductor's own choice (not measured).

    ``uneven`` (the heads' block lists may differ widely in length, ``Threshold.uneven``): about four decode programs
    per SM, ``SPLIT_KV`` the largest power of two of at most 4·SMs / (B·H) where inductor takes 2·⌊SMs / (B·H)⌋, so
    that a head with a long list is read by more programs (64 against 32 for one sequence of 8 KV heads on an H200:
    the certified step 128K 0.1495 → 0.1334 ms, 512K 0.3160 → 0.2967; the same split made `TopK` at 5% and the dense
    mode slower, 0.0373 → 0.0393 and 0.1826 → 0.1910 ms at 128K, where every head reads as many blocks: NOTES.md
    §34). Only for the R < 128 rows that take the decode kernel."""
    if not (q_rows.is_cuda and _capability_major(q_rows.device.index) == 9):
        return None
    B, H, R = q_rows.shape[:3]
    if not uneven or R >= 128:  # (R ≥ 128: flex_attention's main template, no KV split)
        return {"num_stages": 3}
    per_sm = 4 * _sm_count(q_rows.device.index) // (B * H)
    return {"num_stages": 3, "SPLIT_KV": 1 << max(per_sm, 1).bit_length() - 1}


def fold_gqa(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, S, D] -> [B, H, G·S, D]: the query heads of a KV group become rows (row = g·S + s)."""
    B, Hq, S, D = q.shape
    return q.reshape(B, num_kv_heads, (Hq // num_kv_heads) * S, D)


def unfold_gqa(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """[B, H, G·S, ...] -> [B, Hq, S, ...], the inverse of ``fold_gqa``."""
    B, H, R = x.shape[:3]
    return x.reshape(B, num_q_heads, R * H // num_q_heads, *x.shape[3:])


def _masked_lse(q_rows, keys, block_mask: BlockMask, valid, scale) -> torch.Tensor:
    """Log-sum-exp of the scaled scores over the keys the mask reads, computed densely in float32: [B, H, R].

    Used where compiled flex_attention cannot return it (the CPU backend, DESIGN.md §3).
    """
    B, H, R, _ = q_rows.shape
    C = keys.shape[2]
    bs = block_mask.BLOCK_SIZE[1]
    nb = C // bs
    num = block_mask.kv_num_blocks[:, :, :1]  # [B, H, 1]
    idx = block_mask.kv_indices[:, :, 0, :].long()  # [B, H, NB]
    listed = torch.arange(nb, device=keys.device) < num  # [B, H, NB]
    # kv_indices is a permutation of the blocks (kept first), so this scatter has no duplicate targets.
    read = torch.zeros(B, H, nb, dtype=torch.bool, device=keys.device).scatter_(2, idx, listed)
    read_slots = read.repeat_interleave(bs, dim=-1) & (valid[:, None, :] if valid.ndim == 2 else valid)  # [B, H, C]
    s = (q_rows.float() @ keys.float().transpose(-1, -2)) * scale  # [B, H, R, C]
    return s.masked_fill(~read_slots[:, :, None, :], -math.inf).logsumexp(-1)


def block_attention(
    q_rows: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_mask: BlockMask,
    valid: torch.Tensor,
    scale: float,
    return_lse: bool = False,
    uneven: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of folded query rows over the blocks the mask lists.

    Args:
        q_rows: [B, H, R, D] (R = G·S) in the storage dtype.
        keys, values: [B, H, C, D] storage.
        block_mask: from ``selection_block_mask``.
        valid: [B, C] (or per head [B, H, C]) bool real-token slots of ``keys``: only the CPU path reads it, for the
            LSE compiled flex_attention cannot return there.
        scale: softmax scale.
        return_lse: also return the log-sum-exp of the scaled scores read, [B, H, R] float32.
        uneven: the heads' lists may differ widely in length (``kernel_options``).
    Returns:
        out [B, H, R, D] (rows that read no key are 0) and the LSE (-inf for such rows) or None.
    """
    if return_lse and q_rows.is_cuda:
        # return_lse is deprecated (its warning costs a recompile on torch 2.11); AuxRequest is the supported form.
        out, aux = compiled_flex_attention()(q_rows, keys, values, block_mask=block_mask, scale=scale,
                                             kernel_options=kernel_options(q_rows, uneven),
                                             return_aux=AuxRequest(lse=True))
        return out, aux.lse.float()
    out = compiled_flex_attention()(q_rows, keys, values, block_mask=block_mask, scale=scale,
                                    kernel_options=kernel_options(q_rows, uneven))
    if not return_lse:
        return out, None
    return out, _masked_lse(q_rows, keys, block_mask, valid, scale)


# Past this many elements from a K/V tensor's storage start to its end, inductor indexes the flex decoding kernel in
# int64, which fails to compile there (torch 2.11 and 2.13, CUDA: the kernel mixes int64 program ids with int32 block
# counts and passes int64 offsets to block pointers). 128K tokens at batch 16 or 1M at batch 2 (8 KV heads of 128)
# reach it.
INDEX_LIMIT = 2**31 - 1


def selected_attention(
    rows: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    keep: torch.Tensor,
    valid: torch.Tensor,
    block_size: int,
    scale: float,
    slot_block: torch.Tensor | None = None,
    read_valid: torch.Tensor | None = None,
    uneven: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of folded query rows over the selected blocks of ``keys``/``values`` with its log-sum-exp: (out
    [B, H, R, D], lse [B, H, R] float32), the arguments as ``selection_block_mask`` and ``block_attention`` take them
    (``read_valid``: the validity of ``keys``' own slots where it differs from ``valid``, the CPU LSE's; ``uneven``:
    the heads' lists may differ widely in length, ``kernel_options``).

    K/V past ``INDEX_LIMIT`` elements are read in groups of batch rows, each through a view whose storage starts at
    its first row, so that every flex_attention call indexes in int32 (``_grouped_attention``).
    """
    args = (rows, keys, values, kv_num_blocks, kv_indices, keep, valid, block_size, scale, slot_block, read_valid,
            uneven)
    if max(_storage_extent(keys), _storage_extent(values)) > INDEX_LIMIT:
        return _grouped_attention(*args)
    return _one_call(*args)


def _one_call(rows, keys, values, kv_num_blocks, kv_indices, keep, valid, block_size, scale, slot_block, read_valid,
              uneven):
    """``selected_attention`` as one flex_attention call."""
    mask = selection_block_mask(kv_num_blocks, kv_indices, keep, valid, block_size, rows.shape[2], slot_block)
    return block_attention(rows, keys, values, mask, valid if read_valid is None else read_valid, scale,
                           return_lse=True, uneven=uneven)


def _storage_extent(t: torch.Tensor) -> int:
    """Elements from ``t``'s first element to its last: what inductor weighs when it picks 32- or 64-bit indexing
    for a kernel reading ``t``, for the whole tensors (storage offset 0) this module is given. (A traced graph
    cannot read the storage offset.)"""
    return sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1


@torch.library.custom_op("hira::grouped_attention", mutates_args=())
def _grouped_attention(
    rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor, block_size: int, scale: float,
    slot_block: torch.Tensor | None, read_valid: torch.Tensor | None, uneven: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Opaque: a view whose storage starts at a batch row (a DLPack alias) cannot be made inside a traced graph, and
    # a slice of a graph input keeps its storage offset, which inductor counts.
    # A batch row's stride bounds the extent of any of its views (C·D·H for the storage's layout).
    row = max(keys.stride(0), values.stride(0))
    if row > INDEX_LIMIT:
        raise ValueError(
            f"one batch row of K/V spans {row:,} elements, past the {INDEX_LIMIT:,} that compiled flex_attention "
            "can index (torch 2.11–2.13): use fewer tokens per sequence"
        )
    per_group = INDEX_LIMIT // row
    outs, lses = [], []
    for b0 in range(0, keys.shape[0], per_group):
        part = slice(b0, b0 + per_group)
        out, lse = _one_call(
            rows[part], torch.from_dlpack(keys[part]), torch.from_dlpack(values[part]), kv_num_blocks[part],
            kv_indices[part], keep[part], valid[part], block_size, scale,
            None if slot_block is None else slot_block[part], None if read_valid is None else read_valid[part], uneven,
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@_grouped_attention.register_fake
def _(rows, keys, values, kv_num_blocks, kv_indices, keep, valid, block_size, scale, slot_block, read_valid,
      uneven):
    return torch.empty_like(rows), rows.new_empty(rows.shape[:3], dtype=torch.float32)


def chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_valid: torch.Tensor, rank_range,
                    scale: float) -> torch.Tensor:
    """Causal attention of a prefill chunk over the permuted storage, which already holds it.

    The chunk's S queries are padded to a power of two (padding rows read nothing), so that one compiled shape
    serves every chunk length up to it.

    Args:
        q: [B, Hq, S, D] the chunk's queries; keys, values: [B, H, C, D] the storage.
        n_valid: [B] real tokens stored, the chunk's included (all its tokens are real).
        rank_range: (rank [B, H, C], leaf_first, leaf_last, count [B, H, NB]) for ``chunk_block_mask``.
    Returns:
        [B, Hq, S, D] in q's dtype.
    """
    B, Hq, S, D = q.shape
    H = keys.shape[1]
    padded = 1 << (S - 1).bit_length()
    rows = fold_gqa(F.pad(q.to(keys.dtype), (0, 0, 0, padded - S)), H)  # [B, H, G·padded, D]
    pos = torch.arange(padded, device=q.device)
    s_rank = torch.where(pos < S, n_valid[:, None] - S + pos, -1)  # [B, padded] (row g·padded + s is token s)
    rank, leaf_first, leaf_last, count = rank_range
    mask = chunk_block_mask(rank, leaf_first, leaf_last, count, s_rank.repeat(1, Hq // H), keys.shape[2] // count.shape[-1])
    out = _COMPILED_FLEX_CHUNKS(rows, keys, values, block_mask=mask, scale=scale)
    return unfold_gqa(out, Hq)[:, :, :S].to(q.dtype)


def dense_attention_lse(
    q_rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention of query rows over a few extra keys, with its LSE, in float32.

    Args:
        q_rows: [B, H, R, D]; keys, values: [B, H, T, D]; key_mask: [B, T] bool.
    Returns:
        out [B, H, R, D] (0 for rows with no key), lse [B, H, R] float32.
    """
    s = (q_rows.float() @ keys.float().transpose(-1, -2)) * scale  # [B, H, R, T]
    s = s.masked_fill(~key_mask[:, None, None, :], -math.inf)
    lse = s.logsumexp(-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(nan=0.0)
    return (p @ values.float()).to(q_rows.dtype), lse


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the union of two disjoint key sets from each part's output and LSE.

    out_*: [..., D]; lse_*: [...] float32 (-inf for a part that read nothing). Returns (out, lse).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    wa = torch.exp(lse_a - safe)[..., None]
    wb = torch.exp(lse_b - safe)[..., None]
    out = wa * out_a.float() + wb * out_b.float()
    return out.to(out_a.dtype), lse
