#!/usr/bin/env python3
"""Context parallel: one decode attention step of one layer with the KV cache sharded over W GPUs, against
single-GPU Hira and dense SDPA measured in the same run on rank 0's GPU; and the largest context that fits.

Llama-3-8B attention shapes: 32 query heads, 8 KV heads, head dim 128, bf16, batch 1, query length 1.

For every context N (the whole sequence) and mode (dense; topk keeping 1% and 5% of the blocks):
  - Hira on W ranks: ``hira.sharded_decode_attention`` (search with the ranks' agreement, block attention over
    the rank's slice, exact LSE merge through one all-gather) on each rank's ``build_shard_index`` of N / W
    tokens; the time is the slowest rank's median;
  - Hira on one GPU (rank 0): ``hira.step.select`` + ``hira.api.attend_selection`` over an index of all N
    tokens, the ``HiraCache`` decode step without its append, and the largest difference of its output from the sharded one;
  - dense context parallel on W ranks: ``hira.dense_sharded_attention`` (each rank SDPA's flash kernel over its
    slice, one all-gather of output and LSE, exact merge), what W GPUs do without Hira; slowest rank;
  - SDPA dense (rank 0, ``enable_gqa=True``) over the N tokens.
Each is timed eagerly (flex_attention compiled, the rest eager, host overhead included) and, where W = 1 (no
collective to capture) or with ``--graph-collectives``, replayed from a CUDA graph. Timing: CUDA events around each
of ``--reps`` calls after a warm-up, median; every rank makes the same number of calls (the step is a collective).
L2 is not flushed (the K/V of 32K tokens alone is 256 MB).

Largest context: bytes per token and layer measured on the built indexes (K, V and the index), then
W × (GPU memory − model weights − reserve) / (layers × bytes per token) for a Llama-3-8B (32 layers, 16.1 GB of
bf16 weights on every rank), for W = 1, 2, 4 and against a plain KV cache (what SDPA needs).

GPU run on one H100 (W = 1, about 3 minutes; contexts past --time-budget seconds are skipped):

    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
    torchrun --standalone --nproc_per_node 1 benchmarks/bench_multigpu.py --out $OUT/multigpu.md

On W GPUs: ``--nproc_per_node W`` (NCCL). CPU smoke run (gloo, flex run eagerly, timings not meaningful):

    PYTHONPATH=$PWD torchrun --standalone --nproc_per_node 2 benchmarks/bench_multigpu.py --device cpu \\
        --contexts 2K,4K --reps 3 --out /tmp/multigpu.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    DTYPE, HKV, D, capture_graph, fmt_num, fmt_size, md_table, parse_size, timed_ms, topic_kv,
)
from hira.api import attend_selection, build_index_unchecked  # noqa: E402
from hira.config import HiraConfig  # noqa: E402
from hira.parallel import (  # noqa: E402
    SequenceShard, build_shard_index, dense_sharded_attention, sharded_decode_attention,
)
from hira.step import select  # noqa: E402
from hira.selection.threshold import Dense, TopK  # noqa: E402

MODEL_LAYERS = 32
MODEL_WEIGHT_BYTES = 16.06e9  # Llama-3-8B, bf16
MODES = (("dense", None), ("topk 1%", 0.01), ("topk 5%", 0.05))


def slowest(ms: float | None, device) -> float | None:
    """Max over the ranks (None anywhere: None)."""
    t = torch.tensor([math.inf if ms is None else ms], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return None if math.isinf(t.item()) else t.item()


def run_context(args, shard: SequenceShard, device, N: int, rows: list, memory: dict, log) -> None:
    cfg = HiraConfig(block_size=args.block_size)
    room = args.block_size  # decode room past the prompt
    k, v, q = topic_kv(N, device, seed=N)
    local = build_shard_index(k, v, None, cfg, shard, N + room)
    single = build_index_unchecked(k, v, None, cfg, N + room) if shard.is_first else None
    start, end = shard.slices(N, args.block_size)[shard.rank]
    k_local, v_local = k[:, :, start:end].clone(), v[:, :, start:end].clone()  # the dense baseline's slice
    if not shard.is_first:
        del k, v
    memory["hira"] = (local.index.kv_nbytes() + local.index.index_nbytes()) / local.index.capacity
    scale = D**-0.5
    nb_global = sum(local.leaves_per_rank)
    W = shard.world_size
    use_graph = device.type == "cuda" and (W == 1 or args.graph_collectives)
    for name, fraction in MODES:
        thr = Dense() if fraction is None else TopK(max(1, round(fraction * nb_global)))

        def sharded():
            return sharded_decode_attention(q, local, thr, scale)[0]

        row = {"context": N, "mode": name, "W": W}
        row["sharded"] = slowest(timed_ms(sharded, device, args.reps), device)
        row["sharded_graph"] = None
        if use_graph:
            try:
                replay = capture_graph(sharded)[0].replay
                ms = timed_ms(replay, device, args.reps)
            except RuntimeError as e:  # a backend that cannot capture its collectives
                log(f"  graph capture of the sharded step failed: {str(e)[:160]}")
                ms = None
            row["sharded_graph"] = slowest(ms, device)
        out_sharded = sharded()
        if fraction is None:  # the dense context-parallel baseline, once per context (MODES lists dense first)

            def dense_cp():
                return dense_sharded_attention(q, k_local, v_local, shard, scale)

            dense_cp_ms, dense_cp_graph_ms = slowest(timed_ms(dense_cp, device, args.reps), device), None
            if use_graph:
                try:
                    ms = timed_ms(capture_graph(dense_cp)[0].replay, device, args.reps)
                except RuntimeError as e:
                    log(f"  graph capture of the dense context-parallel step failed: {str(e)[:160]}")
                    ms = None
                dense_cp_graph_ms = slowest(ms, device)
            dense_out = dense_cp()
        if shard.is_first:

            def one_gpu():
                return attend_selection(q, single, select(single, q, thr, scale), scale)[0]

            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

            row["single"] = timed_ms(one_gpu, device, args.reps)
            row["sdpa"] = timed_ms(sdpa, device, args.reps)
            cuda = device.type == "cuda"
            row["single_graph"] = timed_ms(capture_graph(one_gpu)[0].replay, device, args.reps) if cuda else None
            row["sdpa_graph"] = timed_ms(capture_graph(sdpa)[0].replay, device, args.reps) if cuda else None
            row["diff"] = (out_sharded.float() - one_gpu().float()).abs().max().item()
            row["dense_cp"], row["dense_cp_graph"] = dense_cp_ms, dense_cp_graph_ms
            row["dense_cp_diff"] = (dense_out.float() - sdpa().float()).abs().max().item()
            row["kept"] = float(select(single, q, thr, scale).kept_fraction.mean())
            rows.append(row)
            timings = ", ".join(f"{key}={val}" for key, val in row.items() if key not in ("context", "mode"))
            log(f"  {fmt_size(N, approx=True)} {name}: {timings}")
        dist.barrier()


def markdown(args, rows: list, memory: dict, meta: dict) -> str:
    W = meta["world_size"]
    lines = [
        f"## Context parallel, {meta['date']}, {meta['device']}, W = {W}, torch {meta['torch']}",
        "",
        f"Command: `torchrun --standalone --nproc_per_node {W} benchmarks/bench_multigpu.py {meta['argv']}`",
        "",
        "One decode attention step of one layer (32/8 heads, D 128, bf16, batch 1, block size "
        f"{args.block_size}), ms, median of {args.reps} calls. Hira on W ranks: slowest rank, search + sparse "
        "attention + exact merge; Hira on 1 GPU and SDPA: rank 0. Eager: host overhead included; graph: CUDA-graph "
        "replay. Dense CP: ``hira.dense_sharded_attention``, each rank attends densely over its slice (SDPA's flash "
        "kernel on CUDA) and one all-gather merges the partials exactly (slowest rank). Speedups: dense CP or "
        "SDPA ÷ Hira on W ranks (graph where measured, else eager).",
        "",
    ]
    table = []
    for r in rows:
        hira_ms = r["sharded_graph"] if r["sharded_graph"] is not None else r["sharded"]
        sdpa_ms = r["sdpa_graph"] if r["sdpa_graph"] is not None and r["sharded_graph"] is not None else r["sdpa"]
        cp_ms = r["dense_cp_graph"] if r["dense_cp_graph"] is not None and r["sharded_graph"] is not None \
            else r["dense_cp"]
        table.append([fmt_size(r["context"], approx=True), r["mode"], f"{r['kept']:.1%}",
                      *(fmt_num(r[k], 3) for k in ("sharded", "sharded_graph", "dense_cp", "dense_cp_graph",
                                                   "single", "single_graph", "sdpa", "sdpa_graph")),
                      f"{cp_ms / hira_ms:.2f}×", f"{sdpa_ms / hira_ms:.2f}×", f"{r['diff']:.2e}",
                      f"{r['dense_cp_diff']:.2e}"])
    lines.append(md_table(["context", "mode", "kept", f"Hira W={W} eager", f"Hira W={W} graph",
                           f"dense CP W={W} eager", f"dense CP W={W} graph", "Hira 1 GPU eager", "Hira 1 GPU graph",
                           "SDPA eager", "SDPA graph", "speedup vs dense CP", "speedup vs SDPA", "max diff W vs 1",
                           "max diff dense CP vs SDPA"], table))
    if "hira" in memory:
        usable = meta["gpu_bytes"] - MODEL_WEIGHT_BYTES - args.reserve_gb * 1e9
        plain = 2 * HKV * D * torch.finfo(DTYPE).bits // 8
        lines += [
            "",
            f"Largest context that fits, Llama-3-8B ({MODEL_LAYERS} layers, {MODEL_WEIGHT_BYTES / 1e9:.1f} GB of "
            f"weights on every rank, {args.reserve_gb} GB reserved), GPUs of {meta['gpu_bytes'] / 1e9:.1f} GB: "
            "W × (memory − weights − reserve) / (layers × bytes per token and layer). Bytes per token measured "
            "on this run's indexes; the counts for other W are projections (the last rank also holds the decoded "
            "tokens; prefill needs one layer's whole-prompt K/V on every rank at a time).",
            "",
            md_table(["cache", "bytes / token / layer", "1 GPU", "2 GPUs", "4 GPUs"], [
                ["plain KV (SDPA)", plain, fmt_size(usable / (MODEL_LAYERS * plain), approx=True), "—", "—"],
                ["Hira, sequence-sharded", f"{memory['hira']:.0f}",
                 *(fmt_size(w * usable / (MODEL_LAYERS * memory["hira"]), approx=True) for w in (1, 2, 4))],
            ]),
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--contexts", default="32K,128K,512K,1M", help="whole-sequence lengths, smallest first")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--time-budget", type=float, default=180.0, help="seconds; later contexts are skipped")
    p.add_argument("--reserve-gb", type=float, default=4.0, help="memory kept free for activations and workspace")
    p.add_argument("--graph-collectives", action="store_true", help="also graph-capture the step when W > 1")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        # CPU is a smoke run: flex_attention eager (exact through its mask_mod, DESIGN.md §3), no compile per rank.
        torch.compiler.set_stance("force_eager")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    shard = SequenceShard()

    def log(msg):
        if shard.is_first:
            print(msg, flush=True)

    start = time.perf_counter()
    rows, memory = [], {}
    for N in (parse_size(c) for c in args.contexts.split(",")):
        over = torch.tensor([time.perf_counter() - start > args.time_budget], dtype=torch.int32, device=device)
        dist.broadcast(over, 0)  # rank 0 decides for all: every rank must run the same steps
        if over.item():
            log(f"time budget spent: skipping {fmt_size(N, approx=True)} and longer contexts")
            break
        log(f"context {fmt_size(N, approx=True)} on {shard.world_size} rank(s)")
        run_context(args, shard, device, N, rows, memory, log)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if shard.is_first:
        gpu_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 80e9
        cpu_name = "CPU smoke run (80 GB GPUs assumed)"
        meta = {
            "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name,
            "world_size": shard.world_size,
            "torch": torch.__version__,
            "argv": " ".join(sys.argv[1:]),
            "gpu_bytes": gpu_bytes,
        }
        text = markdown(args, rows, memory, meta)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
