#!/usr/bin/env python3
"""Which bound family makes pruning exact AND selective, and which ranking makes the budgeted mode good, on real
post-RoPE queries/keys/values of SmolLM2-135M-Instruct (30 layers, 9 q heads, 3 KV heads, head dim 64).

Capture (benchmarks/capture.py): one causal forward pass over the first ``--context`` tokens of ``--text``; the last
``--steps`` query positions are the teacher-forced decode steps, step t attending keys 0..N-T+t. All measurement in
float64, softmax scale 1/8 (the model's).

Per block size (16, 32, 64) and key order (position; pca = hira.index.cluster.pca_tree_rank):

1. Certified search at τ = each query's top-p 0.99 level (the score above which the keys hold 99% of the mass).
   Indexed blocks cover positions [0, P), P = BS·floor((N-T+1)/BS) (seen by every step); the few tokens after P are
   a dense tail, always read. Families: ball, box, min(ball, box), per-key int8 / int4 sketch intervals (keys
   quantized per block and channel with the block's box as zero and range; error term min(Σ|q_i|·step_i/2,
   ‖q‖·‖k − k̃‖); block bound = max over keys of q·k̃ + err), and two-stage filters box → int4 / int8 (box at block
   level, sketch intervals inside surviving blocks). Reported: bound − true block max, blocks (and keys) read by a
   no-false-negative search per query row and per KV head (union over the 3 query heads of a group: what one
   FlexAttention mask reads), and bytes per step as a fraction of fp16 K+V. No false negatives is ASSERTED.
2. Budgeted mode at 5/10/20% of the keys: the first block (sinks) and the last ≥256 tokens (from a block boundary)
   always read and counted in the budget, the rest filled with whole candidate blocks by a ranking; relative output
   error ‖o − ô‖/‖o‖ against the ORACLE that reads as many blocks, chosen by true attention mass. Selection per KV
   head ("group", the rows' normalised estimates summed over the group) and per query row ("row").
3. Posterior certificate of each budgeted selection: skipped mass ≤ U/(U + R), U from the skipped blocks' bounds
   (Σ n_j·exp(ub_j)) or from per-key sketch bounds (Σ exp(q·k̃ + err)), R the exact read mass. ASSERTED ≥ true.
4. Top-p mode (as hira.search's ``topp``): per row the fewest blocks whose estimated mass, with the forced part taken
   exactly, reaches p = 0.9 / 0.99; union over the group. Keys read, skipped mass and output error per estimate.
5. Per-layer density: keys needed for 90 / 99 / 99.9% of the mass, and per-layer certified / budgeted figures.

Rankings (budgeted and top-p): min(ball, box); centroid q·c; Gaussian mass estimates log n + q·c + ½ qᵀΣq with a
diagonal (gauss) or isotropic (iso) Σ; mass under 1-bit / int2 / int4 key sketches; the oracle (true block mass).
Index bytes each ranking reads are reported next to its error.

    python3 benchmarks/bench_bounds.py                                   # defaults: 4096 tokens, 32 steps, all layers
    python3 benchmarks/bench_bounds.py --context 8192 --text /work/shared/data/austen/emma.txt --out /tmp/b8k.md
    python3 benchmarks/bench_bounds.py --layers 0-29:3 --block-sizes 64 --orders position   # quick
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from capture import capture_smollm2  # noqa: E402
from harness import md_table, pct  # noqa: E402
from hira.index.cluster import pca_tree_rank  # noqa: E402

F64 = torch.float64
EPS = 1e-9  # added to every upper bound: covers float64 rounding of the two dot products being compared (~1e-14)
BITS = (8, 4)
CERT_FAMILIES = ["ball", "box", "min", "int8", "int4", "box>int8", "box>int4"]
RANKINGS = ["ub", "centroid", "gauss", "iso", "sign1mass", "int2mass", "int4max", "int4mass", "oracle"]
TOPP_LEVELS = (0.9, 0.99)
RANK_DOC = {
    "ub": "min(ball, box) upper bound",
    "centroid": "q·c (block mean)",
    "int4max": "max over the block of q·k̃ (int4 sketch)",
    "int4mass": "log Σ_block exp(q·k̃) (int4 sketch)",
    "int2mass": "log Σ_block exp(q·k̃) (int2 sketch on the box grid)",
    "sign1mass": "log Σ_block exp(q·k̃), 1-bit sketch: per channel k̃_i = mean of the block's k_i above / below c_i",
    "gauss": "log n + q·c + ½ Σ_i q_i² var_i (diagonal Gaussian log-MGF; var per block and channel)",
    "iso": "log n + q·c + ½ ‖q‖² · mean_i var_i (one variance per block)",
    "oracle": "true attention mass of the block",
}


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
class Acc:
    """Named pools of values, kept per layer: acc.add(key, layer, tensor); acc.all(key) / acc.layer(key, l)."""

    def __init__(self):
        self.d = defaultdict(lambda: defaultdict(list))

    def add(self, key, layer, x):
        x = torch.as_tensor(x).detach().reshape(-1)
        self.d[key][layer].append(x.to(torch.float64 if x.dtype == F64 else torch.float32).cpu().numpy())

    def layer(self, key, layer):
        return np.concatenate(self.d[key][layer]) if self.d[key][layer] else np.array([np.nan])

    def all(self, key):
        parts = [a for lst in self.d[key].values() for a in lst]
        return np.concatenate(parts) if parts else np.array([np.nan])

    def has(self, key):
        return key in self.d


def med(a):
    return float(np.median(a))


def p90(a):
    return float(np.percentile(a, 90))


def parse_layers(spec: str, n: int) -> list[int]:
    if spec == "all":
        return list(range(n))
    out = []
    for part in spec.split(","):
        step = 1
        if ":" in part:
            part, s = part.split(":")
            step = int(s)
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1, step))
        else:
            out.append(int(part))
    return sorted(set(i for i in out if 0 <= i < n))


def block_positions(K: torch.Tensor, start: int, end: int, BS: int, order: str) -> torch.Tensor:
    """[H, nb, BS] key positions of the blocks covering [start, end) (end - start a multiple of BS), in ``order``."""
    H = K.shape[0]
    n = end - start
    nb = n // BS
    pos = torch.arange(start, end)
    if order == "position":
        return pos.view(1, nb, BS).expand(H, nb, BS).contiguous()
    rank = pca_tree_rank(K[None, :, start:end].float(), torch.ones(1, H, n, dtype=torch.bool), BS)[0]  # [H, n]
    return (start + rank.argsort(-1)).view(H, nb, BS)


def gather_keys(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [H, N, D], idx [H, nb, BS] -> [H, nb, BS, D]."""
    H, nb, BS = idx.shape
    return torch.gather(x, 1, idx.reshape(H, -1, 1).expand(H, nb * BS, x.shape[-1])).view(H, nb, BS, -1)


def gather_rows(s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """s [H, R, N], idx [H, nb, BS] -> [H, R, nb, BS]."""
    H, R, _ = s.shape
    nb, BS = idx.shape[1:]
    return torch.gather(s, 2, idx.reshape(H, 1, -1).expand(H, R, nb * BS)).view(H, R, nb, BS)


def block_bounds(q: torch.Tensor, Kb: torch.Tensor) -> dict:
    """Every per-block quantity the families and rankings need, for query rows q [H, R, D] and blocks Kb [H,nb,BS,D]."""
    c = Kb.mean(2)  # [H, nb, D]
    r = (Kb - c[:, :, None]).norm(dim=-1).amax(-1)  # [H, nb]
    lo, hi = Kb.amin(2), Kb.amax(2)
    var = Kb.var(2, unbiased=False)  # [H, nb, D]
    qn = q.norm(dim=-1, keepdim=True)  # [H, R, 1]
    qc = q @ c.transpose(1, 2)  # [H, R, nb]
    out = {
        "qc": qc,
        "ball": qc + qn * r[:, None] + EPS,
        "box": q.clamp_min(0) @ hi.transpose(1, 2) + q.clamp_max(0) @ lo.transpose(1, 2) + EPS,
        "gauss_var": 0.5 * (q * q) @ var.transpose(1, 2),  # ½ Σ q_i² var_i
        "iso_var": 0.5 * qn**2 * var.mean(-1)[:, None],  # ½ ‖q‖² mean var
    }
    out["min"] = torch.minimum(out["ball"], out["box"])
    H, nb, BS, D = Kb.shape
    # 1-bit sketch: per channel, the mean of the members above / below the block mean
    above = Kb >= c[:, :, None]
    cnt_a = above.sum(2).clamp_min(1)
    cnt_b = (~above).sum(2).clamp_min(1)
    lvl_a = (Kb * above).sum(2) / cnt_a
    lvl_b = (Kb * ~above).sum(2) / cnt_b
    k1 = torch.where(above, lvl_a[:, :, None], lvl_b[:, :, None])
    out["sign1_est"] = torch.einsum("hrd,hnkd->hrnk", q, k1)
    for b in (2,):  # estimate only (ranking)
        step = ((hi - lo) / (2**b - 1)).clamp_min(1e-30)
        kq = lo[:, :, None] + torch.round((Kb - lo[:, :, None]) / step[:, :, None]) * step[:, :, None]
        out[f"int{b}_est"] = torch.einsum("hrd,hnkd->hrnk", q, kq)
    for b in BITS:
        lv = 2**b - 1
        step = ((hi - lo) / lv).clamp_min(1e-30)  # [H, nb, D]
        kq = lo[:, :, None] + torch.round((Kb - lo[:, :, None]) / step[:, :, None]) * step[:, :, None]
        rn = (Kb - kq).norm(dim=-1)  # [H, nb, BS] exact residual norm per key
        est = torch.einsum("hrd,hnkd->hrnk", q, kq)  # [H, R, nb, BS]  q·k̃
        e_chan = q.abs() @ (step / 2).transpose(1, 2)  # [H, R, nb]
        e_norm = qn[..., None] * rn[:, None]  # [H, R, nb, BS]
        err = torch.minimum(e_chan[..., None], e_norm)
        out[f"int{b}_est"] = est
        out[f"int{b}_err"] = err
        out[f"int{b}_ub"] = est + err + EPS
    return out


def ranking_bytes_per_key(rk: str, BS: int, D: int) -> float:
    """Index bytes a ranking reads per candidate key (fp16 per-block data amortised over BS keys, packed codes)."""
    per_block = {"ub": 6 * D + 2, "centroid": 2 * D, "gauss": 4 * D, "iso": 2 * D + 2, "oracle": 0}
    if rk in per_block:
        return per_block[rk] / BS
    bits = {"sign1mass": 1, "int2mass": 2, "int4max": 4, "int4mass": 4}[rk]
    return bits * D / 8 + 4 * D / BS  # codes + two fp16 vectors per block (box, or the 1-bit levels)


def index_bytes_per_block(fam: str, BS: int, D: int) -> float:
    """Index bytes per block, fp16 storage (ball: centre + radius; box: lo + hi; sketch: codes + ‖k − k̃‖ per key, and
    the box, which is the sketch's zero point and range)."""
    ball = 2 * D + 2
    box = 4 * D
    if fam == "ball":
        return ball
    if fam == "box":
        return box
    if fam == "min":
        return ball + box
    bits = int(fam[-1])
    return box + BS * (bits * D / 8 + 2)


# ------------------------------------------------------------------------------------------------------------------
# measurement of one layer
# ------------------------------------------------------------------------------------------------------------------
def measure_layer(l, Ql, Kl, Vl, scale, args, acc: Acc):
    T, HQ, D = Ql.shape
    H, N, _ = Kl.shape
    G = HQ // H
    R = G * T
    # rows r = g*T + t of KV head h are query head h*G + g at step t
    q = (Ql.to(F64) * scale).view(T, H, G, D).permute(1, 2, 0, 3).reshape(H, R, D)
    K, V = Kl.to(F64), Vl.to(F64)
    n_t = torch.arange(N - T + 1, N + 1)  # keys seen at step t
    n_row = n_t.repeat(G)  # [R]
    n_min = N - T + 1
    visible = torch.arange(N)[None, :] < n_row[:, None]  # [R, N]

    s = (q @ K.transpose(1, 2)).masked_fill(~visible, -math.inf)  # [H, R, N]
    lse = s.logsumexp(-1)  # [H, R]
    p = (s - lse[..., None]).exp()  # normalised attention
    o = p @ V  # [H, R, D] exact output
    ps, order = p.sort(-1, descending=True)
    cum = ps.cumsum(-1)
    for lvl in (0.9, 0.99, 0.999):
        need = (cum < lvl).sum(-1) + 1  # [H, R]
        acc.add(f"dens{lvl}", l, need.to(F64) / n_row)
    cut = (cum < args.topp).sum(-1, keepdim=True)  # index of the last key needed
    tau = torch.gather(s, 2, torch.gather(order, 2, cut)).squeeze(-1)  # [H, R] top-p level
    need_all = s >= tau[..., None]  # [H, R, N]
    acc.add("need_keys", l, need_all.sum(-1).to(F64) / n_row)
    acc.add("mass_sink4", l, p[..., :4].sum(-1))
    tailmask = torch.arange(N)[None, :] >= (n_row - 256)[:, None]
    acc.add("mass_last256", l, (p * tailmask).sum(-1))

    for BS in args.block_sizes:
        for ordr in args.orders:
            tag = f"{BS}/{ordr}"
            # ---------------- certified search at the top-p tau ----------------
            P = BS * (n_min // BS)
            idx = block_positions(K, 0, P, BS, ordr)  # [H, nb, BS]
            nb = idx.shape[1]
            Kb = gather_keys(K, idx)
            bb = block_bounds(q, Kb)
            sb = gather_rows(s, idx)  # [H, R, nb, BS]
            bmax = sb.amax(-1)
            need = sb >= tau[..., None, None]
            true_blk = need.any(-1)
            acc.add(f"true_blk/{tag}", l, true_blk.to(F64).mean(-1))
            acc.add(f"true_blk_grp/{tag}", l, true_blk.view(H, G, T, nb).any(1).to(F64).mean(-1))
            acc.add(f"true_keys/{tag}", l, need.to(F64).mean((-1, -2)))
            box_read = bb["box"] >= tau[..., None]
            for fam in CERT_FAMILIES:
                if fam in ("ball", "box", "min"):
                    ub = bb[fam]
                    read = ub >= tau[..., None]  # [H, R, nb]
                    assert bool((read | ~true_blk).all()), f"false negative: {fam} layer {l} {tag}"
                    keys = read[..., None].expand(-1, -1, -1, BS)
                    acc.add(f"gap/{fam}/{tag}", l, (ub - bmax).float())
                else:
                    bits = int(fam[-1])
                    cand = bb[f"int{bits}_ub"] >= tau[..., None, None]  # [H, R, nb, BS]
                    if fam.startswith("box>"):
                        cand = cand & box_read[..., None]
                    else:
                        acc.add(f"gap/{fam}/{tag}", l, (bb[f"int{bits}_ub"].amax(-1) - bmax).float())
                        acc.add(f"halfwidth/{fam}/{tag}", l, bb[f"int{bits}_err"].median(-1).values.median(-1).values)
                    assert bool((cand | ~need).all()), f"false negative: {fam} layer {l} {tag}"
                    keys = cand
                    read = cand.any(-1)
                read_g = read.view(H, G, T, nb).any(1)  # [H, T, nb] union over the group
                keys_g = keys.view(H, G, T, nb, BS).any(1)
                acc.add(f"blk/{fam}/{tag}", l, read.to(F64).mean(-1))
                acc.add(f"blk_grp/{fam}/{tag}", l, read_g.to(F64).mean(-1))
                acc.add(f"keys/{fam}/{tag}", l, keys.to(F64).mean((-1, -2)))
                # bytes per KV head and step (group union), fraction of full fp16 K+V
                nt = n_t.to(F64)
                kv_blk = (read_g.sum(-1).to(F64) * BS + (nt - P)) * 4 * D
                if fam in ("ball", "box", "min"):
                    idx_b = nb * index_bytes_per_block(fam, BS, D)
                    acc.add(f"bytes/{fam}/{tag}", l, (idx_b + kv_blk) / (nt * 4 * D))
                else:
                    bits = int(fam[-1])
                    per_key = bits * D / 8 + 2
                    if fam.startswith("box>"):  # box of every block; codes of the blocks the box keeps (any row)
                        box_g = box_read.view(H, G, T, nb).any(1).sum(-1).to(F64)
                        idx_b = nb * 4 * D + box_g * BS * per_key
                    else:
                        idx_b = torch.full_like(nt, nb * index_bytes_per_block(fam, BS, D))
                    acc.add(f"bytes/{fam}/{tag}", l, (idx_b + kv_blk) / (nt * 4 * D))
                    kv_gather = (keys_g.sum((-1, -2)).to(F64) + (nt - P)) * 4 * D  # per-key gather of survivors
                    acc.add(f"bytes_gather/{fam}/{tag}", l, (idx_b + kv_gather) / (nt * 4 * D))

            # ---------------- budgeted mode ----------------
            Wb = BS * ((n_min - args.window) // BS)  # forced window starts at a block boundary
            if ordr == "position":  # the candidate blocks are blocks 1 .. Wb/BS - 1 of the certified partition
                nc = Wb // BS - 1
                cidx = idx[:, 1 : 1 + nc]
                cb = {k_: v_[:, :, 1 : 1 + nc] for k_, v_ in bb.items()}
            else:
                cidx = block_positions(K, BS, Wb, BS, ordr)  # candidate blocks [H, nc, BS]
                nc = cidx.shape[1]
                cb = block_bounds(q, gather_keys(K, cidx))
            pb = gather_rows(p, cidx)  # [H, R, nc, BS]
            mb = pb.sum(-1)  # true block mass
            ob = torch.einsum("hrnk,hnkd->hrnd", pb, gather_keys(V, cidx)).float()  # [H, R, nc, D], fp32 suffices
            forced = torch.zeros(N, dtype=torch.bool)
            forced[:BS] = True
            forced[Wb:] = True
            pf = p * forced  # invisible keys have p = 0
            mf, of = pf.sum(-1), pf @ V  # [H, R], [H, R, D]
            onorm = o.norm(dim=-1)
            logn = math.log(BS)
            logm = {
                "ub": cb["min"],
                "centroid": cb["qc"],
                "int4max": cb["int4_est"].amax(-1),
                "int4mass": cb["int4_est"].logsumexp(-1),
                "int2mass": cb["int2_est"].logsumexp(-1),
                "sign1mass": cb["sign1_est"].logsumexp(-1),
                "gauss": logn + cb["qc"] + cb["gauss_var"],
                "iso": logn + cb["qc"] + cb["iso_var"],
                "oracle": mb.clamp_min(1e-300).log(),
            }
            # certificate terms, in units of the row's partition function exp(lse) (exact ratios, no overflow: bounds
            # exceed lse by at most a few tens): per block n·exp(ub − lse), and Σ_block exp(q·k̃ + err − lse)
            u_terms = {
                "blk": (logn + cb["min"] - lse[..., None]).exp(),
                **{f"int{b}": (cb[f"int{b}_ub"] - lse[..., None, None]).exp().sum(-1) for b in BITS},
            }
            forced_keys = (BS + n_row - Wb).to(F64)  # [R]
            k_row = torch.stack(
                [((bud * n_row.to(F64) - forced_keys) / BS).floor().clamp(0, nc).long() for bud in args.budgets]
            )  # [nbud, R] candidate blocks the budget leaves after the forced keys
            for bi, bud in enumerate(args.budgets):
                acc.add(f"kvread/{bud}/{tag}", l, ((forced_keys + k_row[bi] * BS) / n_row).expand(H, R))
                acc.add(f"kblocks/{bud}/{tag}", l, k_row[bi].to(F64))
                acc.add(f"candfrac/{tag}", l, (nc * BS / n_row.to(F64)))  # candidate keys / all keys
            lm = torch.stack([logm[rk] for rk in RANKINGS])  # [nr, H, R, nc]
            nr = len(RANKINGS)
            ar = torch.arange(nc).expand(*lm.shape[:-1], nc).contiguous()
            for mode in ("group", "row"):
                if mode == "group":  # rows' normalised estimates summed over the group: one selection per KV head
                    w = lm.softmax(-1).view(nr, H, G, T, nc).sum(2)  # [nr, H, T, nc]
                    rank = torch.empty_like(w, dtype=torch.long).scatter_(-1, w.argsort(-1, descending=True), ar[:, :, :T])
                    rank = rank[:, :, None].expand(nr, H, G, T, nc).reshape(nr, H, R, nc)
                else:
                    rank = torch.empty_like(lm, dtype=torch.long).scatter_(-1, lm.argsort(-1, descending=True), ar)
                sel = rank[None] < k_row[:, None, None, :, None]  # [nbud, nr, H, R, nc]
                self_ = sel.to(F64)
                mread = mf + (mb * self_).sum(-1)  # read mass (normalised), [nbud, nr, H, R]
                ohat = (of + (sel.float()[..., None, :] @ ob).squeeze(-2)) / mread[..., None]
                err = (o - ohat).norm(dim=-1) / onorm
                true_skip = (mb * (1 - self_)).sum(-1)  # exact, no cancellation
                # posterior certificate: skipped ≤ U / (U + R), both in units of exp(lse)
                certs = {}
                for cn, u in u_terms.items():
                    U = (u * (1 - self_)).sum(-1)
                    certs[cn] = U / (U + mread)
                    assert bool((certs[cn] >= true_skip * (1 - 1e-9) - 1e-12).all()), f"certificate below truth {cn}"
                for bi, bud in enumerate(args.budgets):
                    for ri, rk in enumerate(RANKINGS):
                        key = f"{mode}/{bud}/{tag}/{rk}"
                        acc.add(f"err/{key}", l, err[bi, ri])
                        acc.add(f"skip/{key}", l, true_skip[bi, ri])
                        for cn, c in certs.items():
                            acc.add(f"cert/{cn}/{key}", l, c[bi, ri])

            # ---------------- top-p mode (as hira.search's topp: per row, fewest blocks whose estimated mass with the
            # forced part reaches p; union over the group). The forced part's mass is taken exactly (it is read anyway).
            log_forced = mf.clamp_min(1e-300).log() + lse  # [H, R] log Σ_forced exp(s)
            est = {
                "ub": logn + cb["min"],
                "centroid": logn + cb["qc"],
                "iso": logm["iso"],
                "gauss": logm["gauss"],
                "int2mass": logm["int2mass"],
                "int4mass": logm["int4mass"],
                "oracle": mb.clamp_min(1e-300).log() + lse[..., None],
            }
            for rk, e_ in est.items():
                tot = torch.logaddexp(log_forced, e_.logsumexp(-1))  # [H, R]
                srt, order_ = e_.sort(-1, descending=True)
                share = (srt - tot[..., None]).exp()
                before = (log_forced - tot).exp()[..., None] + share.cumsum(-1) - share  # mass ranked above
                for pp in TOPP_LEVELS:
                    keep_sorted = before < pp
                    keep = torch.zeros_like(keep_sorted).scatter_(-1, order_, keep_sorted)  # [H, R, nc]
                    keep = keep.view(H, G, T, nc).any(1, keepdim=True).expand(H, G, T, nc).reshape(H, R, nc)
                    kf = keep.to(F64)
                    mread = mf + (mb * kf).sum(-1)
                    ohat = (of + (keep.float()[..., None, :] @ ob).squeeze(-2)) / mread[..., None]
                    acc.add(f"topp_err/{pp}/{tag}/{rk}", l, (o - ohat).norm(dim=-1) / onorm)
                    acc.add(f"topp_kv/{pp}/{tag}/{rk}", l, (forced_keys + kf.sum(-1) * BS) / n_row)
                    acc.add(f"topp_skip/{pp}/{tag}/{rk}", l, (mb * (1 - kf)).sum(-1))


# ------------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------------
def summary(acc: Acc, args) -> str:
    """Compact tables: certified families (position order) and budgeted rankings at the middle budget."""
    S = ["## Summary\n"]
    o0 = args.orders[0]
    hdr = ["family"] + [f"BS {BS}: gap / blocks (grp) / keys / bytes" for BS in args.block_sizes]
    rows = []
    for fam in ["true"] + CERT_FAMILIES[:5]:
        r = [fam]
        for BS in args.block_sizes:
            tag = f"{BS}/{o0}"
            if fam == "true":
                r.append(f"— / {pct(med(acc.all(f'true_blk_grp/{tag}')))} / {pct(med(acc.all(f'true_keys/{tag}')))} / —")
            else:
                r.append(f"{med(acc.all(f'gap/{fam}/{tag}')):.2f} / {pct(med(acc.all(f'blk_grp/{fam}/{tag}')))} / "
                         f"{pct(med(acc.all(f'keys/{fam}/{tag}')))} / {pct(med(acc.all(f'bytes/{fam}/{tag}')))}")
        rows.append(r)
    S.append(f"Certified search at the top-p {args.topp} level, {o0} order (medians; blocks read per KV head):\n")
    S.append(md_table(hdr, rows) + "\n")
    b0 = 0.1 if 0.1 in args.budgets else args.budgets[len(args.budgets) // 2]
    cols = [(o, BS) for o in args.orders for BS in args.block_sizes]
    rows = []
    for rk in RANKINGS:
        r = [rk]
        for o, BS in cols:
            tag = f"{BS}/{o}"
            if np.max(acc.all(f"kblocks/{b0}/{tag}")) == 0:
                r.append("forced only")
                continue
            e, eo = acc.all(f"err/group/{b0}/{tag}/{rk}"), acc.all(f"err/group/{b0}/{tag}/oracle")
            r.append(f"{med(e):.4f} ({med(e) / max(med(eo), 1e-12):.2f}×)")
        rows.append(r)
    S.append(f"Budgeted mode at {pct(b0)} of KV, selection per KV head: median rel. error (× oracle):\n")
    S.append(md_table(["ranking"] + [f"{o} BS {BS}" for o, BS in cols], rows) + "\n")
    return "\n".join(S)


def report(acc: Acc, args, layers, meta) -> str:
    S = []
    S.append(f"# Bounds on real keys: SmolLM2-135M-Instruct ({datetime.date.today().isoformat()})\n")
    S.append(
        f"Text `{meta['text']}`, context {args.context} tokens, {args.steps} decode steps (teacher-forced, causal), "
        f"layers {meta['layers_desc']}, 9 query heads / 3 KV heads, head dim 64, float64, scale {meta['scale']}. "
        f"τ at each query's top-p {args.topp} level. Runtime {meta['runtime']:.0f} s on CPU.\n"
    )
    S.append("Medians / p90 over layers × heads × steps (block bound gaps: over all (row, block) pairs).\n")
    # ---- density
    S.append(summary(acc, args))
    S.append("## Density\n")
    rows = []
    for name, key in [("keys for 90% mass", "dens0.9"), ("keys for 99% mass", "dens0.99"),
                      ("keys for 99.9% mass", "dens0.999"), ("keys ≥ τ (top-p level)", "need_keys"),
                      ("mass on first 4 tokens", "mass_sink4"), ("mass on last 256 tokens", "mass_last256")]:
        a = acc.all(key)
        rows.append([name, pct(med(a)), pct(p90(a))])
    S.append(md_table(["quantity", "median", "p90"], rows) + "\n")

    # ---- certified
    S.append("## Certified search at τ = top-p 0.99 level (no false negatives asserted for every family)\n")
    S.append(
        "gap = bound − true block max (score units; sketch: max over the block of q·k̃ + err). blocks/keys read: per "
        "query row; 'grp' = union over the 3 query heads of a KV head (what one mask reads). bytes: index bytes + K/V "
        "bytes read per KV head and step, over fp16 K+V of all keys (dense = 100%); 'gather' = sketch survivors "
        "gathered key by key instead of whole blocks. Dense tail (< BS + steps tokens after the last full block) "
        "always read.\n"
    )
    for ordr in args.orders:
        for BS in args.block_sizes:
            tag = f"{BS}/{ordr}"
            rows = [[
                "**true**", "—", "—",
                f"{pct(med(acc.all(f'true_blk/{tag}')))} / {pct(p90(acc.all(f'true_blk/{tag}')))}",
                f"{pct(med(acc.all(f'true_blk_grp/{tag}')))} / {pct(p90(acc.all(f'true_blk_grp/{tag}')))}",
                f"{pct(med(acc.all(f'true_keys/{tag}')))} / {pct(p90(acc.all(f'true_keys/{tag}')))}",
                "—", "—",
            ]]
            for fam in CERT_FAMILIES:
                g = acc.all(f"gap/{fam}/{tag}") if acc.has(f"gap/{fam}/{tag}") else None
                blk, blkg = acc.all(f"blk/{fam}/{tag}"), acc.all(f"blk_grp/{fam}/{tag}")
                keys = acc.all(f"keys/{fam}/{tag}")
                by = acc.all(f"bytes/{fam}/{tag}")
                byg = acc.all(f"bytes_gather/{fam}/{tag}") if acc.has(f"bytes_gather/{fam}/{tag}") else None
                rows.append([
                    fam,
                    f"{med(g):.2f}" if g is not None else "—",
                    f"{p90(g):.2f}" if g is not None else "—",
                    f"{pct(med(blk))} / {pct(p90(blk))}",
                    f"{pct(med(blkg))} / {pct(p90(blkg))}",
                    f"{pct(med(keys))} / {pct(p90(keys))}",
                    f"{pct(med(by))} / {pct(p90(by))}",
                    f"{pct(med(byg))} / {pct(p90(byg))}" if byg is not None else "—",
                ])
            S.append(f"### {BS}-key blocks, {ordr} order\n")
            S.append(md_table(["family", "gap med", "gap p90", "blocks read (row) med / p90",
                               "blocks read (grp) med / p90", "keys read med / p90", "bytes/step med / p90",
                               "bytes, gather med / p90"], rows) + "\n")
            hw = {b: med(acc.all(f"halfwidth/int{b}/{tag}")) for b in BITS}
            S.append("Per-key interval half-width (median): " + ", ".join(f"int{b} {v:.3f}" for b, v in hw.items()) + "\n")

    # ---- budgeted
    S.append("## Budgeted mode: relative output error ‖o − ô‖/‖o‖ (sinks block + last ≥256 tokens forced, in budget)\n")
    S.append("Rankings: " + "; ".join(f"`{k}` = {v}" for k, v in RANK_DOC.items()) + ".\n")
    S.append(
        "'ratio' = median error / oracle's median error; 'row ratio' = median over rows of err / oracle err (same "
        "number of blocks). 'KV read' = mean fraction of keys actually read (forced part can exceed a small budget). "
        "'index bytes' = what the ranking reads over all candidate blocks (fp16 per-block data, packed sketch codes), "
        "as a fraction of fp16 K+V; 'total bytes' = KV read + index bytes.\n"
    )
    for mode in ("group", "row"):
        for ordr in args.orders:
            rows = []
            for BS in args.block_sizes:
                tag = f"{BS}/{ordr}"
                cand = float(np.mean(acc.all(f"candfrac/{tag}")))
                for budget in args.budgets:
                    kv = float(np.mean(acc.all(f"kvread/{budget}/{tag}")))
                    eo = acc.all(f"err/{mode}/{budget}/{tag}/oracle")
                    if np.max(acc.all(f"kblocks/{budget}/{tag}")) == 0:
                        rows.append([BS, pct(budget), pct(kv), "(forced part alone exceeds the budget)",
                                     "—", "—", f"{med(eo):.4f}", f"{p90(eo):.4f}", f"{np.mean(eo):.4f}", "—", "—"])
                        continue
                    for rk in RANKINGS:
                        e = acc.all(f"err/{mode}/{budget}/{tag}/{rk}")
                        rr = e / np.maximum(eo, 1e-12)
                        ib = ranking_bytes_per_key(rk, BS, meta["D"]) / (4 * meta["D"]) * cand
                        rows.append([BS, pct(budget), pct(kv), rk, pct(ib), pct(kv + ib),
                                     f"{med(e):.4f}", f"{p90(e):.4f}", f"{np.mean(e):.4f}",
                                     f"{med(e) / max(med(eo), 1e-12):.2f}", f"{med(rr):.2f}"])
            S.append(f"### selection per {'KV head (group)' if mode == 'group' else 'query row'}, {ordr} order\n")
            S.append(md_table(["BS", "budget", "KV read", "ranking", "index bytes", "total bytes", "err med",
                               "err p90", "err mean", "ratio", "row ratio"], rows) + "\n")

    # ---- top-p mode
    S.append("## Top-p mode over estimated block mass (per row, union over the group; sinks + window forced)\n")
    S.append(
        "As hira.search's `topp`: per query row, the fewest candidate blocks, best estimate first, whose estimated "
        "mass together with the forced part (taken exactly) reaches p; then the union over the 3 query heads of the "
        "KV head. `ub` is the current estimate n·exp(min(ball, box)); `centroid` = n·exp(q·c); `iso`, `gauss`, "
        "`int2mass`, `int4mass` as above; `oracle` = exact block masses. KV read = fraction of keys read.\n"
    )
    rows = []
    for ordr in args.orders:
        for BS in args.block_sizes:
            tag = f"{BS}/{ordr}"
            for pp in TOPP_LEVELS:
                for rk in ("ub", "centroid", "iso", "gauss", "int2mass", "int4mass", "oracle"):
                    e = acc.all(f"topp_err/{pp}/{tag}/{rk}")
                    kv = acc.all(f"topp_kv/{pp}/{tag}/{rk}")
                    sk = acc.all(f"topp_skip/{pp}/{tag}/{rk}")
                    rows.append([ordr, BS, pp, rk, f"{pct(med(kv))} / {pct(float(np.mean(kv)))}",
                                 f"{med(sk):.4f}", f"{med(e):.4f}", f"{p90(e):.4f}"])
    S.append(md_table(["order", "BS", "p", "estimate", "KV read med / mean", "skipped mass med", "err med",
                       "err p90"], rows) + "\n")

    # ---- certificates
    S.append("## Posterior certificate of budgeted selections (per KV head selection), skipped mass ≤ U/(U+R)\n")
    S.append(
        "`blk`: U = Σ_skipped blocks n·exp(min(ball, box)); `int4`/`int8`: U = Σ_skipped keys exp(q·k̃ + err). "
        "Never below the true skipped mass (asserted). 'cert/true' over rows with true skipped ≥ 1e-3.\n"
    )
    rows = []
    for ordr in args.orders:
        for BS in args.block_sizes:
            tag = f"{BS}/{ordr}"
            for budget in args.budgets:
                for rk in ("ub", "iso", "int2mass", "int4mass", "oracle"):
                    key = f"group/{budget}/{tag}/{rk}"
                    tr = acc.all(f"skip/{key}")
                    big = tr >= 1e-3
                    row = [ordr, BS, pct(budget), rk, f"{med(tr):.4f}"]
                    for cn in ("blk", "int4", "int8"):
                        c = acc.all(f"cert/{cn}/{key}")
                        ratio = c[big] / tr[big] if big.any() else np.array([np.nan])
                        row.append(f"{med(c):.3f} ({med(ratio):.1f}× / {p90(ratio):.1f}×)")
                    rows.append(row)
    S.append(md_table(["order", "BS", "budget", "ranking", "true skipped med", "blk cert med (×true med / p90)",
                       "int4 cert", "int8 cert"], rows) + "\n")

    # ---- per layer
    BS0 = 64 if 64 in args.block_sizes else args.block_sizes[-1]
    BS1 = min(args.block_sizes)
    o0, o1 = args.orders[0], ("pca" if "pca" in args.orders else args.orders[0])
    b0 = 0.1 if 0.1 in args.budgets else args.budgets[len(args.budgets) // 2]
    b1 = max(args.budgets)
    S.append(
        f"## Per layer\n\nDensity; certified search at the top-p level ({BS0}-key blocks, {o0} order: min(ball, box) and "
        f"int4 gaps and blocks read; keys read by the int8 / int4 intervals); budgeted error at {pct(b0)} "
        f"({BS1}-key blocks, {o1} order, selection per KV head) and the oracle's at {pct(b1)}.\n"
    )
    rows = []
    t0, t1 = f"{BS0}/{o0}", f"{BS1}/{o1}"
    rks = ("ub", "centroid", "sign1mass", "int4mass", "oracle")
    for l in layers:
        r = [l]
        r += [pct(med(acc.layer(k, l))) for k in ("dens0.9", "dens0.99", "dens0.999")]
        r.append(pct(p90(acc.layer("dens0.99", l))))
        r.append(pct(med(acc.layer("mass_sink4", l))))
        r.append(pct(med(acc.layer("mass_last256", l))))
        r.append(pct(med(acc.layer(f"true_blk/{t0}", l))))
        r.append(f"{med(acc.layer(f'gap/min/{t0}', l)):.1f}")
        r.append(f"{med(acc.layer(f'gap/int4/{t0}', l)):.2f}")
        r.append(pct(med(acc.layer(f"blk/min/{t0}", l))))
        r.append(pct(med(acc.layer(f"blk/int4/{t0}", l))))
        r.append(pct(med(acc.layer(f"keys/int8/{t0}", l))))
        r.append(pct(med(acc.layer(f"keys/int4/{t0}", l))))
        for rk in rks:
            r.append(f"{med(acc.layer(f'err/group/{b0}/{t1}/{rk}', l)):.3f}")
        r.append(f"{med(acc.layer(f'err/group/{b1}/{t1}/oracle', l)):.3f}")
        rows.append(r)
    S.append(md_table(["layer", "keys 90%", "keys 99%", "keys 99.9%", "keys 99% p90", "mass first 4", "mass last 256",
                       "true blocks", "min gap", "int4 gap", "min blocks", "int4 blocks", "int8 keys", "int4 keys"]
                      + [f"err {rk} {pct(b0)}" for rk in rks] + [f"err oracle {pct(b1)}"], rows) + "\n")
    return "\n".join(S)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(ROOT / "examples" / "data" / "emma_passage.txt"))
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--layers", default="all", help="all | 0,5,9 | 0-29:3")
    ap.add_argument("--block-sizes", default="16,32,64")
    ap.add_argument("--orders", default="position,pca", help="position and/or pca")
    ap.add_argument("--budgets", default="0.05,0.1,0.2")
    ap.add_argument("--topp", type=float, default=0.99)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--capture", default=None, help="load a capture saved by --save-capture / capture.py instead")
    ap.add_argument("--save-capture", default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "bounds_results.md"))
    args = ap.parse_args()
    args.block_sizes = [int(x) for x in args.block_sizes.split(",")]
    args.orders = args.orders.split(",")
    args.budgets = [float(x) for x in args.budgets.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.capture:
        cap = torch.load(args.capture)
    else:
        cap = capture_smollm2(args.text, args.context, args.steps)
        if args.save_capture:
            torch.save(cap, args.save_capture)
    Q, K, V = cap["Q"], cap["K"], cap["V"]
    L, T = Q.shape[:2]
    args.steps, args.context = T, K.shape[2]
    layers = parse_layers(args.layers, L)
    print(f"captured Q {tuple(Q.shape)} K {tuple(K.shape)} in {time.time() - t0:.0f} s; layers {layers}", flush=True)
    acc = Acc()
    for l in layers:
        t1 = time.time()
        measure_layer(l, Q[l], K[l], V[l], cap["scaling"], args, acc)
        tg = f"{64 if 64 in args.block_sizes else args.block_sizes[-1]}/{args.orders[0]}"
        print(
            f"layer {l:2d} ({time.time() - t1:4.1f} s): keys99 {med(acc.layer('dens0.99', l)):.3f} "
            f"true blk {med(acc.layer(f'true_blk/{tg}', l)):.2f} min blk {med(acc.layer(f'blk/min/{tg}', l)):.2f} "
            f"int4 keys {med(acc.layer(f'keys/int4/{tg}', l)):.3f} blk {med(acc.layer(f'blk/int4/{tg}', l)):.2f}",
            flush=True,
        )
    meta = {
        "text": os.path.relpath(args.text, ROOT) + (f" (capture {args.capture})" if args.capture else ""),
        "layers_desc": "all 30" if len(layers) == L else ",".join(map(str, layers)),
        "scale": cap["scaling"],
        "runtime": time.time() - t0,
        "D": Q.shape[-1],
    }
    md = report(acc, args, layers, meta)
    Path(args.out).write_text(md + "\n")
    print(summary(acc, args))
    print(md[md.index("## Per layer"):])
    print(f"\nwrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
