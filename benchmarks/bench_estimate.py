#!/usr/bin/env python3
"""Where the budgeted modes' mass estimate goes wrong: estimate against oracle, per layer and query head.

Input: captures saved by ``bench_quality.py --save-captures DIR`` (post-RoPE Q of the last T positions, all K and V
of the Hira layers). As in its fidelity section, each layer's index is built over the keys before the captured
positions and one key is appended per replayed decode step. Per step, layer and query head, against the true
attention (float64):

- the true mass of every block; the **oracle**: the fewest blocks (sinks and window first, then by true mass) that
  hold 99% of the mass, union over the query heads of the KV group;
- for each estimator of a block's log-mass, ``topp(0.99)``'s selection from it (``_topp_keep``, sinks and window
  first, union over the group, as ``hira.search`` does), its blocks, its recall (true mass read) and the ratio of the
  true skipped mass to the skipped mass the estimate believed (> 1: the estimate thinks the dropped blocks lighter
  than they are). Estimators:
  - ``ball`` (the default without a sketch): log n + q·c + ½‖q‖²·var (``hira.index.bounds.bound_and_estimate``);
  - ``ball, var×a``: the spread term scaled by a, i.e. the variance along q taken a times the mean variance per
    dimension (keys are not isotropic);
  - ``gauss``: log n + q·c + ½ Σ q_i²·var_i with each block's spread per dimension (D more numbers per block than
    the index keeps: the Gaussian log-MGF without the isotropy assumption);
  - ``sketch``: log Σ exp(q·k̃) over the int4 sketch keys (``key_sketch=True``);
- ``calibrated``: the ball estimate with a per-layer p, the smallest p of a grid whose mean recall over the first
  ``--calib`` steps reaches 0.99 (a calibration on known queries), scored on the remaining steps only.

    python3 benchmarks/bench_estimate.py --captures /tmp/cap/capture_gemma3-270m_16384.pt \\
        /tmp/cap/capture_gemma3-270m_32768.pt --out benchmarks/quality_gemma3/estimate

``--passkey LENGTH,DEPTH KEY`` captures its own case first instead (Gemma 3 270M): the passkey prompt of
``bench_quality.py`` (LENGTH tokens, the key at DEPTH) followed by the answer " KEY. Remember", the answer's tokens
being the replayed decode steps (the queries that must find the key).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import hira  # noqa: E402
from capture import capture_qkv, unpack_capture  # noqa: E402
from harness import md_table  # noqa: E402
from hira.flex.attention import fold_gqa  # noqa: E402
from hira.index.bounds import bound_and_estimate  # noqa: E402
from hira.index.index import append as index_append  # noqa: E402
from hira.index.sketch import block_score_stats  # noqa: E402
from hira.selection.threshold import _topp_keep  # noqa: E402

P_GRID = (0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999)
VAR_SCALES = (0.0, 0.5, 2.0)


@torch.no_grad()
def replay(cap: dict, block_size: int) -> dict:
    """Per step: {name: tensor} of the estimators' topp(p) selections against the truth (see the docstring).

    Returns {estimator: {p: {"recall": [T, L, H, G], "kept": [T, L, H], "skip_ratio": [T, L, H, G]}}},
    plus "oracle99": [T, L, H] blocks and "live": [T, L, H].
    """
    Q, K, V, scale, L, T, Hq, D, H, N, G, P, n_blocks = unpack_capture(cap, block_size)
    index = hira.build_index(K[:, :, :P], V[:, :, :P], hira.HiraConfig(block_size=block_size, key_sketch=True),
                             capacity=n_blocks * block_size + T)
    K64 = K.double()
    ests = ["ball"] + [f"ball, var×{a:g}" for a in VAR_SCALES] + ["gauss: per-dimension spread", "sketch"]
    ps = {e: (P_GRID if e == "ball" else (0.99,)) for e in ests}
    out = {e: {p: {"recall": [], "kept": [], "skip_ratio": []} for p in ps[e]} for e in ests}
    out["oracle99"], out["live"] = [], []
    for t in range(T):
        n = P + t + 1
        index_append(index, K[:, :, n - 1 : n], V[:, :, n - 1 : n])
        rows = fold_gqa(Q[:, t, :, None, :].float(), H) * scale  # [L, H, G, D]
        p = (rows.double() @ K64[:, :, :n].transpose(-1, -2)).softmax(-1)  # [L, H, G, n]
        rank = index.rank.long()
        C = rank.shape[-1]
        NB = C // block_size
        real = (rank >= 0)[:, :, None, :]
        slot_p = p.gather(-1, rank.clamp_min(0)[:, :, None, :].expand(L, H, G, C)) * real
        block_p = slot_p.view(L, H, G, NB, block_size).sum(-1)  # [L, H, G, NB] true mass per block
        leaves = index.levels[0]
        live = leaves.count > 0
        forced = index.forced_leaves()
        forced_p = (block_p * forced[:, :, None, :]).sum(-1)
        free, order = block_p.masked_fill(~(live & ~forced)[:, :, None, :], -1.0).sort(-1, descending=True)
        before = forced_p[..., None] + free.clamp_min(0).cumsum(-1) - free.clamp_min(0)
        take = (before < 0.99) & (free >= 0)
        oracle = torch.zeros_like(take).scatter_(-1, order, take) | forced[:, :, None, :]
        out["oracle99"].append((oracle.any(2) & live).sum(-1))
        out["live"].append(live.sum(-1))
        _, est = bound_and_estimate(rows, leaves)  # [L, H, G, NB]
        spread = 0.5 * (rows * rows).sum(-1, keepdim=True) * leaves.var[:, :, None, :]
        estimates = {"ball": est}
        for a in VAR_SCALES:
            estimates[f"ball, var×{a:g}"] = est + (a - 1) * spread

        # Per-dimension spread of each block (D numbers per block, not kept by the index): ½ Σ q_i² var_i.
        keys = index.keys.float().view(L, H, NB, block_size, D)
        w = index.valid.view(L, 1, NB, block_size, 1).float()
        dev = (keys - leaves.center[:, :, :, None, :]) * w
        var_d = (dev * dev).sum(-2) / leaves.count.clamp_min(1)[..., None].float()  # [L, H, NB, D]
        log_n = leaves.count.clamp_min(1).float().log()[:, :, None, :]
        qc = rows @ leaves.center.transpose(-1, -2)
        gauss = log_n + qc + 0.5 * (rows * rows) @ var_d.transpose(-1, -2)
        estimates["gauss: per-dimension spread"] = gauss.masked_fill(~live[:, :, None, :], -math.inf)
        estimates["sketch"] = block_score_stats(rows, index.sketch, index.valid)[1]
        for name, e in estimates.items():
            share = e.softmax(-1).nan_to_num(nan=0.0).double()
            for pp in ps[name]:
                keep = (_topp_keep(e, forced, pp) & live) | forced  # [L, H, NB]
                skipped = (live & ~keep)[:, :, None, :]
                true_skip = (block_p * skipped).sum(-1)
                est_skip = (share * skipped).sum(-1)
                r = out[name][pp]
                r["recall"].append(1 - true_skip)
                r["kept"].append(keep.sum(-1))
                r["skip_ratio"].append(true_skip / est_skip.clamp_min(1e-12))
    res = {"oracle99": torch.stack(out.pop("oracle99")).double(), "live": torch.stack(out.pop("live")).double()}
    for name, by_p in out.items():
        res[name] = {pp: {k: torch.stack(v).double() for k, v in r.items()} for pp, r in by_p.items()}
    return res


def summarize(res: dict, layers: list[int], calib: int) -> dict:
    """Per layer (and head for the recall): kept fraction, recall, skip ratio per estimator; oracle; calibration."""
    live = res["live"]  # [T, L, H]
    out = {"layers": layers, "oracle99": (res["oracle99"] / live).mean((0, 2)).tolist(), "estimators": {},
           "calibrated": {}}
    for name in [k for k in res if k not in ("oracle99", "live")]:
        r = res[name][0.99]
        out["estimators"][name] = {
            "kept": (r["kept"] / live).mean((0, 2)).tolist(),
            "recall_mean": r["recall"].mean((0, 2, 3)).tolist(),
            "recall_min": r["recall"].amin((0, 2, 3)).tolist(),
            "recall_head": r["recall"].mean(0).flatten(1).tolist(),  # [L][H·G]
            "skip_ratio_median": r["skip_ratio"].flatten(2).median(-1).values.median(0).values.tolist(),
        }
    # Per layer: the smallest p of the grid whose mean recall over the first `calib` steps reaches 0.99.
    ball = res["ball"]
    for i, layer in enumerate(layers):
        chosen = next((pp for pp in P_GRID if float(ball[pp]["recall"][:calib, i].mean()) >= 0.99), P_GRID[-1])
        r = ball[chosen]
        out["calibrated"][layer] = {
            "p": chosen,
            "kept": float((r["kept"][calib:, i] / live[calib:, i]).mean()),
            "recall_mean": float(r["recall"][calib:, i].mean()),
            "recall_min": float(r["recall"][calib:, i].min()),
            "oracle99": float((res["oracle99"][calib:, i] / live[calib:, i]).mean()),
        }
    return out


def markdown(summaries: dict) -> str:
    S = ["## The budgeted estimate against the oracle, per layer\n",
         "topp(0.99) from each estimator of a block's mass: blocks kept (fraction of non-empty blocks), recall "
         "(true mass read; mean, min over steps and query heads, mean per query head), and the median ratio of the "
         "true skipped mass to the skipped mass the estimate believed (> 1: it thinks the dropped blocks lighter "
         "than they are). Oracle: the fewest blocks (sinks and window first) holding 99% of every row's mass, union "
         "over the KV group.\n"]
    for ctx, s in summaries.items():
        rows = []
        for name, e in s["estimators"].items():
            for i, layer in enumerate(s["layers"]):
                rows.append([ctx, layer, name, f"{100 * e['kept'][i]:.1f}%", f"{100 * s['oracle99'][i]:.1f}%",
                             f"{e['recall_mean'][i]:.4f}", f"{e['recall_min'][i]:.4f}",
                             " ".join(f"{x:.3f}" for x in e["recall_head"][i]), f"{e['skip_ratio_median'][i]:.2f}"])
        S.append(md_table(["context", "layer", "estimator", "blocks kept", "oracle 0.99", "recall mean",
                           "recall min", "recall per head", "true / estimated skipped mass"], rows) + "\n")
        rows = [[ctx, layer, c["p"], f"{100 * c['kept']:.1f}%", f"{100 * c['oracle99']:.1f}%",
                 f"{c['recall_mean']:.4f}", f"{c['recall_min']:.4f}"] for layer, c in s["calibrated"].items()]
        S.append(f"Per-layer calibration at {ctx} tokens (ball estimate; p chosen on the first {s['calib']} steps, "
                 "scored on the rest):\n\n" + md_table(["context", "layer", "p", "blocks kept", "oracle 0.99",
                                                        "recall mean", "recall min"], rows) + "\n")
    return "\n".join(S)


def passkey_capture(length: int, depth: float, key: str, chunk: int = 2048) -> dict:
    """Capture (``capture.capture_qkv``) of Gemma 3 270M's Hira layers on a passkey prompt of ``bench_quality`` and
    its answer; the answer's positions are the captured queries."""
    from bench_quality import passkey_prompt

    from hira.models import load_gemma3_270m

    model, tok = load_gemma3_270m(dtype=torch.float32)
    text = model.config.get_text_config(decoder=True)
    layers = [i for i, t in enumerate(text.layer_types) if t == "full_attention"]
    answer = tok(f" {key}. Remember", add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([passkey_prompt(tok, length - answer.shape[1], depth, key, chat=False), answer], dim=1)
    return capture_qkv(model, ids, q_last=answer.shape[1] + 1, layers=layers, chunk=chunk)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captures", type=Path, nargs="+", default=[])
    ap.add_argument("--passkey", nargs=2, metavar=("LENGTH,DEPTH", "KEY"), default=None,
                    help="capture a passkey case of Gemma 3 270M instead (see above)")
    ap.add_argument("--block-size", type=int, default=hira.HiraConfig().block_size)
    ap.add_argument("--calib", type=int, default=8, help="steps that calibrate the per-layer p")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="output path without suffix (.md and .json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.passkey:
        length, depth = args.passkey[0].split(",")
        caps = [(f"passkey {length} tokens, depth {depth}", passkey_capture(int(length), float(depth),
                                                                         args.passkey[1]))]
    else:
        caps = [(path.name, torch.load(path)) for path in args.captures]
    summaries = {}
    for name, cap in caps:
        N = cap["K"].shape[2]
        s = summarize(replay(cap, args.block_size), cap["layers"], args.calib)
        s["calib"] = args.calib
        summaries[N] = s
        print(f"{name}: {N} tokens done")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"block_size": args.block_size, "command": " ".join(sys.argv),
                                                         "results": summaries}, indent=1))
    md = markdown(summaries)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
