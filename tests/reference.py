"""Float64 references and test data for the core suite: what Hira must compute, written the slow, obvious way.

Shapes: B batch, Hq query heads, Hkv KV heads, G = Hq / Hkv, S query positions, N tokens (in input order),
C storage slots, NB leaves, D head dim. "Token order" is the order keys were given in (build, then appends);
a token's rank is its position among its row's real tokens in that order, which is what ``HiraIndex.rank`` stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from hira.config import CLUSTERINGS, HiraConfig
from hira.index.index import HiraIndex

KEY_KINDS = ("normal", "clustered", "duplicates", "zeros", "huge", "mixed_norms", "levels")
MASK_KINDS = ("none", "left", "right", "holes")


def make_keys(kind: str, shape: tuple[int, int, int, int], gen: torch.Generator) -> torch.Tensor:
    """Keys [B, H, N, D] float32 of one adversarial kind."""
    B, H, N, D = shape
    if kind == "normal":
        return torch.randn(shape, generator=gen)
    if kind == "clustered":  # a few very tight clusters, members shuffled over positions
        n_centres = max(1, N // 16)
        centres = 3 * torch.randn(B, H, n_centres, D, generator=gen)
        which = torch.randint(0, n_centres, (B, H, N), generator=gen)
        members = torch.gather(centres, 2, which[..., None].expand(B, H, N, D))
        return members + 1e-4 * torch.randn(shape, generator=gen)
    if kind == "duplicates":  # exact copies of three keys
        distinct = torch.randn(B, H, 3, D, generator=gen)
        which = torch.randint(0, 3, (B, H, N), generator=gen)
        return torch.gather(distinct, 2, which[..., None].expand(B, H, N, D))
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "huge":  # norms ~1e4, half of them in one tight clump
        k = 1e4 * torch.randn(shape, generator=gen)
        clump = torch.rand(B, H, N, 1, generator=gen) < 0.5
        return torch.where(clump, k[:, :, :1] + 1e-2 * torch.randn(shape, generator=gen), k)
    if kind == "mixed_norms":  # norms log-uniform over 1e-3 .. 1e3
        norms = 10 ** (6 * torch.rand(B, H, N, 1, generator=gen) - 3)
        return norms * torch.nn.functional.normalize(torch.randn(shape, generator=gen), dim=-1)
    if kind == "levels":  # clusters whose first coordinate (the score for an "axis" query) is spread over 0 .. -30
        n_levels = max(2, N // 8)
        levels = torch.linspace(0, -30, n_levels).expand(B, H, n_levels)
        which = torch.randint(0, n_levels, (B, H, N), generator=gen)
        k = 0.01 * torch.randn(shape, generator=gen)
        k[..., 0] = torch.gather(levels, 2, which)
        return k
    raise ValueError(kind)


def make_key_mask(kind: str, lengths: list[int], N: int, gen: torch.Generator) -> torch.Tensor | None:
    """[B, N] bool with lengths[b] real tokens per row (left/right padding or random holes), None for "none"."""
    if kind == "none":
        return None
    pos = torch.arange(N)
    rows = []
    for n in lengths:
        if kind == "left":
            rows.append(pos >= N - n)
        elif kind == "right":
            rows.append(pos < n)
        else:
            row = torch.zeros(N, dtype=torch.bool)
            row[torch.randperm(N, generator=gen)[:n]] = True
            rows.append(row)
    return torch.stack(rows)


def real_mask(key_mask: torch.Tensor | None, B: int, N: int, device="cpu") -> torch.Tensor:
    """key_mask, or all-True [B, N] where it is None."""
    return torch.ones(B, N, dtype=torch.bool, device=device) if key_mask is None else key_mask.to(device)


def scores64(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled scores in float64: q [B, Hq, S, D], k [B, Hkv, N, D] -> [B, Hq, S, N].

    Query head h reads KV head h // G (the GQA grouping of the models Hira serves).
    """
    G = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(G, dim=1)  # [B, Hq, N, D]
    return scale * (q.double() @ k64.transpose(-1, -2))


def per_query_head(mask: torch.Tensor, Hq: int) -> torch.Tensor:
    """A key mask [B, N] or [B, Hkv, N] -> [B, Hq, 1, N] for broadcasting over S."""
    if mask.ndim == 2:
        return mask[:, None, None, :].expand(mask.shape[0], Hq, 1, mask.shape[1])
    return mask.repeat_interleave(Hq // mask.shape[1], dim=1)[:, :, None, :]


def dense_reference(q, k, v, key_mask, scale: float) -> torch.Tensor:
    """Softmax attention in float64 over the keys key_mask allows ([B, N] or per KV head [B, Hkv, N]).

    q [B, Hq, S, D], k/v [B, Hkv, N, D] -> [B, Hq, S, D] float64; a row that may read no key gives 0.
    """
    Hq, G = q.shape[1], q.shape[1] // k.shape[1]
    s = scores64(q, k, scale).masked_fill(~per_query_head(key_mask.to(q.device), Hq), -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(nan=0.0)
    return p @ v.double().repeat_interleave(G, dim=1)


def skipped_mass(q, k, key_mask, kept_tokens, scale: float) -> torch.Tensor:
    """Float64 softmax mass (over all real keys) of the real keys not kept: [B, Hq, S].

    key_mask [B, N] real tokens; kept_tokens [B, Hkv, N] tokens in kept leaves.
    """
    Hq = q.shape[1]
    real = per_query_head(key_mask.to(q.device), Hq)
    s = scores64(q, k, scale).masked_fill(~real, -math.inf)
    p = torch.softmax(s, dim=-1)
    return p.masked_fill(per_query_head(kept_tokens, Hq), 0.0).sum(-1)


def slot_of_rank(index: HiraIndex) -> torch.Tensor:
    """[B, H, C] the storage slot holding each rank (entries past n_valid are C)."""
    B, H, C = index.rank.shape
    out = torch.full((B, H, C + 1), C, dtype=torch.int64, device=index.rank.device)
    r = torch.where(index.rank >= 0, index.rank.long(), C)  # invalid slots write into the dump column C
    out.scatter_(2, r, torch.arange(C, device=r.device).expand(B, H, C).contiguous())
    return out[:, :, :C]


def token_slots(index: HiraIndex, key_mask: torch.Tensor) -> torch.Tensor:
    """[B, H, N] the storage slot of each token (C for padding tokens). key_mask [B, N] in token order."""
    B, H, C = index.rank.shape
    rank = (key_mask.long().cumsum(1) - 1).clamp_min(0).to(index.rank.device)  # [B, N]
    slots = torch.gather(slot_of_rank(index), 2, rank[:, None, :].expand(B, H, -1).contiguous())
    return slots.masked_fill(~key_mask.to(slots.device)[:, None, :], C)


def storage_in_token_order(index: HiraIndex, key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [B, H, N, D] read back from the storage into token order (0 for padding tokens)."""
    B, H, C, D = index.keys.shape
    idx = token_slots(index, key_mask)[..., None].expand(B, H, -1, D)  # [B, H, N, D]; padding reads slot C
    k, v = (torch.cat([t, t.new_zeros(B, H, 1, D)], dim=2) for t in (index.keys, index.values))  # slot C: zeros
    return torch.gather(k, 2, idx), torch.gather(v, 2, idx)


def kept_tokens(index: HiraIndex, keep: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, N] bool: real tokens whose storage slot lies in a kept leaf. keep [B, Hkv, NB]."""
    B, H, NB = keep.shape
    slot_keep = keep.repeat_interleave(index.block_size, dim=-1) & index.valid[:, None, :]  # [B, H, C]
    slot_keep = torch.cat([slot_keep, slot_keep.new_zeros(B, H, 1)], dim=2)  # slot C: padding, never kept
    return torch.gather(slot_keep, 2, token_slots(index, key_mask))


def node_groups(t: torch.Tensor, dim: int, index: HiraIndex, level: int, fill) -> torch.Tensor:
    """Split the slot axis ``dim`` of t (C slots) into [M_l, span] by the nodes of a level (padded with fill).

    Node j of level l covers leaves [j·b^l, (j+1)·b^l), i.e. slots [j·span, (j+1)·span) with span = BS·b^l.
    """
    span = index.block_size * index.branching**level
    M = index.levels[level].count.shape[-1]
    C = t.shape[dim]
    assert M == -(-C // span), f"level {level} has {M} nodes for {C} slots of span {span}"
    pad = list(t.shape)
    pad[dim] = M * span - C
    return torch.cat([t, t.new_full(pad, fill)], dim=dim).unflatten(dim, (M, span))


def level_member_max(index: HiraIndex, q_rows: torch.Tensor) -> list[torch.Tensor]:
    """Exact max of q·k (float64) over each node's real members, per level: [B, H, R, M_l] (-inf if none).

    q_rows [B, H, R, D].
    """
    s = q_rows.double() @ index.keys.double().transpose(-1, -2)  # [B, H, R, C]
    s = s.masked_fill(~index.valid[:, None, None, :], -math.inf)
    return [node_groups(s, 3, index, lv, -math.inf).amax(-1) for lv in range(len(index.levels))]


def level_member_count(index: HiraIndex) -> list[torch.Tensor]:
    """Real members per node, per level: [B, H, M_l] (the same in every head)."""
    H = index.keys.shape[1]
    counts = (node_groups(index.valid, 1, index, lv, False).sum(-1) for lv in range(len(index.levels)))
    return [c[:, None, :].expand(-1, H, -1) for c in counts]


def level_member_var(index: HiraIndex) -> list[torch.Tensor]:
    """Mean over real members and dimensions of (k − c)² per node, c its stored centre (the members' mean rounded to
    the keys' dtype), per level, in float64: [B, H, M_l]."""
    D = index.keys.shape[-1]
    out = []
    for lv in range(len(index.levels)):
        k = node_groups(index.keys.double(), 2, index, lv, 0.0)  # [B, H, M, span, D]
        w = node_groups(index.valid.double(), 1, index, lv, 0.0)[:, None, :, :, None]  # [B, 1, M, span, 1]
        n = w.sum(-2).clamp_min(1)  # [B, 1, M, 1]
        c = index.levels[lv].center.double()  # [B, H, M, D]
        out.append((((k - c[..., None, :]) ** 2) * w).sum((-2, -1)) / (n[..., 0] * D))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Hypothesis strategies for the eager index/search tests (random shapes are fine there: nothing is compiled).

@dataclass(frozen=True)
class IndexCase:
    """One random index: shapes, settings and the seed of its contents."""

    B: int
    H: int
    N: int
    D: int
    block_size: int
    branching: int
    clustering: str
    sink_tokens: int
    window_tokens: int
    key_kind: str
    mask_kind: str
    lengths: tuple[int, ...]
    slack: int
    seed: int
    key_sketch: bool = False

    def config(self) -> HiraConfig:
        return HiraConfig(
            block_size=self.block_size,
            branching=self.branching,
            clustering=self.clustering,
            sink_tokens=self.sink_tokens,
            window_tokens=self.window_tokens,
            key_sketch=self.key_sketch,
        )

    def tensors(self, device, dtype=torch.float32):
        """(keys, values, key_mask or None) on device."""
        gen = torch.Generator().manual_seed(self.seed)
        shape = (self.B, self.H, self.N, self.D)
        k = make_keys(self.key_kind, shape, gen)
        v = torch.randn(shape, generator=gen)
        m = make_key_mask(self.mask_kind, list(self.lengths), self.N, gen)
        return k.to(device, dtype), v.to(device, dtype), None if m is None else m.to(device)


@st.composite
def index_cases(draw, max_n: int = 300, block_sizes=(16, 32, 64, 128)) -> IndexCase:
    B = draw(st.integers(1, 3))
    N = draw(st.integers(1, max_n))
    return IndexCase(
        B=B,
        H=draw(st.integers(1, 3)),
        N=N,
        D=draw(st.sampled_from([1, 5, 16, 32])),
        block_size=draw(st.sampled_from(block_sizes)),
        branching=draw(st.integers(2, 8)),
        clustering=draw(st.sampled_from(CLUSTERINGS)),
        sink_tokens=draw(st.sampled_from([0, 1, 4])),
        window_tokens=draw(st.sampled_from([0, 1, 17, 64])),
        key_kind=draw(st.sampled_from(KEY_KINDS)),
        mask_kind=draw(st.sampled_from(MASK_KINDS)),
        lengths=tuple(draw(st.lists(st.integers(1, N), min_size=B, max_size=B))),
        slack=draw(st.sampled_from([0, 1, 150])),
        seed=draw(st.integers(0, 2**31 - 1)),
        key_sketch=draw(st.booleans()),
    )


Q_KINDS = ("normal", "aligned", "zero", "huge", "axis")


def make_queries(kind: str, keys: torch.Tensor, Hq: int, S: int, gen: torch.Generator) -> torch.Tensor:
    """Queries [B, Hq, S, D] float32 for keys [B, Hkv, N, D]: random, aligned with stored keys, zero, huge, or
    along the first axis (sqrt(D)·e0: with the default scale the score of a key is then its first coordinate)."""
    B, Hkv, N, D = keys.shape
    if kind == "zero":
        return torch.zeros(B, Hq, S, D, device=keys.device)
    q = torch.randn(B, Hq, S, D, generator=gen)
    if kind == "aligned":  # each query a multiple of a random key of its KV head (the key scores highest)
        pick = torch.randint(0, N, (B, Hq, S), generator=gen)
        src = keys.float().cpu().repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, N, D]
        q = 2.0 * torch.gather(src, 2, pick[..., None].expand(B, Hq, S, D)) + 1e-3 * q
    elif kind == "huge":
        q = 1e4 * q
    elif kind == "axis":
        q = 1e-3 * q
        q[..., 0] += D**0.5
    return q.to(keys.device)
