"""The decode step of one layer, in two halves: ``plan`` appends the new token to the index and searches it;
``run`` attends over the selected blocks and writes the stats. ``decode_step`` is both: a tensor program with no
host sync, fixed shapes and in-place updates. ``HiraLayer`` runs it through ``run_decode_step``:

- inside a model compiled as a whole (transformers' generate auto-compile, or ``torch.compile(model)``), as one
  opaque operator, ``hira::decode_step``, whose implementation is the whole step compiled on its own, once per shape
  and threshold, and shared by every layer (regional compilation): the model's graph stays as small as a dense
  model's and compiles in seconds rather than minutes, while its CUDA graph still captures every kernel of the step;
- in an eager model, the same compiled code called directly: one call instead of ~150 small eager ops per layer.

On CUDA the compiled code is the whole step in one graph; on the CPU it is ``plan`` compiled and ``run`` as it is
(its flex_attention is compiled on its own), because compiled flex_attention in one graph with the BlockMask's
construction returns wrong values there (``_step``).

With K and V in host memory (``HiraConfig.offload``) the step also takes the layer's block cache: ``plan`` writes the
new token to its resident slot (``write_newest``) and reads whole leaves through it, and ``run`` attends through it
(``hira.offload``), its attention one opaque operator inside the compiled step.

Shapes: B batch, Hq query heads, H KV heads, G = Hq / H, D head dim.
"""

from __future__ import annotations

import dataclasses

import torch

from hira.api import AttentionStats, attend_selection
from hira.flex.attention import fold_gqa
from hira.index.bounds import NodeBounds
from hira.index.index import HiraIndex, KeyBlocks, append, check_room
from hira.index.sketch import KeySketch
from hira.offload.block_cache import BlockCache, cached_key_blocks, write_newest
from hira.selection.search import Selection, search_rows
from hira.selection.threshold import Dense, Threshold, from_name, name_and_value


def plan(
    index: HiraIndex, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, threshold: Threshold, scale: float,
    cache: BlockCache | None = None,
) -> Selection:
    """Append the new token to ``index`` (in place) and select the blocks the query reads (``Dense``: every
    non-empty block, with no search).

    ``Dense`` reads no bound, so its append writes the storage alone (``append(bounds=False)``): the index's bounds
    are stale until ``hira.index.index.refresh_bounds`` (``HiraLayer`` refreshes them before a later prefill).

    With a block ``cache`` (K and V in the host tier) the token is first written to its block's slot where that is
    resident, and the append's and the search's reads of whole leaves go through the cache (``cached_key_blocks``).

    Args:
        q: [B, Hq, 1, D] post-RoPE query; k, v: [B, H, 1, D] the new token's key and value.
    """
    key_blocks = None
    if cache is not None:
        write_newest(index, cache, k, v)
        key_blocks = cached_key_blocks(index, cache)
    append(index, k, v, bounds=not isinstance(threshold, Dense), key_blocks=key_blocks)
    return select(index, q, threshold, scale, key_blocks=key_blocks)


def select(index: HiraIndex, q: torch.Tensor, threshold: Threshold, scale: float, kernel: bool = True,
           key_blocks: KeyBlocks | None = None) -> Selection:
    """The blocks the queries read: q [B, Hq, S, D] folded into rows per KV head and searched, scaled in float32 by
    the search (``plan`` without the append; the benchmarks time it on a fixed index, with the search's Triton
    kernels or, ``kernel`` False, its tensor program)."""
    rows = fold_gqa(q, index.keys.shape[1])  # [B, H, G·S, D]
    return search_rows(index, rows, threshold, kernel=kernel, key_blocks=key_blocks, scale=scale)


def run(q: torch.Tensor, index: HiraIndex, selection: Selection, scale: float, stats: AttentionStats,
        cache: BlockCache | None = None) -> torch.Tensor:
    """Attend over the selected blocks and overwrite ``stats`` in place; returns [B, Hq, 1, D] in q's dtype. With a
    block ``cache`` (K and V in the host tier) the attention reads through it."""
    out, new = attend_selection(q, index, selection, scale, cache=cache)
    for dst, src in zip(stats.tensors(), new.tensors()):
        dst.copy_(src)
    return out


def decode_step(
    index: HiraIndex,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    threshold: Threshold,
    scale: float,
    stats: AttentionStats,
    cache: BlockCache | None = None,
) -> torch.Tensor:
    """One decode step of one layer.

    Args:
        index: the layer's index; the new token is appended in place.
        q: [B, Hq, 1, D] post-RoPE query; k, v: [B, H, 1, D] the new token's key and value.
        threshold: the search mode; scale: the softmax scale.
        stats: buffers overwritten in place with this step's ``AttentionStats``.
        cache: the layer's block cache when its K and V are in the host tier (``hira.offload``), else None.
    Returns:
        [B, Hq, 1, D] attention output in q's dtype.
    """
    return run(q, index, plan(index, q, k, v, threshold, scale, cache), scale, stats, cache)


def _unflatten(tensors: list[torch.Tensor], n_levels: int, block_size: int, branching: int, sink_tokens: int,
               window_tokens: int) -> HiraIndex:
    """The ``HiraIndex`` whose ``tensors()`` are ``tensors``."""
    keys, values, valid, rank = tensors[:4]
    levels = [NodeBounds(*tensors[4 + 5 * i : 9 + 5 * i]) for i in range(n_levels)]
    rest = tensors[4 + 5 * n_levels :]
    leaf_first, leaf_last, n_valid, next_slot, spread_weight = rest[:5]
    sketch = KeySketch(*rest[5:8]) if len(rest) > 5 else None
    return HiraIndex(keys, values, valid, rank, levels, leaf_first, leaf_last, n_valid, next_slot, spread_weight,
                     block_size, branching, sink_tokens, window_tokens, sketch)


def _flat_step(tensors, cache, q, k, v, stats, threshold_name, threshold_value, scale, n_levels, block_size,
               branching, sink_tokens, window_tokens):
    index = _unflatten(tensors, n_levels, block_size, branching, sink_tokens, window_tokens)
    threshold = from_name(threshold_name, threshold_value)
    return decode_step(index, q, k, v, threshold, scale, AttentionStats(*stats), _cache(cache))


def _cache(tensors: list[torch.Tensor]) -> BlockCache | None:
    """The ``BlockCache`` whose ``tensors()`` are ``tensors`` (None for none)."""
    return BlockCache(*tensors) if tensors else None


def _flat_plan(tensors, cache, q, k, v, threshold_name, threshold_value, scale, n_levels, block_size, branching,
               sink_tokens, window_tokens):
    index = _unflatten(tensors, n_levels, block_size, branching, sink_tokens, window_tokens)
    selection = plan(index, q, k, v, from_name(threshold_name, threshold_value), scale, _cache(cache))
    # A dataclass is no output: its tensors are (``uneven``, a constant of the threshold, is not).
    return tuple(getattr(selection, f.name) for f in dataclasses.fields(selection) if f.name != "uneven")


# Compiled once per shape and threshold, shared by every layer (their inputs are tensors and constants, no objects).
# Without inductor's reordering for locality: it moved the search's read of the top leaves through the block cache
# (needed only by the stats) after the offloaded attention, which mutates the cache, so the cache's keys could no
# longer be updated in place: a copy of all its slots and a copy back at every step (benchmarks/NOTES.md §20).
_OPTIONS = {"reorder_for_locality": False}
_compiled_step = torch.compile(_flat_step, fullgraph=True, dynamic=False, options=_OPTIONS)
_compiled_plan = torch.compile(_flat_plan, fullgraph=True, dynamic=False, options=_OPTIONS)


def _step(tensors, cache, q, k, v, stats, *setting_and_layout) -> torch.Tensor:
    """On CUDA the whole step compiled as one graph; elsewhere the compiled plan, then ``run`` as it is. On the CPU
    (torch 2.13) flex_attention compiled in one graph with the BlockMask's construction returns wrong values
    (benchmarks/NOTES.md §11), while the process-wide compiled flex_attention that ``run`` calls is exact."""
    if q.is_cuda:
        return _compiled_step(tensors, cache, q, k, v, stats, *setting_and_layout)
    n_levels, block_size, branching, sink_tokens, window_tokens = setting_and_layout[3:]
    uneven = from_name(*setting_and_layout[:2]).uneven
    selection = Selection(*_compiled_plan(tensors, cache, q, k, v, *setting_and_layout), uneven=uneven)
    index = _unflatten(tensors, n_levels, block_size, branching, sink_tokens, window_tokens)
    return run(q, index, selection, setting_and_layout[2], AttentionStats(*stats), _cache(cache))


@torch.library.custom_op("hira::decode_step", mutates_args=("tensors", "cache", "stats"))
def _decode_step_op(
    tensors: list[torch.Tensor], cache: list[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    stats: list[torch.Tensor],
    threshold_name: str, threshold_value: float, scale: float, n_levels: int, block_size: int, branching: int,
    sink_tokens: int, window_tokens: int,
) -> torch.Tensor:
    return _step(tensors, cache, q, k, v, stats, threshold_name, threshold_value, scale, n_levels, block_size,
                 branching, sink_tokens, window_tokens)


@_decode_step_op.register_fake
def _(tensors, cache, q, k, v, stats, threshold_name, threshold_value, scale, n_levels, block_size, branching,
      sink_tokens, window_tokens):
    return torch.empty_like(q)


def step_args(index: HiraIndex, q, k, v, threshold: Threshold, scale: float, stats: AttentionStats,
              cache: BlockCache | None = None) -> tuple:
    """The arguments of the compiled step (``_step``, ``hira::decode_step``): tensors, lists of tensors and
    constants."""
    return (list(index.tensors()), list(cache.tensors()) if cache is not None else [], q, k, v, list(stats.tensors()),
            *name_and_value(threshold), float(scale), len(index.levels), index.block_size, index.branching,
            index.sink_tokens, index.window_tokens)


def run_decode_step(index: HiraIndex, q, k, v, threshold: Threshold, scale: float, stats: AttentionStats,
                    cache: BlockCache | None = None) -> torch.Tensor:
    """``decode_step`` as the module docstring says: inside a compiled model one operator, else the same compiled
    code called directly."""
    args = step_args(index, q, k, v, threshold, scale, stats, cache)
    if torch.compiler.is_compiling():
        return _decode_step_op(*args)
    check_room(index, q.shape[2])  # the compiled step cannot raise: one host read before it
    return _step(*args)
