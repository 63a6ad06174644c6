#!/usr/bin/env python3
"""Tokens/s of exactly the user's call, ``model.generate``, on a Llama-3-8B-shaped model: Hira against dense.

Every variant runs the same random prompt through one ``model.generate(ids, max_new_tokens=W + T)`` call, the way a
user runs it, with nothing captured or compiled by this script:

  - ``dense-dynamic``: the unconverted model, transformers' default (dynamic) cache, eager.
  - ``dense-static``: the unconverted model with ``cache_implementation="static"``: transformers compiles the decode
    (``torch.compile``, mode ``reduce-overhead``, CUDA graphs) by itself.
  - ``hira``, ``hira-topk1``, ``hira-topk5``: ``hira.convert(model, config)`` with the default threshold, or top-k
    at 1% / 5% of the prompt's blocks. The HiraCache generate creates is compileable, so transformers compiles and
    graph-replays the decode the same way as for dense-static.
  - ``hira-offload``: top-k at 2% with ``HiraConfig(offload=Offload(blocks=2k + 8))``: each layer's K and V in
    pinned host memory after its prefill (chunk by chunk with ``--prefill-chunk``), a GPU block cache of twice the
    selection.
  - ``hira-dense``: the dense mode, what a layer below ``HiraConfig.min_context`` decodes with (every block, no
    search): against ``hira`` it gives the crossover, the context from which the search pays for itself.
  - ``dense-forward``, ``hira-forward``: the user compiles the model's forward themselves
    (``model.forward = torch.compile(model.forward, mode="reduce-overhead")``, transformers' own recipe; dense with a
    static cache) and calls ``generate(..., disable_compile=True)``: the prefill and the decode then both run
    compiled. ``hira-forward`` uses the default threshold.

``--check-eager`` also runs each variant's call again with ``disable_compile=True`` (no compile of the model) and
reports whether its new tokens equal the compiled call's (or the first that differs); ``dense-static`` against its
own eager call tells the model's compiled numerics apart from Hira's.

``--prefill-chunk C`` passes ``prefill_chunk_size=C`` to generate (a prompt too long for one forward at that batch).
``--gpu-memory-gb G`` caps the process's GPU memory at G GB (``torch.cuda.set_per_process_memory_fraction``): a
context that does not fit dense within G fails with an out-of-memory row, where ``hira-offload`` may fit.
``--isolate`` runs every (context, batch, variant) in a fresh process (a compiled variant run after others in the
same process was measured 3.3× slower: benchmarks/NOTES.md §11).

A streamer timestamps every token (after a device sync) and reads the allocated device memory: prefill = prompt to
first token; ``mem growth`` = allocated memory after the last step less after the warm-up (must be 0); the first W decode steps
are warm-up (compile, CUDA-graph recording) and the next T are timed: ms/token and tokens/s = B / (ms/token).
``warm-up`` is the time from the call to the end of the W-th step (prefill and compile included); ``first call``
the whole call. Dynamo's graph count is read before and after the timed steps (``recompiles`` in them must be 0).
The bandwidth floor of a dense decode step is (weight bytes + B · KV bytes) / the copy bandwidth measured in the
same run.

The model has Llama-3-8B's shapes (hidden 4096, 32/8 heads, head dim 128, intermediate 14336, vocab 128256) and
``--layers`` decoder layers (default all 32), random bf16 weights. Random weights give unstructured keys: the
default threshold reads most blocks there, so the fixed budgets (topk) show the speed of a sparse read.

GPU run (results as markdown and JSON; ``--plot`` turns the JSON into a PNG anywhere matplotlib is installed):

    python3 benchmarks/bench_generate.py --contexts 32768 131072 --batches 1 --out $OUT/generate.md
    python3 benchmarks/bench_generate.py --plot $OUT/generate.json

CPU smoke run (tiny model; compiles through transformers' ``compile_config`` on CPU): ``--smoke``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback

import torch
import torch._dynamo.utils as dynamo_utils
import transformers
from transformers.generation import CompileConfig
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hira  # noqa: E402
from harness import (  # noqa: E402
    LLAMA3_8B, SMOKE_MODEL, copy_bandwidth, device_name, fmt_num, make_model, md_table, unique_graphs, write_report,
)

VARIANTS = ("dense-dynamic", "dense-static", "hira", "hira-dense", "hira-topk1", "hira-topk5", "dense-forward",
            "hira-forward", "hira-offload")


class StepClock(BaseStreamer):
    """Timestamps every ``put`` of generate (the prompt, then one per new token) after a device sync, with dynamo's
    graph count at that moment; with a ``profiler``, profiles the decode steps from put ``first`` to put ``last``."""

    def __init__(self, device: torch.device, profiler=None, first: int = 0, last: int = 0):
        self.device, self.times, self.graphs, self.memory = device, [], [], []
        self.profiler, self.first, self.last = profiler, first, last

    def put(self, value):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        self.graphs.append(unique_graphs())
        self.memory.append(torch.cuda.memory_allocated(self.device) if cuda else 0)
        if self.profiler is not None and len(self.times) - 1 in (self.first, self.last):
            (self.profiler.start if len(self.times) - 1 == self.first else self.profiler.stop)()

    def end(self):
        pass


def hira_config(variant: str, N: int, new_tokens: int, block_size: int) -> hira.HiraConfig:
    capacity = N + new_tokens + 1
    if variant in ("hira", "hira-forward"):
        return hira.HiraConfig(max_cache_len=capacity)
    if variant == "hira-dense":
        return hira.HiraConfig(max_cache_len=capacity, threshold=hira.Dense())
    fraction = {"hira-topk1": 0.01, "hira-topk5": 0.05, "hira-offload": 0.02}[variant]
    k = max(1, round(fraction * N / block_size))
    if variant == "hira-offload":  # a cache of twice the selection, as bench_offload's
        return hira.HiraConfig(max_cache_len=capacity, threshold=hira.TopK(k), offload=hira.Offload(blocks=2 * k + 8))
    return hira.HiraConfig(max_cache_len=capacity, threshold=hira.TopK(k))


def run_variant(args, model, variant: str, ids: torch.Tensor, device: torch.device) -> dict:
    B, N = ids.shape
    new = args.warmup_steps + args.steps
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if args.smoke:  # transformers compiles on CUDA only unless told otherwise
        cc = CompileConfig()
        cc._compile_all_devices = True
        kw["compile_config"] = cc
    if variant in ("dense-static", "dense-forward"):
        kw["cache_implementation"] = "static"
    if args.prefill_chunk:
        kw["prefill_chunk_size"] = args.prefill_chunk
    config = None
    if variant.startswith("hira"):
        config = hira_config(variant, N, new, args.block_size)
        hira.convert(model, config)
    profiler = None
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        profiler = torch.profiler.profile(activities=activities)
    clock = StepClock(device, profiler, args.warmup_steps + 1, args.warmup_steps + 1 + args.profile)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    user_compiled = variant.endswith("-forward")
    if user_compiled:  # transformers' recipe for a model the user compiles: generate then compiles nothing itself
        model.forward = torch.compile(model.forward, mode="reduce-overhead")
        kw["disable_compile"] = True
    eager_tokens = None
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, streamer=clock, return_dict_in_generate=True, **kw)
        total = time.perf_counter() - t0
        if args.check_eager and not user_compiled:
            with torch.no_grad():
                eager_tokens = model.generate(ids, **dict(kw, disable_compile=True))[:, N:]
    finally:
        if user_compiled:
            del model.forward  # the instance attribute: back to the class's forward
        if config is not None:
            hira.revert(model)
    t, graphs = clock.times, clock.graphs  # t[0]: prompt put (before prefill); t[i]: i-th new token
    W, T = args.warmup_steps, args.steps
    ms = 1e3 * (t[W + T] - t[W + 1]) / (T - 1)  # decode steps W+2 .. W+T (the first token comes from prefill)
    row = dict(
        variant=variant, context=N, batch=B, threshold=str(config.threshold) if config else "dense",
        prefill_s=t[1] - t[0], warmup_s=t[W + 1] - t0, first_call_s=total, ms_per_token=ms,
        tok_s=1e3 * B / ms, graphs=graphs[-1], recompiles=graphs[-1] - graphs[W + 1],
        peak_gb=torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan"),
        cudagraph_skips=int(dynamo_utils.counters["inductor"]["cudagraph_skips"]),
        mem_growth_mb=(clock.memory[-1] - clock.memory[W + 1]) / 2**20,
    )
    if profiler is not None:
        row["profile"] = profile_table(profiler, args.profile, device)
    if eager_tokens is not None:
        same = (out.sequences[:, N:] == eager_tokens).all(0)  # [new]
        row["eager_equal"] = bool(same.all())
        row["first_difference"] = None if bool(same.all()) else int((~same).int().argmax())
    cache = getattr(out, hira.CACHE_ARG, None)
    if isinstance(cache, hira.HiraCache):
        summary = cache.summary()
        row.update(read_fraction=summary.get("read_fraction"), skip_bound=summary.get("skip_bound"),
                   hit_rate=summary.get("hit_rate"))
    del out, cache
    return row


def profile_table(profiler, steps: int, device: torch.device) -> str:
    """The profiled steps' kernels (CPU ops on the CPU) by total device time, per decode step, as text."""
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in profiler.key_averages() if getattr(e, attr) > 0]
    events.sort(key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events)
    lines = [f"{steps} decode steps; device time per step {total / steps / 1e3:.3f} ms",
             f"{'us/step':>9} {'share':>6} {'calls/step':>10}  name"]
    for e in events[:40]:
        t = getattr(e, attr)
        lines.append(f"{t / steps:9.1f} {t / total:6.1%} {e.count / steps:10.1f}  {e.key[:110]}")
    return "\n".join(lines)


def _eager(row: dict) -> str:
    """The ``--check-eager`` column: all new tokens equal, or the first that differs."""
    if "eager_equal" not in row:
        return "—"
    return "all" if row["eager_equal"] else f"differs at token {row['first_difference']}"


def markdown(rows: list, meta: dict) -> str:
    lines = [f"# bench_generate: {meta['device']}, {meta['date']}", "",
             f"`{meta['command']}`", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}; {meta['layers']} layers; "
             + (f"GPU memory capped at {meta['gpu_memory_gb']} GB; " if meta.get("gpu_memory_gb") else "") +
             f"{meta['warmup_steps']} warm-up + {meta['steps']} timed decode steps per call; copy bandwidth "
             f"{fmt_num(meta['bandwidth_tbs'])} TB/s.", ""]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["context"], r["batch"], r["variant"], f"error: {r['error']}"])
            continue
        best = max((x["tok_s"] for x in rows if "error" not in x and x["context"] == r["context"]
                    and x["batch"] == r["batch"] and x["variant"].startswith("dense")), default=None)
        table.append([r["context"], r["batch"], r["variant"], fmt_num(r["tok_s"], 1), fmt_num(r["ms_per_token"]),
                      f"{fmt_num(r['tok_s'] / best if best else None)}×", fmt_num(r["floor_ms"]),
                      fmt_num(r.get("read_fraction")), fmt_num(r.get("hit_rate")), fmt_num(r["prefill_s"]),
                      fmt_num(r["warmup_s"], 1), fmt_num(r["first_call_s"], 1), r["graphs"], r["recompiles"],
                      r["cudagraph_skips"],
                      fmt_num(r["peak_gb"], 1), fmt_num(r.get("mem_growth_mb"), 1), _eager(r)])
    lines.append(md_table(["context", "batch", "variant", "tok/s", "ms/token", "vs best dense", "floor ms (dense)",
                           "read", "hit rate", "prefill s", "warm-up s", "first call s", "graphs", "recompiles",
                           "cudagraph skips", "peak GB", "mem growth MB", "= eager"], table))
    return "\n".join(lines) + "\n"


def plot(json_path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(json_path))
    rows = [r for r in data["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({r["batch"] for r in rows}):
        for variant in VARIANTS:
            pts = sorted((r["context"], r["tok_s"]) for r in rows if r["variant"] == variant and r["batch"] == batch)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{variant}, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"model.generate, {data['meta']['layers']} layers, {data['meta']['device']}")
    ax.legend(fontsize=7)
    out = os.path.splitext(json_path)[0] + ".png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def isolated(args, argv: list) -> None:
    """Every (context, batch, variant) of ``args`` in its own process, each writing a JSON; one table of all rows."""
    import subprocess

    from tqdm import tqdm

    start = time.perf_counter()
    base = [a for a in argv if a != "--isolate"]
    stem = os.path.splitext(args.out)[0]
    rows, meta = [], None
    runs = [(N, B, v) for N in args.contexts for B in args.batches for v in args.variants]
    for N, B, variant in tqdm(runs, desc="generate (isolated)", file=sys.stdout):
        part = f"{stem}_{N}_{B}_{variant}.md"
        left = args.time_budget - (time.perf_counter() - start)
        row = dict(variant=variant, context=N, batch=B, error="skipped: time budget")
        if left > 30:
            cmd = [sys.executable, os.path.abspath(__file__), *base, "--contexts", str(N), "--batches", str(B),
                   "--variants", variant, "--out", part, "--time-budget", str(left)]
            try:
                subprocess.run(cmd, check=True, timeout=left)
                data = json.load(open(os.path.splitext(part)[0] + ".json"))
                meta, row = data["meta"], data["rows"][0]
            except (subprocess.SubprocessError, OSError, ValueError) as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:140]}"
        rows.append(row)
        if meta is not None:
            meta = dict(meta, command="python3 " + " ".join(sys.argv))
            write_report(args.out, markdown(rows, meta), dict(meta=meta, rows=rows))
    print(markdown(rows, meta) if meta else rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--warmup-steps", type=int, default=8)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=0, help="generate's prefill_chunk_size (0: one call)")
    p.add_argument("--gpu-memory-gb", type=float, default=0, help="cap the GPU memory of the process (0: no cap)")
    p.add_argument("--isolate", action="store_true", help="each run in a fresh process")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile N decode steps after the warm-up (kernel table in the JSON row and after the table)")
    p.add_argument("--time-budget", type=float, default=540.0, help="seconds; later runs are skipped")
    p.add_argument("--check-eager", action="store_true",
                   help="run each call again with disable_compile=True and compare the tokens")
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    p.add_argument("--out", default="generate.md")
    p.add_argument("--plot", metavar="JSON", help="only plot a results JSON and exit")
    args = p.parse_args(argv)
    if args.plot:
        print(plot(args.plot))
        return
    from tqdm import tqdm

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.isolate:
        return isolated(args, argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.gpu_memory_gb and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, args.gpu_memory_gb * 1e9 / total)
        torch.cuda.set_per_process_memory_fraction(fraction, torch.cuda.current_device())
    shape = SMOKE_MODEL if args.smoke else LLAMA3_8B
    max_new = args.warmup_steps + args.steps + 1
    model = make_model(shape, args.layers, max(args.contexts) + max_new + args.block_size, device, seed=0)
    model.generation_config.pad_token_id = 0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * args.layers * shape["num_key_value_heads"] * shape["head_dim"] * 2
    bandwidth = copy_bandwidth(device)
    meta = dict(device=device_name(device),
                date=datetime.date.today().isoformat(), command="python3 " + " ".join(sys.argv),
                torch=torch.__version__, transformers=transformers.__version__, layers=args.layers,
                gpu_memory_gb=args.gpu_memory_gb or None,
                warmup_steps=args.warmup_steps, steps=args.steps, bandwidth_tbs=bandwidth / 1e12)
    rows = []
    runs = [(N, B, v) for N in args.contexts for B in args.batches for v in args.variants]
    for N, B, variant in tqdm(runs, desc="generate", file=sys.stdout):
        row = dict(variant=variant, context=N, batch=B)
        if time.perf_counter() - start > args.time_budget:
            row["error"] = "skipped: time budget"
        else:
            ids = torch.randint(3, shape["vocab_size"], (B, N), device=device,
                                generator=torch.Generator(device=device).manual_seed(1))
            try:
                row = run_variant(args, model, variant, ids, device)
                row["floor_ms"] = 1e3 * (weight_bytes + B * N * kv_per_token) / bandwidth
            except Exception as e:  # noqa: BLE001 - one failed variant must not lose the others
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:140]}"
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_report(args.out, markdown(rows, meta), dict(meta=meta, rows=rows))
    print(markdown(rows, meta))
    for r in rows:
        if "profile" in r:
            print(f"\nprofile: {r['context']} tokens, batch {r['batch']}, {r['variant']}\n{r['profile']}")


if __name__ == "__main__":
    main()
