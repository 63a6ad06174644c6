"""Hira: hierarchical range-searching attention for long-context decoding.

Shape glossary, used across the package: B batch, Hq query heads, Hkv (or H) KV heads, G = Hq / Hkv, S query
length, R = G·S folded query rows, N keys, C storage capacity in slots, BS block size, NB = C / BS blocks (leaves),
D head dim.
"""

from hira.api import AttentionStats, attend, build_index, decode_attention, search
from hira.cache import HiraCache
from hira.compat import CACHE_ARG
from hira.config import HiraConfig, Offload
from hira.index.index import HiraIndex
from hira.modeling import HiraAttention, convert, revert
from hira.parallel import SequenceShard, dense_sharded_attention, sharded_decode_attention
from hira.selection.search import Selection
from hira.selection.threshold import Certified, Dense, Fixed, Threshold, TopK, TopP

__all__ = [
    "CACHE_ARG",
    "AttentionStats",
    "Certified",
    "Dense",
    "Fixed",
    "HiraAttention",
    "HiraCache",
    "HiraConfig",
    "HiraIndex",
    "Offload",
    "Selection",
    "SequenceShard",
    "Threshold",
    "TopK",
    "TopP",
    "attend",
    "build_index",
    "convert",
    "decode_attention",
    "revert",
    "search",
    "dense_sharded_attention",
    "sharded_decode_attention",
]
