"""HiraConfig: every knob of the index, the search and the model drop-in, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from hira.selection.threshold import Threshold, TopP

CLUSTERINGS = ("pca", "kmeans", "none")


@dataclass(frozen=True)
class Offload:
    """``HiraConfig.offload``: keep each layer's K and V in pinned host memory and read them through a GPU block cache
    (``hira.offload``). The index (bounds, ranks, the sketch) stays on the GPU, so the search is unchanged; each
    decode step copies in the selected blocks that are not resident. Give the cache's size one way:

    Attributes:
        blocks: slots per layer, batch row and KV head (each holds one block of K and V).
        bytes: GPU bytes for the block caches of all the model's Hira layers together, split evenly.

    A step whose selection outgrows the cache still reads every selected block: those left without a slot are read
    from host memory directly. On the CPU the host tier is emulated (the same memory): the results are the same and
    nothing is saved.
    """

    blocks: int | None = None
    bytes: int | None = None

    def __post_init__(self):
        given = [name for name in ("blocks", "bytes") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"Offload needs exactly one of blocks= or bytes=, got {given or 'neither'}")
        v = getattr(self, given[0])
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"Offload.{given[0]} must be an integer >= 1, got {v!r}")


@dataclass
class HiraConfig:
    """Configuration of Hira. Validated in ``__post_init__``; a bad value raises a ValueError naming the field.

    Attributes:
        block_size: tokens per KV block, a power of two in [16, 128]. A block is a leaf of the index and the unit
            that FlexAttention reads.
        branching: children per node of the upper index levels (≥ 2).
        clustering: how keys are ordered into blocks at build time: ``pca`` (balanced principal-axis tree),
            ``kmeans`` (Lloyd iterations seeded by the pca tree, then sorted by cluster) or ``none`` (position order).
        kmeans_iters: Lloyd iterations for ``clustering="kmeans"``.
        key_sketch: also keep an int4 sketch of the keys (``hira.index.sketch``): per-key score intervals about one
            unit wide, which make the ``Certified`` mode selective on real keys, its bounds and every mode's skip
            certificate tight, and the budgeted modes' ranking close to the oracle's. Costs 1/8 of the K and V
            bytes plus per-block scales (1/BS of that), in memory and read by every search.
        threshold: the search's threshold mode (see ``hira.Threshold``).
        sink_tokens: the first tokens of every sequence, always attended (attention sinks).
        window_tokens: the most recent tokens, always attended.
        min_context: a layer prefilled to fewer tokens than this decodes densely (every block read, no search) until
            its next prefill. The default, 16384, is the crossover measured through ``generate`` on an H200
            (benchmarks/RESULTS.md, run 7): below it the search costs more than the reads it saves. Lower it to see
            the search on a short model (e.g. 1024).
        max_cache_len: capacity of a model's ``HiraCache`` in tokens; -1: ``generate`` sizes the cache it creates to
            the prompt plus the new tokens (as transformers sizes a static cache), any other cache takes the model's
            ``max_position_embeddings``.
        recluster_on_prefill: on every prefill call (query length > 1) rebuild the index over all cached tokens.
            Decode tokens are always appended as new blocks in position order, with exact bounds, at no extra cost.
        dense_layers: layer indices that always decode densely (layers whose attention is not sparse).
        calibration_queries: with a budgeted threshold (``TopK``, ``TopP``) and no key sketch, the last this many
            queries of each prefill choose, per batch row and KV head, the weight of the spread term in the mass
            estimate (``hira.selection.calibrate``): W rows of exact attention at prefill. 0: no calibration.
        offload: an ``Offload`` to keep K and V in host memory behind a GPU block cache, or None (all on the GPU).
    """

    block_size: int = 128
    branching: int = 8
    clustering: str = "pca"
    kmeans_iters: int = 4
    key_sketch: bool = False
    threshold: Threshold = TopP(0.99)
    sink_tokens: int = 4
    window_tokens: int = 256
    min_context: int = 16384
    max_cache_len: int = -1
    recluster_on_prefill: bool = True
    dense_layers: tuple[int, ...] = ()
    calibration_queries: int = 32
    offload: Offload | None = None

    def __post_init__(self):
        bs = self.block_size
        if not isinstance(bs, int) or bs < 16 or bs > 128 or bs & (bs - 1):
            raise ValueError(f"HiraConfig.block_size must be a power of two in [16, 128], got {bs!r}")
        if not isinstance(self.branching, int) or self.branching < 2:
            raise ValueError(f"HiraConfig.branching must be an integer >= 2, got {self.branching!r}")
        if self.clustering not in CLUSTERINGS:
            raise ValueError(f"HiraConfig.clustering must be one of {CLUSTERINGS}, got {self.clustering!r}")
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 1:
            raise ValueError(f"HiraConfig.kmeans_iters must be an integer >= 1, got {self.kmeans_iters!r}")
        if not isinstance(self.key_sketch, bool):
            raise ValueError(f"HiraConfig.key_sketch must be True or False, got {self.key_sketch!r}")
        if not isinstance(self.threshold, Threshold):
            raise ValueError(
                f"HiraConfig.threshold must be a hira.Threshold (e.g. hira.TopP(0.99)), got {self.threshold!r}"
            )
        for name in ("sink_tokens", "window_tokens", "min_context", "calibration_queries"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"HiraConfig.{name} must be an integer >= 0, got {v!r}")
        if not isinstance(self.max_cache_len, int) or (self.max_cache_len < 1 and self.max_cache_len != -1):
            raise ValueError(f"HiraConfig.max_cache_len must be -1 (from the model) or >= 1, got {self.max_cache_len!r}")
        if self.offload is not None and not isinstance(self.offload, Offload):
            raise ValueError(f"HiraConfig.offload must be a hira.Offload or None, got {self.offload!r}")
        self.dense_layers = tuple(self.dense_layers)
        if any(not isinstance(i, int) or i < 0 for i in self.dense_layers):
            raise ValueError(f"HiraConfig.dense_layers must hold layer indices >= 0, got {self.dense_layers!r}")
