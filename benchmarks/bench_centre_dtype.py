#!/usr/bin/env python3
"""Leaf centres in bfloat16 against float32 over the same bfloat16 keys: what each search mode keeps and the true
softmax mass it reads, on real queries and keys.

An index stores its centres in the keys' dtype. Both indexes here hold the same keys (a capture rounded to bfloat16),
one as bfloat16 (bfloat16 centres) and one as float32 (float32 centres); every decode query of the capture is
searched in both, and the mass read is measured in float64 over the index's keys.

    python3 benchmarks/capture.py --text ../shared/data/austen/emma.txt --context 8192 --steps 16 --out cap8k.pt
    python3 benchmarks/bench_centre_dtype.py --capture cap8k.pt --out benchmarks/quality/centre_dtype_8k.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hira  # noqa: E402
from harness import md_table, write_report  # noqa: E402
from hira import Certified, TopK, TopP  # noqa: E402


def read_stats(index: hira.HiraIndex, q: torch.Tensor, mode, scale: float) -> tuple[float, float]:
    """(kept fraction averaged over KV heads, median over query heads of the true mass read) of one query
    q [1, Hq, 1, D]."""
    sel = hira.search(index, q, mode, scale=scale)
    G = q.shape[1] // index.keys.shape[1]
    keys = index.keys.double()[0].repeat_interleave(G, 0)  # [Hq, C, D]
    s = torch.einsum("hd,hcd->hc", q.double()[0, :, 0], keys) * scale
    p = s.masked_fill(~index.valid[0][None, :], float("-inf")).softmax(-1)  # [Hq, C]
    read = sel.keep[0].repeat_interleave(index.block_size, -1).repeat_interleave(G, 0)  # [Hq, C]
    return float(sel.kept_fraction.mean()), float((p * read).sum(-1).median())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capture", required=True, help="a file written by benchmarks/capture.py")
    ap.add_argument("--layers", default="0,6,12,18,24,29")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cap = torch.load(args.capture)
    Q, K, V, scale = cap["Q"], cap["K"], cap["V"], cap["scaling"]  # Q [L, T, Hq, D], K and V [L, Hkv, N, D]
    T, N = Q.shape[1], K.shape[2]
    rows = []
    for layer in (int(x) for x in args.layers.split(",")):
        keys = K[layer, :, : N - T][None].bfloat16()  # the cache before the decode queries
        values = V[layer, :, : N - T][None].bfloat16()
        by_dtype = {}
        for dtype in (torch.float32, torch.bfloat16):
            index = hira.build_index(keys.to(dtype), values.to(dtype), hira.HiraConfig(block_size=args.block_size))
            modes = (TopK(max(1, index.num_leaves // 10)), TopP(0.99), Certified(0.01))
            by_dtype[dtype] = [[read_stats(index, Q[layer, t][None, :, None, :].to(dtype), mode, scale)
                                for t in range(T)] for mode in modes]
        for m, mode in enumerate(modes):
            cells = []
            for dtype in (torch.float32, torch.bfloat16):
                kept, mass = zip(*by_dtype[dtype][m])
                cells += [f"{statistics.mean(kept):.4f}", f"{statistics.median(mass):.4f} / {min(mass):.4f}"]
            rows.append([layer, repr(mode), *cells])
            print(rows[-1], flush=True)
    text = (f"# Leaf centres in bfloat16 against float32 ({os.path.basename(args.capture)}: {N - T} keys, {T} decode "
            f"queries, torch {torch.__version__}, "
            f"block size {args.block_size})\n\n"
            + md_table(["layer", "mode", "kept, float32 centres", "mass read med / min, float32",
                        "kept, bfloat16 centres", "mass read med / min, bfloat16"], rows) + "\n")
    print(text)
    if args.out:
        write_report(args.out, text, {"rows": rows})


if __name__ == "__main__":
    main()
