#!/usr/bin/env python3
"""Time ONE decode attention step of one layer: Hira (search + mask + attention) vs SDPA dense vs flex dense.

Llama-3-8B attention shapes: 32 query heads, 8 KV heads, head dim 128, bf16, query length 1.

For every (block size, context, batch) that fits in memory:
  - SDPA dense (enable_gqa=True) over the same K/V storage, eager and replayed from a CUDA graph;
  - flex_attention dense with an explicit all-blocks BlockMask (GQA folded into the query axis, as Hira does);
  - the Hira step on a prebuilt index: ``hira.step.select`` (the query-row fold and scale, the search: the
    decode step's plan without its append) and ``hira.api.attend_selection`` (mask, flex, stats), in two forms:
      * eager step: the Python step as written (flex_attention compiled on its own, everything else eager);
        timed per call ("no graph") and replayed from a CUDA graph captured after warm-up ("graph");
      * compiled step: the same step function wrapped in ``torch.compile(step, fullgraph=True, dynamic=False)``
        (what ``torch.compile(model)`` does to a decode step: inductor fuses the search's small kernels and the
        flex call into one graph; on the CPU, as ``hira.step`` there, the search compiled and the attention's
        flex_attention compiled on its own), timed per call and replayed from a CUDA graph;
    plus search+mask alone (eager and compiled, both graph-replayed) and attention alone (the flex call with its
    fold, cast and LSE on a mask made beforehand, graph-replayed), for
      (a) forced kept fractions (TopK with k = fraction * NB), and
      (b) the real threshold modes (topp 0.9/0.99, certified 1e-2/1e-3, fixed) on keys with realistic structure
          (topic clusters recurring over the context, a few dominant directions, attention sinks, a recency
          direction); the kept fraction each mode gets is reported, and the true softmax mass it read.
    Each compile is one inductor compile per (shape, selection): only the selections named by ``--compiled``
    get the compiled variants (default: topk 1% and 5%; ``--compiled all`` for every selection).

Timing: triton.testing.do_bench (median; L2 flushed before each rep) on CUDA, a host clock median on CPU (no CUDA
graphs there: the graph columns stay empty). Recompiles are counted around the timed loops (torch._dynamo counters)
and the timed loops run under torch.compiler.set_stance("fail_on_recompile"), the compiled step's included.

GPU run (one H100, ~6 min wall; batch-1 combos first, the rest skipped past --time-budget seconds):

    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
    python3 benchmarks/bench_attention.py \
      --combos 128:128K:1,128:512K:1,128:32K:1,128:1M:1,128:128K:8,64:128K:1,64:512K:1 \
      --time-budget 300 --out $OUT/bench.md

(these combos, --compiled "topk 1%,topk 5%" and --profile-context 128K are also the defaults on CUDA.)

CPU smoke run (2K and 4K, batch 1 and 2; the compiled step for topk 5% in the first combo only, ~1 min of compile):

    python3 benchmarks/bench_attention.py --quick --device cpu --out /tmp/q.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    HKV, HQ, D, Timed, bench, capture_graph, cell, device_name, fmt_num, fmt_size, graph_ms, md_table,
    parse_size, structured_row, sync, unique_graphs, write_report,
)
from hira.api import attend_selection  # noqa: E402
from hira.flex.attention import block_attention, compiled_flex_attention, fold_gqa  # noqa: E402
from hira.flex.mask import Q_BLOCK_SIZE, selection_block_mask  # noqa: E402
from hira.index.bounds import NodeBounds, upper_bound  # noqa: E402
from hira.index.index import HiraIndex, build_index  # noqa: E402
from hira.index.sketch import block_score_stats  # noqa: E402
from hira.step import select  # noqa: E402
from hira.selection.threshold import Certified, Dense, Fixed, Threshold, TopK, TopP  # noqa: E402

SINKS, WINDOW = 4, 256  # HiraConfig defaults
# The default GPU run (module docstring): batch-1 combos first, most important first.
DEFAULT_GPU_COMBOS = "128:128K:1,128:512K:1,128:32K:1,128:1M:1,128:128K:8,64:128K:1,64:512K:1"


def build_batch(N: int, B: int, block_size: int, device, seed: int, clustering: str = "pca",
                key_sketch: bool = False, capacity_slack: int = 0) -> tuple[HiraIndex, torch.Tensor, float]:
    """Build the index one batch row at a time (peak memory of one row's clustering), stacked into one index, with
    room for ``capacity_slack`` appended tokens."""
    if key_sketch and B > 1:
        raise ValueError("--key-sketch runs batch 1 combos only")
    full = None
    qs = []
    t_build = 0.0
    for b in range(B):
        keys, values, q = structured_row(N, seed + 1000 * b, device, SINKS)
        qs.append(q)
        sync(device)
        t0 = time.perf_counter()
        idx = build_index(keys, values, None, block_size=block_size, clustering=clustering, sink_tokens=SINKS,
                          window_tokens=WINDOW, key_sketch=key_sketch,
                          capacity=-(-N // block_size) * block_size + capacity_slack)
        sync(device)
        t_build += time.perf_counter() - t0
        del keys, values
        if B == 1:
            return idx, torch.cat(qs), t_build * 1e3
        if full is None:
            full = _alloc_like(idx, B)
        _copy_row(full, idx, b)
        del idx
    return full, torch.cat(qs), t_build * 1e3 / B


def _alloc_like(idx: HiraIndex, B: int) -> HiraIndex:
    def a(t):
        return t.new_empty((B, *t.shape[1:]))

    levels = [NodeBounds(*[a(t) for t in lv.tensors()]) for lv in idx.levels]
    return dataclasses.replace(
        idx,
        keys=a(idx.keys), values=a(idx.values), valid=a(idx.valid), rank=a(idx.rank), levels=levels,
        leaf_first=a(idx.leaf_first), leaf_last=a(idx.leaf_last), n_valid=a(idx.n_valid),
        next_slot=idx.next_slot.clone(), spread_weight=a(idx.spread_weight),
    )


def _copy_row(full: HiraIndex, idx: HiraIndex, b: int) -> None:
    for name in ("keys", "values", "valid", "rank", "leaf_first", "leaf_last", "n_valid", "spread_weight"):
        getattr(full, name)[b].copy_(getattr(idx, name)[0])
    for lf, li in zip(full.levels, idx.levels):
        for tf, ti in zip(lf.tensors(), li.tensors()):
            tf[b].copy_(ti[0])


# --------------------------------------------------------------------------------------------------------------
# The measured functions
# --------------------------------------------------------------------------------------------------------------

def all_blocks_mask(B: int, C: int, bs: int, rows: int, device) -> BlockMask:
    nb = C // bs
    num = torch.full((B, HKV, 1), nb, dtype=torch.int32, device=device)
    idx = torch.arange(nb, dtype=torch.int32, device=device).expand(B, HKV, 1, nb).contiguous()
    # The same rule as hira.flex.mask.selection_block_mask: empty full-block lists on CPU only (its decode template
    # needs them); on CUDA they would size the KV splits by the context (harmless here: every block is listed).
    full = (None, None) if num.is_cuda else (torch.zeros_like(num), torch.zeros_like(idx))
    return BlockMask.from_kv_blocks(
        num, idx, *full, BLOCK_SIZE=(Q_BLOCK_SIZE, bs), seq_lengths=(rows, C), compute_q_blocks=False,
    )


def compiled(fn):
    """The step as a user's ``torch.compile(model)`` compiles it: one graph, static shapes."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


def hira_step(index: HiraIndex, q: torch.Tensor, thr: Threshold, scale: float, kernel: bool = True, search=select):
    """Everything one decode step of one layer costs but the append (``hira.step.plan`` without it is
    ``hira.step.select``: fold and scale of the query rows, search), then BlockMask, flex attention with its LSE and
    the stats (``attend_selection``, what ``hira.step.run`` calls). The index stays as built, so the step replays.
    ``search``: ``select`` or a compiled form of it."""

    def step():
        sel = search(index, q, thr, scale, kernel)
        out, stats = attend_selection(q, index, sel, scale)
        # every stat HiraCache keeps (last_stats), so that a compiled step cannot drop any of them as dead code
        return out, stats.kept_fraction, stats.read_fraction, stats.skip_bound, sel.keep, stats.prior_skip_bound

    return step


def hira_search_mask(index: HiraIndex, q: torch.Tensor, thr: Threshold, scale: float, kernel: bool = True):
    """Fold + scale, search and BlockMask: returns the mask's block lists and every Selection tensor (so that the
    compiled form computes all the search's outputs, as the step uses them)."""

    def fn():
        sel = select(index, q, thr, scale, kernel)
        mask = selection_block_mask(
            sel.kv_num_blocks, sel.kv_indices, sel.keep, index.valid, index.block_size, sel.tau.shape[2]
        )
        return (mask.kv_num_blocks, mask.kv_indices, sel.keep, sel.tau, sel.log_skip_ub, sel.log_kept_lb,
                sel.kept_fraction)

    return fn


def hira_attention_only(index: HiraIndex, q: torch.Tensor, thr: Threshold, scale: float, kernel: bool = True):
    """The flex call of attend_selection (incl. folding, cast and LSE) on a selection and mask made beforehand.

    block_attention calls hira's compiled flex_attention: this is the attention alone, already compiled."""
    H = index.keys.shape[1]
    sel = select(index, q, thr, scale, kernel)
    mask = selection_block_mask(sel.kv_num_blocks, sel.kv_indices, sel.keep, index.valid, index.block_size, sel.tau.shape[2])

    def fn():
        rows = fold_gqa(q, H).to(index.keys.dtype)
        return block_attention(rows, index.keys, index.values, mask, index.valid, scale, return_lse=True,
                               uneven=sel.uneven)

    return fn, sel


# --------------------------------------------------------------------------------------------------------------
# One (block size, context, batch) combination
# --------------------------------------------------------------------------------------------------------------


def data_stats(index: HiraIndex, q: torch.Tensor, scale: float) -> dict:
    """Oracle facts about batch row 0: softmax concentration, sink/recent mass, the max scores."""
    k = index.keys[0].float()  # [H, C, D]
    rows = fold_gqa(q[:1].float(), HKV)[0] * scale  # [H, R, D]
    s = torch.bmm(rows, k.transpose(1, 2))  # [H, R, C]
    s = s.masked_fill(~index.valid[0][None, None, :], -math.inf)
    p = s.softmax(-1)
    ps = p.sort(-1, descending=True).values
    cs = ps.cumsum(-1)
    n = index.n_valid[0].float()
    out = {}
    for t in (0.9, 0.99):
        need = ((cs < t).sum(-1).float() + 1) / n
        out[f"keys_for_{t}"] = float(need.median())
    rank = index.rank[0]  # [H, C] position of each slot's token
    sink = (rank >= 0) & (rank < SINKS)
    recent = rank >= (index.n_valid[0] - WINDOW)
    out["sink_mass"] = float((p * sink[:, None, :]).sum(-1).median())
    out["window_mass"] = float((p * recent[:, None, :]).sum(-1).median())
    m = s.amax(-1)
    out["max_score_median"] = float(m.median())
    for eps in (1e-2, 1e-3):
        out[f"keys_certified_{eps:g}"] = float((s >= (m - math.log(float(n) / eps))[..., None]).float().mean(-1).median())
    return out, p  # p: [H, R, C] for mass-kept checks


def run_combo(args, device, bs: int, N: int, B: int, results: list, log) -> None:
    tag = f"BS={bs} N={fmt_size(N)} B={B}"
    kv_bytes = 2 * B * HKV * N * D * 2
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        # storage + one row's clustering (~5 float32 copies of a row's keys) + a row of raw K/V + slack
        need = kv_bytes * 1.06 + 5 * HKV * N * D * 4 + 2 * HKV * N * D * 2 + (2 << 30)
        if need > free:
            log(f"{tag}: skip (memory): needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
            results.append(dict(bs=bs, N=N, B=B, skipped="memory"))
            return
    log(f"--- {tag}: building index ({kv_bytes / 2**30:.2f} GiB of K+V)")
    index, q, build_ms = build_batch(N, B, bs, device, args.seed, args.clustering, args.key_sketch)
    q = q * args.query_scale  # sharper attention: fewer blocks truly needed
    C = index.capacity
    NB = index.num_leaves
    scale = D**-0.5
    rows = fold_gqa(q, HKV)  # [B, H, G, D] bf16
    R = rows.shape[2]
    stats, p0 = data_stats(index, q, scale)
    mem_frac = index.index_nbytes() / index.kv_nbytes()
    combo = dict(bs=bs, N=N, B=B, C=C, NB=NB, build_ms_per_row=build_ms, index_frac=mem_frac,
                 index_bytes=index.index_nbytes(), kv_bytes=index.kv_nbytes(), data=stats, rows=[])
    log(f"{tag}: built in {build_ms:.0f} ms/row; index/KV = {mem_frac * 100:.2f}%; data: "
        + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
    use_graph = device.type == "cuda" and not args.no_graph
    cuda = device.type == "cuda"

    # --- SDPA dense (GQA) over the same storage -------------------------------------------------------------
    def sdpa():
        return F.scaled_dot_product_attention(q, index.keys, index.values, scale=scale, enable_gqa=True)

    ref = sdpa().float()
    ref_norm = ref.norm()
    row = dict(method="SDPA dense (GQA)", selection="all", kept=1.0, read=1.0)
    row["eager_ms"] = bench(sdpa, device, args.rep_ms)
    if use_graph:
        row["graph_ms"] = graph_ms(sdpa, device, args.rep_ms)
    sdpa_ms = row.get("graph_ms", row["eager_ms"])
    combo["sdpa_ms"] = sdpa_ms
    combo["rows"].append(row)
    log(f"{tag}: SDPA eager {row['eager_ms']:.4f} ms, graph {fmt_num(row.get('graph_ms'), 4)} ms")

    # --- flex dense, explicit all-blocks BlockMask, folded GQA ----------------------------------------------
    try:
        fmask = all_blocks_mask(B, C, bs, R, device)
        ff = compiled_flex_attention()  # the same compiled flex hira uses

        def flex_dense():
            return ff(rows, index.keys, index.values, block_mask=fmask, scale=scale)

        out = flex_dense()
        err = float((out.reshape(B, HQ, 1, D).float() - ref).norm() / ref_norm)
        row = dict(method="flex dense (all-blocks mask)", selection="all", kept=1.0, read=1.0, rel_err=err)
        with Timed() as t:
            row["eager_ms"] = bench(flex_dense, device, args.rep_ms)
        row["recompiles"] = t.recompiles
        if use_graph:
            row["graph_ms"] = graph_ms(flex_dense, device, args.rep_ms)
        combo["rows"].append(row)
        log(f"{tag}: flex dense eager {row['eager_ms']:.4f} ms, graph {fmt_num(row.get('graph_ms'), 4)} ms, "
            f"rel err vs SDPA {err:.2e}")
    except Exception as e:  # noqa: BLE001
        log(f"{tag}: flex dense FAILED: {type(e).__name__}: {_clean(str(e), 400)}")
        combo["rows"].append(dict(method="flex dense (all-blocks mask)", selection="all",
                                  error=f"{type(e).__name__}: {_clean(str(e), 2000)}"))

    # --- the leaf bounds alone (what the search evaluates: one level, every leaf; mode-independent) ----------
    if use_graph:
        try:
            def bounds_only():
                return upper_bound(fold_gqa(q.float(), HKV) * scale, index.levels[0])

            combo["bounds_ms"] = graph_ms(bounds_only, device, args.rep_ms)
            log(f"{tag}: leaf upper_bound alone (graph) {combo['bounds_ms']:.4f} ms")
        except Exception as e:  # noqa: BLE001
            log(f"{tag}: bounds timing failed: {e!r}"[:300])

    # --- the key sketch's scan alone (the certified mode's per-block score intervals), and its bandwidth ------
    if use_graph and index.sketch is not None:
        try:
            def sketch_scan():
                return block_score_stats(fold_gqa(q.float(), HKV) * scale, index.sketch, index.valid)

            combo["sketch_scan_ms"] = graph_ms(sketch_scan, device, args.rep_ms)
            combo["sketch_bytes"] = index.sketch.nbytes()
            log(f"{tag}: sketch scan alone (graph) {combo['sketch_scan_ms']:.4f} ms, "
                f"{combo['sketch_bytes'] / combo['sketch_scan_ms'] / 1e9:.2f} TB/s of sketch read")
        except Exception as e:  # noqa: BLE001
            log(f"{tag}: sketch scan timing failed: {e!r}"[:300])

    # --- Hira ---------------------------------------------------------------------------------------------
    sels = []
    for f in args.fractions:
        k = max(1, round(f * NB))
        sels.append((f"topk {f * 100:g}% (k={k})", TopK(k)))
    fixed_tau = stats["max_score_median"] - 3.0
    for m in args.modes:
        if m.startswith("topp"):
            sels.append((m, TopP(float(m[4:]))))
        elif m.startswith("certified"):
            sels.append((m, Certified(float(m[9:]))))
        elif m == "fixed":
            sels.append((f"fixed τ={fixed_tau:.1f}", Fixed(fixed_tau)))
        elif m == "dense":
            sels.append(("dense", Dense()))
    # Each selection with the search's Triton kernels (where they apply) and, with --tensor-search, again with its
    # compiled tensor program, the kernels' reference.
    sels = [(name, thr, True) for name, thr in sels] + [
        (name + " [tensor search]", thr, False) for name, thr in sels
        if args.tensor_search and not isinstance(thr, (Dense, Certified))]
    compile_error = None  # the eager step's flex compile failed: the other selections would fail the same way
    compiled_error = None  # the compiled step failed to compile: skip the other compiled variants of this combo
    compiled_fns = {}  # selection -> (compiled step, compiled search+mask), for the profile
    codes = set()  # code objects compiled here, released at the end of the combo
    for name, thr, kernel in sels:
        row = dict(method="Hira" if kernel else "Hira, tensor search", selection=name)
        if compile_error:
            row["error"] = "not run: " + compile_error
            combo["rows"].append(row)
            continue
        try:
            step = hira_step(index, q, thr, scale, kernel)
            g0 = unique_graphs()
            out, kept, read, skip, keep, _ = step()  # warm-up: compiles flex for this shape and mask once
            sync(device)
            row["warmup_compiles"] = unique_graphs() - g0
            row["kept"] = float(kept.mean())
            row["read"] = float(read.mean())
            row["rel_err"] = float((out.float() - ref).norm() / ref_norm)
            row["skip_bound_max"] = float(skip.max())
            slot_keep = keep[0].repeat_interleave(bs, dim=-1)  # [H, C]
            mass = (p0 * slot_keep[:, None, :]).sum(-1)  # [H, R] true softmax mass read, row 0
            row["mass_read_median"] = float(mass.median())
            row["mass_read_min"] = float(mass.min())
            with Timed() as t:
                row["eager_ms"] = bench(step, device, args.rep_ms)
            row["recompiles"] = t.recompiles
            if use_graph:
                g, gout = capture_graph(step)
                gdiff = float((gout[0].float() - out.float()).abs().max())
                row["graph_vs_eager_maxdiff"] = gdiff
                if not gdiff <= 0.05:
                    log(f"{tag}: WARNING graph replay output differs from eager by {gdiff:.3g}")
                row["graph_ms"] = bench(g.replay, device, args.rep_ms)
                del g, gout
                row["search_mask_ms"] = graph_ms(hira_search_mask(index, q, thr, scale, kernel), device, args.rep_ms)
                fn, _ = hira_attention_only(index, q, thr, scale, kernel)
                row["attn_ms"] = graph_ms(fn, device, args.rep_ms)
                del fn
            else:
                fn = hira_search_mask(index, q, thr, scale, kernel)
                row["search_mask_ms"] = bench(fn, device, args.rep_ms)
                fn, _ = hira_attention_only(index, q, thr, scale, kernel)
                row["attn_ms"] = bench(fn, device, args.rep_ms)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {_clean(str(e), 2000)}"
            log(f"{tag}: Hira {name} FAILED: {row['error'][:400]}")
            if "InductorError" in row["error"] or "CompilationError" in row["error"]:
                compile_error = row["error"][:200]
            if args.verbose:
                traceback.print_exc()
            combo["rows"].append(row)
            continue

        # --- the same step, compiled whole -------------------------------------------------------------------
        if want_compiled(args, name):
            if compiled_error:
                row["compiled_error"] = "not run: " + compiled_error
            else:
                try:
                    compiled_step(args, device, index, q, thr, scale, step, out, keep, row, codes, compiled_fns, name,
                                  use_graph, kernel)
                except Exception as e:  # noqa: BLE001
                    row["compiled_error"] = f"{type(e).__name__}: {_clean(str(e), 2000)}"
                    log(f"{tag}: Hira {name} compiled FAILED: {row['compiled_error'][:400]}")
                    if "Detected recompile" not in row["compiled_error"]:
                        compiled_error = row["compiled_error"][:200]
                    if args.verbose:
                        traceback.print_exc()
        ms = row.get("graph_ms", row["eager_ms"])
        cms = row.get("compiled_graph_ms", row.get("compiled_ms"))
        log(f"{tag}: Hira {name:24s} kept {row['kept'] * 100:6.2f}%  mass read {row['mass_read_median']:.3f}"
            f"  eager step: graph {fmt_num(row.get('graph_ms'), 4)} ms, no graph {row['eager_ms']:.4f} ms"
            f"  x{sdpa_ms / ms:.2f} vs SDPA  s+m {row['search_mask_ms']:.4f}  attn {row['attn_ms']:.4f}"
            f"  rel err {row['rel_err']:.3f}  recompiles {row['recompiles']}"
            + (f"  | compiled step: graph {fmt_num(row.get('compiled_graph_ms'), 4)} ms, no graph "
               f"{fmt_num(row.get('compiled_ms'), 4)} ms x{sdpa_ms / cms:.2f} vs SDPA, s+m "
               f"{fmt_num(row.get('compiled_search_mask_ms'), 4)}"
               f", compile {row['compile_s']:.1f}+{fmt_num(row.get('compile_sm_s'), 1)} s, recompiles "
               f"{row['compiled_recompiles']}, max diff vs eager {row['compiled_maxdiff']:.3g}"
               if cms else "")
            + (f"  | compiled: {row['compiled_error'][:200]}" if "compiled_error" in row else ""))
        combo["rows"].append(row)

    if cuda and args.profile_context and N == args.profile_context and B == 1 and bs == args.profile_block_size:
        try:
            profiled = [(name, thr) for name, thr, kernel in sels
                        if kernel and label_matches(name, args.profile_selection)]
            if not profiled:
                raise ValueError(f"--profile-selection {args.profile_selection!r} names no selection of this run")
            combo["profile"] = profile_step(index, q, scale, *profiled[0], log, compiled_fns)
        except Exception as e:  # noqa: BLE001
            log(f"profile failed: {e!r}")
    results.append(combo)
    compiled_fns.clear()
    _release(codes)
    # Free the combo's tensors before empty_cache: rebound, not deleted, as the closures above read these names.
    index = q = rows = p0 = ref = None
    if cuda:
        torch.cuda.empty_cache()


def want_compiled(args, name: str) -> bool:
    """Does the selection labelled ``name`` get the compiled variants (``--compiled``, matched by prefix), in this
    combo (the first ``--compiled-combos`` combos run)?"""
    if args.compiled_combos >= 0 and args.combos_run > args.compiled_combos:
        return False
    return any(c == "all" or label_matches(name, c) for c in args.compiled)


def compiled_step(args, device, index, q, thr, scale, step, out, keep, row, codes, compiled_fns, name, use_graph,
                  kernel):
    """``torch.compile(step, fullgraph=True, dynamic=False)``: compile, check against the eager step, time it per
    call (under fail_on_recompile: it must not recompile) and from a CUDA graph; then search+mask compiled alone.
    On the CPU the step is compiled as ``hira.step`` compiles it there: the search compiled, the attention as it is
    (its flex_attention compiled on its own), because flex_attention compiled in one graph with the BlockMask's
    construction returns wrong values on the CPU (benchmarks/NOTES.md §11b)."""
    if device.type == "cuda":
        cstep = compiled(step)
        codes.add(step.__code__)
    else:
        cstep = hira_step(index, q, thr, scale, kernel, search=compiled(select))
        codes.add(select.__code__)
    g0 = unique_graphs()
    t0 = time.perf_counter()
    cout = cstep()  # compiles
    sync(device)
    row["compile_s"] = time.perf_counter() - t0
    row["compiled_warmup_compiles"] = unique_graphs() - g0
    cout = cstep()
    sync(device)
    row["compiled_maxdiff"] = float((cout[0].float() - out.float()).abs().max())  # nan if the output has any
    row["compiled_same_selection"] = bool(torch.equal(cout[4], keep))
    with Timed() as t:
        row["compiled_ms"] = bench(cstep, device, args.rep_ms)
    row["compiled_recompiles"] = t.recompiles
    if use_graph:
        g, gout = capture_graph(cstep)
        gdiff = float((gout[0].float() - cout[0].float()).abs().max())
        if not gdiff <= 0.05:
            row["compiled_graph_vs_call_maxdiff"] = gdiff
        row["compiled_graph_ms"] = bench(g.replay, device, args.rep_ms)
        del g, gout
    fn = hira_search_mask(index, q, thr, scale, kernel)
    csm = compiled(fn)
    codes.add(fn.__code__)
    t0 = time.perf_counter()
    csm()
    sync(device)
    row["compile_sm_s"] = time.perf_counter() - t0
    if use_graph:
        row["compiled_search_mask_ms"] = graph_ms(csm, device, args.rep_ms)
    else:
        row["compiled_search_mask_ms"] = bench(csm, device, args.rep_ms)
    if args.profile_context:
        compiled_fns[name] = (cstep, csm)


def _release(codes) -> None:
    """Drop dynamo's cache entries for the step closures compiled in this combo (they guard on its index)."""
    try:
        from torch._dynamo.eval_frame import reset_code
    except ImportError:  # pragma: no cover - older/newer layouts
        try:
            from torch._C._dynamo.eval_frame import reset_code
        except ImportError:
            return
    for code in codes:
        try:
            reset_code(code)
        except Exception:  # noqa: BLE001
            pass
    codes.clear()


def profile_step(index, q, scale, name, thr, log, compiled_fns) -> dict:
    """torch.profiler over graph replays of the Hira step with selection ``name`` (``--profile-selection``): device
    time per kernel, kernels per step; the compiled step and search+mask too where that selection was compiled
    (``--compiled``)."""
    from torch.profiler import ProfilerActivity, profile

    res = {"selection": name}
    todo = [("step", hira_step(index, q, thr, scale)), ("search_mask", hira_search_mask(index, q, thr, scale))]
    if name in compiled_fns:
        todo += [("compiled_step", compiled_fns[name][0]), ("compiled_search_mask", compiled_fns[name][1])]
    for label, fn in todo:
        g, _ = capture_graph(fn)
        n = 20
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                g.replay()
            torch.cuda.synchronize()
        kernels = {}
        count = 0
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                dt = e.time_range.elapsed_us()
                kernels.setdefault(e.name, [0, 0.0])
                kernels[e.name][0] += 1
                kernels[e.name][1] += dt
                count += 1
        if count == 0:  # older layouts: kernels only in the averages
            for a in prof.key_averages():
                if a.device_type == torch.autograd.DeviceType.CUDA:
                    kernels[a.key] = [a.count, a.self_device_time_total]
                    count += a.count
        top = sorted(kernels.items(), key=lambda kv: -kv[1][1])
        total_us = sum(v[1] for v in kernels.values()) / n
        res[label] = dict(kernels_per_step=count / n, kernel_us_per_step=total_us,
                          top=[(k[:110], v[0] / n, v[1] / n) for k, v in top[:25]])
        log(f"profile {label}: {count / n:.0f} kernels per replay, {total_us:.1f} us of kernel time per replay")
        for k, calls, us in res[label]["top"][:12]:
            log(f"    {us:8.2f} us  x{calls:4.1f}  {k}")
        del g
    # the eager step: host time per step
    step = hira_step(index, q, thr, scale)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    res["eager_table"] = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
    return res


def label_matches(name: str, prefix: str) -> bool:
    """Is ``prefix`` (as ``--compiled`` and ``--profile-selection`` give them: 'topk 5%', 'certified1e-2') the label
    ``name`` of a selection, or its start up to a space ('topk 5%' names 'topk 5% (k=51)')?"""
    return name == prefix or name.startswith(prefix + " ")


def _clean(msg: str, n: int = 160) -> str:
    """One table cell: the informative part of an error, no newlines or pipes."""
    return cell(msg, n, ("AssertionError(", "RuntimeError: Detected recompile"))


def markdown(results: list, meta: dict) -> str:
    L = []
    L.append("# Hira decode attention benchmark (one layer, one step)\n")
    for k, v in meta.items():
        L.append(f"- {k}: {v}")
    L.append("")
    L.append("ms = median (do_bench on CUDA: L2 flushed before every rep). 'eager step' = the Python step as written "
             "(search, mask and stats eager, flex_attention compiled on its own); 'compiled step' = the same step "
             "function under torch.compile(step, fullgraph=True, dynamic=False) (on the CPU, as hira.step runs it "
             "there, its search compiled and the rest as in the eager step). 'graph' = replay of a "
             "torch.cuda.CUDAGraph captured after warm-up (CUDA only); 'no graph' = the step called from Python. "
             "x SDPA = SDPA ms / method ms, graph replays on CUDA (eager step / compiled step). "
             "kept = blocks read / non-empty blocks (mean over batch, KV heads), sinks and window included; "
             "mass read = true softmax mass in the blocks read (batch row 0, median and min over the 32 query rows); "
             "rel err = ‖o − o_SDPA‖/‖o_SDPA‖ of the eager step; s+m = search + BlockMask alone (eager / compiled); "
             "attn = the flex call alone (fold, cast, LSE; flex compiled) on a mask made beforehand; "
             "s+m / attn uses the compiled s+m where measured. compile s = first-call wall time of the compiled step "
             "+ of search+mask compiled. c-vs-e diff = max |o_compiled − o_eager| (bf16; 'WRONG' past 0.05 or NaN; "
             "'sel≠' where the compiled search kept other blocks). recompiles = dynamo graphs compiled inside the "
             "timed no-graph loops, eager step / compiled step (warm-up compiles in brackets); the loops run under "
             "fail_on_recompile.\n")
    rows = []
    for c in results:
        combo = [c["bs"], fmt_size(c["N"]), c["B"]]
        if c.get("skipped"):
            rows.append(combo + [f"skip ({c['skipped']})"])
            continue
        sd = c["sdpa_ms"]
        for r in c["rows"]:
            if "error" in r:
                rows.append(combo + [r["method"], r["selection"], f"FAILED: {_clean(r['error'])}"])
                continue
            ms = r.get("graph_ms", r.get("eager_ms"))
            cms = r.get("compiled_graph_ms", r.get("compiled_ms"))
            sm = r.get("compiled_search_mask_ms", r.get("search_mask_ms"))
            at = r.get("attn_ms")
            mass = (f"{r['mass_read_median']:.3f}/{r['mass_read_min']:.3f}" if "mass_read_median" in r else "1/1")
            xs = f"{sd / ms:.2f}" + (f" / {sd / cms:.2f}" if cms else "")
            if "compiled_error" in r:
                cerr = f"FAILED: {_clean(r['compiled_error'], 120)}"
                cells = [cerr, xs, fmt_num(r.get("eager_ms"), 4), "—", fmt_num(r.get("search_mask_ms"), 4), "—"]
            else:
                cells = [fmt_num(r.get("compiled_graph_ms"), 4), xs, fmt_num(r.get("eager_ms"), 4),
                         fmt_num(r.get("compiled_ms"), 4), fmt_num(r.get("search_mask_ms"), 4),
                         fmt_num(r.get("compiled_search_mask_ms"), 4)]
            diff = "—"
            if "compiled_maxdiff" in r:
                d = r["compiled_maxdiff"]
                diff = f"{d:.3g}" if d <= 0.05 else f"WRONG ({d:.3g})"
                if not r.get("compiled_same_selection", True):
                    diff += " sel≠"
            comp = f"{r['compile_s']:.1f}+{r['compile_sm_s']:.1f}" if "compile_sm_s" in r else "—"
            rec = f"{r.get('recompiles', '—')}"
            if r.get("warmup_compiles"):
                rec += f" ({r['warmup_compiles']})"
            if "compiled_recompiles" in r:
                rec += f" / {r['compiled_recompiles']} ({r.get('compiled_warmup_compiles', 0)})"
            rows.append(combo + [r["method"], r["selection"], f"{r['kept'] * 100:.2f}", mass,
                                 fmt_num(r.get("graph_ms"), 4), *cells, fmt_num(at, 4),
                                 f"{100 * sm / at:.0f}%" if sm and at else "—", fmt_num(r.get("rel_err"), 4), diff,
                                 comp, rec])
    L.append(md_table(["BS", "context", "B", "method", "selection", "kept %", "mass read med/min",
                       "eager step, graph ms", "compiled step, graph ms", "x SDPA eager / compiled",
                       "eager step, no graph ms", "compiled step, no graph ms", "s+m eager ms", "s+m compiled ms",
                       "attn ms", "s+m / attn", "rel err", "c-vs-e diff", "compile s", "recompiles"], rows))
    L.append("")
    L.append("## Index memory and data\n")
    rows = []
    for c in results:
        if c.get("skipped"):
            continue
        d = c["data"]
        rows.append([c["bs"], fmt_size(c["N"]), c["B"], f"{c['index_frac'] * 100:.2f}%",
                     f"{c['index_bytes'] / 2**20:.1f}", f"{c['kv_bytes'] / 2**20:.0f}", f"{c['build_ms_per_row']:.0f}",
                     fmt_num(c.get("bounds_ms"), 4),
                     (f"{c['sketch_scan_ms']:.4f} ({c['sketch_bytes'] / c['sketch_scan_ms'] / 1e9:.2f} TB/s)"
                      if "sketch_scan_ms" in c else "—"),
                     f"{d['keys_for_0.9'] * 100:.2f}% / {d['keys_for_0.99'] * 100:.2f}%", f"{d['sink_mass']:.3f}",
                     f"{d['window_mass']:.3f}",
                     f"{d['keys_certified_0.01'] * 100:.1f}% / {d['keys_certified_0.001'] * 100:.1f}%"])
    L.append(md_table(["BS", "context", "B", "index / KV", "index MiB", "KV MiB", "build ms/row",
                       "leaf bounds alone ms (graph)", "sketch scan alone ms (graph)", "keys for 90% / 99% mass", "sink mass", "window mass",
                       "keys ≥ m−ln(N/ε), ε=1e-2 / 1e-3"], rows))
    L.append("")
    prof = [c for c in results if c.get("profile")]
    for c in prof:
        L.append(f"## Profile: BS={c['bs']} context {fmt_size(c['N'])} B={c['B']}, {c['profile']['selection']}, "
                 "graph replay ('step' and 'search_mask' eager, 'compiled_*' compiled)\n")
        for label in ("step", "search_mask", "compiled_step", "compiled_search_mask"):
            if label not in c["profile"]:
                continue
            p = c["profile"][label]
            L.append(f"**{label}**: {p['kernels_per_step']:.0f} kernels per replay, "
                     f"{p['kernel_us_per_step']:.1f} µs of summed kernel time per replay.\n")
            L.append(md_table(["µs / step", "calls / step", "kernel"],
                              [[f"{us:.2f}", f"{calls:.1f}", f"`{k}`"] for k, calls, us in p["top"][:20]]))
            L.append("")
        L.append("Eager step (5 calls), torch.profiler key_averages by CPU time:\n")
        L.append("```")
        L.append(c["profile"]["eager_table"])
        L.append("```\n")
    L.append("## Goals\n")
    L.extend(goal_lines(results))
    return "\n".join(L) + "\n"


def goal_lines(results: list) -> list[str]:
    """The search issue's goals: the step at 1% ≥ 5× SDPA at 128K, ≥ 12× at 512K, ≥ 15× at 128K batch 8; search +
    mask ≤ 15 µs at 128K batch 1 and ≤ 30% of the attention at 5%; the sketch scan ≥ 2.5 TB/s."""
    out = []
    for c in results:
        if c.get("skipped"):
            continue
        sd = c["sdpa_ms"]
        target = {(131072, 1): 5.0, (524288, 1): 12.0, (131072, 8): 15.0}.get((c["N"], c["B"]))
        for r in c["rows"]:
            if not r.get("selection", "").startswith(("topk 1% ", "topk 5% ")) or "error" in r:
                continue
            ms = r.get("graph_ms", r["eager_ms"])
            parts = [f"eager step {ms:.4f} ms = {sd / ms:.2f}×"]
            cms = r.get("compiled_graph_ms", r.get("compiled_ms"))
            best = ms
            if cms:
                bad = "" if r["compiled_maxdiff"] <= 0.05 else " (output WRONG)"
                parts.append(f"compiled step {cms:.4f} ms = {sd / cms:.2f}×{bad}")
                best = min(ms, cms) if not bad else ms
            one = r["selection"].startswith("topk 1% ")
            goal = (f" (goal ≥ {target:g}×: {'PASS' if sd / best >= target else 'FAIL'})"
                    if target and one else "")
            sm = r.get("compiled_search_mask_ms", r["search_mask_ms"])
            which = "compiled" if "compiled_search_mask_ms" in r else "eager"
            sm_goal = f"≤ 30% of attention: {'PASS' if sm <= 0.3 * r['attn_ms'] else 'FAIL'}"
            if one and c["N"] == 131072 and c["B"] == 1:
                sm_goal = f"≤ 15 µs: {'PASS' if sm <= 0.015 else 'FAIL'}"
            out.append(f"- BS={c['bs']} {fmt_size(c['N'])} B={c['B']}: {r['method']} {r['selection']} "
                       f"(kept {r['kept'] * 100:.1f}%) vs SDPA {sd:.4f} ms: " + ", ".join(parts) + goal
                       + f"; search+mask ({which}) {sm:.4f} ms = {100 * sm / r['attn_ms']:.0f}% of attention "
                       f"{r['attn_ms']:.4f} ms (goal {sm_goal})")
        if "sketch_scan_ms" in c:
            tbs = c["sketch_bytes"] / c["sketch_scan_ms"] / 1e9
            out.append(f"- BS={c['bs']} {fmt_size(c['N'])} B={c['B']}: sketch scan {c['sketch_scan_ms']:.4f} ms, "
                       f"{tbs:.2f} TB/s (goal ≥ 2.5 TB/s: {'PASS' if tbs >= 2.5 else 'FAIL'})")
    return out


# --------------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="32K,128K,512K,1M", help="comma list, e.g. 32K,128K,512K,1M")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--block-size", default="128", help="KV block size(s), comma list (e.g. 128,64)")
    ap.add_argument("--fractions", default="0.01,0.02,0.05,0.10,0.20", help="forced kept fractions (topk)")
    ap.add_argument("--modes", default="topp0.9,topp0.99,certified1e-2,certified1e-3,fixed")
    ap.add_argument("--quick", action="store_true", help="small sizes for a CPU smoke run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-graph", action="store_true", help="do not capture CUDA graphs")
    ap.add_argument("--rep-ms", type=float, default=None, help="time per measurement (ms)")
    ap.add_argument("--profile-context", default="128K", help="profile the Hira step at this context (B=1); 0: off")
    ap.add_argument("--combos", default=None,
                    help="explicit ordered list BS:context:batch,... (overrides the three above); default on CUDA "
                         f"without --quick/--contexts/--batches/--block-size: {DEFAULT_GPU_COMBOS}")
    ap.add_argument("--compiled", default=None,
                    help="selections that also get the compiled step and compiled search+mask, comma list of label "
                         "prefixes ('topk 5%%', 'topp0.99', 'certified1e-3', 'fixed'), 'all' or 'none'; "
                         "default 'topk 1%%,topk 5%%' ('topk 5%%' with --quick): one inductor compile each")
    ap.add_argument("--compiled-combos", type=int, default=None,
                    help="only the first N combos run get the compiled variants (-1: all; default all, 1 with --quick: "
                         "a CPU inductor compile of the step takes 20-35 s)")
    ap.add_argument("--profile-block-size", type=int, default=128)
    ap.add_argument("--profile-selection", default="topk 5%",
                    help="the profiled step's selection, a label prefix as for --compiled ('topk 1%%', "
                         "'certified1e-2'); its compiled step too where --compiled names it")
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds; skip remaining combos past it (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="markdown file for the full table (a .json beside it)")
    ap.add_argument("--clustering", default="pca", choices=("pca", "kmeans", "none"))
    ap.add_argument("--key-sketch", action="store_true", help="indexes keep the int4 key sketch (batch 1 combos only)")
    ap.add_argument("--query-scale", type=float, default=1.0,
                    help="multiply the queries: > 1 sharpens the attention, so that fewer blocks are truly needed "
                         "(the regime of the certified mode's goal: ≤ 5%% of blocks)")
    ap.add_argument("--tensor-search", action="store_true",
                    help="also run each fixed/topk/topp selection with the search's compiled tensor program instead "
                         "of its Triton kernels (rows labelled [tensor search])")
    ap.add_argument("--flex-options", default="",
                    help="flex_attention kernel options for Hira's decode calls, e.g. 'num_stages=3,num_warps=4' "
                         "(integers), or 'inductor' for inductor's choice; default Hira's own "
                         "(hira.flex.attention.kernel_options); the dense flex baseline keeps inductor's")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    given = " ".join(argv if argv is not None else sys.argv)
    if args.combos is None:
        grid = any(f"--{o}" in given for o in ("contexts", "batches", "block-size"))
        args.combos = DEFAULT_GPU_COMBOS if device.type == "cuda" and not args.quick and not grid else ""
    if args.compiled is None:
        args.compiled = "topk 5%" if args.quick else "topk 1%,topk 5%"
    args.compiled = [c.strip() for c in args.compiled.split(",") if c.strip() and c.strip() != "none"]
    if args.compiled_combos is None:
        args.compiled_combos = 1 if args.quick else -1
    args.combos_run = 0
    if args.quick:
        if "--contexts" not in given:
            args.contexts = "2K,4K"
        if "--batches" not in given:
            args.batches = "1,2"
        if "--profile-context" not in given:
            args.profile_context = "0"
    args.contexts = [parse_size(s) for s in args.contexts.split(",") if s]
    args.batches = [int(s) for s in args.batches.split(",") if s]
    args.block_sizes = [int(s) for s in str(args.block_size).split(",") if s]
    args.fractions = [float(s) for s in args.fractions.split(",") if s]
    args.modes = [s for s in args.modes.split(",") if s]
    args.profile_context = parse_size(args.profile_context) if args.profile_context not in ("0", "") else 0
    if args.rep_ms is None:
        args.rep_ms = 60.0 if device.type == "cuda" else (20.0 if args.quick else 200.0)
    if device.type != "cuda":
        args.no_graph = True
    if args.flex_options:
        # Hira's decode calls take their kernel options from hira.flex.attention.kernel_options at each call.
        import hira.flex.attention as flex_module

        options = None if args.flex_options == "inductor" else {
            k.strip(): int(v) for k, v in (kv.split("=") for kv in args.flex_options.split(","))}
        flex_module.kernel_options = lambda q_rows, uneven=False: options

    # Many (shape, mask_mod) graphs live on flex_attention's one code object in this process: raise the limit
    # (a model uses one shape per layer), and fail loudly rather than fall back to eager past it.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    torch._dynamo.config.fail_on_recompile_limit_hit = True

    meta = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "shapes": f"Hq={HQ}, Hkv={HKV}, D={D}, bf16, query length 1, sinks={SINKS}, window={WINDOW}, "
                  f"clustering={args.clustering}, key_sketch={args.key_sketch}, branching=8, "
                  f"query scale {args.query_scale:g}",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "flex decode kernel options": args.flex_options or "Hira's",
        "compiled variants for": (", ".join(args.compiled) or "none")
        + ("" if args.compiled_combos < 0 else f" (first {args.compiled_combos} combo(s) only)"),
    }
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    log(json.dumps(meta))
    results = []
    t0 = time.perf_counter()
    graphs0 = unique_graphs()
    if args.combos:
        combos = []
        for item in args.combos.split(","):
            bs, n, b = item.split(":")
            combos.append((int(bs), parse_size(n), int(b)))
    else:  # batch outer: every batch-1 result first
        combos = [(bs, N, B) for B in args.batches for N in args.contexts for bs in args.block_sizes]
    for bs, N, B in combos:
        if args.time_budget and time.perf_counter() - t0 > args.time_budget:
            log(f"BS={bs} N={fmt_size(N)} B={B}: skip (time budget)")
            results.append(dict(bs=bs, N=N, B=B, skipped="time budget"))
            continue
        if N % bs:
            log(f"context {N} is not a multiple of the block size {bs}: skipped")
            continue
        args.combos_run += 1
        try:
            run_combo(args, device, bs, N, B, results, log)
        except torch.OutOfMemoryError as e:
            log(f"BS={bs} N={fmt_size(N)} B={B}: skip (memory): {str(e)[:200]}")
            results.append(dict(bs=bs, N=N, B=B, skipped="memory"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.out:
            _write(args.out, results, meta)
    meta["graphs compiled in the process"] = unique_graphs() - graphs0
    meta["wall seconds"] = f"{time.perf_counter() - t0:.0f}"
    md = markdown(results, meta)
    print(md)
    if args.out:
        _write(args.out, results, meta)
        with open(os.path.splitext(args.out)[0] + ".log", "w") as fh:
            fh.write("\n".join(log_lines) + "\n")


def _write(path, results, meta):
    write_report(path, markdown(results, meta), dict(meta=meta, results=results))


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001
        return "not installed"


if __name__ == "__main__":
    main()
