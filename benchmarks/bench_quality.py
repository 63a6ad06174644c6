#!/usr/bin/env python3
"""Quality of Hira on a real model: what each threshold mode costs in accuracy.

Models (``--model``): ``smollm2`` (default: SmolLM2-135M-Instruct, fp32, every layer converted, prompts through its
chat template) or ``gemma3-270m`` (Gemma 3 270M, a base model: raw text after <bos>; Hira on its 3 full-attention
layers 5, 11 and 17, the 15 sliding-window layers exact; every measured fraction and error is of the Hira layers).

Sections, each runnable alone (``--sections``):

fidelity     Attention fidelity on real KV caches. One causal forward pass over the first C tokens of the text
             (C in ``--contexts``) captures the post-RoPE q/k/v of the Hira layers (``benchmarks/capture.py``); the
             last ``--steps`` positions are replayed as decode steps, exactly as ``HiraCache`` decodes: the index is
             built over the first C - steps keys, then each step appends its key and searches and attends through
             the functional API (``hira.search`` / ``hira.attend``, the layers batched as B). Per layer, query head
             and step, against dense attention in float64 over the same keys: relative output error ‖o − ô‖/‖o‖,
             recall (the dense attention mass on the keys read), fraction of blocks kept and of keys read, and the
             certified posterior bound ``AttentionStats.skip_bound`` (and the prior bound) against the measured
             skipped mass. A bound below the measured mass is a violation; there must be none. Against the oracle
             (true attention): its error at the mode's budget, and the blocks it needs for the mode's recall and
             for 99% of the mass (``fidelity_at``).
perplexity   Dense vs Hira perplexity over ``--ppl-windows`` windows of each length in ``--ppl-window``. Dense: the
             unconverted model. Hira: the converted model prefills the first W − 1 − ``--ppl-decode`` tokens of a
             window (exact) once, then, from a copy of that prefill per mode, teacher-forces the rest one token per
             decode step, so each of the ``--ppl-decode`` scored predictions comes from a sparse decode step. The
             modes in ``--ppl-modes`` (``dense`` runs Hira's sparse path with every block kept: the anchor); keys
             read per layer.
passkey      A 5-digit pass key hidden at depths ``--passkey-depths`` of filler text, prompts of
             ``--passkey-lengths`` tokens (the answer starts "The pass key is"); greedy answer, first 5-digit number
             parsed. Accuracy per (length, depth) for dense and for each mode in ``--modes``.
needle       Multi-key needle retrieval: ``--needle-keys`` secret numbers of different things hidden in the text,
             the asked one at each depth; same lengths, depths and scoring.
vartrack     Variable tracking: a chain of ``--vt-hops`` assignments (VAR A = 12345, VAR B = VAR A, ...) hidden in
             the text from each depth on; the last variable's value is asked.
             The retrieval sections prefill each prompt once (all but its last token) and decode every mode from a
             copy, ``dense`` included (every block read through Hira's path). Prompts shorter than
             ``HiraConfig.min_context`` (1024) decode densely by design.
generation   Greedy agreement with dense over ``--gen-tokens`` new tokens after ``--gen-prompts`` long prompts of
             novel text: teacher-forced (Hira predicts each position given dense's tokens, so one early divergence
             does not cascade; positions predicted by decode steps only), and the first divergence position of
             Hira's free greedy generation.

Long prompts on a CPU: ``--prefill-chunk N`` prefills (and runs the dense reference and the fidelity capture) in
calls of N tokens, so Gemma 3's sliding-window layers attend their window instead of an n × n mask (a one-call 32K
prefill of Gemma 3 270M on one thread would take ~15 min; in 2K chunks a few minutes).

Hira runs with ``HiraConfig(threshold=mode, block_size=--block-size)`` and otherwise the defaults (sinks 4, window
256, pca clustering), except ``max_cache_len`` and ``min_context`` (pinned to 1024: ``MIN_CONTEXT``) (``--capacity``, ``cache_capacity``).

Outputs in ``--out``: ``quality_<section><--tag>.md`` (markdown tables), ``quality_<section><--tag>.json`` (the
numbers), and, drawn from every such JSON file the folder holds (so runs of different lengths, with different tags,
share a folder): ``quality_pareto.png``, relative output error against fraction of KV read per mode (fidelity) and
perplexity delta against fraction read (perplexity); ``quality_read_vs_context.png``, fraction read against context.

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

Gemma 3 270M at 8K, 16K and 32K tokens on a CPU: the commands in ``benchmarks/quality_gemma3/README.md``.

CPU smoke run (2K only, few steps; 2 min 20 s on 2 cores, 2026-11-24):

    PYTHONPATH=$PWD python3 benchmarks/bench_quality.py --device cpu --out /tmp/quality --contexts 2048 --steps 8 \\
        --ppl-window 2048 --ppl-windows 1 --ppl-decode 64 --ppl-modes dense,topp:0.99,topp:0.9 --modes topp:0.99 \\
        --passkey-lengths 2048 --passkey-depths 0.25,0.5,0.75 --gen-prompts 1 --gen-tokens 32 --gen-context 2048
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
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
from capture import capture_qkv, unpack_capture  # noqa: E402
from harness import md_table, pct  # noqa: E402
from hira.cache import HiraLayer  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from hira.index.index import append as index_append  # noqa: E402
from hira.models import load_gemma3_270m, load_smollm2  # noqa: E402
from hira.selection.threshold import THRESHOLDS, from_name  # noqa: E402

SECTIONS = ("fidelity", "perplexity", "passkey", "needle", "vartrack", "generation")
MODELS = ("smollm2", "gemma3-270m")
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
        if mode not in THRESHOLDS:
            raise ValueError(f"unknown mode {text!r}: expected one of {tuple(THRESHOLDS)}")
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
        return from_name(self.mode, max(1, round(self.value * n_blocks)) if self.mode == "topk" else self.value)


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


# The search is what this benchmark measures: min_context is pinned below every context it runs (the default,
# 16384, the speed crossover on an H200, would decode the shorter ones densely).
MIN_CONTEXT = 1024


def hira_config(spec: ModeSpec, prompt_tokens: int, new_tokens: int, args) -> hira.HiraConfig:
    """The HiraConfig of a run: the mode (topk relative to the prompt's blocks), the block size, the capacity,
    ``MIN_CONTEXT``."""
    return hira.HiraConfig(
        threshold=spec.threshold(-(-prompt_tokens // args.block_size)),
        key_sketch=spec.sketch,
        block_size=args.block_size,
        max_cache_len=cache_capacity(prompt_tokens, new_tokens, args.block_size, args.capacity),
        min_context=MIN_CONTEXT,
    )


@contextlib.contextmanager
def converted(model, config: hira.HiraConfig):
    """The model converted to Hira with ``config`` inside the block, restored after."""
    hira.convert(model, config)
    try:
        yield model
    finally:
        hira.revert(model)


def load_model(args):
    """(model, tokenizer) of ``--model`` in float32, and the model facts the sections need on ``args``: ``bos`` (the
    token a raw-text input starts with, None for SmolLM2), ``chat`` (prompts through the chat template: SmolLM2 is an
    instruct model, Gemma 3 270M a base model), ``hira_layers`` (the layers ``hira.convert`` converts: every layer of
    SmolLM2, Gemma 3's full-attention layers) and ``model_name``."""
    if args.model == "gemma3-270m":
        model, tok = load_gemma3_270m(dtype=torch.float32, device=args.device)
        text = model.config.get_text_config(decoder=True)
        args.bos, args.chat = tok.bos_token_id, False
        args.hira_layers = [i for i, t in enumerate(text.layer_types) if t == "full_attention"]
        args.model_name = (f"Gemma 3 270M (base, Q4_K_M dequantized to fp32; Hira on the full-attention layers "
                           f"{args.hira_layers}, the {text.sliding_window}-token sliding-window layers exact)")
    else:
        model, tok = load_smollm2(dtype=torch.float32, device=args.device)
        args.bos, args.chat = None, True
        args.hira_layers = list(range(model.config.num_hidden_layers))
        args.model_name = "SmolLM2-135M-Instruct (fp32)"
    return model, tok


def text_input(args, ids: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """[1, n] model input from the text tokens ``ids`` at ``start``: <bos> first where the model wants one (Gemma 3
    degenerates without it), then the text."""
    if args.bos is None:
        return ids[:, start : start + n]
    return torch.cat([torch.full_like(ids[:, :1], args.bos), ids[:, start : start + n - 1]], dim=1)


@torch.no_grad()
def prefill_cache(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Run ``ids`` [1, n] into ``cache`` in calls of at most ``chunk`` tokens (0: one call); the last token's logits
    [V]. A one-call prefill of a model with sliding-window layers builds an n × n mask and pays n² attention in every
    layer; in chunks the window layers attend their window only."""
    n = ids.shape[1]
    step = chunk or n
    for start in range(0, n, step):
        logits = model(ids[:, start : start + step], **{hira.CACHE_ARG: cache}, logits_to_keep=1).logits
    return logits[0, -1]


def mode_cache(base: hira.HiraCache, threshold: hira.Threshold, sketch: bool) -> hira.HiraCache:
    """A copy of a prefilled cache that decodes with ``threshold`` and, when ``sketch`` is False, without the key
    sketch. One prefill, indexed with the sketch, then serves every mode: the sketch adds to the index and changes
    nothing else (the same storage order and leaf bounds). Each layer chooses its mode and calibrates it as its own
    prefill does (``HiraLayer._choose_threshold``: dense in ``dense_layers`` or below ``min_context``, else
    ``threshold``; ``HiraLayer.calibrate``)."""
    cache = copy.deepcopy(base)
    for layer in cache.layers:
        if isinstance(layer, HiraLayer):
            layer.config = dataclasses.replace(layer.config, threshold=threshold)
            layer.threshold = layer._choose_threshold(int(layer.length))
            if not sketch:
                layer.index = dataclasses.replace(layer.index, sketch=None)
            layer.calibrate()  # the spread weight for this threshold, on the prefill's own last queries
    return cache


def layer_stats(cache: hira.HiraCache) -> dict[int, dict]:
    """``cache.stats()`` of the layers that decoded, by layer index."""
    return {i: s for i, s in enumerate(cache.stats()) if s is not None}


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
        ({label: {name: tensor}}, number of blocks of the prefix) with err, recall, skipped, bound, prior,
        oracle_err [T, L, Hq] and kept, read, kept_n, need_same, need99, live_n [T, L, Hkv], all float64 on the CPU.
        The oracle, from the true attention (float64): ``oracle_err`` keeps per KV head as many blocks as the mode
        kept, by the group's true mass (sinks and window first); ``need_same`` is the fewest blocks (sinks and window
        first, then by true mass) that give every row of the group the recall the mode gave it, union over the
        rows; ``need99`` the blocks holding a key at or above each row's top-0.99 level, union over the rows (the
        blocks truly needed for ε = 0.01, as ``bench_certified`` counts them); ``kept_n`` the blocks the mode kept;
        ``live_n`` the non-empty blocks.
    """
    Q, K, V, scale, L, T, Hq, D, H, N, G, P, n_blocks = unpack_capture(cap, block_size)
    # The layers are the batch: every (layer, KV head) is searched and attended independently. One index per
    # key_sketch setting (the same storage order: the sketch only adds to it).
    indexes = {
        sk: hira.build_index(K[:, :, :P], V[:, :, :P], hira.HiraConfig(block_size=block_size, key_sketch=sk),
                             capacity=n_blocks * block_size + T)
        for sk in sorted({s.sketch for s in specs})
    }
    K64, V64 = K.double(), V.double()
    thresholds = {s.label: (s.threshold(n_blocks), s.sketch) for s in specs}
    names = ("err", "recall", "skipped", "bound", "prior", "kept", "read", "oracle_err", "kept_n", "need_same",
             "need99", "live_n")
    out = {label: {k: [] for k in names} for label in thresholds}
    for t in tqdm(range(T), desc=f"fidelity {N} tokens", leave=False):
        n = P + t + 1
        for index in indexes.values():
            index_append(index, K[:, :, n - 1 : n], V[:, :, n - 1 : n])
        q = Q[:, t, :, None, :]  # [L, Hq, 1, D]
        q64 = q.double().view(L, H, G, D) * scale  # [L, H, G, D]: query head h·G + g
        p = (q64 @ K64[:, :, :n].transpose(-1, -2)).softmax(-1)  # [L, H, G, n]
        o = p @ V64[:, :, :n]  # [L, H, G, D]
        # The oracle's view, from any index (they share the storage order): true mass per slot and per block.
        index = next(iter(indexes.values()))
        rank = index.rank.long()  # [L, H, C] position of the key in each slot (-1: empty)
        C = rank.shape[-1]
        NB = C // block_size
        real = (rank >= 0)[:, :, None, :]  # [L, H, 1, C]
        slot_p = p.gather(-1, rank.clamp_min(0)[:, :, None, :].expand(L, H, G, C)) * real  # [L, H, G, C]
        block_p = slot_p.view(L, H, G, NB, block_size).sum(-1)  # [L, H, G, NB]
        live = index.levels[0].count > 0  # [L, H, NB]
        forced = index.forced_leaves()
        forced_p = (block_p * forced[:, :, None, :]).sum(-1)  # [L, H, G]
        free, free_order = block_p.masked_fill(~(live & ~forced)[:, :, None, :], -1.0).sort(-1, descending=True)
        before = forced_p[..., None] + free.clamp_min(0).cumsum(-1) - free.clamp_min(0)

        def oracle_count(target: torch.Tensor) -> torch.Tensor:
            """Fewest blocks (forced first, then by true mass) giving each row ``target`` [L, H, G], union."""
            take = (before < target[..., None]) & (free >= 0)
            rows = torch.zeros_like(take).scatter_(-1, free_order, take) | forced[:, :, None, :]
            return (rows.any(2) & live).sum(-1).double()

        srt = p.sort(-1, descending=True).values
        level = srt.gather(-1, ((srt.cumsum(-1) - srt) < 0.99).sum(-1, keepdim=True) - 1)  # [L, H, G, 1]
        above = ((slot_p >= level) & real).view(L, H, G, NB, block_size).any(-1).any(2)  # [L, H, NB]
        need99 = (above & live).sum(-1).double()
        group_order = torch.where(forced, math.inf, block_p.sum(2).masked_fill(~live, -1.0)).argsort(
            -1, descending=True)

        def read_positions(keep: torch.Tensor) -> torch.Tensor:
            """[L, H, n] bool: the key positions in the kept blocks [L, H, NB]."""
            read_slot = keep.repeat_interleave(block_size, -1) & index.valid[:, None, :]  # [L, H, C]
            # Slots not read scatter into the spare column n, dropped after.
            dest = torch.where(read_slot, rank, n)
            return torch.zeros(L, H, n + 1, dtype=torch.bool, device=q.device).scatter_(2, dest, True)[..., :n]

        for label, (thr, sk) in thresholds.items():
            sel = hira.search(indexes[sk], q, thr, scale=scale)
            o_hat, st = hira.attend(q, indexes[sk], sel, scale=scale)
            read_pos = read_positions(sel.keep)
            skipped = (p * ~read_pos[:, :, None, :]).sum(-1)  # [L, H, G]
            recall = (p * read_pos[:, :, None, :]).sum(-1)
            err = (o_hat.double().view(L, H, G, D) - o).norm(dim=-1) / o.norm(dim=-1)
            kept_n = (sel.keep & live).sum(-1)  # [L, H]
            oracle_keep = torch.zeros_like(live).scatter_(
                -1, group_order, torch.arange(NB, device=q.device) < kept_n[..., None]) & live
            w = p * read_positions(oracle_keep)[:, :, None, :]
            o_oracle = (w @ V64[:, :, :n]) / w.sum(-1, keepdim=True)
            r = out[label]
            r["oracle_err"].append(((o_oracle - o).norm(dim=-1) / o.norm(dim=-1)).reshape(L, Hq))
            r["kept_n"].append(kept_n.double())
            r["need_same"].append(oracle_count(recall * (1 - 1e-9)))
            r["need99"].append(need99)
            r["live_n"].append(live.sum(-1).double())
            r["err"].append(err.reshape(L, Hq))
            r["skipped"].append(skipped.reshape(L, Hq))
            r["recall"].append(recall.reshape(L, Hq))
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
        "oracle_err_median": quantile(r["oracle_err"], 0.5),
        "oracle_err_p90": quantile(r["oracle_err"], 0.9),
        "need_same_fraction": float((r["need_same"] / r["live_n"]).mean()),
        "need99_fraction": float((r["need99"] / r["live_n"]).mean()),
        "kept_over_need_same_median": quantile(r["kept_n"] / r["need_same"], 0.5),
        "kept_over_need_same_p90": quantile(r["kept_n"] / r["need_same"], 0.9),
        "kept_over_need99_median": quantile(r["kept_n"] / r["need99"], 0.5),
        "kept_over_need99_p90": quantile(r["kept_n"] / r["need99"], 0.9),
        "per_layer": {
            "err_median": r["err"].median(0).values.median(-1).values.tolist(),  # median over steps, then heads
            "oracle_err_median": r["oracle_err"].median(0).values.median(-1).values.tolist(),
            "recall_mean": r["recall"].mean((0, 2)).tolist(),
            "recall_min": r["recall"].amin((0, 2)).tolist(),
            "read_fraction": r["read"].mean((0, 2)).tolist(),
            "kept_fraction": r["kept"].mean((0, 2)).tolist(),
            "need_same_fraction": (r["need_same"] / r["live_n"]).mean((0, 2)).tolist(),
            "need99_fraction": (r["need99"] / r["live_n"]).mean((0, 2)).tolist(),
            "skipped_max": r["skipped"].amax((0, 2)).tolist(),
        },
        "per_layer_head_err_median": r["err"].median(0).values.tolist(),  # [L][Hq]
        "per_layer_head_recall_mean": r["recall"].mean(0).tolist(),  # [L][Hq]
        "per_layer_head_recall_min": r["recall"].amin(0).tolist(),  # [L][Hq]
    }


def run_fidelity(args, model, tok, ids: torch.Tensor) -> dict:
    specs = parse_modes(args.fidelity_modes)
    results = []
    for ctx in args.contexts:
        if ctx > ids.shape[1] or ctx > args.max_positions:
            print(f"fidelity: context {ctx} skipped (text has {ids.shape[1]} tokens, model {args.max_positions})")
            continue
        t0 = time.time()
        cap = capture_qkv(model, text_input(args, ids, 0, ctx).to(args.device), q_last=args.steps,
                          layers=args.hira_layers, chunk=args.prefill_chunk)
        if args.save_captures:
            args.save_captures.mkdir(parents=True, exist_ok=True)
            torch.save(cap, args.save_captures / f"capture_{args.model}_{ctx}.pt")
        r, n_blocks = fidelity_at(cap, specs, args.block_size)
        del cap
        for spec in specs:
            results.append({"context": ctx, "mode": spec.mode, "value": spec.value, "label": spec.label,
                            "n_blocks": n_blocks, **summarize_fidelity(r[spec.label])})
        print(f"fidelity {ctx}: {time.time() - t0:.0f} s")
    return {"steps": args.steps, "block_size": args.block_size, "layers": args.hira_layers,
            "heads": model.config.num_attention_heads, "results": results}


def fidelity_markdown(data: dict, meta: dict) -> str:
    res = data["results"]
    if not res:
        return "## Attention fidelity\n\nNo context fitted the text.\n"
    layers = data["layers"]
    S = [
        "## Attention fidelity on captured KV caches\n",
        f"{meta['model']}, text `{meta['text']}`, {meta['device']}, {meta['date']}. {data['steps']} decode steps per "
        f"context (the last positions of one causal pass, replayed: index built over the rest, one key appended per "
        f"step), the Hira layers {layers} × {data['heads']} query heads, block size {data['block_size']}. Error "
        "‖o − ô‖/‖o‖ and recall (dense attention mass on the keys read) against float64 dense attention; "
        "blocks/keys: fraction kept/read (topk at a fraction of the prefix's blocks; sinks and the 256-token window "
        "always added). Bound: `AttentionStats.skip_bound` (posterior); violations = cases whose measured skipped "
        "mass exceeds it (posterior / prior bound), out of layers × heads × steps.\n",
    ]
    rows = [[r["context"], r["label"], pct(r["kept_fraction"]), pct(r["read_fraction"]), f"{r['err_median']:.2e}",
             f"{r['err_p90']:.2e}", f"{r['err_max']:.2e}", f"{r['recall_mean']:.4f}", f"{r['recall_min']:.4f}",
             f"{r['skipped_median']:.1e}", f"{r['bound_median']:.1e}",
             f"{r['violations']} / {r['prior_violations']} of {r['cases']}"] for r in res]
    S.append(md_table(["context", "mode", "blocks kept", "keys read", "err median", "err p90", "err max",
                       "recall mean", "recall min", "skipped median", "bound median", "violations"], rows) + "\n")
    S.append("Against the oracle (true attention, per KV head and step): the oracle's error when it keeps as many "
             "blocks as the mode, by true mass; the blocks the oracle needs for the recall the mode reached (every "
             "row of the group), and the blocks truly needed for 99% (holding a key ≥ each row's top-0.99 level); "
             "the mode's blocks over each (median / p90).\n")
    rows = [[r["context"], r["label"], pct(r["kept_fraction"]), f"{r['err_median']:.2e}",
             f"{r['oracle_err_median']:.2e}",
             f"{r['err_median'] / r['oracle_err_median']:.2f}×" if r["oracle_err_median"] > 1e-6 else "—",
             pct(r["need_same_fraction"]), pct(r["need99_fraction"]),
             f"{r['kept_over_need_same_median']:.2f} / {r['kept_over_need_same_p90']:.2f}",
             f"{r['kept_over_need99_median']:.2f} / {r['kept_over_need99_p90']:.2f}"] for r in res]
    S.append(md_table(["context", "mode", "blocks kept", "err median", "oracle err median (same budget)",
                       "err / oracle", "oracle needs (same recall)", "truly needed (0.99)",
                       "kept / oracle (same recall)", "kept / truly needed"], rows) + "\n")
    for ctx in sorted({r["context"] for r in res}):
        sel = [r for r in res if r["context"] == ctx and r["mode"] == "topp" and r["value"] == 0.99]
        if not sel:
            continue
        S.append(f"Per layer at {ctx} tokens, `topp 0.99` (the default) with and without the sketch: blocks kept, "
                 "blocks the oracle needs for the same recall and for 0.99, recall (mean, min, per query head), "
                 "error against the oracle's at the same budget.\n")
        rows = []
        for r in sel:
            pl = r["per_layer"]
            for i, layer in enumerate(layers):
                rows.append([r["label"], layer, pct(pl["kept_fraction"][i]), pct(pl["need_same_fraction"][i]),
                             pct(pl["need99_fraction"][i]), f"{pl['recall_mean'][i]:.4f}",
                             f"{pl['recall_min'][i]:.4f}",
                             " ".join(f"{x:.3f}" for x in r["per_layer_head_recall_mean"][i]),
                             f"{pl['err_median'][i]:.2e}", f"{pl['oracle_err_median'][i]:.2e}"])
        S.append(md_table(["mode", "layer", "blocks kept", "oracle (same recall)", "truly needed (0.99)",
                           "recall mean", "recall min", "recall per head", "err median", "oracle err median"],
                          rows) + "\n")
    return "\n".join(S)


# ------------------------------------------------------------------------------------------------------------------
# teacher-forced decoding (perplexity, generation agreement)
# ------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def forced_decode_modes(model, ids: torch.Tensor, prefill: int, config: hira.HiraConfig, modes: dict, desc: str,
                        chunk: int = 0) -> dict:
    """Prefill ``ids[:, :prefill]`` through Hira once (exact, in calls of ``chunk`` tokens), then, for each mode, feed
    ``ids[:, prefill:-1]`` one decode step each from a copy of that prefill (``mode_cache``).

    Args:
        ids: [1, n] int64 on the model's device.
        config: the HiraConfig of the prefill (its threshold unused; the index gets a key sketch if any mode has one).
        modes: {label: (hira.Threshold, key_sketch)}; the first is the reference of ``kl``.
    Returns:
        {label: result}; result: logprob [n - prefill - 1] float64 of the tokens ``ids[0, prefill + 1:]`` and pred
        [n - prefill - 1] int64 (greedy predictions of those positions), both from decode steps; per step, the Hira
        layers' mean ``read`` and ``kept`` fractions, the max ``skip_bound`` and ``kl``, KL(first mode ‖ this
        mode) of the next-token distributions; ``layer_read``: {layer: mean read fraction over the steps}.
    """
    n = ids.shape[1]
    config = dataclasses.replace(config, key_sketch=any(sk for _, sk in modes.values()))
    out, ref = {}, []
    with converted(model, config):
        base = hira.HiraCache(model.config, config)
        prefill_cache(model, ids[:, :prefill], base, chunk)
        for label, (threshold, sketch) in modes.items():
            cache = mode_cache(base, threshold, sketch)
            logprob, pred, read, kept, skip, kl, per_layer = [], [], [], [], [], [], {}
            for i, t in enumerate(tqdm(range(prefill, n - 1), desc=f"{desc} {label}".strip(), leave=False)):
                logits = model(ids[:, t : t + 1], **{hira.CACHE_ARG: cache}).logits[0, -1].double()
                logp = logits.log_softmax(-1)
                if len(ref) <= i:
                    ref.append(logp.float())
                kl.append(float((ref[i].double().exp() * (ref[i].double() - logp)).sum()))
                logprob.append(logp[ids[0, t + 1]])
                pred.append(logits.argmax())
                stats = layer_stats(cache)
                read.append(sum(s["read_fraction"] for s in stats.values()) / len(stats))
                kept.append(sum(s["kept_fraction"] for s in stats.values()) / len(stats))
                skip.append(max(s["skip_bound"] for s in stats.values()))
                for i, s in stats.items():
                    per_layer.setdefault(i, []).append(s["read_fraction"])
            out[label] = {"logprob": torch.stack(logprob).cpu(), "pred": torch.stack(pred).cpu(), "read": read,
                          "kept": kept, "skip_bound": skip, "kl": kl,
                          "layer_read": {i: sum(v) / len(v) for i, v in per_layer.items()}}
            del cache
    return out


def hira_forced_decode(model, ids: torch.Tensor, prefill: int, config: hira.HiraConfig, desc: str) -> dict:
    """``forced_decode_modes`` for ``config``'s own mode alone: its result."""
    return forced_decode_modes(model, ids, prefill, config, {"": (config.threshold, config.key_sketch)}, desc)[""]


@torch.no_grad()
def dense_logprob(model, ids: torch.Tensor, prefill: int, chunk: int = 0) -> torch.Tensor:
    """Log-probabilities [n - prefill - 1] of ``ids[0, prefill + 1:]`` from the unconverted model: one forward pass,
    or with ``chunk``, the first ``prefill`` tokens in calls of ``chunk`` through a ``DynamicCache``, then the rest."""
    n = ids.shape[1]
    if not chunk:
        logits = model(ids, logits_to_keep=n - prefill).logits[0, :-1].double()  # positions prefill .. n-2
    else:
        cache = DynamicCache(config=model.config)
        prefill_cache(model, ids[:, :prefill], cache, chunk)
        logits = model(ids[:, prefill:], **{hira.CACHE_ARG: cache}).logits[0, :-1].double()
    return logits.log_softmax(-1).gather(-1, ids[0, prefill + 1 :, None]).squeeze(-1).cpu()


def run_perplexity(args, model, tok, ids: torch.Tensor) -> dict:
    specs = parse_modes(args.ppl_modes)
    per_window, overall, meta = [], [], []
    for W_asked in args.ppl_window:
        W = min(W_asked, args.max_positions, ids.shape[1])
        if W < W_asked:
            print(f"perplexity: window shortened to {W} tokens (text {ids.shape[1]}, model {args.max_positions})")
        windows = min(args.ppl_windows, ids.shape[1] // W)
        if windows < args.ppl_windows:
            print(f"perplexity: {windows} window(s) of {W} tokens fit the text ({args.ppl_windows} asked)")
        prefill = W - 1 - args.ppl_decode
        if prefill < 1:
            raise ValueError(f"--ppl-decode {args.ppl_decode} leaves no prefill in a window of {W} tokens")
        n_blocks = -(-prefill // args.block_size)
        modes = {s.label: (s.threshold(n_blocks), s.sketch) for s in specs}
        config = hira.HiraConfig(block_size=args.block_size, min_context=MIN_CONTEXT,
                                 calibration_queries=args.calibration_queries,
                                 max_cache_len=cache_capacity(prefill, W - prefill, args.block_size, args.capacity))
        totals = {"dense": []}
        for w in range(windows):
            win = text_input(args, ids, w * W, W).to(args.device)
            ref = dense_logprob(model, win, prefill, args.prefill_chunk)
            totals["dense"].append(ref)
            per_window.append({"window_tokens": W, "window": w, "mode": "model (dense)", "label": "model (dense)",
                               "ppl": math.exp(-float(ref.mean()))})
            res = forced_decode_modes(model, win, prefill, config, modes, f"ppl {W} w{w}", args.prefill_chunk)
            for spec in specs:
                r = res[spec.label]
                totals.setdefault(spec.label, []).append(r["logprob"])
                per_window.append({"window_tokens": W, "window": w, "mode": spec.mode, "value": spec.value,
                                   "label": spec.label, "ppl": math.exp(-float(r["logprob"].mean())),
                                   "read_fraction": sum(r["read"]) / len(r["read"]),
                                   "kept_fraction": sum(r["kept"]) / len(r["kept"]),
                                   "skip_bound_max": max(r["skip_bound"]),
                                   "agreement": float((r["pred"] == res[specs[0].label]["pred"]).double().mean()),
                                   "kl": sum(r["kl"]) / len(r["kl"]),
                                   "layer_read": r["layer_read"]})
        dense_ppl = math.exp(-float(torch.cat(totals["dense"]).mean())) if windows else float("nan")
        meta.append({"window": W, "windows": windows, "prefill": prefill, "decode": W - 1 - prefill,
                     "dense_ppl": dense_ppl})
        for spec in specs:
            rows = [r for r in per_window if r["label"] == spec.label and r["window_tokens"] == W]
            ppl = math.exp(-float(torch.cat(totals[spec.label]).mean()))
            layers = rows[0]["layer_read"].keys()
            overall.append({"window": W, "mode": spec.mode, "value": spec.value, "label": spec.label, "ppl": ppl,
                            "delta": ppl / dense_ppl - 1,
                            "read_fraction": sum(r["read_fraction"] for r in rows) / len(rows),
                            "kept_fraction": sum(r["kept_fraction"] for r in rows) / len(rows),
                            "skip_bound_max": max(r["skip_bound_max"] for r in rows),
                            "agreement": sum(r["agreement"] for r in rows) / len(rows),
                            "kl": sum(r["kl"] for r in rows) / len(rows),
                            "layer_read": {i: sum(r["layer_read"][i] for r in rows) / len(rows) for i in layers}})
    return {"windows": meta, "block_size": args.block_size, "agreement_with": specs[0].label, "overall": overall,
            "per_window": per_window}


def perplexity_markdown(data: dict, meta: dict) -> str:
    S = [
        "## Perplexity, dense vs Hira\n",
        f"{meta['model']}, text `{meta['text']}`, {meta['device']}, {meta['date']}. Per window length: prefill "
        f"(exact, one prefill shared by every mode), then the last positions teacher-forced one decode step each; "
        f"perplexity over those positions. Dense: the unconverted model. `dense` below is Hira's sparse path keeping "
        f"every block (the anchor). Keys read / blocks kept: mean over steps and Hira layers; skip bound: the "
        f"largest posterior bound of any step, layer and head; top-1 agreement: the greedy prediction equals "
        f"`{data['agreement_with']}`'s; KL: mean over positions of KL(`{data['agreement_with']}` ‖ mode) of the "
        f"next-token distributions, in nats.\n",
    ]
    for m in data["windows"]:
        W = m["window"]
        S.append(f"**{W} tokens** ({m['windows']} window(s): prefill {m['prefill']}, {m['decode']} decode "
                 f"positions). Dense perplexity: {m['dense_ppl']:.4f}\n")
        res = [r for r in data["overall"] if r["window"] == W]
        layers = list(res[0]["layer_read"]) if res else []
        rows = [[r["label"], f"{r['ppl']:.4f}", f"{100 * r['delta']:+.3f}%", pct(r["read_fraction"]),
                 pct(r["kept_fraction"]), f"{r['skip_bound_max']:.2e}", f"{r['agreement']:.4f}", f"{r['kl']:.2e}"]
                + [pct(r["layer_read"][i]) for i in layers] for r in res]
        S.append(md_table(["mode", "perplexity", "Δ vs dense", "keys read", "blocks kept", "skip bound max",
                           "top-1 agreement", "KL"] + [f"read L{i}" for i in layers], rows) + "\n")
    if any(m["windows"] > 1 for m in data["windows"]):
        rows = [[r["window_tokens"], r["window"], r["label"], f"{r['ppl']:.4f}",
                 pct(r["read_fraction"]) if "read_fraction" in r else "—"] for r in data["per_window"]]
        S.append("Per window:\n\n" + md_table(["tokens", "window", "mode", "perplexity", "keys read"], rows) + "\n")
    return "\n".join(S)


# ------------------------------------------------------------------------------------------------------------------
# section 3: passkey retrieval
# ------------------------------------------------------------------------------------------------------------------
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about it.\n\n")
PASSKEY_QUESTION = "\n\nWhat is the pass key?"
PASSKEY_ANSWER = "The pass key is"
NEEDLE_INTRO = ("Some secret numbers are hidden inside the text below. Find them and memorize them. I will quiz you "
                "about one of them.\n\n")
NEEDLE_THINGS = ("red kite", "blue door", "green lamp", "silver coin", "yellow boat", "black clock", "white horse",
                 "golden key")
VT_INTRO = "Variables are assigned inside the text below. Follow their values: I will ask about one of them.\n\n"


def wrap_prompt(tok, chat: bool, text: str, answer: str) -> torch.Tensor:
    """[1, n] prompt ids: ``text`` as the user's turn of the chat template then ``answer`` as the start of the
    assistant's (``chat``), or for a base model <bos> (the tokenizer's), ``text``, a space and ``answer``."""
    if not chat:
        return tok(text + " " + answer, return_tensors="pt").input_ids
    msgs = [{"role": "user", "content": text}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    answer_ids = tok(answer, add_special_tokens=False, return_tensors="pt").input_ids
    return torch.cat([ids["input_ids"], answer_ids], dim=1)


def passkey_prompt(tok, n_tokens: int, depth: float, key: str, chat: bool = True) -> torch.Tensor:
    """[1, ≤ n_tokens] prompt hiding ``key`` at ``depth`` (0: first, 1: last) of the filler, ending in "The pass key
    is" (the assistant's turn of the chat template, or plain text for a base model)."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "

    def build(reps: int) -> torch.Tensor:
        cut = round(depth * reps)
        body = PASSKEY_FILLER * cut + needle + PASSKEY_FILLER * (reps - cut)
        return wrap_prompt(tok, chat, PASSKEY_INTRO + body + PASSKEY_QUESTION, PASSKEY_ANSWER)

    per_rep = len(tok(PASSKEY_FILLER, add_special_tokens=False).input_ids)
    reps = max(0, (n_tokens - build(0).shape[1]) // per_rep)
    ids = build(reps)
    while ids.shape[1] > n_tokens and reps > 0:
        reps -= 1
        ids = build(reps)
    return ids


def hide(text: str, inserts: list[tuple[float, str]]) -> str:
    """``text`` with each (depth, sentence) inserted at that fraction of its length, moved forward to just after
    the next sentence end ('. '), in depth order."""
    cuts = []
    for depth, sentence in sorted(inserts, key=lambda x: x[0]):
        pos = round(depth * len(text))
        end = text.find(". ", pos)
        cuts.append((end + 2 if end >= 0 and depth < 1 else len(text), sentence))
    out, last = [], 0
    for pos, sentence in cuts:
        pos = max(pos, last)
        out += [text[last:pos], sentence + " "]
        last = pos
    return "".join(out + [text[last:]])


def haystack_prompt(tok, chat: bool, ids_text: torch.Tensor, n_tokens: int, start: int, intro: str,
                    inserts: list[tuple[float, str]], question: str, answer: str) -> torch.Tensor:
    """[1, ≤ n_tokens] prompt: ``intro``, a stretch of the text from token ``start`` with the ``inserts`` hidden in it
    (``hide``), ``question``; then ``answer`` (``wrap_prompt``). The stretch is as long as fits."""
    h = n_tokens
    while True:
        hay = tok.decode(ids_text[0, start : start + h])
        ids = wrap_prompt(tok, chat, intro + hide(hay, inserts) + question, answer)
        if ids.shape[1] <= n_tokens:
            return ids
        h -= ids.shape[1] - n_tokens


def parse_passkey(text: str) -> str | None:
    m = re.search(r"\d{5}", text)
    return m.group(0) if m else None


def random_key(rng: random.Random) -> str:
    return str(rng.randrange(10000, 100000))


def passkey_case(args, tok, ids_text, n: int, depth: float, rng: random.Random) -> tuple[torch.Tensor, str]:
    key = random_key(rng)
    return passkey_prompt(tok, n, depth, key, args.chat), key


def needle_case(args, tok, ids_text, n: int, depth: float, rng: random.Random) -> tuple[torch.Tensor, str]:
    """``--needle-keys`` secret numbers of different things hidden in the text: the one asked for at ``depth``, the
    others at random depths."""
    things = rng.sample(NEEDLE_THINGS, args.needle_keys)
    keys = [random_key(rng) for _ in things]
    inserts = [(depth if i == 0 else rng.random(), f"The secret number of the {t} is {k}.")
               for i, (t, k) in enumerate(zip(things, keys))]
    start = rng.randrange(0, ids_text.shape[1] - n)
    ids = haystack_prompt(tok, args.chat, ids_text, n, start, NEEDLE_INTRO, inserts,
                          f"\n\nWhat is the secret number of the {things[0]}?",
                          f"The secret number of the {things[0]} is")
    return ids, keys[0]


def vartrack_case(args, tok, ids_text, n: int, depth: float, rng: random.Random) -> tuple[torch.Tensor, str]:
    """A chain of ``--vt-hops`` assignments hidden in the text, VAR A = 12345, VAR B = VAR A, ...: the first at
    ``depth``, the others spread in order between it and the end; the question asks for the last variable's value."""
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(args.vt_hops)]
    key = random_key(rng)
    statements = [f"VAR {names[0]} = {key}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    inserts = [(depth + (0.98 - depth) * i / len(statements) if depth < 1 else 1.0, st)
               for i, st in enumerate(statements)]
    start = rng.randrange(0, ids_text.shape[1] - n)
    ids = haystack_prompt(tok, args.chat, ids_text, n, start, VT_INTRO, inserts,
                          f"\n\nWhat is the value of VAR {names[-1]}?", f"VAR {names[-1]} =")
    return ids, key


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


@torch.no_grad()
def greedy_modes(model, ids: torch.Tensor, new_tokens: int, config: hira.HiraConfig, modes: dict,
                 chunk: int = 0) -> dict:
    """Greedy continuations of ``ids`` [1, n] for several modes from one prefill: the first n − 1 tokens prefilled
    through Hira (exact), then per mode (``mode_cache``) the last prompt token and every generated one run as decode
    steps, so each answer token comes from a sparse step. EOS suppressed.

    Returns:
        {label: {"tokens": [new_tokens] int64, "read": mean read fraction of the Hira layers over the steps}}.
    """
    config = dataclasses.replace(config, key_sketch=any(sk for _, sk in modes.values()))
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    out = {}
    with converted(model, config):
        base = hira.HiraCache(model.config, config)
        prefill_cache(model, ids[:, :-1], base, chunk)
        for label, (threshold, sketch) in modes.items():
            cache = mode_cache(base, threshold, sketch)
            nxt, tokens, read = ids[:, -1:], [], []
            for _ in range(new_tokens):
                logits = model(nxt, **{hira.CACHE_ARG: cache}).logits[0, -1]
                logits[eos] = -math.inf
                nxt = logits.argmax().view(1, 1)
                tokens.append(int(nxt))
                stats = layer_stats(cache)
                read.append(sum(s["read_fraction"] for s in stats.values()) / len(stats))
            out[label] = {"tokens": torch.tensor(tokens), "read": sum(read) / len(read)}
            del cache
    return out


RETRIEVAL = {
    "passkey": ("Passkey retrieval", passkey_case,
                "A random 5-digit key hidden at a depth of repeated filler (\"The grass is green...\"); the answer is "
                "primed with \"The pass key is\"."),
    "needle": ("Multi-key needle retrieval", needle_case,
               "Several secret numbers of different things (\"The secret number of the red kite is 12345.\") hidden "
               "in the text; the one asked for at the given depth, the others at random depths; the answer is primed "
               "with \"The secret number of the ... is\"."),
    "vartrack": ("Variable tracking", vartrack_case,
                 "A chain of assignments (VAR A = 12345. ... VAR B = VAR A. ...) hidden in the text, the first at the "
                 "given depth, the rest in order after it; the question asks for the last variable's value, the "
                 "answer primed with \"VAR <last> =\"."),
}


def run_retrieval(args, model, tok, ids_text: torch.Tensor, task: str) -> dict:
    specs = parse_modes(args.modes)
    _, make_case, _ = RETRIEVAL[task]
    rng = random.Random(f"{args.seed}-{task}")
    cases = [(n, d) for n in args.passkey_lengths if n <= args.max_positions for d in args.passkey_depths]
    labels = ["dense"] + [s.label for s in specs]
    results = []
    for n, depth in tqdm(cases, desc=task):
        ids, key = make_case(args, tok, ids_text, n - args.passkey_new_tokens, depth, rng)
        ids = ids.to(args.device)
        P = ids.shape[1] - 1  # the prefill; the last prompt token is the first decode step
        n_blocks = -(-P // args.block_size)
        modes = {"dense": (hira.Dense(), False)}
        modes.update({s.label: (s.threshold(n_blocks), s.sketch) for s in specs})
        config = hira.HiraConfig(block_size=args.block_size, min_context=MIN_CONTEXT,
                                 calibration_queries=args.calibration_queries, max_cache_len=cache_capacity(
            P, args.passkey_new_tokens + 1, args.block_size, args.capacity))
        res = greedy_modes(model, ids, args.passkey_new_tokens, config, modes, args.prefill_chunk)
        answers = {k: tok.decode(r["tokens"]) for k, r in res.items()}
        results.append({"length": n, "prompt_tokens": ids.shape[1], "depth": depth, "key": key, "answers": answers,
                        "correct": {k: parse_passkey(a) == key for k, a in answers.items()},
                        "same_as_dense": {k: parse_passkey(a) == parse_passkey(answers["dense"])
                                          for k, a in answers.items()},
                        "read": {k: r["read"] for k, r in res.items()}})
    return {"task": task, "labels": labels, "results": results, "min_context": MIN_CONTEXT}


def retrieval_markdown(data: dict, meta: dict) -> str:
    labels, res = data["labels"], data["results"]
    title, _, what = RETRIEVAL[data["task"]]
    S = [
        f"## {title}\n",
        f"{meta['model']}, text `{meta['text']}`, {meta['device']}, {meta['date']}. {what} Greedy, first 5-digit "
        f"number parsed; ✓ = the key. One prefill per case (exact, all but the last prompt token), then every mode "
        f"from a copy of it: the last prompt token and the answer tokens are decode steps. `dense` = every block "
        f"read through Hira's path (exact attention). Prompts under {data['min_context']} tokens decode densely "
        f"(HiraConfig.min_context).\n",
    ]

    def mark(r, k):
        return "✓" if r["correct"][k] else "✗ " + repr(r["answers"][k].strip()[:24])

    rows = [[r["length"], r["prompt_tokens"], f"{r['depth']:.0%}", r["key"]] + [mark(r, k) for k in labels]
            for r in res]
    S.append(md_table(["length", "prompt tokens", "depth", "key"] + labels, rows) + "\n")
    rows = []
    for n in sorted({r["length"] for r in res}):
        sub = [r for r in res if r["length"] == n]
        rows.append([n] + [f"{sum(r['correct'][k] for r in sub)}/{len(sub)}" for k in labels]
                    + [f"{sum(r['same_as_dense'][k] for r in sub)}/{len(sub)}" for k in labels[1:]]
                    + [pct(sum(r["read"][k] for r in sub) / len(sub)) for k in labels[1:]])
    rows.append(["all"] + [f"{sum(r['correct'][k] for r in res)}/{len(res)}" for k in labels]
                + [f"{sum(r['same_as_dense'][k] for r in res)}/{len(res)}" for k in labels[1:]]
                + [pct(sum(r["read"][k] for r in res) / len(res)) for k in labels[1:]])
    S.append("Accuracy per length; same answer as dense (the parsed number); keys read by the Hira layers:\n\n"
             + md_table(["length"] + [f"correct: {k}" for k in labels] + [f"= dense: {k}" for k in labels[1:]]
                        + [f"read: {k}" for k in labels[1:]], rows) + "\n")
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
        prompt = text_input(args, ids_text, start, ctx).to(args.device)
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
def load_results(out: Path, section: str) -> tuple[list[dict], str]:
    """Every ``quality_<section>*.json`` in ``out`` (runs with different ``--tag``s): their result rows, and the
    model named in their metadata."""
    rows, model = [], ""
    for path in sorted(out.glob(f"quality_{section}*.json")):
        data = json.loads(path.read_text())
        rows += data["results"] if section == "fidelity" else data["overall"]
        model = data["meta"]["model"].split(" (")[0]
    return rows, model


PLOT_COLORS = {"topk": "C0", "topp": "C1", "certified": "C2", "topk +sketch": "C9", "topp +sketch": "C3",
               "certified +sketch": "C5", "fixed": "C4", "dense": "k"}


def curve(r: dict) -> str:
    return r["mode"] + (" +sketch" if r["label"].endswith("+sketch") else "")


def plot(out: Path) -> list[Path]:
    """From the JSON files in ``out``: ``quality_pareto.png``, the error against the fraction of keys read (fidelity:
    relative output error per mode at the longest context, with the oracle at the same budget; perplexity: Δ
    against dense per window length), and ``quality_read_vs_context.png``, the fraction read against context per
    mode (perplexity runs, else fidelity), the default's layers dotted, and the oracle of ``estimate.json``
    (``bench_estimate.py``) where the folder has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid, model = load_results(out, "fidelity")
    ppl, ppl_model = load_results(out, "perplexity")
    model = model or ppl_model
    paths = []
    if fid or ppl:
        kl = [r for r in ppl if "kl" in r]
        panels = [x for x in (fid, ppl, kl) if x]
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
        col = 0
        if fid:
            ax = axes[0, col]
            col += 1
            ctx = max(r["context"] for r in fid)  # the longest context: one curve per mode
            at = [r for r in fid if r["context"] == ctx]
            for name, color in PLOT_COLORS.items():
                pts = sorted((r["read_fraction"], r["err_median"]) for r in at if curve(r) == name)
                if not pts:
                    continue
                x, y = zip(*pts)
                style = dict(marker="*", markersize=12, linestyle="none") if name == "dense" else dict(
                    marker="s" if "sketch" in name else "o", linestyle="--" if "sketch" in name else "-")
                ax.plot(x, y, color=color, label=name, **style)
            pts = sorted((r["read_fraction"], r["oracle_err_median"]) for r in at
                         if r["mode"] in ("topk", "topp") and "oracle_err_median" in r)
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, color="gray", marker=".", linestyle="none", label="oracle, same blocks as each mode")
            ax.set_yscale("log")
            ax.set_xlabel("fraction of KV read")
            ax.set_ylabel("relative output error ‖o − ô‖/‖o‖ (median)")
            ax.set_title(f"Attention fidelity, {model}, {ctx} tokens (real KV caches)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        for rows, key, ylabel, title in ((ppl, "delta", "perplexity Δ vs dense (%)", "Perplexity"),
                                         (kl, "kl", "KL(dense ‖ mode) per token, nats (mean)", "KL to dense")):
            if not rows:
                continue
            ax = axes[0, col]
            col += 1
            windows = sorted({r.get("window", 0) for r in rows})
            markers = "osD^v"
            for name, color in PLOT_COLORS.items():
                for j, W in enumerate(windows):
                    pts = sorted((r["read_fraction"], r[key] * (100 if key == "delta" else 1)) for r in rows
                                 if curve(r) == name and r.get("window", 0) == W and (key == "delta" or r[key] > 0))
                    if not pts:
                        continue
                    x, y = zip(*pts)
                    ax.plot(x, y, color=color, marker=markers[j % len(markers)], alpha=0.8,
                            label=f"{name}, {W // 1024}K" if W else name)
            if key == "delta":
                ax.axhline(0, color="gray", lw=0.8)
            else:
                ax.set_yscale("log")
            ax.set_xlabel("fraction of KV read (Hira layers)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}, teacher-forced decode, {model}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        paths.append(out / "quality_pareto.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    src = [(r.get("window", 0), r) for r in ppl] or [(r["context"], r) for r in fid]
    contexts = sorted({c for c, _ in src})
    if len(contexts) > 1:
        fig, ax = plt.subplots(figsize=(7.5, 5))
        labels = sorted({r["label"] for _, r in src}, key=lambda x: (curve({"mode": x.split()[0], "label": x}), x))
        for i, label in enumerate(labels):
            pts = sorted((c, r["read_fraction"]) for c, r in src if r["label"] == label)
            x, y = zip(*pts)
            ax.plot(x, y, marker="o", color=plt.cm.tab20(i % 20), label=label)
            layer_pts = sorted(((c, r["layer_read"]) for c, r in src if r["label"] == label and "layer_read" in r),
                               key=lambda x: x[0])
            if label == "topp 0.99" and layer_pts:
                for layer in layer_pts[0][1]:
                    xs = [c for c, lr in layer_pts]
                    ax.plot(xs, [lr[layer] for c, lr in layer_pts], color=plt.cm.tab20(i % 20), linestyle=":", lw=1)
                    ax.annotate(f"L{layer}", (xs[-1], layer_pts[-1][1][layer]), fontsize=7, xytext=(3, 0),
                                textcoords="offset points")
        est = out / "estimate.json"
        if est.is_file():  # bench_estimate.py's oracle: the fewest blocks holding 99% of the mass, mean over layers
            oracle = sorted((int(c), sum(r["oracle99"]) / len(r["oracle99"]))
                            for c, r in json.loads(est.read_text())["results"].items())
            ax.plot(*zip(*oracle), color="k", linestyle="--", marker="x",
                    label="oracle: fewest blocks for 99% of the mass")
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c // 1024}K" for c in contexts])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("fraction of keys read (Hira layers)")
        ax.set_title(f"Keys read against context, {model} (dotted: the default's layers)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out / "quality_read_vs_context.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------------
RUNNERS = {
    "fidelity": (run_fidelity, fidelity_markdown),
    "perplexity": (run_perplexity, perplexity_markdown),
    "passkey": (lambda *a: run_retrieval(*a, "passkey"), retrieval_markdown),
    "needle": (lambda *a: run_retrieval(*a, "needle"), retrieval_markdown),
    "vartrack": (lambda *a: run_retrieval(*a, "vartrack"), retrieval_markdown),
    "generation": (run_generation, generation_markdown),
}


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="smollm2")
    ap.add_argument("--text", type=Path, default=None, help="a long plain-text file (default: see above)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True, help="folder for the tables, JSON and the plot")
    ap.add_argument("--tag", default="", help="suffix of the output files (quality_<section><tag>.json/.md), so "
                                              "runs of different lengths share a folder and its plots")
    ap.add_argument("--sections", default="fidelity,perplexity,passkey,generation",
                    help=f"comma list of {SECTIONS}")
    ap.add_argument("--block-size", type=int, default=hira.HiraConfig().block_size)
    ap.add_argument("--calibration-queries", type=int, default=hira.HiraConfig().calibration_queries,
                    help="HiraConfig.calibration_queries (0: the budgeted estimate uncalibrated)")
    ap.add_argument("--capacity", type=int, default=-1,
                    help="HiraCache slots of every model run; 0: sized to each run; -1 (default): 0 on CPU, the "
                         "model's max positions + 1024 on CUDA (one compiled decode shape)")
    ap.add_argument("--prefill-chunk", type=int, default=0,
                    help="prefill (and the dense reference and fidelity capture) in calls of this many tokens (0: "
                         "one call); Gemma 3's sliding-window layers then attend their window only")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("fidelity")
    g.add_argument("--contexts", type=int_list, default=[2048, 4096, 8192])
    g.add_argument("--steps", type=int, default=64, help="decode positions per captured context")
    g.add_argument("--fidelity-modes", default=FIDELITY_MODES)
    g.add_argument("--save-captures", type=Path, default=None, help="folder to save each context's capture in")
    g = ap.add_argument_group("perplexity")
    g.add_argument("--ppl-window", type=int_list, default=[8192],
                   help="window lengths, comma list (each capped at max positions)")
    g.add_argument("--ppl-windows", type=int, default=2, help="windows per length")
    g.add_argument("--ppl-decode", type=int, default=256, help="teacher-forced decode positions per window")
    g.add_argument("--ppl-modes", default="dense,topp:0.99,topp:0.9,topk:0.2,topk:0.05")
    g = ap.add_argument_group("retrieval (passkey, needle, vartrack) and generation")
    g.add_argument("--modes", default="topp:0.99,topp:0.9", help="Hira modes compared with dense")
    g.add_argument("--passkey-lengths", type=int_list, default=[1024, 2048, 4096, 8192],
                   help="prompt lengths of the retrieval sections")
    g.add_argument("--passkey-depths", default="0,0.25,0.5,0.75,1", help="depths of the retrieval sections")
    g.add_argument("--passkey-new-tokens", type=int, default=8)
    g.add_argument("--needle-keys", type=int, default=4, help="secret numbers hidden per needle prompt")
    g.add_argument("--vt-hops", type=int, default=3, help="assignments per variable-tracking chain")
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
    torch._dynamo.config.recompile_limit = 64

    args.out.mkdir(parents=True, exist_ok=True)
    text_path = args.text or default_text()
    model, tok = load_model(args)
    args.max_positions = int(model.config.max_position_embeddings)
    if args.capacity == -1:
        args.capacity = args.max_positions + 1024 if args.device.startswith("cuda") else 0
    ids = tok(text_path.read_text(encoding="utf-8", errors="replace"), return_tensors="pt",
              add_special_tokens=False).input_ids
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    meta = {
        "model": f"{args.model_name} (max positions {args.max_positions})",
        "text": f"{text_path.name} ({ids.shape[1]} tokens)",
        "device": f"{args.device} ({device_name}, {torch.get_num_threads()} thread(s)), torch {torch.__version__}",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
    }
    print(f"{meta['model']}; {meta['text']}; {meta['device']}; sections {sections}")
    for name in sections:
        run, markdown = RUNNERS[name]
        t0 = time.time()
        data = run(args, model, tok, ids)
        data["meta"] = {**meta, "seconds": time.time() - t0}
        (args.out / f"quality_{name}{args.tag}.json").write_text(json.dumps(data, indent=1))
        md = markdown(data, meta) + f"\n({name}: {time.time() - t0:.0f} s)\n"
        (args.out / f"quality_{name}{args.tag}.md").write_text(md)
        print(md)
    for path in plot(args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
