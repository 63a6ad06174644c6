#!/usr/bin/env python3
"""The eager decode step (no compile of the model) of SmolLM2-135M-Instruct: Hira against the unconverted model.

A ``--context``-token prompt of Austen is prefilled once per variant, then ``--steps`` single-token forwards of each
are timed, alternating between the variants step by step so that a busy machine slows both alike (teacher-forced on
the following text, so both run the same inputs), after ``--warmup`` untimed ones:

  - ``dense``: the unconverted model, transformers' DynamicCache, sdpa;
  - ``hira``: ``hira.convert`` with the default config and a HiraCache.

Prints ms per step (median of the timed steps) and the ratio; ``--out`` writes the table as markdown.

    python benchmarks/bench_eager.py --context 4096 --steps 32
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hira  # noqa: E402
from harness import md_table  # noqa: E402
from hira.models import load_smollm2  # noqa: E402

TEXT = Path(__file__).parents[1] / "examples" / "data" / "emma_passage.txt"
AUSTEN = Path(__file__).parents[2] / "shared" / "data" / "austen"


def text_ids(tokenizer, n: int) -> torch.Tensor:
    files = sorted(AUSTEN.glob("*.txt")) if AUSTEN.is_dir() else []
    text = "".join(p.read_text() for p in files) or TEXT.read_text() * 8
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise ValueError(f"the text has {ids.shape[1]} tokens, {n} asked")
    return ids


@torch.no_grad()
def step_ms(runs: list, ids: torch.Tensor, context: int, warmup: int, steps: int) -> list[float]:
    """runs: (model, cache) pairs. Median ms of a decode step of each, the variants alternating step by step."""
    for model, cache in runs:
        model(ids[:, :context], **{hira.CACHE_ARG: cache}, logits_to_keep=1)
    times = [[] for _ in runs]
    for t in range(context, context + warmup + steps):
        for (model, cache), out in zip(runs, times):
            start = time.perf_counter()
            model(ids[:, t : t + 1], **{hira.CACHE_ARG: cache})
            out.append(time.perf_counter() - start)
    return [1e3 * statistics.median(x[warmup:]) for x in times]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    converted, _ = load_smollm2()
    ids = text_ids(tokenizer, args.context + args.warmup + args.steps)
    config = hira.HiraConfig(max_cache_len=args.context + args.warmup + args.steps + 1)
    hira.convert(converted, config)
    cache = hira.HiraCache(converted.config, config)
    runs = [(model, DynamicCache(config=model.config)), (converted, cache)]
    dense, sparse = step_ms(runs, ids, args.context, args.warmup, args.steps)
    read = cache.summary()["read_fraction"]
    table = (
        f"# bench_eager: CPU ({torch.get_num_threads()} threads), {datetime.date.today()}, torch {torch.__version__}\n\n"
        f"`python {' '.join(sys.argv)}`\n\n"
        + md_table(["context", "dense ms/step", "hira ms/step", "ratio", "hira reads"],
                   [[args.context, f"{dense:.1f}", f"{sparse:.1f}", f"{sparse / dense:.2f}×", f"{100 * read:.0f}%"]])
        + "\n"
    )
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
