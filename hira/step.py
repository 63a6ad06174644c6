"""The decode step of one layer: append the new token to the index, search, attend, write the stats.

``decode_step`` is the tensor program (no host sync, fixed shapes, in-place updates): ``HiraLayer`` calls it.

Inside a model compiled as a whole (transformers' generate auto-compile, or ``torch.compile(model)``) the step
enters the model's graph as one opaque operator, ``hira::decode_step``, whose implementation is the step compiled
on its own, once per shape and threshold, and shared by every layer (regional compilation): the model's graph
stays as small as a dense model's, so it compiles in seconds rather than minutes, and a CUDA graph of the whole
model still captures every kernel of every step. Outside a compiled model the step runs as it is (the eager path).

Shapes: B batch, Hq query heads, H KV heads, G = Hq / H, D head dim.
"""

from __future__ import annotations

import torch

from hira.api import AttentionStats, attend_selection
from hira.flex.attention import fold_gqa
from hira.index.bounds import NodeBounds
from hira.index.index import HiraIndex, append
from hira.index.sketch import KeySketch
from hira.search.search import search
from hira.search.threshold import Threshold


def decode_step(
    index: HiraIndex,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    threshold: Threshold,
    scale: float,
    min_context: int,
    stats: AttentionStats,
) -> torch.Tensor:
    """One decode step of one layer.

    Args:
        index: the layer's index; the new token is appended in place.
        q: [B, Hq, 1, D] post-RoPE query; k, v: [B, H, 1, D] the new token's key and value.
        threshold: the search mode; scale: the softmax scale.
        min_context: below this many tokens in every row the step reads every block.
        stats: buffers overwritten in place with this step's ``AttentionStats``.
    Returns:
        [B, Hq, 1, D] attention output in q's dtype.
    """
    append(index, k, v)
    rows = fold_gqa(q.float(), index.keys.shape[1]) * scale  # [B, H, G, D]
    dense = index.n_valid.amax() < min_context
    sel = search(index, rows, threshold, dense=dense)
    out, new = attend_selection(q, index, sel, scale)
    for dst, src in zip(stats.tensors(), new.tensors()):
        dst.copy_(src)
    return out


def _unflatten(tensors: list[torch.Tensor], n_levels: int, block_size: int, branching: int, sink_tokens: int,
               window_tokens: int) -> HiraIndex:
    """The ``HiraIndex`` whose ``tensors()`` are ``tensors``."""
    keys, values, valid, rank = tensors[:4]
    levels = [NodeBounds(*tensors[4 + 5 * i : 9 + 5 * i]) for i in range(n_levels)]
    rest = tensors[4 + 5 * n_levels :]
    leaf_first, leaf_last, n_valid, next_slot = rest[:4]
    sketch = KeySketch(*rest[4:7]) if len(rest) > 4 else None
    return HiraIndex(keys, values, valid, rank, levels, leaf_first, leaf_last, n_valid, next_slot, block_size,
                     branching, sink_tokens, window_tokens, sketch)


def _flat_step(tensors, q, k, v, stats, mode, value, scale, min_context, n_levels, block_size, branching, sink_tokens,
               window_tokens):
    index = _unflatten(tensors, n_levels, block_size, branching, sink_tokens, window_tokens)
    return decode_step(index, q, k, v, Threshold(mode, value), scale, min_context, AttentionStats(*stats))


# Compiled once per shape and threshold, shared by every layer (its inputs are tensors and constants, no objects).
_compiled_step = torch.compile(_flat_step, fullgraph=True, dynamic=False)


@torch.library.custom_op("hira::decode_step", mutates_args=("tensors", "stats"))
def _decode_step_op(
    tensors: list[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stats: list[torch.Tensor],
    threshold_mode: str, value: float, scale: float, min_context: int, n_levels: int, block_size: int, branching: int,
    sink_tokens: int, window_tokens: int,
) -> torch.Tensor:
    # (threshold_mode: "mode" is taken by the operator machinery's own keyword arguments)
    return _compiled_step(tensors, q, k, v, stats, threshold_mode, value, scale, min_context, n_levels, block_size, branching,
                          sink_tokens, window_tokens)


@_decode_step_op.register_fake
def _(tensors, q, k, v, stats, threshold_mode, value, scale, min_context, n_levels, block_size, branching, sink_tokens,
      window_tokens):
    return torch.empty_like(q)


def run_decode_step(index: HiraIndex, q, k, v, threshold: Threshold, scale: float, min_context: int,
                    stats: AttentionStats) -> torch.Tensor:
    """``decode_step``, entering a compiled model's graph as the ``hira::decode_step`` operator (module docstring)."""
    if not torch.compiler.is_compiling():
        return decode_step(index, q, k, v, threshold, scale, min_context, stats)
    return _decode_step_op(
        list(index.tensors()), q, k, v, list(stats.tensors()), threshold.mode, threshold.value, float(scale),
        min_context, len(index.levels), index.block_size, index.branching, index.sink_tokens, index.window_tokens,
    )
