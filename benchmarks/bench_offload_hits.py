#!/usr/bin/env python3
"""The block cache on a real model: how many of the blocks a decode step keeps were already resident, and whether
the logits equal those without offload.

SmolLM2-135M-Instruct (30 layers, 3 KV heads, fp32) on the CPU, where the host tier is emulated (the same memory:
the cache's logic is real, its speed is not measured here). A prompt of --context tokens of Austen's text is
prefilled, then --steps tokens of the same text are decoded one at a time (teacher forcing, so every variant sees
the same queries). Per threshold and block cache size (slots per layer, batch row and KV head), the hit rate over
the steps after the first (1 − (fetched + read from host) / kept), the blocks fetched per layer and head per step,
and the largest logit difference to the same run without offload.

    python3 benchmarks/bench_offload_hits.py --context 8192 --steps 48 --out benchmarks/offload/hits_smollm2.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hira  # noqa: E402
from bench_eager import text_ids  # noqa: E402
from harness import md_table, write_report  # noqa: E402
from hira.models import load_smollm2  # noqa: E402


@torch.no_grad()
def decode(model, config, ids, context, steps):
    """Logits of each decode step [steps, vocab] and, with offload, per step the cache's (kept, fetched, from host)
    summed over layers, rows and heads."""
    cache = hira.HiraCache(model.config, config)
    model(ids[:, :context], **{hira.CACHE_ARG: cache}, logits_to_keep=1)
    logits, moves = [], []
    for t in range(context, context + steps):
        logits.append(model(ids[:, t : t + 1], **{hira.CACHE_ARG: cache}).logits[0, -1])
        if config.offload is not None:
            caches = [layer.block_cache for layer in cache.layers]
            moves.append([sum(float(getattr(c, f).sum()) for c in caches) for f in ("kept", "fetched", "from_host")])
    return torch.stack(logits), moves


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--thresholds", default="topp0.99,topk4")
    ap.add_argument("--slots", default="8,16,32", help="block cache slots per layer, batch row and KV head")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_smollm2(dtype=torch.float32)
    model = hira.convert(model)
    ids = text_ids(tok, args.context + args.steps)
    lines = [f"bench_offload_hits {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, CPU, torch "
             f"{torch.__version__}: SmolLM2-135M-Instruct, context {args.context}, {args.steps} decode steps, "
             f"block size {args.block_size}"]
    print(lines[0], flush=True)
    rows, data = [], []
    for name in args.thresholds.split(","):
        threshold = hira.TopP(float(name[4:])) if name.startswith("topp") else hira.TopK(int(name[4:]))
        base = hira.HiraConfig(block_size=args.block_size, threshold=threshold, min_context=0)
        want, _ = decode(model, base, ids, args.context, args.steps)
        for slots in (int(s) for s in args.slots.split(",")):
            config = dataclasses.replace(base, offload=hira.Offload(blocks=slots))
            got, moves = decode(model, config, ids, args.context, args.steps)
            kept, fetched, host = (sum(m[i] for m in moves[1:]) for i in range(3))
            per = len(moves[1:]) * model.config.num_hidden_layers * model.config.num_key_value_heads
            r = dict(threshold=str(threshold), slots=slots, kept_per_head=kept / per, hit_rate=1 - (fetched + host) / kept,
                     fetched_per_head=fetched / per, host_per_head=host / per,
                     max_logit_diff=float((got - want).abs().max()))
            data.append(r)
            print(r, flush=True)
            rows.append([r["threshold"], slots, f"{r['kept_per_head']:.1f}", f"{r['hit_rate']:.3f}",
                         f"{r['fetched_per_head']:.2f}", f"{r['host_per_head']:.2f}", f"{r['max_logit_diff']:.2e}"])
    table = md_table(["threshold", "slots", "blocks kept / layer·head·step", "hit rate", "fetched / layer·head·step",
                      "read from host / layer·head·step", "max logit diff vs no offload"], rows)
    print(table)
    if args.out:
        write_report(args.out, "\n".join(lines) + "\n\n" + table + "\n", {"args": vars(args), "results": data})


if __name__ == "__main__":
    main()
