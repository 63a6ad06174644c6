#!/usr/bin/env python3
"""Decode tokens with K and V in host memory (``HiraConfig(offload=...)``) against the same tokens with everything on
the GPU, Hira and dense, in the same run.

A token is L layers, each: the layer's weight matmuls at Llama-3-8B shapes (random bf16 weights: QKV, O, gate+up,
down; embeddings, RoPE and norms left out) and its decode attention over a context of N tokens, batch B:
  - ``dense``: SDPA over the whole static KV storage of the layer (as a static cache reads it);
  - ``hira``: Hira's decode step (``hira.step``, the code a converted model runs: append, search, mask, compiled
    flex_attention), ``TopK`` with k = --k-frac of the blocks, the index and K/V on the GPU;
  - ``offload``: the same step with K and V in pinned host memory behind the layer's block cache of --slots blocks
    per batch row and KV head (``hira.offload``).
The whole token (every layer) is one CUDA graph, replayed for --steps tokens; before each, every layer gets a new
query (the structured synthetic query of ``harness.structured_row`` plus drift·‖q‖/√D·noise, a random walk, so that
the selection moves from token to token) and a new key and value, which the step appends. Keys are the structured
synthetic keys, one row per batch row and layer, indexed with the default pca clustering.

Reported per mode: tok/s (and ms per token), GPU memory beyond the weights, and for ``offload`` the block cache's
hit rate (1 − fetched or host-read blocks over kept blocks), the blocks and bytes moved from host memory per token,
and the same token with the layers' attention alone (weights left out).

--share-kv: every layer's index shares one K/V storage (its GPU index and its block cache are its own): on the GPU
for ``dense`` and ``hira``, in host memory for ``offload``. For sizes whose distinct K/V would not fit (1M tokens,
32 layers: 137 GB, more than the H200 and than its machine's 128 GiB of host memory; 128K at batches past dense's
largest): the bytes each step reads and moves are the same, the values the layers append overwrite one another. The
GPU bytes reported are those of distinct layers, with whether they and the weights would fit the GPU.

GPU run (one H200, see benchmarks/RESULTS.md):

    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
    python3 benchmarks/bench_offload.py --context 1M --layers 8 --out $OUT/offload_1m_8.md

CPU smoke run (emulated host tier, no graphs):

    python3 benchmarks/bench_offload.py --device cpu --context 8K --layers 2 --steps 4 --out /tmp/o.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import build_batch  # noqa: E402
from harness import HKV, HQ, D, LLAMA3_8B, capture_graph, device_name, fmt_size, md_table, parse_size, write_report  # noqa: E402
from hira.api import AttentionStats  # noqa: E402
from hira.index.index import HiraIndex  # noqa: E402
from hira.offload.block_cache import new_block_cache  # noqa: E402
from hira.offload.host import to_host_tier  # noqa: E402
from hira.selection.threshold import TopK, name_and_value  # noqa: E402
from hira.step import _step  # noqa: E402

BS = 128
FORCED = 8  # cache slots beyond 2·k by default: the sink block, the window's (256 tokens) and the newest, with room


def weights(layers: int, device) -> list[list[torch.Tensor]]:
    """Per layer the four weight matrices of a Llama-3-8B layer, bf16, random."""
    hid, inter = LLAMA3_8B["hidden_size"], LLAMA3_8B["intermediate_size"]
    shapes = ((hid, (HQ + 2 * HKV) * D), (HQ * D, hid), (hid, 2 * inter), (inter, hid))
    gen = torch.Generator(device=device).manual_seed(0)
    return [[torch.randn(s, device=device, dtype=torch.bfloat16, generator=gen) * 0.02 for s in shapes]
            for _ in range(layers)]


def layer_matmuls(x: torch.Tensor, w: list[torch.Tensor]) -> torch.Tensor:
    """The weight reads of one layer: x [B, hidden] through QKV, O, gate+up and down (activations kept apart from
    the attention, whose inputs come from the benchmark's buffers)."""
    qkv = x @ w[0]
    o = qkv[:, : HQ * D] @ w[1]
    gate, up = (o @ w[2]).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w[3]


class Layers:
    """L layers' decode attention state and per-token inputs, for one mode."""

    def __init__(self, mode: str, indices: list[HiraIndex], B: int, k: int, slots: int):
        self.mode, self.indices = mode, indices
        dev = indices[0].keys.device
        L = len(indices)
        self.q = torch.zeros(L, B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
        self.k = torch.zeros(L, B, HKV, 1, D, device=dev, dtype=torch.bfloat16)
        self.v = torch.zeros_like(self.k)
        self.threshold = TopK(k)
        shapes = ((B, HKV), (B, HKV), (B, HQ, 1), (B, HQ, 1))
        self.stats = [AttentionStats(*(torch.empty(s, device=dev) for s in shapes)) for _ in range(L)]
        self.caches = [new_block_cache(ix, slots) for ix in indices] if mode == "offload" else [None] * L
        self.out = torch.zeros(L, B, HQ, 1, D, device=dev, dtype=torch.bfloat16)

    def attend(self, layer: int) -> None:
        ix = self.indices[layer]
        if self.mode == "dense":
            self.out[layer] = F.scaled_dot_product_attention(self.q[layer], ix.keys, ix.values, enable_gqa=True)
            return
        cache = self.caches[layer]
        args = (list(ix.tensors()), list(cache.tensors()) if cache is not None else [], self.q[layer], self.k[layer],
                self.v[layer], list(self.stats[layer].tensors()), *name_and_value(self.threshold), D**-0.5,
                len(ix.levels), ix.block_size, ix.branching, ix.sink_tokens, ix.window_tokens)
        self.out[layer] = _step(*args)  # the compiled decode step, as HiraLayer runs it (its room checked below)


def token_fn(layers: Layers, w, x):
    def token():
        for i in range(len(layers.indices)):
            if w is not None:
                layer_matmuls(x, w[i])
            layers.attend(i)

    return token


def run_mode(mode, indices, w, args, q0, drift, device, log) -> dict:
    B = indices[0].keys.shape[0]
    NB = indices[0].num_leaves
    k = max(1, round(args.k_frac * NB))
    layers = Layers(mode, indices, B, k, args.slots or 2 * k + FORCED)
    x = torch.randn(B, LLAMA3_8B["hidden_size"], device=device, dtype=torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(1)
    walk = q0.clone()  # [L, B, HQ, 1, D] float32

    def next_inputs():
        walk.add_(torch.randn(walk.shape, device=device, generator=gen) * drift * walk.norm(dim=-1, keepdim=True)
                  / math.sqrt(D))
        layers.q.copy_(walk)
        layers.k.normal_(generator=gen)
        layers.v.normal_(generator=gen)

    used = int(indices[0].next_slot)
    if used + args.steps + 8 > indices[0].capacity:
        raise ValueError(f"capacity {indices[0].capacity} too small for {args.steps} steps after {used} slots")
    res = {"mode": mode, "drift": drift, "k": k if mode != "dense" else None,
           "slots": layers.caches[0].slots if mode == "offload" else None,
           "cache_bytes": sum(c.nbytes() for c in layers.caches if c is not None)}
    for label, wts in (("token", w), ("attention", None)):
        if label == "attention" and mode != "offload":
            continue
        fn = token_fn(layers, wts, x)
        next_inputs()
        if device.type == "cuda":
            graph, _ = capture_graph(fn)
            run = graph.replay
        else:
            run = fn
            fn()  # warm, as the graph's capture is
        fetched = host = kept = 0.0
        times = []
        for _ in range(args.steps):
            next_inputs()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if mode == "offload":
                for c in layers.caches:
                    kept += float(c.kept.sum())
                    fetched += float(c.fetched.sum())
                    host += float(c.from_host.sum())
        times.sort()
        ms = times[len(times) // 2] * 1e3
        if args.profile and label == "attention" and device.type == "cuda":
            res["profile"] = profile(fn, next_inputs, log)
        res[f"{label}_ms"] = ms
        log(f"{mode} (drift {drift:g}) {label}: {ms:.3f} ms per token (median of {args.steps}), {1e3 / ms:.1f} tok/s")
        if mode == "offload" and label == "token":
            per_block = 2 * BS * D * 2  # K and V, bf16
            res["hit_rate"] = 1 - (fetched + host) / max(kept, 1.0)
            res["fetched_per_token"] = fetched / args.steps
            res["host_read_per_token"] = host / args.steps
            res["host_bytes_per_token"] = (fetched + host) * per_block / args.steps
            res["kept_per_token"] = kept / args.steps
            log(f"  hit rate {res['hit_rate']:.3f}; per token {res['fetched_per_token']:.0f} blocks fetched, "
                f"{res['host_read_per_token']:.0f} read from host, {res['host_bytes_per_token'] / 1e6:.1f} MB")
    return res


def profile(fn, next_inputs, log, tokens: int = 3) -> str:
    """The kernels of ``tokens`` tokens called eagerly (each layer's compiled step, its opaque parts included),
    by total CUDA time: a table of the top 20."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(tokens):
            next_inputs()
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60)
    log(f"profile of {tokens} tokens, attention only:\n{table}")
    return table


def gpu_bytes(indices, mode) -> int:
    """GPU bytes of the layers' attention state: the index (K/V storage included unless offloaded)."""
    total = 0
    for ix in indices:
        total += ix.index_nbytes() + (0 if mode == "offload" else ix.kv_nbytes())
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="1M")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k-frac", type=float, default=0.02, help="TopK's k as a fraction of the blocks")
    ap.add_argument("--slots", type=int, default=0,
                    help=f"block cache slots per batch row and KV head (0: 2·k + {FORCED})")
    ap.add_argument("--drift", default="0.1", help="query drift per token; a list runs the offload mode at each")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", default="dense,hira,offload")
    ap.add_argument("--share-kv", action="store_true")
    ap.add_argument("--no-weights", action="store_true", help="attention only (no weight matmuls)")
    ap.add_argument("--profile", action="store_true", help="profile the offload mode's attention-only tokens")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    N, L, B = parse_size(args.context), args.layers, args.batch
    lines = []
    drifts = [float(d) for d in args.drift.split(",")]

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    log(f"bench_offload {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {device_name(device)}, "
        f"torch {torch.__version__}: context {fmt_size(N)}, {L} layers, batch {B}, topk {args.k_frac:g}, "
        f"drift {args.drift}, {args.steps} steps, share_kv={args.share_kv}")
    w = None if args.no_weights else weights(L, device)
    weight_bytes = sum(t.numel() * t.element_size() for ws in w or [] for t in ws)
    t0 = time.perf_counter()
    indices, qs = [], []
    for i in range(L):
        if args.share_kv and i > 0:
            ix = indices[0]
            clone = HiraIndex(*(getattr(ix, f) for f in ("keys", "values")),
                              ix.valid.clone(), ix.rank.clone(), [type(lv)(*(t.clone() for t in lv.tensors()))
                                                                 for lv in ix.levels],
                              ix.leaf_first.clone(), ix.leaf_last.clone(), ix.n_valid.clone(), ix.next_slot.clone(),
                              ix.spread_weight.clone(), ix.block_size, ix.branching, ix.sink_tokens, ix.window_tokens)
            indices.append(clone)
            qs.append(qs[0])
            continue
        ix, q, _ = build_batch(N, B, BS, device, args.seed + 7919 * i, capacity_slack=args.steps * 4 + 64)
        indices.append(ix)
        qs.append(q)
    q0 = torch.stack(qs).float()  # [L, B, HQ, 1, D]
    log(f"built {L} indices in {time.perf_counter() - t0:.1f} s")
    results = []
    modes = args.modes.split(",")
    for mode in modes:
        if mode == "offload":
            t0 = time.perf_counter()
            moved = {}
            for ix in indices:
                for name in ("keys", "values"):
                    t = getattr(ix, name)
                    if id(t) not in moved:
                        moved[id(t)] = to_host_tier(t)
                    setattr(ix, name, moved[id(t)])
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log(f"K and V moved to pinned host memory in {time.perf_counter() - t0:.1f} s")
        for drift in drifts if mode == "offload" else drifts[:1]:
            try:
                r = run_mode(mode, indices, w, args, q0, drift, device, log)
            except torch.OutOfMemoryError as e:
                log(f"{mode}: out of GPU memory ({str(e)[:120]})")
                continue
            r["gpu_attention_bytes"] = gpu_bytes(indices, mode) + r["cache_bytes"]
            r["kv_bytes"] = sum(ix.kv_nbytes() for ix in indices)
            r["fits"] = fits(r["gpu_attention_bytes"] + weight_bytes, device)
            results.append(r)
    dense = next((r for r in results if r["mode"] == "dense"), None)
    rows = []
    for r in results:
        rows.append([r["mode"], f"{r['drift']:g}", f"{r['token_ms']:.3f}", f"{1e3 / r['token_ms']:.1f}",
                     f"{B * 1e3 / r['token_ms']:.1f}",
                     f"{dense['token_ms'] / r['token_ms']:.2f}×" if dense else "—",
                     f"{r['attention_ms']:.3f}" if "attention_ms" in r else "—",
                     f"{r['gpu_attention_bytes'] / 1e9:.2f}", f"{r['gpu_attention_bytes'] / r['kv_bytes'] * 100:.1f}%",
                     f"{r['hit_rate']:.3f}" if "hit_rate" in r else "—",
                     f"{r['host_bytes_per_token'] / 1e6:.1f}" if "host_bytes_per_token" in r else "—",
                     {True: "yes", False: "no", None: "—"}[r["fits"]]])
    table = md_table(["mode", "drift", "ms/token", "tok/s per sequence", "tok/s (batch)", "vs dense",
                      "attention alone ms", "GPU GB (attention state)", "of dense KV", "hit rate", "host MB/token",
                      "distinct layers fit the GPU"], rows)
    log("\n" + table)
    if args.out:
        write_report(args.out, "\n".join(lines) + "\n", {"args": vars(args), "results": results})


def fits(nbytes: int, device) -> bool | None:
    """Whether ``nbytes`` fit the GPU's memory (None off CUDA)."""
    return torch.cuda.mem_get_info(device)[1] >= nbytes if device.type == "cuda" else None


if __name__ == "__main__":
    main()
