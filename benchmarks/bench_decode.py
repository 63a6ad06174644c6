#!/usr/bin/env python3
"""End-to-end decode tokens/s of a Llama-3-8B-shaped model: Hira vs transformers' sdpa and flex_attention.

The model has Llama-3-8B's shapes (hidden 4096, 32 query heads, 8 KV heads, head dim 128, intermediate 14336,
vocab 128256, rope theta 500000) but only ``--layers`` of its 32 decoder layers (default 4: at 128K tokens and batch 8
one layer's KV cache is 4.3 GB, and 32 layers would need 137 GB), with random bf16 weights (normal, std 0.02, drawn
directly in bf16 on the device). Every variant decodes the same random prompt from the same KV cache:

  - ``sdpa``: transformers' sdpa attention with a StaticCache, as shipped. Under torch.compile a decode step with a
    static cache carries an attention mask, so transformers materialises G = 4 copies of K and V (``repeat_kv``, one
    per query head of a group) in every layer and step before SDPA reads them.
  - ``sdpa-gqa``: the same, except that at query length 1 the G query heads of a group are folded into the query axis
    (what transformers does itself outside torch.compile, ``pack_gqa``): SDPA reads K and V once. A benchmark-local
    attention function registered in transformers' AttentionInterface.
  - ``flex``: transformers' flex_attention with a StaticCache (a causal BlockMask made in every step).
  - ``hira``: ``hira.convert`` + ``HiraCache`` with ``TopK(k)``, k = each ``--hira-fractions`` of the
    prompt's blocks (random weights give unstructured keys, so a fixed budget), sinks and window as HiraConfig's
    defaults.

Prefill. A 128K-token prompt at batch 8 does not fit in activation memory at once, and Hira's chunked prefill
materialises a [B, Hq, S, C] bool mask per chunk and re-clusters the whole layer after each chunk, so the cache is
filled the way a one-shot prefill fills it, row by row: the unconverted model (sdpa, exact causal attention) prefills each batch row alone and
its keys and values are kept. The static caches are filled with them. For Hira each layer's index is built from them
with ``hira.api.build_index_unchecked`` and the layer's capacity, the call ``HiraLayer`` makes after its own (equally
exact SDPA) prefill, so every variant decodes from the same context. The build is timed per layer (CUDA events) and
compared with that layer's prefill time (attention + MLP, timed by hooks on the decoder layer, summed over the rows).

Decode step. One step = ``model(input_ids, position_ids, past_key_values, logits_to_keep=1)``, greedy argmax of the
logits fed back as the next input, positions advanced in place: no host sync. The step is compiled with
``torch.compile(step, dynamic=False)`` (inductor; ``aot_eager`` with ``--smoke``), warmed up, then captured once in a ``torch.cuda.CUDAGraph`` and replayed
(``--no-graph``: timed as compiled calls). The same for every variant. Timing: CUDA events around ``--steps`` replays;
tokens/s = batch · steps / time. Compiles are counted with dynamo's counters: graphs made by the first call, and
graphs made by any later call (per-step recompiles; the replays run no Python and cannot recompile).

Why an explicit graph. This benchmark predates the compileable HiraCache: it compiles and captures the decode step
itself, the same way for every variant (the token count is held at the prompt length during warm-up and capture),
and isolates attention from generate's own per-step work. ``bench_generate.py`` times the user's ``generate``.

The model has L of 32 layers: tokens/s ratios hold per layer plus the embedding and lm_head. The table also gives an
estimate for all 32 layers, head + 32 · (step − head) / L, where head = embedding + final norm + lm_head + argmax
timed alone (eager, graph-replayed) at the same batch.

GPU run (one H100, ~6 min with cold compile caches; a run that would start after --time-budget seconds is skipped
and listed as such):

    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
    python3 benchmarks/bench_decode.py --out $OUT/decode.md

(defaults: --layers 4 --contexts 131072 32768 --batches 1 8 --variants sdpa hira flex sdpa-gqa
--hira-fractions 0.05 0.01 --steps 100 --time-budget 360).

CPU smoke run (2 layers, hidden 256, context 2048, batch 1 and 2, every variant; ~2 min):

    python3 benchmarks/bench_decode.py --smoke --out /tmp/decode_smoke.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import transformers
from transformers import DynamicCache, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hira  # noqa: E402
from hira.api import build_index_unchecked  # noqa: E402
from harness import (  # noqa: E402
    DTYPE, FULL_LAYERS, LLAMA3_8B, SMOKE_MODEL, Clock, capture_graph, cell, device_name, fmt_num, fmt_size, make_model,
    md_table, parse_size, unique_graphs, write_report,
)

VARIANTS = ("sdpa", "sdpa-gqa", "flex", "hira")
ATTN_IMPL = {"sdpa": "sdpa", "sdpa-gqa": "sdpa_gqa", "flex": "flex_attention", "hira": "sdpa"}
GRAPH_WARMUP = 2  # replays before the timed ones
SLOT_ALIGN = 128  # decode slots are reserved in whole blocks of this many tokens


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------


def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' ``sdpa_attention_forward``, except that at query length 1 the G query heads of a KV group are
    folded into the query axis (q [B, Hkv, G, D]), so SDPA reads K and V once instead of G repeated copies. The
    decode mask [B, 1, 1, N] is the same for every head and query row, so it broadcasts unchanged."""
    B, Hq, S, D = query.shape
    Hkv = key.shape[1]
    if S != 1 or Hq == Hkv:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    rows = query.reshape(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)  # [B, Hkv, G, D]
    return out.reshape(B, Hq, 1, D).transpose(1, 2).contiguous(), None  # [B, 1, Hq, D]


def register_sdpa_gqa() -> None:
    AttentionInterface.register("sdpa_gqa", sdpa_gqa_attention)
    AttentionMaskInterface.register("sdpa_gqa", sdpa_mask)


# --------------------------------------------------------------------------------------------------------------
# Prefill and cache filling
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def prefill(model, ids: torch.Tensor, clock: Clock) -> tuple[list, list, list]:
    """Prefill every row of ``ids`` [B, N] alone through the unconverted model (exact causal SDPA).

    Returns:
        keys, values: per layer [B, Hkv, N, D] post-RoPE, as a cache holds them;
        ms: per layer, the list of the rows' prefill times of that decoder layer (attention + MLP + norms).
    """
    model.set_attn_implementation("sdpa")
    layers = model.model.layers
    B, N = ids.shape
    cfg = model.config
    shape = (B, cfg.num_key_value_heads, N, cfg.head_dim)
    keys = [torch.empty(shape, dtype=DTYPE, device=ids.device) for _ in layers]
    values = [torch.empty(shape, dtype=DTYPE, device=ids.device) for _ in layers]
    ms = [[] for _ in layers]
    marks = {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: marks.__setitem__((i, 0), clock.mark())))
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: marks.__setitem__((i, 1), clock.mark())))
    try:
        for b in range(B):
            cache = DynamicCache(config=cfg)
            model.model(input_ids=ids[b : b + 1], **{hira.CACHE_ARG: cache}, use_cache=True)
            for i in range(len(layers)):
                ms[i].append(clock.ms(marks[(i, 0)], marks[(i, 1)]))
                keys[i][b].copy_(cache.layers[i].keys[0])
                values[i][b].copy_(cache.layers[i].values[0])
            del cache
    finally:
        for h in hooks:
            h.remove()
    return keys, values, ms


def static_cache(model, keys, values, B: int, N: int, capacity: int) -> StaticCache:
    """A StaticCache of ``capacity`` slots holding the first B rows and N tokens of the prefilled keys/values."""
    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=capacity)
    cache.early_initialization(batch_size=B, num_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=DTYPE,
                               device=keys[0].device)
    for layer, k, v in zip(cache.layers, keys, values):
        layer.keys[:, :, :N].copy_(k[:B])
        layer.values[:, :, :N].copy_(v[:B])
        layer.cumulative_length.fill_(N)
    return cache


def hira_cache(model, keys, values, B: int, N: int, config: hira.HiraConfig, clock: Clock):
    """A HiraCache as a one-shot prefill of these rows leaves it: each layer's index built from its keys/values with
    the layer's capacity (what ``HiraLayer`` does after its SDPA prefill). Returns the cache and the build ms per
    layer."""
    cache = hira.HiraCache(model.config, config)
    build_ms = []
    for layer, k, v in zip(cache.layers, keys, values):
        t0 = clock.mark()
        index = build_index_unchecked(k[:B], v[:B], None, config, layer.capacity)
        build_ms.append(clock.ms(t0, clock.mark()))
        layer._install(index, B, model.config.num_attention_heads)
        layer.length.fill_(N)
    return cache, build_ms


# --------------------------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def time_decode(args, model, cache, B: int, N: int, hold, clock: Clock, device: torch.device) -> dict:
    """Compile the decode step, warm it up, capture it in a CUDA graph and time ``args.steps`` replays.

    hold: called before every Python call of the compiled step (Hira: keeps ``HiraLayer.length`` at N).
    """
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(model.config.vocab_size, (B, 1), generator=gen).to(device)
    pos = torch.full((B, 1), N, dtype=torch.long, device=device)

    def step():
        logits = model(input_ids=ids, position_ids=pos, **{hira.CACHE_ARG: cache}, use_cache=True, logits_to_keep=1).logits
        ids.copy_(logits[:, -1:].argmax(-1))
        pos.add_(1)
        return logits

    compiled = torch.compile(step, dynamic=False, backend=args.backend)
    row = {}
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream() if cuda else None
    if cuda:  # warm up on a side stream, as CUDA graph capture wants, after the cache writes of the default stream
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
        g0 = unique_graphs()
        t0 = time.perf_counter()
        hold()
        logits = compiled()
        clock.sync()
        row["compile_s"] = time.perf_counter() - t0
        row["graphs"] = unique_graphs() - g0
        g1 = unique_graphs()
        for _ in range(args.warmup - 1):
            hold()
            logits = compiled()
        clock.sync()
    if cuda:
        torch.cuda.current_stream().wait_stream(stream)
    row["recompiles"] = unique_graphs() - g1
    row["finite"] = bool(torch.isfinite(logits.float()).all())

    graph = None
    if cuda and not args.no_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            hold()
            g2 = unique_graphs()
            with torch.cuda.graph(graph):
                compiled()
            row["recompiles"] += unique_graphs() - g2
            for _ in range(GRAPH_WARMUP):
                graph.replay()
            torch.cuda.synchronize()
            row["graph"] = "yes"
        except Exception as e:  # noqa: BLE001 - measured without a graph instead, and the reason is printed
            graph = None
            row["graph"] = f"no: {type(e).__name__}: {cell(str(e), 120)}"
            torch.cuda.synchronize()
    else:
        row["graph"] = "no (--no-graph)" if cuda else "no (CPU)"

    g3 = unique_graphs()
    t0 = clock.mark()
    for _ in range(args.steps):
        if graph is not None:
            graph.replay()
        else:
            hold()
            compiled()
    ms = clock.ms(t0, clock.mark()) / args.steps
    row["recompiles"] += unique_graphs() - g3
    row["ms"] = ms
    row["tok_s"] = B * 1e3 / ms
    del graph
    return row


@torch.no_grad()
def head_ms(model, B: int, clock: Clock, device: torch.device, use_graph: bool, reps: int) -> float:
    """Time of what a decode step does outside the decoder layers: embedding, final norm, lm_head, argmax."""
    ids = torch.zeros(B, 1, dtype=torch.long, device=device)
    h = torch.randn(B, 1, model.config.hidden_size, dtype=DTYPE, device=device)

    def head():
        x = model.model.embed_tokens(ids)
        return model.lm_head(model.model.norm(h + x)).argmax(-1)

    head()
    fn = head
    graph = None
    if use_graph:
        graph, _ = capture_graph(head, warm=1)
        fn = graph.replay
    clock.sync()
    t0 = clock.mark()
    for _ in range(reps):
        fn()
    out = clock.ms(t0, clock.mark()) / reps
    del graph
    return out


def release(device: torch.device) -> None:
    """Drop every compiled graph (each run compiles a step closure over its own cache) and free the memory."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_variant(args, model, name, keys, values, B, N, capacity, clock, device, builds) -> dict:
    """One (variant, context, batch): make the cache, time the decode, collect the kept fraction for Hira."""
    variant, fraction = name
    label = variant if fraction is None else f"hira topk {fraction * 100:g}%"
    row = dict(variant=label, base=variant, N=N, B=B)
    cache = None
    try:
        if variant == "hira":
            nb = N // args.block_size
            k = max(1, round(fraction * nb))
            row["variant"] = f"{label} (k={k} of {nb})"
            config = hira.HiraConfig(block_size=args.block_size, threshold=hira.TopK(k),
                                     max_cache_len=capacity)
            model.set_attn_implementation(ATTN_IMPL[variant])
            hira.convert(model, config)
            cache, build = hira_cache(model, keys, values, B, N, config, clock)
            builds.append(build)

            def hold():
                for layer in cache.layers:
                    layer.length.fill_(N)
        else:
            model.set_attn_implementation(ATTN_IMPL[variant])
            cache = static_cache(model, keys, values, B, N, capacity)

            def hold():
                return None

        row.update(time_decode(args, model, cache, B, N, hold, clock, device))
        if variant == "hira":
            stats = [s for s in cache.stats() if s is not None]
            row["kept"] = sum(s["kept_fraction"] for s in stats) / len(stats)
            row["read"] = sum(s["read_fraction"] for s in stats) / len(stats)
    except Exception as e:  # noqa: BLE001 - one failed variant must not hide the others' numbers
        row["error"] = f"{type(e).__name__}: {cell(str(e), 300)}"
        if args.verbose:
            traceback.print_exc()
    finally:
        if variant == "hira":
            hira.revert(model)
        cache = None  # freed before release(): rebound, not deleted, as hold() reads the name
        release(device)
    return row


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def markdown(rows: list, builds: list, meta: dict, layers: int) -> str:
    L = ["# Hira end-to-end decode benchmark\n"]
    for k, v in meta.items():
        L.append(f"- {k}: {v}")
    L.append("")
    L.append(f"tokens/s = batch · steps / time of the steps; ms/token = time of one decode step (one new token per "
             f"sequence). × sdpa = sdpa's ms / the variant's ms in the same (context, batch); × best dense = the same "
             f"against the fastest of sdpa, sdpa-gqa and flex. kept = blocks read / non-empty blocks (Hira, mean over "
             f"layers, batch and KV heads, last step; sinks, window and the decode block included), read = keys in "
             f"those blocks / all keys. graphs = dynamo graphs the first call compiled; recompiles = graphs compiled "
             f"by any later call (warm-up, capture, timed steps). 32 layers (est.) = head + 32 · (step − head) / "
             f"{layers}, head = embedding + norm + lm_head + argmax timed alone.\n")
    table = []
    for r in rows:
        head = [r["variant"], fmt_size(r["N"]), r["B"]]
        if "error" in r or "skipped" in r:
            table.append(head + [r.get("skipped") or "FAILED: " + r["error"]])
            continue
        same = [o for o in rows if o["N"] == r["N"] and o["B"] == r["B"] and "ms" in o]
        sdpa = next((o["ms"] for o in same if o["base"] == "sdpa"), None)
        dense = [o["ms"] for o in same if o["base"] != "hira"]
        best = min(dense) if dense else None
        est, sdpa_est = r.get("ms32"), next((o.get("ms32") for o in same if o["base"] == "sdpa"), None)
        kept = f"{r['kept']:.4f}" if "kept" in r else "1 (dense)"
        read = f"{r['read']:.4f}" if "read" in r else "1"
        table.append(head + [f"{r['tok_s']:.1f}", f"{r['ms']:.3f}", fmt_num(sdpa / r["ms"] if sdpa else None),
                             fmt_num(best / r["ms"] if best else None), kept, read, r["graphs"], r["recompiles"],
                             r["graph"], f"{r['compile_s']:.1f}", fmt_num(est, 3),
                             fmt_num(sdpa_est / est if sdpa_est and est else None)]
                     + ([] if r["finite"] else ["(non-finite logits)"]))
    L.append(md_table(["variant", "context", "batch", "tokens/s", "ms/token", "× sdpa", "× best dense", "kept",
                       "read", "graphs", "recompiles", "CUDA graph", "compile s", "32 layers (est.): ms/token",
                       "32 layers (est.): × sdpa"], table))
    heads = {r["B"]: r["head_ms"] for r in rows if "head_ms" in r}
    if heads:
        L.append("")
        L.append("Head alone (embedding + norm + lm_head + argmax): "
                 + ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in sorted(heads.items())) + ".")
    L.append("")
    L.append("## Index build after prefill, per layer\n")
    L.append("Prefill = that decoder layer's forward over the prompt (attention + MLP + norms, exact causal SDPA), "
             "one batch row at a time, summed over the rows. Build = ``build_index_unchecked`` over the layer's "
             "keys and values for the whole batch (cluster, permute, bounds), the minimum over the Hira runs of the "
             "case.\n")
    L.append(md_table(["context", "batch", "layer", "prefill ms", "index build ms", "build / prefill"],
                      [[fmt_size(b["N"]), b["B"], i, f"{p:.1f}", f"{m:.1f}", f"{100 * m / p:.1f}%"]
                       for b in builds for i, (p, m) in enumerate(zip(b["prefill_ms"], b["build_ms"]))]))
    L.append("")
    return "\n".join(L) + "\n"


def write(path: str, rows: list, builds: list, meta: dict, layers: int) -> None:
    write_report(path, markdown(rows, builds, meta, layers), dict(meta=meta, rows=rows, builds=builds))


# --------------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; 2 with --smoke)")
    ap.add_argument("--contexts", nargs="+", default=None, help="prompt lengths, e.g. 131072 32K (default 131072 "
                    "32768; 2048 with --smoke); run in this order")
    ap.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 8 (1 2 with --smoke)")
    ap.add_argument("--variants", nargs="+", default=["sdpa", "hira", "flex", "sdpa-gqa"], choices=VARIANTS,
                    help="run in this order within each (context, batch)")
    ap.add_argument("--hira-fractions", nargs="+", type=float, default=[0.05, 0.01],
                    help="Hira's topk budget as a fraction of the prompt's blocks, one run each")
    ap.add_argument("--block-size", type=int, default=128, help="Hira's KV block size")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 100; 4 with --smoke)")
    ap.add_argument("--warmup", type=int, default=3, help="compiled calls before capture (the first compiles)")
    ap.add_argument("--backend", default=None,
                    help="torch.compile backend (default inductor; aot_eager with --smoke: dynamo traces the same "
                         "step, with no C++ compile on the CPU)")
    ap.add_argument("--no-graph", action="store_true", help="time compiled calls instead of CUDA graph replays")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds since start after which no new run starts (default 360 on CUDA; 0: none)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, to check the code paths")
    ap.add_argument("--device", default=None, help="default cuda if available (cpu with --smoke)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="markdown file for the tables (a .json beside it)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failed runs")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    shape = SMOKE_MODEL if args.smoke else LLAMA3_8B
    args.layers = args.layers or (2 if args.smoke else 4)
    contexts = [parse_size(c) for c in (args.contexts or (["2048"] if args.smoke else ["131072", "32768"]))]
    batches = args.batches or ([1, 2] if args.smoke else [1, 8])
    args.steps = args.steps or (4 if args.smoke else 100)
    args.backend = args.backend or ("aot_eager" if args.smoke else "inductor")
    if args.time_budget is None:
        args.time_budget = 360.0 if device.type == "cuda" else 0.0
    for n in contexts:
        if n % args.block_size:
            ap.error(f"context {n} is not a multiple of --block-size {args.block_size}")
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first call compiles)")
    # Decode slots every variant reserves past the prompt: warm-up calls, graph warm-up and timed replays.
    extra = -(-(args.warmup + GRAPH_WARMUP + args.steps + 1) // SLOT_ALIGN) * SLOT_ALIGN

    torch._dynamo.config.fail_on_recompile_limit_hit = True  # never fall back to eager silently
    register_sdpa_gqa()
    clock = Clock(device)
    names = [(v, f) for v in args.variants for f in (args.hira_fractions if v == "hira" else [None])]
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "torch / transformers": f"{torch.__version__} / {transformers.__version__}",
        "model": (f"{'tiny smoke model' if args.smoke else 'Llama-3-8B shapes'}: {args.layers} of "
                  f"{FULL_LAYERS} layers (hidden {shape['hidden_size']}, heads {shape['num_attention_heads']}/"
                  f"{shape['num_key_value_heads']}, head dim {shape['head_dim']}, intermediate "
                  f"{shape['intermediate_size']}, vocab {shape['vocab_size']}); random bf16 weights, std 0.02. "
                  f"tokens/s ratios hold per layer plus the embedding and lm_head"),
        "Hira": (f"topk budgets {', '.join(f'{f * 100:g}%' for f in args.hira_fractions)} of the prompt's blocks, "
                 f"block {args.block_size}, sinks {hira.HiraConfig.sink_tokens}, window "
                 f"{hira.HiraConfig.window_tokens} (defaults); HiraLayer.seen held at the prompt length during "
                 f"warm-up and capture"),
        "decode": (f"torch.compile(step, dynamic=False, backend={args.backend!r}), {args.warmup} warm-up calls, "
                   f"{'CUDA graph replays' if device.type == 'cuda' and not args.no_graph else 'compiled calls'}, "
                   f"{args.steps} timed steps, greedy argmax fed back; caches hold {extra} slots past the prompt"),
        "command": " ".join([os.path.basename(sys.executable)] + (argv if argv is not None else sys.argv)),
    }
    print(json.dumps(meta), flush=True)

    model = make_model(shape, args.layers, max(contexts) + extra, device, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rows, builds = [], []
    for N in contexts:
        ids = torch.randint(shape["vocab_size"], (max(batches), N), generator=gen).to(device)
        t0 = time.perf_counter()
        keys, values, prefill_ms = prefill(model, ids, clock)
        print(f"context {fmt_size(N)}: prefilled {max(batches)} row(s) in {time.perf_counter() - t0:.1f} s",
              flush=True)
        del ids
        for B in batches:
            heads = head_ms(model, B, clock, device, device.type == "cuda", reps=20)
            case_builds = []
            for name in names:
                if args.time_budget and time.perf_counter() - start > args.time_budget:
                    rows.append(dict(variant=name[0] if name[1] is None else f"hira topk {name[1] * 100:g}%",
                                     base=name[0], N=N, B=B, skipped="skipped (time budget)"))
                    continue
                row = run_variant(args, model, name, keys, values, B, N, N + extra, clock, device, case_builds)
                if "ms" in row:
                    row["head_ms"] = heads
                    row["ms32"] = heads + FULL_LAYERS * (row["ms"] - heads) / args.layers
                rows.append(row)
                msg = (f"{row['variant']:28s} {fmt_size(N):>5s} B={B}: " + (
                    f"{row['tok_s']:9.1f} tok/s  {row['ms']:.3f} ms/step  graphs {row['graphs']}  recompiles "
                    f"{row['recompiles']}  compile {row['compile_s']:.1f} s  graph {row['graph']}"
                    + (f"  kept {row['kept']:.4f}  read {row['read']:.4f}" if "kept" in row else "")
                    if "ms" in row else f"FAILED: {row['error']}"))
                print(msg, flush=True)
                if args.out:
                    write(args.out, rows, builds, meta, args.layers)
            if case_builds:
                builds.append(dict(N=N, B=B, build_ms=[min(b[i] for b in case_builds) for i in range(args.layers)],
                                   prefill_ms=[sum(ms[:B]) for ms in prefill_ms]))
        del keys, values
        release(device)
    meta["wall seconds"] = f"{time.perf_counter() - start:.0f}"
    md = markdown(rows, builds, meta, args.layers)
    print(md)
    if args.out:
        write(args.out, rows, builds, meta, args.layers)


if __name__ == "__main__":
    main()
