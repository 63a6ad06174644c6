"""HiraCache: a transformers ``Cache`` whose layers hold K/V in index order, the index, and each step's stats.

A layer's life:
- first call (prefill): exact causal attention over the prompt (SDPA), then the prompt's keys are indexed;
- decode (query length 1): the new token is appended to the index (as a new block in position order), the range
  search selects blocks, FlexAttention reads them; fixed shapes, no host sync;
- a later prefill chunk (query length > 1): appended in position order and attended exactly over the permuted
  storage (FlexAttention, causal by each slot's position rank, block lists from the leaves' rank ranges: no
  [S, N] mask); then (``recluster_on_prefill``) the whole layer is re-clustered, at once, or, inside
  ``HiraCache.deferred_recluster()`` (generate's chunked prefill), once after the last chunk.

With a ``SequenceShard`` (context parallel) the layers are the shard's own (``hira.parallel.ShardedHiraLayer``, a
``HiraLayer`` holding one rank's slice): this module does not depend on the parallel code.

The layers are only driven by ``HiraAttention`` (installed by ``hira.convert``); ``update`` raises, so a HiraCache
given to an unconverted model fails loudly instead of attending over scrambled keys. A model's sliding-window layers
(Gemma 3's, which ``convert`` leaves unconverted) hold transformers' own sliding-window layer instead.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, StaticSlidingWindowLayer

from hira.api import AttentionStats, build_index_unchecked
from hira.config import HiraConfig
from hira.flex.attention import chunk_attention, fold_gqa
from hira.index.index import HiraIndex, append, refresh_bounds
from hira.offload.block_cache import BlockCache, new_block_cache
from hira.offload.host import staged, to_host_tier
from hira.selection.calibrate import calibrate_spread
from hira.selection.threshold import Dense, Threshold, TopK, TopP
from hira.step import run_decode_step


def key_mask_from_attention_mask(attention_mask: torch.Tensor | None, batch: int, n_keys: int, device) -> torch.Tensor:
    """Real-token mask [B, N] from the model's 4D attention mask [B, 1, S, N] (bool: True attends; float: 0 attends).

    The last query row of a causal prefill sees every real key, so it marks padding exactly.
    """
    if attention_mask is None:
        return torch.ones(batch, n_keys, dtype=torch.bool, device=device)
    last = attention_mask[:, 0, -1, -n_keys:]  # [B, N]
    return last if last.dtype == torch.bool else last == 0


class HiraLayer(CacheLayerMixin):
    """One decoder layer's cache: the ``HiraIndex`` over its keys and values, plus the last decode step's stats.

    Compileable in transformers' sense: once prefilled, every tensor a decode step reads or writes keeps its address
    (the index storage, the token count ``length`` and the stats are updated in place, a later prefill refills them
    in place) and no Python value changes between steps, so ``generate``'s compiled decode is recorded once as a
    CUDA graph and replayed.
    """

    is_compileable = True
    is_sliding = False

    def __init__(self, layer_idx: int, capacity: int, config: HiraConfig):
        super().__init__()
        self.layer_idx = layer_idx
        self.capacity = capacity
        self.config = config
        self.index: HiraIndex | None = None
        self.emptied = False  # reset since the last prefill: the next call prefills into the kept storage
        self.defer_recluster = False  # set by HiraCache.deferred_recluster()
        self.recluster_pending = False  # chunks were appended and not re-clustered yet
        self.calibration: tuple[torch.Tensor, torch.Tensor] | None = None  # the last prefill's (rows, ranks)
        self.length = torch.zeros((), dtype=torch.int64)  # tokens seen, a 0-d tensor advanced in place
        self.last_stats: AttentionStats | None = None  # buffers the decode step overwrites
        self.threshold = config.threshold  # the decode steps' mode, chosen at each prefill (``_choose_threshold``)
        self.block_cache: BlockCache | None = None  # with HiraConfig.offload: the GPU slots in front of the host tier
        self.offload_share = 1.0  # this layer's part of ``Offload.bytes`` (set by HiraCache)

    # --- transformers' CacheLayerMixin contract -------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError(
            "HiraCache.update was called by an attention module that is not HiraAttention. A HiraCache only works "
            "with a converted model: call hira.convert(model) first, or pass no cache."
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # A decode step never reads the model's mask (padding lives in the index): one column, the same shape at
        # every step, is all a compiled decode needs. Prefill gets the full causal width (a host read: eager only).
        if self.index is None or self.emptied:
            return query_length, 0
        if query_length == 1:
            return 1, 0
        return int(self.length) + query_length, 0

    def get_seq_length(self) -> torch.Tensor:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        # Storage stays allocated, so the next prefill refills it in place (the recorded decode graph stays valid).
        self.length.zero_()
        self._clear_stats()
        self.emptied = True

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("HiraCache does not support beam search yet: use greedy or sampling decoding")

    # --- Hira ------------------------------------------------------------------------------------------------
    def attend(self, q, k, v, attention_mask, scale: float) -> torch.Tensor:
        """Attention of new queries over the cache plus the new keys, which are stored.

        Args:
            q: [B, Hq, S, D] post-RoPE queries; k, v: [B, Hkv, S, D] the new tokens' keys and values.
            attention_mask: the model's 4D mask (bool or additive float) or None.
        Returns:
            [B, Hq, S, D] attention output.
        """
        S = q.shape[2]
        if self.index is None or self.emptied:
            out = self._prefill(q, k, v, attention_mask, scale)
        elif S > 1:
            out = self._continue_prefill(q, k, v, scale)
        else:
            out = self._decode(q, k, v, scale)
        self.length.add_(S)
        return out

    def _choose_threshold(self, tokens: int) -> Threshold:
        """The decode steps' mode after a prefill to ``tokens`` tokens: ``Dense`` (every block read, no search) for
        a layer in ``dense_layers`` or shorter than ``min_context``, else the configured one. Chosen once per
        prefill, on the host, so a decode step holds no branch: a sequence that grows past ``min_context`` while
        decoding keeps decoding densely until its next prefill."""
        if self.layer_idx in self.config.dense_layers or tokens < self.config.min_context:
            return Dense()
        return self.config.threshold

    def _build(self, k, v, key_mask) -> HiraIndex:
        # One spare block: the prompt fills its last block before decode tokens are appended, so a prompt of N
        # tokens leaves capacity − N tokens to decode whatever N is, in storage of one size (one compiled shape).
        bs = self.config.block_size
        return build_index_unchecked(k, v, key_mask, self.config, -(-self.capacity // bs) * bs + bs)

    def _install(self, index: HiraIndex, B: int, Hq: int) -> None:
        """Make ``index`` the layer's, refilling the current storage in place where the shapes agree (the recorded
        decode graph reads those addresses), and mark every tensor the decode step mutates as a static address."""
        old = self.index
        if old is not None and [t.shape for t in old.tensors()] == [t.shape for t in index.tensors()]:
            for dst, src in zip(old.tensors(), index.tensors()):
                dst.copy_(src)  # K and V into the host tier where they are there
            self._clear_stats()
            if self.block_cache is not None:
                self.block_cache.clear()
            return
        if self.config.offload is not None:
            index.keys, index.values = to_host_tier(index.keys), to_host_tier(index.values)
            self.block_cache = new_block_cache(index, self._cache_slots(index))
        self.index = index
        dev = index.keys.device
        self.length = self.length.to(dev)
        H = index.keys.shape[1]
        shapes = ((B, H), (B, H), (B, Hq, 1), (B, Hq, 1))  # kept / read fraction, posterior / prior skip bound
        self.last_stats = AttentionStats(*(torch.empty(shape, device=dev) for shape in shapes))
        self._clear_stats()
        cache = self.block_cache.tensors() if self.block_cache is not None else ()
        for t in (*index.tensors(), *cache, self.length, *self.last_stats.tensors()):
            torch._dynamo.mark_static_address(t)

    def _cache_slots(self, index: HiraIndex) -> int:
        """Slots per batch row and KV head of the layer's block cache, from ``HiraConfig.offload``."""
        offload = self.config.offload
        if offload.blocks is not None:
            return min(offload.blocks, index.num_leaves)
        B, H, _, D = index.keys.shape
        per_slot = 2 * B * H * index.block_size * D * index.keys.element_size()
        slots = int(offload.bytes * self.offload_share) // per_slot
        if slots < 1:
            raise ValueError(
                f"Offload(bytes={offload.bytes}) leaves layer {self.layer_idx} less than one block per batch row and "
                f"KV head ({per_slot} bytes at batch {B}): give it more bytes, or blocks=n"
            )
        return min(slots, index.num_leaves)

    def _clear_stats(self) -> None:
        """NaN stats: no decode step since the last prefill (a flag in a tensor, so the step never reads a Python
        value that changes)."""
        if self.last_stats is not None:
            for t in self.last_stats.tensors():
                t.fill_(math.nan)

    # A prefill runs eagerly even inside a model compiled as a whole (``torch.compile(model)``, or a compiled
    # forward): the index build has host syncs and data-dependent sizes, and compiled it took minutes per prompt
    # length (a 600-token prompt of a tiny model: 211 s of CPU compile). The decode step is what compiling buys.
    @torch.compiler.disable
    def _prefill(self, q, k, v, attention_mask, scale):
        B, _, N, _ = k.shape
        if N > self.capacity:
            raise ValueError(
                f"prompt of {N} tokens exceeds the HiraCache capacity of {self.capacity}: raise HiraConfig.max_cache_len"
            )
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None and N > 1, scale=scale,
            enable_gqa=True,
        )
        key_mask = key_mask_from_attention_mask(attention_mask, B, N, k.device)
        self._install(self._build(k, v, key_mask), B, q.shape[1])
        self.emptied = False
        self.threshold = self._choose_threshold(N)
        real = torch.ones(B, N, dtype=torch.bool, device=k.device) if key_mask is None else key_mask
        self._calibrate(q, (real.cumsum(1) - 1).masked_fill(~real, -1), scale)
        return out

    @torch.compiler.disable
    def _continue_prefill(self, q, k, v, scale):
        index = self.index
        if isinstance(self.threshold, Dense) and not self.config.recluster_on_prefill:
            refresh_bounds(index)  # the dense decode steps since the last prefill left the bounds stale
        append(index, k, v)
        if self.block_cache is not None:
            self.block_cache.clear()  # the blocks the chunk wrote may be resident
        rank_range = (index.rank, index.leaf_first, index.leaf_last, index.levels[0].count)
        keys, values = index.keys, index.values
        if self.block_cache is not None:  # K and V in host memory: read once into device memory, not once per tile
            bs = index.block_size
            extent = -(-int(index.next_slot) // bs) * bs  # to the end of the last block written
            keys, values = staged(keys, extent), staged(values, extent)
        out = chunk_attention(q, keys, values, index.n_valid, rank_range, scale)
        del keys, values  # the device copies, freed before a re-clustering
        if self.config.recluster_on_prefill:
            self.recluster_pending = True
            if not self.defer_recluster:
                self.recluster()
        S = q.shape[2]
        self.threshold = self._choose_threshold(int(self.length) + S)
        self._calibrate(q, index.n_valid[:, None] - S + torch.arange(S, device=q.device), scale)
        return out

    def recluster(self) -> None:
        """Re-cluster the layer now if chunks were appended since it last was (at once, or after the last chunk
        under ``HiraCache.deferred_recluster``), then calibrate it on the last chunk's queries."""
        if self.recluster_pending:
            self.recluster_pending = False
            B, Hq = self.index.keys.shape[0], self.last_stats.skip_bound.shape[1]
            self._install(self._rebuild(), B, Hq)
            self.calibrate()

    def _calibrate(self, q: torch.Tensor, q_rank: torch.Tensor, scale: float) -> None:
        """Keep a prefill's last queries for ``calibrate`` and run it (after the re-clustering if that is deferred).

        q: [B, Hq, S, D] the call's queries; q_rank: [B, S] their tokens' ranks (-1: padding)."""
        W = min(self.config.calibration_queries, q.shape[2])
        if W == 0:
            return
        self.calibration = (fold_gqa(q[:, :, -W:].float(), self.index.keys.shape[1]) * scale, q_rank[:, -W:])
        if not self.recluster_pending:
            self.calibrate()

    def calibrate(self) -> None:
        """Choose the index's spread weight per batch row and KV head for the layer's threshold from the last
        prefill's queries (``hira.selection.calibrate``): for a budgeted threshold on an index without a key sketch;
        otherwise the weight stays 1. Prefill runs it; call it again after changing ``threshold`` by hand."""
        if self.calibration is None:
            return
        budgeted = isinstance(self.threshold, (TopK, TopP)) and self.index.sketch is None
        weight = calibrate_spread(self.index, *self.calibration, self.threshold) if budgeted else 1.0
        self.index.spread_weight.copy_(weight)

    def _rebuild(self) -> HiraIndex:
        """Re-cluster every real token of the layer (host sync: prefill only)."""
        index = self.index
        B, H, C, D = index.keys.shape
        n = int(index.n_valid.max())
        big = torch.iinfo(torch.int32).max
        order = index.rank.masked_fill(index.rank < 0, big).argsort(dim=-1)[:, :, :n]  # position order, real first
        gather = order[..., None].expand(B, H, n, D)
        k = torch.gather(index.keys, 2, gather)
        v = torch.gather(index.values, 2, gather)
        key_mask = torch.arange(n, device=k.device) < index.n_valid[:, None]
        return self._build(k, v, key_mask)

    def _decode(self, q, k, v, scale):
        return run_decode_step(self.index, q, k, v, self.threshold, scale, self.last_stats, self.block_cache)


class HiraCache(Cache):
    """The KV cache of a ``hira.convert``-ed model: one ``HiraLayer`` per full-attention decoder layer.

    A converted model creates one by itself when ``generate`` or ``forward`` gets no cache; pass one explicitly to
    keep it (and its stats) across calls.

    A sliding-window layer (Gemma 3's, left unconverted by ``convert``) gets transformers' own
    ``StaticSlidingWindowLayer``: exact attention over the window, in preallocated storage updated in place, so the
    cache stays compileable (``generate`` auto-compiles a Gemma 3 decode on CUDA as it does a Llama one).

    Args:
        model_config: the transformers config of the model (layer count, ``max_position_embeddings``).
        config: the ``HiraConfig``; its ``max_cache_len`` (or the model's ``max_position_embeddings``) sets the
            capacity of every layer, allocated at the first forward.
        shard: a ``hira.SequenceShard`` to shard every layer along the sequence over its process group (context
            parallel: each rank stores its slice; see ``hira.parallel``), or None for a single-process cache.
    """

    def __init__(self, model_config, config: HiraConfig | None = None, shard=None):
        if shard is not None and not callable(getattr(shard, "cache_layer", None)):
            raise ValueError(f"shard must be a hira.SequenceShard or None, got {type(shard).__name__}")
        self.hira_config = config or HiraConfig()
        self.shard = shard
        text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
        capacity = self.hira_config.max_cache_len
        if capacity == -1:
            capacity = int(text.max_position_embeddings)
        # A DynamicCache of the config has one layer per decoder layer, sliding where transformers reads a window from
        # the config (how it reads it differs between releases): those get the static sliding layer, every other
        # becomes a Hira layer.
        layers = DynamicCache(config=text).layers
        for i, layer in enumerate(layers):
            if layer.is_sliding:
                layers[i] = StaticSlidingWindowLayer(max_cache_len=capacity, sliding_window=layer.sliding_window)
            else:
                layers[i] = HiraLayer(i, capacity, self.hira_config) if shard is None else shard.cache_layer(
                    i, capacity, self.hira_config
                )
        hira_layers = [layer for layer in layers if isinstance(layer, HiraLayer)]
        for layer in hira_layers:
            layer.offload_share = 1.0 / len(hira_layers)
        super().__init__(layers=layers)

    @contextlib.contextmanager
    def deferred_recluster(self):
        """Within this context a prefill chunk appends its tokens without re-clustering its layer; on exit each
        layer that took chunks is re-clustered once. ``generate``'s chunked prefill runs inside it, so a prompt
        prefilled in n chunks is clustered once, not n times."""
        layers = [layer for layer in self.layers if isinstance(layer, HiraLayer)]
        for layer in layers:
            layer.defer_recluster = True
        try:
            yield self
        finally:
            for layer in layers:
                layer.defer_recluster = False
            for layer in layers:
                layer.recluster()

    def stats(self) -> list[dict[str, float] | None]:
        """Per layer, what the last decode step read: ``read_fraction`` (real keys in the blocks read over all real
        keys), ``kept_fraction`` (blocks), and ``skip_bound`` (certified bound on the softmax mass not read, max over
        batch, heads and rows). With ``HiraConfig.offload`` also, per batch row and KV head on average, the blocks
        the step kept (``blocks_kept``), copied in from host memory (``blocks_fetched``) and read from host memory
        directly for want of a free slot (``blocks_from_host``). ``None`` for a layer that has not decoded yet, and
        for a sliding-window layer (it reads its whole window). Reads tensors to the host (a sync): call it between
        steps, not inside a compiled step.
        """
        out = []
        for layer in self.layers:
            s = getattr(layer, "last_stats", None)
            if s is None or bool(s.read_fraction.isnan().all()):
                out.append(None)
                continue
            row = {
                "read_fraction": float(s.read_fraction.mean()),
                "kept_fraction": float(s.kept_fraction.mean()),
                "skip_bound": float(s.skip_bound.max()),
            }
            if layer.block_cache is not None:
                c = layer.block_cache
                row.update(blocks_kept=float(c.kept.float().mean()), blocks_fetched=float(c.fetched.float().mean()),
                           blocks_from_host=float(c.from_host.float().mean()))
            out.append(row)
        return out

    def summary(self) -> dict[str, float]:
        """Mean ``read_fraction`` and max ``skip_bound`` over the layers that decoded (empty dict if none did); with
        ``HiraConfig.offload`` also the last step's ``hit_rate``: the kept blocks found resident, over all layers."""
        per_layer = [s for s in self.stats() if s is not None]
        if not per_layer:
            return {}
        out = {
            "read_fraction": sum(s["read_fraction"] for s in per_layer) / len(per_layer),
            "skip_bound": max(s["skip_bound"] for s in per_layer),
        }
        offloaded = [s for s in per_layer if "blocks_kept" in s]
        if offloaded:
            kept = sum(s["blocks_kept"] for s in offloaded)
            missed = sum(s["blocks_fetched"] + s["blocks_from_host"] for s in offloaded)
            out["hit_rate"] = 1.0 - missed / max(kept, 1e-9)
        return out
