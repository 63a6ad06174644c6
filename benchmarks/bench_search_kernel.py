#!/usr/bin/env python3
"""Sweep the search kernels' launch parameters on CUDA: the bounds kernel (leaves per program, warps) and the
selection kernel (per mode: warps, channels per key tile of the exact score, pivots per pass of its searches or, for
``TopK``, the k-th share from triton's top-k), each replayed alone from a CUDA graph, then the whole search as
shipped and, for ``TopK``, with its k-th share found each way (in the selection kernel, or from the shares kernel's
splits of 256 to 1,024 leaves, with 4 to 16 warps for the selection), on synthetic leaves (Llama-3-8B shapes: 8 KV
heads, 4 query rows, D 128, 128-key blocks); and the key sketch's tensor-core scan (blocks per program, warps, a
register cap), with its bandwidth over the bytes it reads.

    python3 benchmarks/bench_search_kernel.py --out $OUT/search_kernel.md

A floor row times one tiny kernel the same way (graph replay, L2 flushed before each rep).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from unittest import mock

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import HKV, D, device_name, fmt_size, graph_ms, md_table, write_report  # noqa: E402
from hira.index import sketch_kernel  # noqa: E402
from hira.index.bounds import margin_factor  # noqa: E402
from hira.selection import search_kernel as sk  # noqa: E402

R, BS = 4, 128


def leaves(B: int, NB: int, dev, center_dtype: torch.dtype):
    """Synthetic full leaves: centres (in ``center_dtype``), radii, counts, spreads, rank ranges, keys and query
    rows."""
    g = torch.Generator(device=dev).manual_seed(0)
    C = NB * BS
    f = dict(device=dev, dtype=torch.float32)
    center = torch.randn(B, HKV, NB, D, generator=g, **f).to(center_dtype)
    radius = torch.rand(B, HKV, NB, generator=g, **f) * 4
    count = torch.full((B, HKV, NB), BS, device=dev, dtype=torch.int32)
    var = torch.rand(B, HKV, NB, generator=g, **f)
    mag = center.float().norm(dim=-1) + radius
    first = (torch.arange(NB, device=dev, dtype=torch.int32) * BS).expand(B, HKV, NB).contiguous()
    return dict(
        q=torch.randn(B, HKV, R, D, generator=g, **f) * 0.2, keys=torch.randn(B, HKV, C, D, device=dev).bfloat16(),
        valid=torch.ones(B, C, device=dev, dtype=torch.bool), center=center, radius=radius, count=count, var=var,
        mag=mag, weight=torch.ones(B, HKV, **f), first=first, last=first + BS - 1,
        n_valid=torch.full((B,), C, device=dev, dtype=torch.int64),
    )


def bounds_fn(t, chunk: int, warps: int):
    B, H, _, _ = t["q"].shape
    NB = t["center"].shape[2]
    nch = triton.cdiv(NB, chunk)
    f = dict(device=t["q"].device, dtype=torch.float32)
    out = [torch.empty(B, H, R, NB, **f) for _ in range(2)] + [torch.empty(B, H, R, nch, **f) for _ in range(3)]
    out.append(torch.empty(B, H, R, nch, device=t["q"].device, dtype=torch.int32))
    out.append(torch.empty(B, H, R, **f))  # the kept-mass bound, set to +inf here

    def fn():
        sk._leaf_bounds_kernel[(B * H, nch)](
            t["q"], t["center"], t["radius"], t["count"], t["var"], t["mag"], t["weight"], *out, NB, nch,
            margin_factor(D, True), 1.0, R=R, R_PAD=R, D=D, D_PAD=D, CHUNK=chunk, PDL=False,
            num_warps=warps)
        return out

    return fn, out, nch


def select_fn(t, parts, nch, mode: int, value: float, warps: int, exact_d: int, ways: int, kth: str | None = None):
    B, H, _, _ = t["q"].shape
    NB = t["center"].shape[2]
    C = NB * BS
    dev = t["q"].device
    f = dict(device=dev, dtype=torch.float32)
    # keep, kv_num_blocks, kv_indices, tau, the certificate, the kept-mass bound (the bounds kernel's +inf), fractions
    res = [torch.empty(B, H, NB, device=dev, dtype=torch.int8), torch.empty(B, H, 1, device=dev, dtype=torch.int32),
           torch.empty(B, H, 1, NB, device=dev, dtype=torch.int32), torch.empty(B, H, R, **f),
           torch.empty(B, H, R, **f), parts[6], torch.empty(B, H, **f), torch.empty(B, H, **f)]

    k = int(value) if mode == sk.TOPK else 0
    launch = dict(sk._one_program(sk.select_launch(mode, R, NB, D, BS, ways, k, kth)), num_warps=warps,
                  EXACT_D=exact_d)

    def fn():
        sk._select_kernel[(B * H, 2)](
            t["q"], t["keys"], t["valid"], t["count"], t["first"], t["last"], t["n_valid"], *parts[:6],
            *res, H, NB, nch, C, 1.0, value, k, 4, 256, MODE=mode, R=R, R_PAD=R, D=D, BS=BS,
            NB_PAD=triton.next_power_of_2(NB), NCH_PAD=triton.next_power_of_2(nch), PDL=False, **launch)
        return res

    return fn


def _launch_with(kth: str, split: int, warps: int | None):
    """``select_launch`` with ``TopK``'s k-th share found as ``kth`` says (splits of ``split`` leaves for "shares")
    and, given ``warps``, that many warps for the one-program selection kernel (the selection by splits takes its
    own from ``_SPLITS_WARPS``)."""
    shipped = sk.select_launch  # the module's own, before a patch puts this one in its place

    def launch(*args, **kwargs):
        got = shipped(*args, **dict(kwargs, kth=kth, split=split))
        return got if warps is None else dict(got, num_warps=warps)

    return launch


def sketch(B: int, NB: int, dev):
    """A synthetic key sketch: codes, per-block scales, validity (an empty last block) and query rows."""
    g = torch.Generator(device=dev).manual_seed(0)
    C = NB * BS
    valid = torch.ones(B, C, device=dev, dtype=torch.bool)
    valid[:, -BS:] = False
    return dict(q=torch.randn(B, HKV, R, D, generator=g, device=dev),
                codes=torch.randint(0, 256, (B, HKV, C, D // 2), generator=g, device=dev, dtype=torch.uint8),
                lo=(torch.randn(B, HKV, NB, D, generator=g, device=dev) * 0.5).bfloat16(),
                step=(torch.rand(B, HKV, NB, D, generator=g, device=dev) * 0.1).bfloat16(), valid=valid)


def sketch_fn(t, G: int, warps: int, maxnreg: int | None):
    """The tensor-core sketch scan with G blocks per program, ``warps`` warps and at most ``maxnreg`` registers."""
    B, H, _, _ = t["q"].shape
    NB, C = t["lo"].shape[2], t["codes"].shape[2]
    launch = dict(sketch_kernel.dot_launch(R, G), num_warps=warps)
    if maxnreg is not None:
        launch["maxnreg"] = maxnreg
    NG = triton.cdiv(NB, G)
    words = t["codes"].view(torch.int32)
    out = [torch.empty(B, H, R, NB, device=t["q"].device, dtype=torch.float32) for _ in range(3)]
    terms = sketch_kernel.half_width_terms(D)

    def fn():
        sketch_kernel._block_stats_dot_kernel[(B * H * NG,)](
            t["q"], words, t["lo"], t["step"], t["valid"], *out, H, NB, C, NG, *terms, R=R, D=D, W=D // 8, BS=BS,
            **launch)
        return out

    return fn


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1024:1,8192:1,1024:8", help="leaves:batch list (1024 leaves = 128K)")
    ap.add_argument("--rep-ms", type=float, default=20.0)
    ap.add_argument("--parts", default="bounds,select,search,sketch", help="which sweeps to run")
    ap.add_argument("--center-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="the leaf centres' dtype (an index stores them in the keys' dtype)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    small = torch.zeros(16, device=dev)
    floor = graph_ms(lambda: small.add_(1), dev, args.rep_ms)
    rows.append(["—", "—", "floor: one tiny kernel", "—", f"{floor * 1e3:.1f}"])
    print(f"floor {floor * 1e3:.1f} us", flush=True)
    for shape in args.shapes.split(","):
        NB, B = (int(x) for x in shape.split(":"))
        t = leaves(B, NB, dev, getattr(torch, args.center_dtype))
        ctx = fmt_size(NB * BS)
        parts_run = args.parts.split(",")
        for chunk, warps in itertools.product((8, 16, 32, 64), (2, 4, 8)) if "bounds" in parts_run else ():
            fn, _, _ = bounds_fn(t, chunk, warps)
            us = graph_ms(fn, dev, args.rep_ms) * 1e3
            rows.append([ctx, B, "bounds", f"chunk {chunk}, warps {warps}", f"{us:.1f}"])
            print(rows[-1], flush=True)
        fn, parts, nch = bounds_fn(t, sk._CHUNK, 4)
        fn()
        for (mode, value), warps in itertools.product(((sk.FIXED, 5.0), (sk.TOPK, NB // 100), (sk.TOPP, 0.99)),
                                                      (4, 8, 16) if "select" in parts_run else ()):
            exact_ds = (32, 128) if mode == sk.FIXED else (sk.select_launch(mode, R, NB, D, BS)["EXACT_D"],)
            searches = [("search", w) for w in ((2,) if mode == sk.FIXED else (2, 4, 8, 16))]
            if mode == sk.TOPK:  # the k-th share from triton's top-k instead: no pivots
                searches.append(("topk", 4))
            for exact_d, (kth, ways) in itertools.product(exact_ds, searches):
                fn = select_fn(t, parts, nch, mode, value, warps, exact_d, ways, kth)
                us = graph_ms(fn, dev, args.rep_ms) * 1e3
                name = ("fixed", "topk", "topp")[mode]
                how = f"warps {warps}, exact D {exact_d}, " + ("top-k" if kth == "topk" else f"ways {ways}")
                rows.append([ctx, B, f"select {name}", how, f"{us:.1f}"])
                print(rows[-1], flush=True)
        # (mode, value, how TopK finds its k-th share: None as shipped, or (kth, split, the selection's warps))
        searches = [(sk.FIXED, 5.0, None), (sk.TOPK, NB // 100, None), (sk.TOPP, 0.99, None)]
        searches += [(sk.TOPK, NB // 100, way) for way in (
            ("topk", 512, None), ("search", 512, None), ("shares", 256, None), ("shares", 512, None),
            ("shares", 1024, None), ("shares", 512, 4), ("shares", 512, 16))]
        shipped_keep = None  # TopK's kept leaves as shipped, which the other ways must match
        for mode, value, way in searches if "search" in parts_run else ():
            args_ = (t["q"], t["keys"], t["valid"], t["center"], t["radius"], t["count"], t["var"], t["mag"],
                     t["weight"], t["first"], t["last"], t["n_valid"], 1.0, mode, value, margin_factor(D, True), 4,
                     256)
            how, launch = "as shipped", sk.select_launch
            if way is not None:
                kth, split, warps = way
                how = f"k-th share by {kth}" + (f" from splits of {split} leaves" if kth == "shares" else "")
                how += f", {warps} warps" if warps else ""
                launch = _launch_with(kth, split, warps)
            split_warps = way[2] if way is not None and way[0] == "shares" and way[2] else sk._SPLITS_WARPS
            with mock.patch.object(sk, "select_launch", launch), mock.patch.object(sk, "_SPLITS_WARPS", split_warps):
                got = sk.ball_search_op(*args_)
                if way is not None and not torch.equal(got[0], shipped_keep):  # the shares are distinct: no ties
                    how += ", KEPT OTHER LEAVES THAN SHIPPED"
                us = graph_ms(lambda: sk.ball_search_op(*args_), dev, args.rep_ms) * 1e3
            if mode == sk.TOPK and way is None:
                shipped_keep = got[0]
            rows.append([ctx, B, f"search {('fixed', 'topk', 'topp')[mode]}", f"all kernels (ball_search_op), {how}",
                         f"{us:.1f}"])
            print(rows[-1], flush=True)
        if "sketch" in parts_run:
            ks = sketch(B, NB, dev)
            nbytes = sum(x.numel() * x.element_size() for k, x in ks.items() if k != "q")

            def shipped():
                return sketch_kernel.sketch_block_stats_dot(ks["q"], ks["codes"], ks["lo"], ks["step"], ks["valid"])

            want = shipped()
            us = graph_ms(shipped, dev, args.rep_ms) * 1e3
            rows.append([ctx, B, "sketch scan", f"as shipped, {nbytes / us / 1e6:.2f} TB/s", f"{us:.1f}"])
            print(rows[-1], flush=True)
            for G, warps, maxnreg in itertools.product((1, 2, 4), (4, 8), (None, 102)):
                fn = sketch_fn(ks, G, warps, maxnreg)
                got = fn()
                for a, e in zip(got, want):  # every launch computes the same statistics
                    torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)
                us = graph_ms(fn, dev, args.rep_ms) * 1e3
                how = f"{G} blocks/program, warps {warps}, maxnreg {maxnreg}, {nbytes / us / 1e6:.2f} TB/s"
                rows.append([ctx, B, "sketch scan", how, f"{us:.1f}"])
                print(rows[-1], flush=True)
    text = (f"# Search kernel sweep ({device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}, "
            f"{args.center_dtype} centres)\n\n"
            + md_table(["context", "B", "kernel", "launch", "µs (graph replay)"], rows) + "\n")
    print(text)
    if args.out:
        write_report(args.out, text, {"rows": rows})


if __name__ == "__main__":
    main()
