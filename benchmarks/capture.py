#!/usr/bin/env python3
"""Capture post-RoPE queries, keys and values of every attention layer of a transformers Llama-family model.

How: a custom attention function is registered in ``transformers.AttentionInterface`` (and the matching mask
function in ``AttentionMaskInterface``) under a private name; it records the ``query``, ``key``, ``value`` tensors the
attention module passes to it (these are post-RoPE, post any q/k norm, before GQA repetition) and then calls the
model's original attention function, so the forward pass is unchanged. The model's previous implementation is
restored afterwards. Works for any model whose attention modules follow the functional ``AttentionInterface``
route and carry ``layer_idx`` (Llama, Mistral, Qwen2/3, SmolLM2, ...).

    from benchmarks.capture import capture_qkv
    cap = capture_qkv(model, input_ids, q_last=32)     # dict: Q [L,T,Hq,D], K/V [L,Hkv,N,D], scaling, q_pos
    Q, K, V, scale, L, T, Hq, D, H, N, G, P, n_blocks = unpack_capture(cap, block_size=64)   # for a replay
    python3 benchmarks/capture.py --context 4096 --steps 32 --out /tmp/cap.pt   # SmolLM2 on the Emma passage

Shapes: L layers, T captured query positions (the last ``q_last`` of the sequence), Hq query heads, Hkv KV heads,
N sequence length, D head dim.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch

_NAME = "hira_capture"


class Replay(NamedTuple):
    """A capture laid out for replaying its T captured queries as decode steps after a prefix of P keys."""

    Q: torch.Tensor  # [L, T, Hq, D] post-RoPE queries of positions N-T..N-1
    K: torch.Tensor  # [L, H, N, D] post-RoPE keys (H = Hkv)
    V: torch.Tensor  # [L, H, N, D]
    scale: float  # the model's softmax scale
    L: int  # captured layers
    T: int  # captured queries: the replayed decode steps
    Hq: int
    D: int
    H: int  # KV heads
    N: int  # sequence length
    G: int  # query heads per KV head, Hq // H
    P: int  # keys before the first captured query, N - T: what the index is built over
    n_blocks: int  # blocks of the given size covering the P keys


def unpack_capture(cap: dict, block_size: int) -> Replay:
    """``capture_qkv``'s dict (or a saved one) as a ``Replay``: its tensors, scale and sizes, and the prefix that
    precedes the captured queries, in blocks of ``block_size``."""
    Q, K, V = cap["Q"], cap["K"], cap["V"]
    L, T, Hq, D = Q.shape
    H, N = K.shape[1], K.shape[2]
    P = N - T
    return Replay(Q, K, V, cap["scaling"], L, T, Hq, D, H, N, Hq // H, P, -(-P // block_size))


def capture_qkv(
    model, input_ids: torch.Tensor, q_last: int | None = None, dtype: torch.dtype = torch.float32,
    layers: list[int] | None = None, chunk: int = 0,
) -> dict:
    """One forward pass over ``input_ids`` [1, N]; returns the post-RoPE Q of the last ``q_last`` positions, all K, V.

    ``layers``: capture these layers only (default all; a sliding-window layer's K and V cover its window only when
    ``chunk`` is set, so capture full-attention layers then). ``chunk``: run the first N − q_last tokens in calls of
    at most ``chunk`` tokens through a ``DynamicCache`` and capture the last call (the q_last positions against the
    cached and new keys): the same attention without an N × N mask, which makes a 32K-token pass of a model with
    sliding-window layers affordable on a CPU.

    Returns a dict with
        Q: [L, T, Hq, D] (T = q_last or N) queries of positions N-T..N-1 (each attends keys 0..its position),
        K, V: [L, Hkv, N, D] post-RoPE keys and values,
        scaling: the softmax scale the model uses, q_pos: [T] int64 positions of the captured queries,
        layers: the captured layers' indices (L of them, in order).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, N], got {tuple(input_ids.shape)}")
    prev = model.config._attn_implementation
    base = prev if prev in ALL_ATTENTION_FUNCTIONS else "sdpa"
    inner = ALL_ATTENTION_FUNCTIONS[base]
    store: dict[int, tuple] = {}
    T = q_last or input_ids.shape[1]
    n_layers = model.config.num_hidden_layers
    wanted = set(range(n_layers) if layers is None else layers)
    recording = [not chunk]

    def attn_fn(module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise RuntimeError(f"{type(module).__name__} has no layer_idx: cannot attribute the capture")
        if recording[0] and int(layer) in wanted:
            store[int(layer)] = (
                query[0, :, -T:].transpose(0, 1).detach().to(dtype).clone(),  # [T, Hq, D]
                key[0].detach().to(dtype).clone(),  # [Hkv, N, D]
                value[0].detach().to(dtype).clone(),
                kwargs.get("scaling", getattr(module, "scaling", None)),
            )
        return inner(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_NAME, attn_fn)
    AttentionMaskInterface.register(_NAME, ALL_MASK_ATTENTION_FUNCTIONS[base])
    try:
        model.set_attn_implementation(_NAME)
        with torch.no_grad():
            if chunk:
                from transformers import DynamicCache

                from hira.compat import CACHE_ARG  # the cache argument's name in the installed transformers

                cache = {CACHE_ARG: DynamicCache(config=model.config)}
                N = input_ids.shape[1]
                for start in range(0, N - T, chunk):
                    model(input_ids=input_ids[:, start : min(start + chunk, N - T)], **cache, logits_to_keep=1)
                recording[0] = True
                model(input_ids=input_ids[:, N - T :], **cache, logits_to_keep=1)
            else:
                model(input_ids=input_ids, use_cache=False)
    finally:
        model.set_attn_implementation(prev)
    order = sorted(wanted)
    missing = [i for i in order if i not in store]
    if missing:
        raise RuntimeError(f"no attention call was captured for layers {missing}")
    Q, K, V, sc = zip(*(store[i] for i in order))
    N = input_ids.shape[1]
    return {
        "Q": torch.stack(Q),
        "K": torch.stack(K),
        "V": torch.stack(V),
        "scaling": float(sc[0]) if sc[0] is not None else Q[0].shape[-1] ** -0.5,
        "q_pos": torch.arange(N - T, N),
        "layers": order,
    }


def tokenize_text(tokenizer, path: str | Path, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of a text file, [1, n_tokens] int64 (raises if the text is too short)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"{path} has only {ids.shape[1]} tokens, {n_tokens} asked")
    return ids[:, :n_tokens]


def capture_smollm2(text: str | Path, context: int, steps: int) -> dict:
    """Capture SmolLM2-135M-Instruct (offline loader ``hira.models.load_smollm2``) on the first ``context`` tokens."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from hira.models import load_smollm2

    model, tok = load_smollm2(dtype=torch.float32)
    ids = tokenize_text(tok, text, context)
    return capture_qkv(model, ids, q_last=steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "..", "examples", "data", "emma_passage.txt"))
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cap = capture_smollm2(a.text, a.context, a.steps)
    torch.save(cap, a.out)
    print({k: tuple(v.shape) if torch.is_tensor(v) else v for k, v in cap.items()})


if __name__ == "__main__":
    main()
