#!/usr/bin/env python3
"""Quality of Hira on the real model (SmolLM2-135M-Instruct, fp32): what each threshold mode costs in accuracy.

Four sections, each runnable alone (``--sections``):

fidelity     Attention fidelity on real KV caches. One causal forward pass over the first C tokens of the text
             (C in ``--contexts``) captures the post-RoPE q/k/v of every layer (``benchmarks/capture.py``); the last
             ``--steps`` positions are replayed as decode steps, exactly as ``HiraCache`` decodes: the index is built
             over the first C - steps keys, then each step appends its key and searches and attends through the
             functional API (``hira.search`` / ``hira.attend``, the 30 layers batched as B). Per layer, query head
             and step, against dense attention in float64 over the same keys: relative output error ‖o − ô‖/‖o‖,
             recall (the dense attention mass on the keys read), fraction of blocks kept and of keys read, and the
             certified posterior bound ``AttentionStats.skip_bound`` (and the prior bound) against the measured
             skipped mass. A bound below the measured mass is a violation; there must be none.
perplexity   Dense vs Hira perplexity over ``--ppl-windows`` windows of ``--ppl-window`` tokens (default the model's
             ``max_position_embeddings``). Dense: one forward pass of the unconverted model. Hira: the converted
             model prefills the first W − 1 − ``--ppl-decode`` tokens of a window (exact), then teacher-forces the
             rest one token per decode step, so each of the ``--ppl-decode`` scored predictions comes from a sparse
             decode step. The modes in ``--ppl-modes`` (``dense`` runs Hira's sparse path with every block kept: the
             anchor).
passkey      A 5-digit pass key hidden at depths ``--passkey-depths`` of filler text, prompts of
             ``--passkey-lengths`` tokens (chat template; the answer starts "The pass key is"); greedy answer,
             first 5-digit number parsed. Accuracy per (length, depth) for dense and for each mode in ``--modes``.
             Prompts shorter than ``HiraConfig.min_context`` (1024) decode densely by design.
generation   Greedy agreement with dense over ``--gen-tokens`` new tokens after ``--gen-prompts`` long prompts of
             novel text: teacher-forced (Hira predicts each position given dense's tokens, so one early divergence
             does not cascade; positions predicted by decode steps only), and the first divergence position of
             Hira's free greedy generation.

Hira runs with ``HiraConfig(threshold=mode, block_size=--block-size)`` and otherwise the defaults (sinks 4, window
256, min_context 1024, pca clustering), except ``max_cache_len`` (``--capacity``, ``cache_capacity``).

Outputs in ``--out``: ``quality_<section>.md`` (markdown tables), ``quality_<section>.json`` (the numbers), and
``quality_pareto.png``: relative output error against fraction of KV read per mode (fidelity), and perplexity delta
against fraction read (perplexity), drawn from whichever JSON files the folder holds.

Text: ``--text PATH``; by default Austen's *Emma* from ``shared/data/austen`` (beside the repository or inside it)
when present, else ``examples/data/emma_passage.txt`` (6K tokens: contexts and windows longer than the text are
dropped, with a message).

GPU run (one H100; estimated 4-6 min, not timed yet: four compiled flex shapes, ~2,600 perplexity and ~2,000
generation decode steps; if it runs long, drop to ``--ppl-windows 1``):

    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
    python3 benchmarks/bench_quality.py --device cuda --out $OUT/quality

(defaults: contexts 2K/4K/8K with 64 decode steps each; 2 perplexity windows of 8K, 256 decode positions each, modes
dense/topp 0.99/topp 0.9/topk 20%/topk 5% (certified modes read every block at these lengths: see fidelity); passkey
4 lengths x 5 depths = 20 cases; 2 prompts x 256 generated tokens; passkey and generation modes topp 0.99 / topp 0.9.
The 8K contexts need the Austen text: pass ``--text`` if ``shared/data/austen`` is not beside the checkout.)

CPU smoke run (2K only, few steps; 2 min 20 s on 2 cores, 2026-11-24):

    PYTHONPATH=$PWD python3 benchmarks/bench_quality.py --device cpu --out /tmp/quality --contexts 2048 --steps 8 \\
        --ppl-window 2048 --ppl-windows 1 --ppl-decode 64 --ppl-modes dense,topp:0.99,topp:0.9 --modes topp:0.99 \\
        --passkey-lengths 2048 --passkey-depths 0.25,0.5,0.75 --gen-prompts 1 --gen-tokens 32 --gen-context 2048
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import hira  # noqa: E402
from capture import capture_qkv  # noqa: E402
from hira.index.index import append as index_append  # noqa: E402
from hira.models import load_smollm2  # noqa: E402
from hira.search.threshold import MODES  # noqa: E402

SECTIONS = ("fidelity", "perplexity", "passkey", "generation")
PASSAGE = ROOT / "examples" / "data" / "emma_passage.txt"
AUSTEN = ("../shared/data/austen/emma.txt", "shared/data/austen/emma.txt")
FIDELITY_MODES = (
    "dense,topk:0.01,topk:0.02,topk:0.05,topk:0.1,topk:0.2,"
    "topp:0.8,topp:0.9,topp:0.95,topp:0.99,topp:0.999,certified:0.1,certified:0.01,certified:0.001,"
    "topk:0.05+sketch,topk:0.1+sketch,topk:0.2+sketch,topp:0.9+sketch,topp:0.99+sketch,"
    "certified:0.1+sketch,certified:0.01+sketch,certified:0.001+sketch"
)
# A measured skipped mass above the bound by less than this is float32 rounding of the bound, not a violation.
BOUND_RTOL, BOUND_ATOL = 1e-4, 1e-6


# ------------------------------------------------------------------------------------------------------------------
# threshold specs, text, model
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModeSpec:
    """A threshold mode as given on the command line: ``dense``, ``topk:F`` (F = fraction of the context's blocks),
    ``topp:P``, ``certified:EPS`` or ``fixed:TAU``; a ``+sketch`` suffix turns on ``HiraConfig.key_sketch``."""

    mode: str
    value: float = 0.0
    sketch: bool = False

    @classmethod
    def parse(cls, text: str) -> "ModeSpec":
        text, plus, flag = text.strip().partition("+")
        if plus and flag != "sketch":
            raise ValueError(f"unknown mode suffix {flag!r} in {text}+{flag}: only +sketch")
        spec = cls._parse(text)
        return cls(spec.mode, spec.value, bool(plus))

    @classmethod
    def _parse(cls, text: str) -> "ModeSpec":
        mode, _, value = text.strip().partition(":")
        if mode not in MODES:
            raise ValueError(f"unknown mode {text!r}: expected one of {MODES}")
        if mode == "dense":
            return cls("dense")
        if not value:
            raise ValueError(f"mode {text!r} needs a parameter, e.g. topp:0.99, topk:0.05, certified:0.01")
        spec = cls(mode, float(value))
        if mode == "topk" and not 0 < spec.value <= 1:
            raise ValueError(f"topk takes a fraction of the blocks in (0, 1], got {text!r}")
        spec.threshold(1)  # validates the parameter
        return spec

    @property
    def label(self) -> str:
        if self.mode == "dense":
            base = "dense"
        elif self.mode == "topk":
            base = f"topk {self.value:.0%}"
        else:
            base = f"{self.mode} {self.value:g}"
        return base + (" +sketch" if self.sketch else "")

    def threshold(self, n_blocks: int) -> hira.Threshold:
        """The ``hira.Threshold``; ``topk`` keeps ``value`` of ``n_blocks`` (at least one block)."""
        if self.mode == "topk":
            return hira.Threshold.topk(max(1, round(self.value * n_blocks)))
        return hira.Threshold(self.mode, self.value)


def parse_modes(text: str) -> list[ModeSpec]:
    return [ModeSpec.parse(s) for s in text.split(",") if s.strip()]


def default_text() -> Path:
    """Austen's *Emma* from the shared data folder when present, else the 6K-token passage shipped with the repo."""
    for rel in AUSTEN:
        path = (ROOT / rel).resolve()
        if path.is_file():
            return path
    print(f"shared/data/austen not found: using {PASSAGE.relative_to(ROOT)} (6K tokens; longer contexts are dropped)")
    return PASSAGE


def cache_capacity(prompt_tokens: int, new_tokens: int, block_size: int, fixed: int = 0) -> int:
    """``max_cache_len`` for a prompt and the tokens decoded after it, rounded up to a multiple of 1024.

    Capacity sets every decode shape: a tight one keeps CPU steps cheap; one ``fixed`` capacity for every run
    compiles the decode step once (what a GPU run wants).
    """
    need = prompt_tokens + new_tokens
    if fixed:
        if need > fixed:
            raise ValueError(f"{prompt_tokens} prompt + {new_tokens} new tokens need {need} slots, --capacity {fixed}")
        return fixed
    return -(-need // 1024) * 1024


def hira_config(spec: ModeSpec, prompt_tokens: int, new_tokens: int, args) -> hira.HiraConfig:
    """The HiraConfig of a run: the mode (topk relative to the prompt's blocks), the block size, the capacity."""
    return hira.HiraConfig(
        threshold=spec.threshold(-(-prompt_tokens // args.block_size)),
        key_sketch=spec.sketch,
        block_size=args.block_size,
        max_cache_len=cache_capacity(prompt_tokens, new_tokens, args.block_size, args.capacity),
    )


@contextlib.contextmanager
def converted(model, config: hira.HiraConfig):
    """The model converted to Hira with ``config`` inside the block, restored after."""
    hira.convert(model, config)
    try:
        yield model
    finally:
        hira.revert(model)


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def quantile(t: torch.Tensor, q: float) -> float:
    return float(torch.quantile(t.flatten().double(), q))


# ------------------------------------------------------------------------------------------------------------------
# section 1: attention fidelity on captured KV caches
# ------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def fidelity_at(cap: dict, specs: list[ModeSpec], block_size: int) -> tuple[dict, int]:
    """Replay the captured decode steps through Hira for every mode.

    Args:
        cap: from ``capture_qkv``: Q [L, T, Hq, D], K and V [L, Hkv, N, D], scaling.
    Returns:
        ({label: {name: tensor}}, number of blocks of the prefix) with err, recall, skipped, bound, prior
        [T, L, Hq] and kept, read [T, L, Hkv], all float64 on the CPU.
    """
    Q, K, V, scale = cap["Q"], cap["K"], cap["V"], cap["scaling"]
    L, T, Hq, D = Q.shape
    H, N = K.shape[1], K.shape[2]
    G = Hq // H
    P = N - T
    n_blocks = -(-P // block_size)
    # The layers are the batch: every (layer, KV head) is searched and attended independently. One index per
    # key_sketch setting (the same storage order: the sketch only adds to it).
    indexes = {
        sk: hira.build_index(K[:, :, :P], V[:, :, :P], hira.HiraConfig(block_size=block_size, key_sketch=sk),
                             capacity=n_blocks * block_size + T)
        for sk in sorted({s.sketch for s in specs})
    }
    K64, V64 = K.double(), V.double()
    thresholds = {s.label: (s.threshold(n_blocks), s.sketch) for s in specs}
    names = ("err", "recall", "skipped", "bound", "prior", "kept", "read")
    out = {label: {k: [] for k in names} for label in thresholds}
    for t in tqdm(range(T), desc=f"fidelity {N} tokens", leave=False):
        n = P + t + 1
        for index in indexes.values():
            index_append(index, K[:, :, n - 1 : n], V[:, :, n - 1 : n])
        q = Q[:, t, :, None, :]  # [L, Hq, 1, D]
        q64 = q.double().view(L, H, G, D) * scale  # [L, H, G, D]: query head h·G + g
        p = (q64 @ K64[:, :, :n].transpose(-1, -2)).softmax(-1)  # [L, H, G, n]
        o = p @ V64[:, :, :n]  # [L, H, G, D]
        for label, (thr, sk) in thresholds.items():
            index = indexes[sk]
            rank = index.rank.long()  # [L, H, C] position of the key in each slot (-1: empty)
            sel = hira.search(index, q, thr, scale=scale)
            o_hat, st = hira.attend(q, index, sel, scale=scale)
            read_slot = sel.keep.repeat_interleave(block_size, -1) & index.valid[:, None, :]  # [L, H, C]
            # Slots not read scatter into the spare column n, dropped after.
            dest = torch.where(read_slot, rank, n)
            read_pos = torch.zeros(L, H, n + 1, dtype=torch.bool, device=q.device).scatter_(2, dest, True)[..., :n]
            skipped = (p * ~read_pos[:, :, None, :]).sum(-1)  # [L, H, G]
            err = (o_hat.double().view(L, H, G, D) - o).norm(dim=-1) / o.norm(dim=-1)
            r = out[label]
            r["err"].append(err.reshape(L, Hq))
            r["skipped"].append(skipped.reshape(L, Hq))
            r["recall"].append((p * read_pos[:, :, None, :]).sum(-1).reshape(L, Hq))
            r["bound"].append(st.skip_bound[:, :, 0].double())
            r["prior"].append(st.prior_skip_bound[:, :, 0].double())
            r["kept"].append(st.kept_fraction.double())
            r["read"].append(st.read_fraction.double())
    return {label: {k: torch.stack(v).cpu() for k, v in r.items()} for label, r in out.items()}, n_blocks


def violations(skipped: torch.Tensor, bound: torch.Tensor) -> int:
    return int((skipped > bound * (1 + BOUND_RTOL) + BOUND_ATOL).sum())


def summarize_fidelity(r: dict) -> dict:
    """Scalar summary of one (context, mode) from ``fidelity_at``'s tensors."""
    sk, b = r["skipped"], r["bound"]
    return {
        "kept_fraction": float(r["kept"].mean()),
        "read_fraction": float(r["read"].mean()),
        "err_median": quantile(r["err"], 0.5),
        "err_p90": quantile(r["err"], 0.9),
        "err_max": float(r["err"].max()),
        "recall_mean": float(r["recall"].mean()),
        "recall_min": float(r["recall"].min()),
        "skipped_median": quantile(sk, 0.5),
        "skipped_max": float(sk.max()),
        "bound_median": quantile(b, 0.5),
        "bound_max": float(b.max()),
        "violations": violations(sk, b),
        "prior_violations": violations(sk, r["prior"]),
        "cases": sk.numel(),
        "per_layer": {
            "err_median": r["err"].median(0).values.median(-1).values.tolist(),  # median over steps, then heads
            "recall_mean": r["recall"].mean((0, 2)).tolist(),
            "read_fraction": r["read"].mean((0, 2)).tolist(),
            "kept_fraction": r["kept"].mean((0, 2)).tolist(),
            "skipped_max": r["skipped"].amax((0, 2)).tolist(),
        },
        "per_layer_head_err_median": r["err"].median(0).values.tolist(),  # [L][Hq]
    }


def run_fidelity(args, model, tok, ids: torch.Tensor) -> dict:
    specs = parse_modes(args.fidelity_modes)
    results = []
    for ctx in args.contexts:
        if ctx > ids.shape[1] or ctx > args.max_positions:
            print(f"fidelity: context {ctx} skipped (text has {ids.shape[1]} tokens, model {args.max_positions})")
            continue
        t0 = time.time()
        cap = capture_qkv(model, ids[:, :ctx].to(args.device), q_last=args.steps)
        r, n_blocks = fidelity_at(cap, specs, args.block_size)
        del cap
        for spec in specs:
            results.append({"context": ctx, "mode": spec.mode, "value": spec.value, "label": spec.label,
                            "n_blocks": n_blocks, **summarize_fidelity(r[spec.label])})
        print(f"fidelity {ctx}: {time.time() - t0:.0f} s")
    return {"steps": args.steps, "block_size": args.block_size, "results": results}


def fidelity_markdown(data: dict, meta: dict) -> str:
    res = data["results"]
    if not res:
        return "## Attention fidelity\n\nNo context fitted the text.\n"
    S = [
        "## Attention fidelity on captured KV caches\n",
        f"{meta['model']}, text `{meta['text']}`, {meta['device']}, {meta['date']}. {data['steps']} decode steps per "
        f"context (the last positions of one causal pass, replayed: index built over the rest, one key appended per "
        f"step), all 30 layers × 9 query heads, block size {data['block_size']}. Error ‖o − ô‖/‖o‖ and recall "
        "(dense attention mass on the keys read) against float64 dense attention; blocks/keys: fraction kept/read "
        "(topk at a fraction of the prefix's blocks; sinks and the 256-token window always added). Bound: "
        "`AttentionStats.skip_bound` (posterior); violations = cases whose measured skipped mass exceeds it "
        "(posterior / prior bound), out of layers × heads × steps.\n",
    ]
    rows = [[r["context"], r["label"], pct(r["kept_fraction"]), pct(r["read_fraction"]), f"{r['err_median']:.2e}",
             f"{r['err_p90']:.2e}", f"{r['err_max']:.2e}", f"{r['recall_mean']:.4f}", f"{r['recall_min']:.4f}",
             f"{r['skipped_median']:.1e}", f"{r['bound_median']:.1e}",
             f"{r['violations']} / {r['prior_violations']} of {r['cases']}"] for r in res]
    S.append(md_table(["context", "mode", "blocks kept", "keys read", "err median", "err p90", "err max",
                       "recall mean", "recall min", "skipped median", "bound median", "violations"], rows) + "\n")
    default = hira.HiraConfig().threshold
    ctx = max(r["context"] for r in res)
    sel = [r for r in res if r["context"] == ctx and r["mode"] == default.mode and r["value"] == default.value]
    if sel:
        r = sel[0]
        pl = r["per_layer"]
        S.append(f"Per layer at {ctx} tokens, the default mode ({r['label']}); err per query head: median over "
                 "steps.\n")
        rows = [[i, pct(pl["kept_fraction"][i]), pct(pl["read_fraction"][i]), f"{pl['err_median'][i]:.2e}",
                 f"{pl['recall_mean'][i]:.4f}", f"{pl['skipped_max'][i]:.1e}",
                 " ".join(f"{e:.0e}" for e in r["per_layer_head_err_median"][i])] for i in range(len(pl["err_median"]))]
        S.append(md_table(["layer", "blocks kept", "keys read", "err median", "recall mean", "skipped max",
                           "err per head"], rows) + "\n")
    return "\n".join(S)


# ------------------------------------------------------------------------------------------------------------------
# teacher-forced decoding (perplexity, generation agreement)
# ------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def hira_forced_decode(model, ids: torch.Tensor, prefill: int, config: hira.HiraConfig, desc: str) -> dict:
    """Prefill ``ids[:, :prefill]`` through Hira (exact), then feed ``ids[:, prefill:-1]`` one decode step each.

    Args:
        ids: [1, n] int64 on the model's device.
    Returns:
        logprob [n - prefill - 1] float64 of the tokens ``ids[0, prefill + 1:]`` and pred [n - prefill - 1] int64
        (greedy predictions of those positions), both from decode steps; per step, the layers' mean ``read``
        and ``kept`` fractions and the max ``skip_bound``.
    """
    n = ids.shape[1]
    logprob, pred, read, kept, skip = [], [], [], [], []
    with converted(model, config):
        cache = hira.HiraCache(model.config, config)
        model(ids[:, :prefill], **{hira.CACHE_ARG: cache}, logits_to_keep=1)
        for t in tqdm(range(prefill, n - 1), desc=desc, leave=False):
            logits = model(ids[:, t : t + 1], **{hira.CACHE_ARG: cache}).logits[0, -1].double()
            logprob.append(logits.log_softmax(-1)[ids[0, t + 1]])
            pred.append(logits.argmax())
            stats = [s for s in cache.stats() if s is not None]
            read.append(sum(s["read_fraction"] for s in stats) / len(stats))
            kept.append(sum(s["kept_fraction"] for s in stats) / len(stats))
            skip.append(max(s["skip_bound"] for s in stats))
    return {"logprob": torch.stack(logprob).cpu(), "pred": torch.stack(pred).cpu(), "read": read, "kept": kept,
            "skip_bound": skip}


@torch.no_grad()
def dense_logprob(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Log-probabilities [n - prefill - 1] of ``ids[0, prefill + 1:]`` from one dense forward pass."""
    n = ids.shape[1]
    logits = model(ids, logits_to_keep=n - prefill).logits[0, :-1].double()  # positions prefill .. n-2
    return logits.log_softmax(-1).gather(-1, ids[0, prefill + 1 :, None]).squeeze(-1).cpu()


def run_perplexity(args, model, tok, ids: torch.Tensor) -> dict:
    W = min(args.ppl_window, args.max_positions, ids.shape[1])
    if W < args.ppl_window:
        print(f"perplexity: window shortened to {W} tokens (text {ids.shape[1]}, model {args.max_positions})")
    windows = min(args.ppl_windows, ids.shape[1] // W)
    if windows < args.ppl_windows:
        print(f"perplexity: {windows} window(s) of {W} tokens fit the text ({args.ppl_windows} asked)")
    prefill = W - 1 - args.ppl_decode
    if prefill < 1:
        raise ValueError(f"--ppl-decode {args.ppl_decode} leaves no prefill in a window of {W} tokens")
    specs = parse_modes(args.ppl_modes)
    per_window, totals = [], {"dense": []}
    for w in range(windows):
        win = ids[:, w * W : (w + 1) * W].to(args.device)
        ref = dense_logprob(model, win, prefill)
        totals["dense"].append(ref)
        per_window.append({"window": w, "mode": "model (dense)", "label": "model (dense)",
                           "ppl": math.exp(-float(ref.mean()))})
        for spec in specs:
            cfg = hira_config(spec, prefill, W - prefill, args)
            r = hira_forced_decode(model, win, prefill, cfg, f"ppl w{w} {spec.label}")
            totals.setdefault(spec.label, []).append(r["logprob"])
            per_window.append({"window": w, "mode": spec.mode, "value": spec.value, "label": spec.label,
                               "ppl": math.exp(-float(r["logprob"].mean())),
                               "read_fraction": sum(r["read"]) / len(r["read"]),
                               "kept_fraction": sum(r["kept"]) / len(r["kept"]),
                               "skip_bound_max": max(r["skip_bound"])})
    dense_ppl = math.exp(-float(torch.cat(totals["dense"]).mean())) if windows else float("nan")
    overall = []
    for spec in specs:
        rows = [r for r in per_window if r["label"] == spec.label]
        ppl = math.exp(-float(torch.cat(totals[spec.label]).mean()))
        overall.append({"mode": spec.mode, "value": spec.value, "label": spec.label, "ppl": ppl,
                        "delta": ppl / dense_ppl - 1,
                        "read_fraction": sum(r["read_fraction"] for r in rows) / len(rows),
                        "kept_fraction": sum(r["kept_fraction"] for r in rows) / len(rows),
                        "skip_bound_max": max(r["skip_bound_max"] for r in rows)})
    return {"window": W, "windows": windows, "prefill": prefill, "decode": W - 1 - prefill, "dense_ppl": dense_ppl,
            "block_size": args.block_size, "overall": overall, "per_window": per_window}


def perplexity_markdown(data: dict, meta: dict) -> str:
    S = [
        "## Perplexity, dense vs Hira\n",
        f"{meta['model']}, text `{meta['text']}`, {meta['device']}, {meta['date']}. {data['windows']} window(s) of "
        f"{data['window']} tokens: prefill {data['prefill']} (exact), then {data['decode']} positions teacher-forced "
        f"one decode step each; perplexity over those positions. Dense: one forward pass of the unconverted model. "
        f"`dense` below is Hira's sparse path keeping every block (the anchor). Keys read / blocks kept: mean over "
        f"steps and layers; skip bound: the largest posterior bound of any step, layer and head.\n",
        f"Dense perplexity: {data['dense_ppl']:.4f}\n",
    ]
    rows = [[r["label"], f"{r['ppl']:.4f}", f"{100 * r['delta']:+.3f}%", pct(r["read_fraction"]),
             pct(r["kept_fraction"]), f"{r['skip_bound_max']:.2e}"] for r in data["overall"]]
    S.append(md_table(["mode", "perplexity", "Δ vs dense", "keys read", "blocks kept", "skip bound max"], rows) + "\n")
    if data["windows"] > 1:
        rows = [[r["window"], r["label"], f"{r['ppl']:.4f}", pct(r["read_fraction"]) if "read_fraction" in r else "—"]
                for r in data["per_window"]]
        S.append("Per window:\n\n" + md_table(["window", "mode", "perplexity", "keys read"], rows) + "\n")
    return "\n".join(S)


# ------------------------------------------------------------------------------------------------------------------
# section 3: passkey retrieval
# ------------------------------------------------------------------------------------------------------------------
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about it.\n\n")
PASSKEY_QUESTION = "\n\nWhat is the pass key?"
PASSKEY_ANSWER = "The pass key is"


def passkey_prompt(tok, n_tokens: int, depth: float, key: str) -> torch.Tensor:
    """[1, ≤ n_tokens] chat prompt hiding ``key`` at ``depth`` (0: first, 1: last) of the filler, ending in the
    assistant's "The pass key is"."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "

    def build(reps: int) -> torch.Tensor:
        cut = round(depth * reps)
        body = PASSKEY_FILLER * cut + needle + PASSKEY_FILLER * (reps - cut)
        msgs = [{"role": "user", "content": PASSKEY_INTRO + body + PASSKEY_QUESTION}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        answer = tok(PASSKEY_ANSWER, add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([ids["input_ids"], answer], dim=1)

    per_rep = len(tok(PASSKEY_FILLER, add_special_tokens=False).input_ids)
    reps = max(0, (n_tokens - build(0).shape[1]) // per_rep)
    ids = build(reps)
    while ids.shape[1] > n_tokens and reps > 0:
        reps -= 1
        ids = build(reps)
    return ids


def parse_passkey(text: str) -> str | None:
    m = re.search(r"\d{5}", text)
    return m.group(0) if m else None


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int, config: hira.HiraConfig | None = None) -> torch.Tensor:
    """Greedy continuation [new_tokens] of ``ids`` [1, n]; through Hira when ``config`` is given (EOS suppressed)."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              attention_mask=torch.ones_like(ids), pad_token_id=model.config.eos_token_id)
    if config is None:
        return model.generate(ids, **kw)[0, ids.shape[1] :].cpu()
    with converted(model, config):
        cache = hira.HiraCache(model.config, config)
        return model.generate(ids, **{hira.CACHE_ARG: cache}, **kw)[0, ids.shape[1] :].cpu()


def run_passkey(args, model, tok, ids_text: torch.Tensor) -> dict:
    specs = parse_modes(args.modes)
    rng = random.Random(args.seed)
    cases = [(n, d) for n in args.passkey_lengths if n <= args.max_positions for d in args.passkey_depths]
    results = []
    for n, depth in tqdm(cases, desc="passkey"):
        key = str(rng.randrange(10000, 100000))
        ids = passkey_prompt(tok, n - args.passkey_new_tokens, depth, key).to(args.device)
        answers = {"dense": tok.decode(greedy(model, ids, args.passkey_new_tokens))}
        for spec in specs:
            cfg = hira_config(spec, ids.shape[1], args.passkey_new_tokens, args)
            out = greedy(model, ids, args.passkey_new_tokens, cfg)
            answers[spec.label] = tok.decode(out)
        results.append({"length": n, "prompt_tokens": ids.shape[1], "depth": depth, "key": key,
                        "answers": answers, "correct": {k: parse_passkey(a) == key for k, a in answers.items()}})
    return {"labels": ["dense"] + [s.label for s in specs], "results": results,
            "min_context": hira.HiraConfig().min_context}


def passkey_markdown(data: dict, meta: dict) -> str:
    labels, res = data["labels"], data["results"]
    S = [
        "## Passkey retrieval\n",
        f"{meta['model']}, {meta['device']}, {meta['date']}. A random 5-digit key hidden at a depth of repeated "
        f"filler; chat template, answer primed with \"{PASSKEY_ANSWER}\", greedy, first 5-digit number parsed. "
        f"✓ = the key. Prompts under {data['min_context']} tokens decode densely (HiraConfig.min_context).\n",
    ]
    def mark(r, k):
        return "✓" if r["correct"][k] else "✗ " + repr(r["answers"][k].strip()[:24])

    rows = [[r["length"], r["prompt_tokens"], f"{r['depth']:.0%}", r["key"]] + [mark(r, k) for k in labels]
            for r in res]
    S.append(md_table(["length", "prompt tokens", "depth", "key"] + labels, rows) + "\n")
    rows = []
    for n in sorted({r["length"] for r in res}):
        sub = [r for r in res if r["length"] == n]
        rows.append([n] + [f"{sum(r['correct'][k] for r in sub)}/{len(sub)}" for k in labels])
    rows.append(["all"] + [f"{sum(r['correct'][k] for r in res)}/{len(res)}" for k in labels])
    agree = {k: sum(r["correct"][k] == r["correct"]["dense"] for r in res) for k in labels[1:]}
    S.append("Accuracy per length:\n\n" + md_table(["length"] + labels, rows) + "\n")
    S.append("Cases where Hira is right exactly when dense is: "
             + ", ".join(f"{k} {v}/{len(res)}" for k, v in agree.items()) + "\n")
    return "\n".join(S)


# ------------------------------------------------------------------------------------------------------------------
# section 4: greedy generation agreement
# ------------------------------------------------------------------------------------------------------------------
def run_generation(args, model, tok, ids_text: torch.Tensor) -> dict:
    specs = parse_modes(args.modes)
    G = args.gen_tokens
    ctx = min(args.gen_context or args.max_positions, args.max_positions) - G
    prompts = min(args.gen_prompts, ids_text.shape[1] // (ctx + G))
    if prompts < args.gen_prompts:
        print(f"generation: {prompts} prompt(s) of {ctx} tokens fit the text ({args.gen_prompts} asked)")
    results = []
    for i in range(prompts):
        # Prompts from distant parts of the text (the second from the middle).
        start = i * (ids_text.shape[1] - ctx - G) // max(prompts, 2)
        prompt = ids_text[:, start : start + ctx].to(args.device)
        dense = greedy(model, prompt, G)
        full = torch.cat([prompt, dense[None].to(args.device)], dim=1)
        for spec in specs:
            cfg = hira_config(spec, ctx, G, args)
            forced = hira_forced_decode(model, full, ctx, cfg, f"gen {i} {spec.label} forced")
            free = greedy(model, prompt, G, cfg)
            diff = (free != dense).nonzero()
            results.append({"prompt": i, "start": start, "prompt_tokens": ctx, "mode": spec.mode, "value": spec.value,
                            "label": spec.label,
                            "agreement": float((forced["pred"] == dense[1:]).double().mean()),
                            "positions": len(forced["pred"]),
                            "first_divergence": int(diff[0]) if len(diff) else None,
                            "read_fraction": sum(forced["read"]) / len(forced["read"])})
    return {"new_tokens": G, "results": results}


def generation_markdown(data: dict, meta: dict) -> str:
    S = [
        "## Greedy generation agreement with dense\n",
        f"{meta['model']}, text `{meta['text']}`, {meta['device']}, {meta['date']}. Dense generates "
        f"{data['new_tokens']} tokens greedily (EOS suppressed). Teacher-forced: Hira predicts positions 2..N given "
        "dense's tokens (position 1 comes from the exact prefill); agreement = fraction equal to dense's token. "
        "Free: Hira generates on its own; first divergence = the first position (0-based) that differs "
        "(— if none).\n",
    ]
    rows = [[r["prompt"], r["prompt_tokens"], r["label"], f"{r['agreement']:.4f} ({r['positions']})",
             "—" if r["first_divergence"] is None else r["first_divergence"], pct(r["read_fraction"])]
            for r in data["results"]]
    S.append(md_table(["prompt", "prompt tokens", "mode", "teacher-forced agreement (positions)",
                       "first divergence (free)", "keys read"], rows) + "\n")
    return "\n".join(S)


# ------------------------------------------------------------------------------------------------------------------
# plot
# ------------------------------------------------------------------------------------------------------------------
def plot(out: Path) -> Path | None:
    """``quality_pareto.png`` from the fidelity (and, if present, perplexity) JSON files in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid_path, ppl_path = out / "quality_fidelity.json", out / "quality_perplexity.json"
    if not fid_path.is_file():
        return None
    fid = json.loads(fid_path.read_text())["results"]
    ppl = json.loads(ppl_path.read_text())["overall"] if ppl_path.is_file() else []
    fig, axes = plt.subplots(1, 2 if ppl else 1, figsize=(13 if ppl else 7, 5), squeeze=False)
    ax = axes[0, 0]
    colors = {"topk": "C0", "topp": "C1", "certified": "C2", "topk +sketch": "C9", "topp +sketch": "C3",
              "certified +sketch": "C5", "fixed": "C4", "dense": "k"}

    def curve(r) -> str:
        return r["mode"] + (" +sketch" if r["label"].endswith("+sketch") else "")

    ctx = max(r["context"] for r in fid)  # the longest context: one curve per mode
    for name, color in colors.items():
        pts = sorted((r["read_fraction"], r["err_median"]) for r in fid if r["context"] == ctx and curve(r) == name)
        if not pts:
            continue
        x, y = zip(*pts)
        style = dict(marker="*", markersize=12, linestyle="none") if name == "dense" else dict(
            marker="s" if "sketch" in name else "o", linestyle="--" if "sketch" in name else "-")
        ax.plot(x, y, color=color, label=name, **style)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of KV read")
    ax.set_ylabel("relative output error ‖o − ô‖/‖o‖ (median)")
    ax.set_title(f"Attention fidelity, SmolLM2-135M, {ctx} tokens (real KV caches)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if ppl:
        ax = axes[0, 1]
        for name, color in colors.items():
            pts = sorted((r["read_fraction"], 100 * r["delta"], r["label"]) for r in ppl if curve(r) == name)
            if not pts:
                continue
            x, y, names = zip(*pts)
            ax.plot(x, y, color=color, marker="o", label=name)
            for xi, yi, name in pts:
                ax.annotate(name, (xi, yi), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("fraction of KV read")
        ax.set_ylabel("perplexity Δ vs dense (%)")
        ax.set_title("Perplexity, teacher-forced decode")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "quality_pareto.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------------
RUNNERS = {
    "fidelity": (run_fidelity, fidelity_markdown),
    "perplexity": (run_perplexity, perplexity_markdown),
    "passkey": (run_passkey, passkey_markdown),
    "generation": (run_generation, generation_markdown),
}


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, default=None, help="a long plain-text file (default: see above)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True, help="folder for the tables, JSON and the plot")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--block-size", type=int, default=hira.HiraConfig().block_size)
    ap.add_argument("--capacity", type=int, default=-1,
                    help="HiraCache slots of every model run; 0: sized to each run; -1 (default): 0 on CPU, the "
                         "model's max positions + 1024 on CUDA (one compiled decode shape)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("fidelity")
    g.add_argument("--contexts", type=int_list, default=[2048, 4096, 8192])
    g.add_argument("--steps", type=int, default=64, help="decode positions per captured context")
    g.add_argument("--fidelity-modes", default=FIDELITY_MODES)
    g = ap.add_argument_group("perplexity")
    g.add_argument("--ppl-window", type=int, default=8192, help="window length (capped at max positions)")
    g.add_argument("--ppl-windows", type=int, default=2)
    g.add_argument("--ppl-decode", type=int, default=256, help="teacher-forced decode positions per window")
    g.add_argument("--ppl-modes", default="dense,topp:0.99,topp:0.9,topk:0.2,topk:0.05")
    g = ap.add_argument_group("passkey and generation")
    g.add_argument("--modes", default="topp:0.99,topp:0.9", help="Hira modes compared with dense")
    g.add_argument("--passkey-lengths", type=int_list, default=[1024, 2048, 4096, 8192])
    g.add_argument("--passkey-depths", default="0,0.25,0.5,0.75,1")
    g.add_argument("--passkey-new-tokens", type=int, default=8)
    g.add_argument("--gen-prompts", type=int, default=2)
    g.add_argument("--gen-tokens", type=int, default=256)
    g.add_argument("--gen-context", type=int, default=0, help="prompt + new tokens (0: the model's max positions)")
    args = ap.parse_args()
    args.passkey_depths = [float(x) for x in args.passkey_depths.split(",")]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}: choose from {SECTIONS}")
    for text in (args.fidelity_modes, args.ppl_modes, args.modes):
        parse_modes(text)  # fail on a bad spec before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    # Past the recompile limit flex_attention silently runs eager (DESIGN.md §3): fail loudly instead.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    torch._dynamo.config.recompile_limit = 32

    args.out.mkdir(parents=True, exist_ok=True)
    text_path = args.text or default_text()
    model, tok = load_smollm2(dtype=torch.float32, device=args.device)
    args.max_positions = int(model.config.max_position_embeddings)
    if args.capacity == -1:
        args.capacity = args.max_positions + 1024 if args.device.startswith("cuda") else 0
    ids = tok(text_path.read_text(encoding="utf-8", errors="replace"), return_tensors="pt",
              add_special_tokens=False).input_ids
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    meta = {
        "model": f"SmolLM2-135M-Instruct (fp32, max positions {args.max_positions})",
        "text": f"{text_path.name} ({ids.shape[1]} tokens)",
        "device": f"{args.device} ({device_name}), torch {torch.__version__}",
        "date": datetime.date.today().isoformat(),
    }
    print(f"{meta['model']}; {meta['text']}; {meta['device']}; sections {sections}")
    for name in sections:
        run, markdown = RUNNERS[name]
        t0 = time.time()
        data = run(args, model, tok, ids)
        data["meta"] = {**meta, "seconds": time.time() - t0}
        (args.out / f"quality_{name}.json").write_text(json.dumps(data, indent=1))
        md = markdown(data, meta) + f"\n({name}: {time.time() - t0:.0f} s)\n"
        (args.out / f"quality_{name}.md").write_text(md)
        print(md)
    path = plot(args.out)
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
